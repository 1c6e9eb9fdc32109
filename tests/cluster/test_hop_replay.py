"""A hop captured on the wire between two nodes cannot be used again: single-use nonces, signed framing, v1 refused.

Node a is advertised behind a recording TCP relay, so the test holds the exact
bytes node b sent to a's socket for a real forwarded request; replaying them
(as they are, or with another body or cookie) must get 403, while fresh
requests keep passing.
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest
import requests
from gevent.server import StreamServer

from tests.fixtures.cluster import CLUSTER_SECRET
from tests.fixtures.net import free_port
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cluster.hop import HOP_HEADER, sign


class RecordingRelay:
    """A TCP relay in front of a node that keeps every byte sent to it, per connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.target: tuple[str, int] | None = None
        self.streams: list[bytearray] = []
        self._server = StreamServer(("127.0.0.1", self.port), self._handle)
        self._server.start()

    def _handle(self, client, _address) -> None:
        assert self.target is not None
        upstream = socket.create_connection(self.target, timeout=10)
        recorded = bytearray()
        self.streams.append(recorded)

        def up() -> None:
            while data := client.recv(65536):
                recorded.extend(data)
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)

        pump = gevent.spawn(up)
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            pump.kill()
            upstream.close()
            client.close()

    def first_request(self) -> bytes:
        """The first whole request (head and Content-Length body) any connection carried."""
        data = bytes(self.streams[0])
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + b"\r\n\r\n" + rest[:length]

    def stop(self) -> None:
        self._server.stop(timeout=1)


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.fixture
def relayed_nodes(cluster_node, backend, start_client):
    """Node a (holding app.test's tunnel) reached by node b only through a RecordingRelay."""
    relay = RecordingRelay()
    a = cluster_node("a", advertise_url=f"http://127.0.0.1:{relay.port}")
    relay.target = ("127.0.0.1", a.running.http_address[1])
    b = cluster_node("b")
    url, app = backend
    start_client(a.client_config(a.grant(), url))
    wait_until(lambda: [x.node for x in b.server.get_all_backends()] == ["a"], message="a's backend listed on b")
    yield a, b, relay, app
    relay.stop()


def forwarded_post(b, body: bytes, cookie: str = "session=victim") -> requests.Response:
    return requests.post(b.http_url + "/sink", data=body, timeout=10,
                         headers={"Host": DOMAIN, "Cookie": cookie, "Content-Type": "text/plain"})


def test_a_replayed_hop_is_refused_and_fresh_ones_pass(relayed_nodes):
    a, b, relay, _app = relayed_nodes
    assert forwarded_post(b, b"transfer=10").status_code == 200
    captured = relay.first_request()
    assert f"{HOP_HEADER}: v2;".encode() in captured and b"nonce=" in captured
    a_port = a.running.http_address[1]
    for replay in (captured,                                                   # as captured
                   captured.replace(b"transfer=10", b"transfer=99"),          # another body, same length
                   captured.replace(b"session=victim", b"session=attack")):   # another cookie
        answer = send_raw(a_port, replay)
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert b"nonce already used" in answer
    for _ in range(3):  # every forwarded request gets its own nonce
        assert forwarded_post(b, b"transfer=10").status_code == 200


def test_a_signature_covers_the_body_framing(relayed_nodes):
    a, b, relay, _app = relayed_nodes
    assert forwarded_post(b, b"transfer=10").status_code == 200
    captured = relay.first_request()
    longer = captured.replace(b"Content-Length: 11", b"Content-Length: 12") + b"0"
    assert longer != captured + b"0"
    answer = send_raw(a.running.http_address[1], longer)  # checked before the nonce: the signature breaks
    assert answer.startswith(b"HTTP/1.1 403") and b"bad hop signature" in answer, answer[:300]
    chunked = captured.replace(b"Content-Length: 11", b"Transfer-Encoding: chunked").replace(
        b"\r\n\r\ntransfer=10", b"\r\n\r\nb\r\ntransfer=10\r\n0\r\n\r\n")
    answer = send_raw(a.running.http_address[1], chunked)
    assert answer.startswith(b"HTTP/1.1 403") and b"bad hop signature" in answer, answer[:300]


def test_a_replay_to_a_restarted_node_of_the_same_id_is_refused(relayed_nodes, cluster_node):
    a, b, relay, _app = relayed_nodes
    assert forwarded_post(b, b"transfer=10").status_code == 200
    captured = relay.first_request()
    a.running.stop()  # its memory of nonces is gone; Redis still has them
    again = cluster_node("a")
    answer = send_raw(again.running.http_address[1], captured)
    assert answer.startswith(b"HTTP/1.1 403") and b"nonce already used" in answer


def test_the_old_v1_header_and_a_hop_for_another_node_are_refused(relayed_nodes):
    a, _b, _relay, _app = relayed_nodes
    a_port = a.running.http_address[1]
    old = f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n{HOP_HEADER}: v1;node=b;ts={int(time.time())};sig=00\r\n\r\n"
    answer = send_raw(a_port, old.encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"unsupported hop version 'v1'" in answer
    elsewhere = sign(CLUSTER_SECRET.encode(), origin="b", to="c", timestamp=int(time.time() * 1000), method="GET",
                     host=DOMAIN, target="/", request_id="r1", forwarded_for="10.0.0.1")
    request = (f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n{HOP_HEADER}: {elsewhere}\r\nX-Request-Id: r1\r\n"
               f"X-Forwarded-For: 10.0.0.1\r\n\r\n")
    answer = send_raw(a_port, request.encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"addressed to node 'c'" in answer


def _signed_head(to: str):
    from tun2g.http import RequestHead

    head = RequestHead("POST", "/sink", "HTTP/1.1", [("Host", DOMAIN), ("X-Request-Id", "r1"),
                                                      ("X-Forwarded-For", "10.0.0.1"), ("Content-Length", "3")])
    head.set(HOP_HEADER, sign(CLUSTER_SECRET.encode(), origin="b", to=to, timestamp=int(time.time() * 1000),
                              method="POST", host=DOMAIN, target="/sink", request_id="r1",
                              forwarded_for="10.0.0.1", framing="3"))
    return head


@pytest.mark.parametrize("age, claimed", [(0.0, True), (60.0, False)])
def test_a_replay_is_refused_with_redis_asked_only_around_the_nodes_start(redis_server, age, claimed):
    """A node 60 s old refuses a replayed hop from its own memory, with no Redis call; a new one also claims
    the nonce in Redis, where an earlier process of its id may have left it."""
    import redis

    from tun2g.cluster import ClusterConfig, ClusterNode
    from tun2g.cluster.hop import HopRefused

    node = ClusterNode(ClusterConfig(redis_url=redis_server.url, advertise_url="http://127.0.0.1:9",
                                     secret=CLUSTER_SECRET), "a", local_backends=list, kill_local=lambda _id: None,
                       started=time.time() - age)
    try:
        head = _signed_head("a")
        value = head.get(HOP_HEADER)
        assert node.accept_hop(head) is not None
        keys = redis.Redis.from_url(redis_server.url).keys("tun2g:hop-nonce:*")
        assert bool(keys) is claimed
        replay = _signed_head("a")
        replay.set(HOP_HEADER, value)
        with pytest.raises(HopRefused, match="nonce already used"):
            node.accept_hop(replay)
    finally:
        node.close()
