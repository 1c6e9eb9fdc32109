"""Multi-homed clients: sessions on K nodes at once, learnt from the auth reply; a node's death loses no GET."""

from __future__ import annotations

import subprocess
import sys
import time

import gevent
import pytest
import requests

from tests.fixtures.cluster import commands_seen
from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.client.client import _cluster_view
from tun2g.client.multi import MultiClient
from tun2g.storage import RedisStorage

DOMAIN = "multi.test"


@pytest.mark.pure
def test_a_hostile_node_list_is_bounded_and_malformed_entries_dropped():
    nodes = [{"node": f"n{i}", "tunnel": f"127.0.0.1:{i}"} for i in range(10_000)]
    node, view = _cluster_view({"ok": True, "node": "n1", "nodes": nodes + ["x", {"node": 1}]})
    assert node == "n1" and len(view) == 64
    assert _cluster_view({"ok": True, "node": ["n"], "nodes": {"a": "b"}}) == (None, {})
    assert _cluster_view({"ok": True, "nodes": [{"node": "a", "tunnel": "x" * 1000}]}) == (None, {})


@pytest.fixture
def multi(cluster_node, backend, redis_server):
    """Three in-process nodes on the test's Redis and a factory of running MultiClients for multi.test."""
    nodes = [cluster_node(f"m{i}") for i in (1, 2, 3)]
    storage = nodes[0].server.storage
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    backend_url, _app = backend
    running = []

    def start(entry, sessions=None) -> MultiClient:
        config = ClientConfig(server_addr=entry.tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                              plain=True, backoff_initial=0.05, backoff_max=0.3)
        client = MultiClient(config, sessions=sessions)
        running.append((client, gevent.spawn(client.run)))
        return client

    yield nodes, start
    for client, greenlet in running:
        client.close()
        greenlet.join(5)


def test_with_k_equal_n_every_node_has_a_session_and_no_request_crosses_nodes(multi, redis_server):
    nodes, start = multi
    client = start(nodes[1], sessions=3)
    wait_until(lambda: client.connected_nodes() == ["m1", "m2", "m3"], timeout=10,
               message="sessions on all three nodes")
    with commands_seen(redis_server.url) as commands:
        for _ in range(10):
            for node in nodes:
                response = requests.get(node.http_url + "/", headers={"Host": DOMAIN}, timeout=5)
                assert response.status_code == 200
    # No node asked the registry where multi.test is: each served it from its own session. (Other
    # commands may run meanwhile: the last session's takeover call to the other nodes is asynchronous.)
    assert not [command for command in commands if command.startswith(f"ZRANGEBYSCORE tun2g:domain:{DOMAIN} ")]


def test_the_default_is_two_sessions_on_two_nodes_and_a_stopped_node_is_replaced(multi):
    nodes, start = multi
    client = start(nodes[0])
    wait_until(lambda: len(client.connected_nodes()) == 2, timeout=10, message="two sessions")
    assert "m1" in client.connected_nodes()
    other = next(n for n in nodes if n.server.config.node_id == [x for x in client.connected_nodes() if x != "m1"][0])
    other.running.stop()
    wait_until(lambda: len(client.connected_nodes()) == 2 and other.server.config.node_id not in
               client.connected_nodes(), timeout=10, message="a session on the third node instead")
    assert len(set(client.connected_nodes())) == 2  # never two sessions on one node


def trace_sessions(client: MultiClient, served_on: dict[str, str]) -> None:
    """Note in `served_on` which node's session each request target reached (when it began there), for
    every session the client holds now and opens later."""

    def trace(session) -> None:
        if getattr(session, "_traced", False):
            return
        session._traced = True
        session.set_on_request(lambda served: None)  # an observer, whose begin() we wrap
        begin = session._observer.begin

        def traced(head, stream_id=None):
            served_on.setdefault(head.target, session.node_id or "?")
            return begin(head, stream_id)

        session._observer.begin = traced

    trace(client.entry)
    add = client._add

    def traced_add(node_id: str, address: str) -> None:
        add(node_id, address)
        trace(client.extra[node_id])

    client._add = traced_add  # type: ignore[method-assign]
    for session in client.extra.values():
        trace(session)


def hop_failures(nodes) -> dict[str, str]:
    """{request id: the node a forwarded request was in flight to when that hop broke}, from the nodes' logs."""
    failures = {}
    for node in nodes:
        for line in node.log().splitlines():
            if "event=hop_failed_page" in line:
                fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
                failures[fields.get("request_id", "")] = fields.get("node", "")
    return failures


