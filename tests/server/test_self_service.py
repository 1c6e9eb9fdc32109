"""Self-service names end to end (docs/routing.md#self-service): a tun2g client claims, serves, reconnects to the
same name; hostile claims (a flood, a label of the client's choosing); a Go client against such a server."""

import json
import re

import pytest
import requests

from tests.fixtures.tunnel import DOMAIN, USER, wait_until
from tests.server.test_auth import _handshake as raw_handshake
from tun2g.client import AuthRejected
from tun2g.control import Auth, parse_auth
from tun2g.errors import ConfigurationError
from tun2g.server.self_service import public_url_template, public_urls
from tun2g.server.server import ServerConfig
from tun2g.storage import SQLiteStorage

BASE = "tun.test"
CLAIMED = re.compile(r"[a-z2-7]{10}\.tun\.test")


@pytest.fixture
def self_service(plain_deployment):
    plain_deployment.server.config.self_service_domain = BASE
    plain_deployment.server.config.self_service_limit = 3
    plain_deployment.server.config.public_url = "http://{domain}:8080"
    return plain_deployment


def _handshake(deployment, auth: dict) -> dict | None:
    return raw_handshake(deployment, json.dumps(auth).encode())


def test_a_claiming_client_serves_a_random_name_and_keeps_it_across_reconnects(self_service, backend, start_client):
    url, _app = backend
    _info, token = self_service.storage.create_token(USER)
    claimed = []
    client = start_client(self_service.client_config(token, url, domain="", claim=True), on_claim=claimed.append)
    name = client.client.config.domain
    assert CLAIMED.fullmatch(name) and claimed == [name]
    assert client.client.public_urls == [f"http://{name}:8080"]
    assert self_service.storage.has_route(name) == USER
    assert requests.get(self_service.http_url + "/", headers={"Host": name}, timeout=10).status_code == 200
    first = self_service.server.get_all_backends()[0].id
    client.connected.clear()
    self_service.server.kill_backend(first)
    client.wait_connected()
    assert client.client.config.domain == name and claimed == [name], "a reconnect serves the same name"
    assert [b.domain for b in self_service.server.get_all_backends()] == [name]
    assert self_service.storage.claimed_routes(BASE, USER) == [name]


def test_a_label_chosen_by_the_client_is_ignored(self_service):
    _info, token = self_service.storage.create_token(USER)
    for auth in ({"token": token, "domain": "chosen.tun.test", "claim": 1},
                 {"token": token, "domain": "", "claim": "chosen.tun.test"},
                 {"token": token, "domain": "", "claim": {"label": "chosen"}}):
        reply = _handshake(self_service, auth)
        assert reply["ok"] is True and CLAIMED.fullmatch(reply["domain"]) and "chosen" not in reply["domain"]
    assert all("chosen" not in route.domain for route in self_service.storage.list_routes())


def test_a_claim_flood_by_one_token_holds_the_limit_and_nothing_grows(self_service):
    _info, token = self_service.storage.create_token(USER)
    replies = [_handshake(self_service, {"token": token, "domain": "", "claim": 1}) for _ in range(40)]
    granted = [reply["domain"] for reply in replies if reply["ok"]]
    assert len(granted) == 3 == len(set(granted))
    refused = [reply for reply in replies if not reply["ok"]]
    assert not refused[0].get("retry"), "the limit is permanent: a client must not retry it"
    assert "limit of this server (3)" in refused[0]["error"] and "tun2g route rm" in refused[0]["error"]
    assert len(self_service.storage.list_routes()) == 3
    raw = self_service.storage._run(lambda db: db.execute("SELECT count(*) FROM claims").fetchone()[0])
    assert raw == 3


def test_a_refusal_for_now_uses_up_no_name(self_service, backend, start_client):
    """The session cap and a draining server are checked before the claim: a retrying client burns no names."""
    url, _app = backend
    _info, token = self_service.storage.create_token(USER)
    self_service.server.config.max_sessions_per_token = 1
    start_client(self_service.client_config(token, url, domain="", claim=True))
    capped = _handshake(self_service, {"token": token, "domain": "", "claim": 1})
    assert capped["ok"] is False and capped["retry"] is True and "too many tunnels" in capped["error"]
    _info, other = self_service.storage.create_token("other")
    self_service.server.draining = True
    stopping = _handshake(self_service, {"token": other, "domain": "", "claim": 1})
    assert stopping["ok"] is False and stopping["retry"] is True and "stopping" in stopping["error"]
    assert len(self_service.storage.list_routes()) == 1


def test_an_unknown_token_claims_nothing_and_learns_nothing(self_service):
    reply = _handshake(self_service, {"token": "forged", "domain": "", "claim": 1})
    assert reply == {"ok": False, "error": "invalid token"}
    assert self_service.storage.list_routes() == []


def test_a_server_without_self_service_refuses_a_claim_for_good(plain_deployment, backend, start_client):
    url, _app = backend
    _info, token = plain_deployment.storage.create_token(USER)
    client = start_client(plain_deployment.client_config(token, url, domain="", claim=True), wait=False)
    assert client.rejected.wait(10)
    assert isinstance(client.error, AuthRejected) and "--domain NAME" in str(client.error)
    assert plain_deployment.storage.list_routes() == []


