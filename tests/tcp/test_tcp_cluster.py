"""A TCP connection entering node B reaches the client on node A, over the signed hop."""

from __future__ import annotations

import socket

import pytest

from tests.fixtures.net import free_port
from tests.fixtures.tunnel import USER, wait_until
from tests.tcp.test_tcp_routes import local_echo  # noqa: F401  (a fixture)
from tun2g.client.tcp_forward import TCPForwarder
from tun2g.storage.tcp_route import new_tcp_route


@pytest.fixture
def port_on_node_a(cluster_node, start_client, local_echo):  # noqa: F811
    """(node A, node B, port): both nodes listen on the TCP route, a client on node A serves it (echo)."""
    node_a = cluster_node("a", tcp_bind="127.0.0.2")
    node_b = cluster_node("b", tcp_bind="127.0.0.3")
    for node in (node_a, node_b):
        node.server.tcp.settings.refresh_interval = 0.05
    port = free_port()
    node_a.storage.add_tcp_route(new_tcp_route(f"tcp:0.0.0.0:{port}", USER, 0.0))
    for node in (node_a, node_b):
        wait_until(lambda node=node: port in node.server.tcp.listening_ports(), message="both nodes listening")
    token = node_a.grant()
    start_client(node_a.client_config(token, "http://127.0.0.1:9",
                                      tcp=TCPForwarder.from_specs([f"{port}=127.0.0.1:{local_echo}"])))
    wait_until(lambda: node_b.cluster.registry.lookup(f"tcp:{port}"), message="node A published the port")
    return node_a, node_b, port


def test_a_connection_on_a_node_without_the_tunnel_is_spliced_to_the_node_with_it(port_on_node_a):
    node_a, node_b, port = port_on_node_a
    with socket.create_connection(("127.0.0.3", port), timeout=10) as sock:
        sock.sendall(b"via node b")
        assert sock.recv(10) == b"via node b"
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            piece = sock.recv(64)
            if not piece:
                break
            data += piece
        assert data == b"<bye>"
    assert node_b.server.metrics.tcp_connections["forwarded"].value == 1
    assert node_a.server.metrics.tcp_connections["served"].value == 1


def test_a_tcp_hop_without_a_valid_signature_is_refused(cluster_node):
    node = cluster_node("a")
    with socket.create_connection(("127.0.0.1", node.running.http_address[1]), timeout=10) as sock:
        sock.sendall(b"GET /_tun2g/tcp HTTP/1.1\r\nHost: tcp:22\r\nUpgrade: tun2g-tcp\r\nConnection: Upgrade\r\n"
                     b"X-Tun2g-Hop: v2;node=x;to=a;ts=1;nonce=" + b"0" * 32 + b";sig=00\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 403")


# -- hostile hops for TLS passthrough names (Host: tls:<name>) ------------------------------------


def _hop_head(node, host: str, *, secret: bytes | None = None, remote: str = "203.0.113.5:4000",
              request_id: str = "r1", extra: str = "") -> bytes:
    """A hop request for `host` addressed to `node`, signed with `secret` (None: the cluster's own)."""
    import time

    from tun2g.cluster.hop import sign
    from tun2g.tcp.wire import HOP_PATH, HOP_UPGRADE

    signature = sign(node.cluster.secret if secret is None else secret, origin="x", to=node.cluster.node_id,
                     timestamp=int(time.time() * 1000), method="GET", host=host, target=HOP_PATH,
                     request_id=request_id, forwarded_for="203.0.113.5")
    return (f"GET {HOP_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: {HOP_UPGRADE}\r\nConnection: Upgrade\r\n"
            f"X-Request-Id: {request_id}\r\nX-Forwarded-For: 203.0.113.5\r\nX-Tun2g-Hop: {signature}\r\n"
            f"X-Tun2g-Remote: {remote}\r\n{extra}\r\n").encode()


