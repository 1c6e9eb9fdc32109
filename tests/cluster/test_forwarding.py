"""Several nodes on one Redis, in this process: a request reaches its backend from any node, once."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest
import requests

from tests.fixtures.backends import pattern_bytes
from tests.fixtures.cluster import CLUSTER_SECRET
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cluster.hop import HOP_HEADER, sign


def get(node, path="/", host=DOMAIN, **kwargs):
    headers = {"Host": host, **kwargs.pop("headers", {})}
    return requests.get(node.http_url + path, headers=headers, timeout=10, **kwargs)


@pytest.fixture
def two_nodes(cluster_node, backend, start_client):
    """Nodes a and b; a tunnel client for app.test on a only."""
    a, b = cluster_node("a"), cluster_node("b")
    url, app = backend
    client = start_client(a.client_config(a.grant(), url))
    wait_until(lambda: [x.node for x in b.server.get_all_backends()] == ["a"], message="a's backend listed on b")
    return a, b, app, client


def test_a_request_on_a_node_without_the_backend_is_forwarded_once(two_nodes):
    a, b, app, _client = two_nodes
    response = get(b, "/headers", headers={"X-Forwarded-For": "203.0.113.7"})
    assert response.status_code == 200
    seen = response.json()["headers"]
    direct = get(a, "/headers", headers={"X-Forwarded-For": "203.0.113.7"}).json()["headers"]
    assert seen["X-Forwarded-For"] == direct["X-Forwarded-For"]  # b added the public peer; a added nothing
    assert HOP_HEADER.title() not in seen and "X-Tun2G-Hop" not in seen
    assert response.headers["X-Request-Id"] == seen["X-Request-Id"]
    assert get(a).text == get(b).text == "hello from backend\n"


def test_bodies_stream_through_the_hop_both_ways(two_nodes):
    _a, b, _app, _client = two_nodes
    size = 8 * 1024 * 1024
    upload = requests.post(b.http_url + "/sink", data=pattern_bytes(size), headers={"Host": DOMAIN}, timeout=30)
    expected = hashlib.sha256(b"".join(pattern_bytes(size))).hexdigest()
    assert upload.json() == {"sha256": expected, "length": size}
    download = get(b, f"/chunked/{size}")
    assert hashlib.sha256(download.content).hexdigest() == expected


def test_a_forged_hop_is_refused(two_nodes):
    a, b, _app, _client = two_nodes
    for node, other in ((a, "b"), (b, "a")):
        forged = sign(b"guessed-secret", origin=other, to=node.server.config.node_id,
                      timestamp=int(time.time() * 1000), method="GET", host=DOMAIN, target="/", request_id="r1",
                      forwarded_for="10.0.0.1")
        response = get(node, headers={HOP_HEADER: forged, "X-Request-Id": "r1", "X-Forwarded-For": "10.0.0.1"})
        assert response.status_code == 403
        assert "signature" in response.text


def test_a_valid_hop_is_never_forwarded_again(two_nodes):
    _a, b, _app, _client = two_nodes
    hop = sign(CLUSTER_SECRET.encode(), origin="a", to="b", timestamp=int(time.time() * 1000), method="GET",
               host=DOMAIN, target="/", request_id="r2", forwarded_for="10.0.0.1")
    response = get(b, headers={HOP_HEADER: hop, "X-Request-Id": "r2", "X-Forwarded-For": "10.0.0.1"})
    assert response.status_code == 502  # b holds no backend and must not bounce it on to a
    assert "no backends connected" in response.text


def test_the_backend_list_and_kill_work_from_any_node(two_nodes):
    a, b, _app, client = two_nodes
    listed = requests.get(b.admin_url + "/backends", headers=b.admin_headers, timeout=5).json()
    assert [(x["node"], x["domain"]) for x in listed] == [("a", DOMAIN)]
    first_id = listed[0]["id"]
    assert requests.post(f"{b.admin_url}/backends/{first_id}/kill", json={}, headers=b.admin_headers,
                         timeout=5).status_code == 200
    wait_until(lambda: first_id not in {x.id for x in a.server.get_all_backends()}, message="a dropping it")
    assert requests.post(f"{b.admin_url}/backends/nope/kill", json={}, headers=b.admin_headers,
                         timeout=5).status_code == 404


def test_a_node_that_stops_takes_its_backends_out_and_others_answer_502(two_nodes):
    a, b, _app, _client = two_nodes
    a.running.stop()
    wait_until(lambda: b.server.get_all_backends() == [], timeout=3, message="a's records gone")
    response = get(b)
    assert response.status_code == 502 and "no backends connected" in response.text


def test_a_tunnel_client_can_connect_by_upgrade_on_the_public_port(cluster_node, backend, start_client):
    a, b = cluster_node("a", tunnel_addr="none"), cluster_node("b")
    assert a.running.tunnel_address is None
    url, _app = backend
    config = b.client_config(a.grant(), url, server_addr=a.http_url, conn_type="upgrade", plain=True)
    start_client(config)
    assert [x.proto for x in a.server.get_all_backends()] == ["upgrade"]
    assert get(a).text == "hello from backend\n"
    wait_until(lambda: get(b).status_code == 200, message="b forwarding to a's upgrade tunnel")


def test_a_plain_request_for_the_tunnel_path_is_not_an_upgrade(cluster_node):
    a = cluster_node("a")
    with socket.create_connection(("127.0.0.1", a.running.http_address[1]), timeout=5) as sock:
        sock.sendall(b"GET /_tun2g/tunnel HTTP/1.1\r\nHost: other.test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 502")


def test_redis_down_local_backends_keep_working_remote_ones_get_503(two_nodes, redis_server):
    a, b, _app, _client = two_nodes
    redis_server.stop()
    assert get(a).status_code == 200
    wait_until(lambda: get(b, host="elsewhere.test").status_code == 503, timeout=5, message="b answering 503")
    response = get(b, host="elsewhere.test")
    assert "cannot find the site" in response.text and response.headers["Retry-After"] == "1"
    for _ in range(20):
        assert get(a).status_code == 200
    redis_server.start()
    wait_until(lambda: get(b).status_code == 200, timeout=10, message="b forwarding again after Redis came back")
    assert json.loads(json.dumps([x.node for x in b.server.get_all_backends()])) == ["a"]


def test_a_websocket_is_spliced_through_the_hop(cluster_node, websocket_backend, start_client):
    import websocket

    a, b = cluster_node("a"), cluster_node("b")
    start_client(a.client_config(a.grant(), websocket_backend))
    wait_until(lambda: b.server.get_all_backends() != [], message="a's backend listed on b")
    ws = websocket.create_connection(f"ws://127.0.0.1:{b.running.http_address[1]}/chat",
                                     host=DOMAIN, timeout=10)  # one Host: two are a 400
    try:
        for text in ("hello", "through two nodes", "x" * 300):
            ws.send(text)
            assert ws.recv() == text
    finally:
        ws.close()


def test_an_unreachable_holder_is_skipped_for_a_live_one(two_nodes, redis_server, closed_port_url):
    from tests.fixtures.cluster import backend_record
    from tun2g.cluster.registry import RedisRegistry

    _a, b, _app, _client = two_nodes
    ghost = RedisRegistry(redis_server.url, "ghost", closed_port_url, snapshot=lambda: [
        backend_record("g1", DOMAIN, node="ghost")], on_kill=lambda backend_id: None)
    try:
        assert ghost.publish_now()  # a crashed node whose records have not expired yet
        wait_until(lambda: {x.node for x in b.server.get_all_backends()} == {"a", "ghost"})
        for _ in range(20):  # random order: the ghost is met first about half the time
            assert get(b).status_code == 200
        assert closed_port_url not in b.cluster.forwarder._pools  # no sockets kept for a dead node
    finally:
        ghost.close()


def test_round_trip_callers_reach_other_nodes_backends_too(two_nodes, redis_server):
    _a, b, _app, _client = two_nodes
    session = requests.Session()
    session.mount("http://", b.server.adapter())  # the requests adapter over node b's Server.round_trip
    response = session.get(f"http://{DOMAIN}/headers", timeout=10)
    assert response.status_code == 200 and response.json()["headers"]["Host"] == DOMAIN
    upload = session.post(f"http://{DOMAIN}/sink", data=b"z" * 100_000, timeout=10)
    assert upload.json()["length"] == 100_000
    assert session.get("http://nobody.test/", timeout=10).status_code == 502
    redis_server.stop()
    wait_until(lambda: session.get("http://elsewhere.test/", timeout=10).status_code == 503, timeout=5,
               message="round_trip answering 503 without the registry")


def test_redis_is_never_asked_on_the_local_path_and_once_per_second_on_the_forwarded_one(two_nodes, redis_server):
    from tests.fixtures.cluster import commands_between, redis_command_counts

    a, b, _app, _client = two_nodes
    session = requests.Session()
    before = redis_command_counts(redis_server.url)
    for _ in range(30):
        assert session.get(a.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200
    assert commands_between(before, redis_command_counts(redis_server.url)).get("zrangebyscore", 0) == 0
    get(b)  # warm b's cache
    before, started = redis_command_counts(redis_server.url), time.monotonic()
    for _ in range(30):
        assert session.get(b.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200
    lookups = commands_between(before, redis_command_counts(redis_server.url)).get("zrangebyscore", 0)
    assert lookups <= int(time.monotonic() - started) + 1  # the cache holds an answer for a second