def test_a_client_at_the_limit_is_refused_and_stops(self_service, backend, start_client):
    url, _app = backend
    _info, token = self_service.storage.create_token(USER)
    self_service.server.config.self_service_limit = 1
    start_client(self_service.client_config(token, url, domain="", claim=True))
    second = start_client(self_service.client_config(token, url, domain="", claim=True), wait=False)
    assert second.rejected.wait(10)
    assert "limit of this server (1)" in str(second.error)


def test_a_go_client_is_served_by_a_self_service_server(self_service, backend, go_peer):
    url, _app = backend
    token = self_service.grant()
    go_peer("tun2client", "--server", self_service.tunnel_addr, "--token", token, "--domain", DOMAIN,
            "--backend", url).wait_for(r"AUTH-SENT")
    wait_until(lambda: len(self_service.server.get_all_backends()) == 1, message="the Go client to register")
    response = requests.get(self_service.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
    assert response.text == "hello from backend\n"
    assert [r.domain for r in self_service.storage.list_routes()] == [DOMAIN], "a Go client never claims"


# -- pure parts -----------------------------------------------------------------------------------------

@pytest.mark.pure
def test_the_claim_field_round_trips_and_a_go_auth_has_none():
    assert b'"claim":1' in Auth("t", "", claim=True).encode()
    assert b"claim" not in Auth("t", "app.test").encode()
    assert parse_auth({"token": "t", "domain": ""}).claim is False
    assert parse_auth({"token": "t", "domain": "", "claim": 0}).claim is False
    assert parse_auth({"token": "t", "domain": "x", "claim": "label"}).claim is True


@pytest.mark.pure
@pytest.mark.parametrize("given, template", [
    ("https://{domain}", "https://{domain}"),
    ("https://{domain}:8443", "https://{domain}:8443"),
    ("https://tunnels.example.com", "https://{domain}"),
    ("https://tunnels.example.com/", "https://{domain}"),
    ("http://localhost:8080", "http://{domain}:8080"),
])
def test_public_url_takes_a_template_or_a_bare_base(given, template):
    assert public_url_template(given) == template


@pytest.mark.pure
@pytest.mark.parametrize("given", ["ftp://x", "tunnels.example.com", "https://x/path", "https://x?q", "https://",
                                   "https://u:p@x", "https://x:99999", "{domain}"])
def test_public_url_refuses_what_is_neither(given):
    with pytest.raises(ValueError):
        public_url_template(given)


@pytest.mark.pure
def test_every_route_gets_its_url():
    assert public_urls("https://{domain}", ("a.test", "b.test/api")) == ["https://a.test", "https://b.test/api"]
    assert public_urls(None, ("a.test",)) == []


@pytest.mark.pure
@pytest.mark.parametrize("settings", [{"self_service_domain": "com"}, {"self_service_domain": "a b"},
                                      {"self_service_limit": 0}, {"public_url": "ftp://x"}])
def test_server_config_refuses_bad_self_service_settings(settings):
    with pytest.raises(ConfigurationError):
        ServerConfig(storage=SQLiteStorage(":memory:"), **settings)


def test_claims_through_a_redis_backed_server_hold_the_limit(tmp_path, data_dir, redis_server):
    import redis

    from tun2g.server.process import ServerSetup

    setup = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0", admin_addr=None, plain_tunnel=True,
                        storage_url=redis_server.url, access_log=False, log_level="warning",
                        self_service_domain=BASE, self_service_limit=2)
    running = setup.start()
    try:
        _info, token = running.server.storage.create_token(USER)
        deployment = type("Node", (), {"running": running})()
        replies = [_handshake(deployment, {"token": token, "domain": "", "claim": 1}) for _ in range(10)]
        granted = sorted(reply["domain"] for reply in replies if reply["ok"])
        assert len(granted) == 2 and all(CLAIMED.fullmatch(name) for name in granted)
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        assert raw.keys("tun2g:claims:*") == [f"tun2g:claims:{BASE}:{USER}"]
        assert sorted(raw.smembers(f"tun2g:claims:{BASE}:{USER}")) == granted
        assert sorted(raw.smembers("tun2g:routes")) == granted, "refused claims left nothing behind"
    finally:
        running.stop()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_claim_handshake_latency_with_2000_names(kind, tmp_path, data_dir, request):
    """The figure in docs/routing.md#self-service: Auth to reply for a claim among 2,000 names under the base
    (the new name goes into the routing table directly: no reload of every route)."""
    import time

    from tests.storage.test_claims import BASE as STORE_BASE, _fill
    from tun2g.server.process import ServerSetup

    url = f"sqlite:///{tmp_path}/store.sqlite3" if kind == "sqlite" else request.getfixturevalue("redis_server").url
    running = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0", admin_addr=None, plain_tunnel=True,
                          storage_url=url, access_log=False, log_level="warning", self_service_domain=STORE_BASE,
                          self_service_limit=3).start()
    try:
        _fill(running.server.storage, 2000)
        node = type("Node", (), {"running": running})()
        timings = []
        for index in range(20):
            _info, token = running.server.storage.create_token(f"user{index}")
            started = time.perf_counter()
            reply = _handshake(node, {"token": token, "domain": "", "claim": 1})
            timings.append(time.perf_counter() - started)
            assert reply["ok"] and running.server.router.knows(reply["domain"])
        timings.sort()
        print(f"claim handshake on {kind} with 2000 names: median {timings[10] * 1000:.1f} ms, "
              f"max {timings[-1] * 1000:.1f} ms")
        assert timings[10] < 1.0, "generous: a loaded 2-core machine; measured 4-7 ms"
    finally:
        running.stop()