def _answer(node, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", node.running.http_address[1]), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except ConnectionResetError:
            pass
        return answer


@pytest.fixture
def tls_node(cluster_node, start_client):
    """A node whose local client serves secure.test by passthrough (to a closed port: only routing is tested)."""
    node = cluster_node("a")
    token = node.grant("secure.test")
    start_client(node.client_config(token, "http://127.0.0.1:9", domain="secure.test",
                                    tcp=TCPForwarder.from_specs(tls_specs=["secure.test=127.0.0.1:9"])))
    wait_until(lambda: "secure.test" in node.server.tcp.passthrough_names(), message="the name served")
    return node


def test_an_unsigned_or_forged_tls_hop_is_refused(tls_node):
    unsigned = (b"GET /_tun2g/tcp HTTP/1.1\r\nHost: tls:secure.test\r\nUpgrade: tun2g-tcp\r\n"
                b"Connection: Upgrade\r\n\r\n")
    assert _answer(tls_node, unsigned).startswith(b"HTTP/1.1 403")
    assert _answer(tls_node, _hop_head(tls_node, "tls:secure.test", secret=b"not the cluster's")).startswith(
        b"HTTP/1.1 403")
    # Signed for another name, sent for this one: the signature covers the Host.
    forged = _hop_head(tls_node, "tls:other.test").replace(b"Host: tls:other.test", b"Host: tls:secure.test")
    assert _answer(tls_node, forged).startswith(b"HTTP/1.1 403")
    # A replay of a valid hop: its nonce is single-use.
    valid = _hop_head(tls_node, "tls:secure.test", request_id="once")
    assert _answer(tls_node, valid).startswith(b"HTTP/1.1 101")
    assert _answer(tls_node, valid).startswith(b"HTTP/1.1 403")
    assert tls_node.server.metrics.tcp_connections["served"].value == 0


def test_a_signed_hop_for_a_name_this_node_does_not_serve_gets_502(tls_node):
    for host in ("tls:other.test", "tls:SECURE.TEST.", "tls:" + "a" * 300, "tls:", "tcp:99999999", "tcp:x"):
        answer = _answer(tls_node, _hop_head(tls_node, host, request_id=f"r-{len(host)}-{host[-3:]}"))
        assert answer.startswith((b"HTTP/1.1 502", b"HTTP/1.1 403")), (host, answer[:40])


def test_a_huge_or_junk_hop_preamble_is_bounded(tls_node):
    # A head past the front's limits is refused before any hop logic.
    huge = _hop_head(tls_node, "tls:secure.test", extra="X-Junk: " + "j" * 200_000 + "\r\n")
    assert _answer(tls_node, huge)[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400", b"")
    assert _answer(tls_node, b"\x16\x03\x01" + b"\xff" * 5000 + b"\r\n\r\n")[:9] in (b"HTTP/1.1 ", b"")
    # A signed hop naming a junk remote address: served with a bounded one, never a preamble past its cap.
    answer = _answer(tls_node, _hop_head(tls_node, "tls:secure.test", remote="x" * 5000, request_id="junk"))
    assert answer.startswith(b"HTTP/1.1 101")
    wait_until(lambda: tls_node.server.metrics.tcp_connections["local_unreachable"].value
               + tls_node.server.metrics.tcp_connections["local_refused"].value == 1,
               message="the stream reached the client, which found its local port closed")


def test_draining_the_origin_node_waits_for_a_connection_it_spliced_to_another(port_on_node_a):
    import gevent

    _node_a, node_b, port = port_on_node_a
    with socket.create_connection(("127.0.0.3", port), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        assert node_b.server.tcp.forwarding == 1
        drain = gevent.spawn(node_b.running.drain, 20.0)
        wait_until(lambda: port not in node_b.server.tcp.listening_ports(), message="node B's listener closed")
        sock.sendall(b"more")
        assert sock.recv(4) == b"more"
        assert not drain.ready()  # the forwarded connection holds the drain
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(64) == b"<bye>"
    drain.join(10)
    assert drain.ready() and node_b.running.stopped.is_set()