def test_sigkill_of_a_node_fails_no_get_and_only_posts_in_flight_there(node_processes, haproxy, backend,
                                                                        redis_server):
    """3 node processes behind HAProxy, one client with K = 2: SIGKILL one of its nodes under GET and POST
    load. No GET fails; a POST fails only if it was in flight on the dead node when it died (HAProxy had sent
    it there, or it was being served by that node's session)."""
    nodes = node_processes(3, ttl=2.0)
    balancer = haproxy([node.http_port for node in nodes])
    storage = RedisStorage(redis_server.url)
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    config = ClientConfig(server_addr=nodes[0].tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                          plain=True, backoff_initial=0.05, backoff_max=0.3)
    client = MultiClient(config, sessions=2)
    served_on: dict[str, str] = {}
    trace_sessions(client, served_on)
    runner = gevent.spawn(client.run)
    statuses: list[int] = []
    posts: dict[str, tuple[float, float, int]] = {}  # target -> (sent, answered, status; -1: no answer)
    stop = gevent.event.Event()

    def get_loop() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                statuses.append(session.get(balancer.url + "/", headers={"Host": DOMAIN}, timeout=10).status_code)
            except requests.RequestException:
                statuses.append(-1)

    def post_loop(worker: int) -> None:
        session = requests.Session()
        count = 0
        while not stop.is_set():
            count += 1
            target = f"/sink?post={worker}-{count}"
            sent = time.monotonic()
            try:
                status = session.post(balancer.url + target, data=b"x" * 2048, timeout=10,
                                      headers={"Host": DOMAIN, "X-Request-Id": f"post-{worker}-{count}"}).status_code
            except requests.RequestException:
                status = -1
            posts[target] = (sent, time.monotonic(), status)

    try:
        wait_until(lambda: len(client.connected_nodes()) == 2, timeout=10, message="two sessions")
        wait_until(lambda: all(requests.get(n.url + "/", headers={"Host": DOMAIN}, timeout=5).status_code == 200
                               for n in nodes), timeout=10, message="every node serving the domain")
        workers = [gevent.spawn(get_loop) for _ in range(3)] + [gevent.spawn(post_loop, i) for i in range(2)]
        wait_until(lambda: len(statuses) > 50 and len(posts) > 20, message="traffic flowing")
        victim = next(n for n in nodes if n.node_id == client.connected_nodes()[-1])
        kill_started = time.monotonic()
        victim.kill()
        killed_at, killed_count = time.monotonic(), len(statuses)
        wait_until(lambda: len(client.connected_nodes()) == 2 and victim.node_id not in client.connected_nodes(),
                   timeout=10, message="the client holding two sessions again, off the dead node")
        wait_until(lambda: len(statuses) > killed_count + 200, timeout=20, message="traffic after the kill")
        stop.set()
        gevent.joinall(workers, timeout=15)
    finally:
        stop.set()
        client.close()
        runner.join(5)
    failed = [status for status in statuses if status != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} GETs failed: {sorted(set(failed))}"
    balancer.stop()  # its log is complete once it has stopped
    entered = balancer.sent_to("POST", "/sink")
    forwarded_to = hop_failures([node for node in nodes if node is not victim])
    failed_posts = {target: result for target, result in posts.items() if result[2] != 200}
    for target, (sent, answered, status) in failed_posts.items():
        request_id = "post-" + target.rsplit("=", 1)[1]
        where = (entered.get(target), served_on.get(target), forwarded_to.get(request_id))
        # In flight when the node died, and on it: it was traced there, or seen by no live node or session at
        # all (HAProxy logs no server for a request cut on a node that died under it).
        on_victim = victim.node_id in where or where == (None, None, None)
        assert on_victim and sent <= killed_at and answered >= kill_started, \
            f"POST {target} failed ({status}) without being in flight on the dead node {victim.node_id}: " \
            f"HAProxy sent it to {where[0]}, forwarded to {where[2]}, the session on {where[1]} got it"
    print(f"{len(statuses)} GETs, none failed; {len(posts)} POSTs, {len(failed_posts)} failed, all in flight on "
          f"{victim.node_id}")


def test_a_bad_advertise_tunnel_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", "server", "--advertise-tunnel", "no-port-here"],
                            capture_output=True, text=True, timeout=30, env=env_without_proxies())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--advertise-tunnel" in result.stderr, result.stderr


def test_a_claiming_client_holds_every_session_on_its_one_claimed_name(cluster_node, backend):
    """docs/routing.md#self-service: the entry session claims; the sessions on other nodes serve that name."""
    nodes = [cluster_node(f"s{i}", self_service_domain="tun.test") for i in (1, 2)]
    storage = nodes[0].server.storage
    _info, token = storage.create_token("alice")
    backend_url, _app = backend
    config = ClientConfig(server_addr=nodes[0].tunnel_addr, token=token, domain="", claim=True,
                          backend_url=backend_url, plain=True, backoff_initial=0.05, backoff_max=0.3)
    claimed: list[str] = []
    client = MultiClient(config, sessions=2, on_claim=claimed.append)
    greenlet = gevent.spawn(client.run)
    try:
        wait_until(lambda: client.connected_nodes() == ["s1", "s2"], timeout=10, message="sessions on both nodes")
        assert len(claimed) == 1 and storage.claimed_routes("tun.test", "alice") == claimed
        assert {c.config.domain for c in client.clients} == set(claimed)
        for node in nodes:
            response = requests.get(node.http_url + "/", headers={"Host": claimed[0]}, timeout=5)
            assert response.status_code == 200
    finally:
        client.close()
        greenlet.join(5)
