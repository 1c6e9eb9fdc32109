"""Revoking a token or removing a route ends its live tunnels within a second: one server on SQLite, two nodes on Redis.

Real processes throughout: `tun2g server` processes, the `tun2g token revoke` /
`tun2g route rm` commands as an operator runs them, and a tunnel client that
reconnects and must then be refused.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from tests.fixtures.cluster import NodeProcess
from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.storage import open_storage

DOMAIN = "app.test"
PROMPT = 1.0  # seconds from the command's exit to the tunnel's disconnection, on every node


def tun2g(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", *args], capture_output=True, text=True, timeout=30,
                            env=env_without_proxies())
    assert result.returncode == 0, result.stderr


def backends(node) -> list[dict]:
    return requests.get(node.admin_url + "/backends", headers=node.admin_headers, timeout=5).json()


def local_backends(node) -> list[dict]:
    return [b for b in backends(node) if b["node"] == node.node_id]


def grant(storage_url: str, domain: str = DOMAIN) -> tuple[str, str]:
    storage = open_storage(storage_url)
    try:
        storage.add_route(domain, "alice")
        info, secret = storage.create_token("alice")
    finally:
        storage.close()
    return info.id, secret


def connect(start_client, node, token: str, backend_url: str, domain: str = DOMAIN):
    return start_client(ClientConfig(server_addr=node.tunnel_addr, token=token, domain=domain,
                                     backend_url=backend_url, plain=True, backoff_initial=0.05, backoff_max=0.3))


def seconds_until_gone(nodes, started: float) -> float:
    wait_until(lambda: all(backends(node) == [] for node in nodes), timeout=5, interval=0.01,
               message="the revoked tunnel leaving every node's backend list")
    took = time.monotonic() - started
    print(f"revoke-to-disconnect: {took:.3f} s")
    return took


@pytest.fixture
def sqlite_server(tmp_path):
    """One `tun2g server` process on a SQLite file; yields (node, storage URL)."""
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    node = NodeProcess("solo", url, tmp_path)
    try:
        yield node.wait_ready(), url
    finally:
        node.stop()


@pytest.mark.parametrize("how", ["token revoke", "route rm"])
def test_on_sqlite_the_cli_ends_a_live_tunnel_within_a_second(sqlite_server, backend, start_client, how):
    node, url = sqlite_server
    token_id, token = grant(url)
    backend_url, _app = backend
    client = connect(start_client, node, token, backend_url)
    assert requests.get(node.url, headers={"Host": DOMAIN}, timeout=5).status_code == 200
    command = ("token", "revoke", token_id) if how == "token revoke" else ("route", "rm", DOMAIN)
    tun2g(*command, "--storage", url)
    took = seconds_until_gone([node], time.monotonic())
    assert took < PROMPT, f"{how}: tunnel still listed {took:.2f} s after the command"
    assert client.rejected.wait(5), "the client, reconnecting, was not refused"
    assert "invalid token" in str(client.error) or "no route" in str(client.error)  # revoked: told no more
    assert requests.get(node.url, headers={"Host": DOMAIN}, timeout=5).status_code == 502
    assert "tunnel_revoked" in node.log()


def test_other_tokens_and_routes_keep_their_tunnels(sqlite_server, backend, start_client):
    node, url = sqlite_server
    revoked_id, revoked = grant(url)
    _kept_id, kept = grant(url, "other.test")
    backend_url, _app = backend
    connect(start_client, node, revoked, backend_url)
    connect(start_client, node, kept, backend_url, "other.test")
    tun2g("token", "revoke", revoked_id, "--storage", url)
    wait_until(lambda: [b["domain"] for b in backends(node)] == ["other.test"], timeout=5,
               message="only the revoked token's tunnel leaving")
    assert requests.get(node.url, headers={"Host": "other.test"}, timeout=5).status_code == 200


@pytest.mark.parametrize("how", ["token revoke", "route rm"])
def test_on_redis_every_node_drops_the_tunnel_within_a_second(redis_server, node_processes, backend, start_client,
                                                             how):
    n1, n2 = node_processes(2)
    token_id, token = grant(redis_server.url)
    backend_url, _app = backend
    client = connect(start_client, n1, token, backend_url)
    wait_until(lambda: [b["node"] for b in backends(n2)] == ["n1"], message="n2 seeing n1's tunnel")
    assert requests.get(n2.url, headers={"Host": DOMAIN}, timeout=5).status_code == 200
    command = ("token", "revoke", token_id) if how == "token revoke" else ("route", "rm", DOMAIN)
    tun2g(*command, "--storage", redis_server.url)
    took = seconds_until_gone([n1, n2], time.monotonic())
    assert took < PROMPT, f"{how}: tunnel still listed {took:.2f} s after the command"
    assert client.rejected.wait(5), "the client, reconnecting, was not refused"
    for node in (n1, n2):
        assert requests.get(node.url, headers={"Host": DOMAIN}, timeout=5).status_code == 502


def test_a_tunnel_on_the_other_node_of_the_same_token_goes_too(redis_server, node_processes, backend, start_client):
    n1, n2 = node_processes(2)
    token_id, token = grant(redis_server.url)
    backend_url, _app = backend
    connect(start_client, n1, token, backend_url)
    connect(start_client, n2, token, backend_url)
    wait_until(lambda: sorted(b["node"] for b in backends(n1)) == ["n1", "n2"], message="both tunnels listed")
    tun2g("token", "revoke", token_id, "--storage", redis_server.url)
    took = seconds_until_gone([n1, n2], time.monotonic())
    assert took < PROMPT
    assert local_backends(n1) == local_backends(n2) == []


class _Store:
    """A store whose revision and contents the test sets."""

    def __init__(self) -> None:
        self.rev, self.tokens, self.routes = "3", {"secret": ("alice", ["connect"])}, {DOMAIN: "alice"}

    def revision(self) -> str:
        return self.rev

    def has_token(self, token):
        try:
            return self.tokens[token]
        except KeyError:
            raise LookupError(token) from None

    def has_route(self, domain):
        try:
            return self.routes[domain]
        except KeyError:
            raise LookupError(domain) from None


class _Tunnel:
    def __init__(self) -> None:
        from tun2g.control import Auth

        self.auth, self.domain, self.revision, self.is_closed = Auth(token="secret", domain=DOMAIN), DOMAIN, None, False
        self.token_hash = "ab" * 32

    def log_fields(self) -> dict:
        return {}


def test_a_store_that_comes_back_empty_is_not_a_revocation():
    from tun2g.server.revocation import RevocationWatch

    store, tunnel, cut = _Store(), _Tunnel(), []
    watch = RevocationWatch(store, lambda: [tunnel], lambda t, reason: cut.append(reason))
    assert watch.check() == 0 and tunnel.revision == "3"  # the baseline
    store.tokens, store.routes, store.rev = {}, {}, "0"  # Redis restarted without its data
    assert watch.check() == 0 and cut == [] and tunnel.revision == "0"
    store.rev = "1"  # a real revocation afterwards is acted on
    assert watch.check() == 1 and "no route" in cut[0]


def test_an_unchanged_revision_scans_no_tunnel():
    from tun2g.server.revocation import RevocationWatch

    store, tunnel, scans = _Store(), _Tunnel(), []
    watch = RevocationWatch(store, lambda: scans.append(1) or [tunnel], lambda t, reason: None)
    watch.check()  # the baseline
    before = len(scans)
    for _ in range(5):
        assert watch.check() == 0
    assert len(scans) == before
    store.rev = "4"  # moved: scanned once
    watch.check()
    assert len(scans) == before + 1


def test_a_tunnel_that_registers_under_an_older_revision_is_checked_at_the_next_tick():
    from tun2g.server.revocation import RevocationWatch

    store, cut, tunnels = _Store(), [], []
    watch = RevocationWatch(store, lambda: tunnels, lambda t, reason: cut.append(reason))
    watch.check()  # baseline "3"
    late = _Tunnel()
    late.revision = watch.revision  # its Auth check starts under "3" ...
    store.tokens, store.rev = {}, "4"  # ... a revocation lands meanwhile ...
    assert watch.check() == 0  # ... and the tick reads "4" before the tunnel registers
    tunnels.append(late)
    watch.registered(late)
    assert watch.check() == 1 and cut  # same revision, but the late tunnel is checked
    assert watch.check() == 0
