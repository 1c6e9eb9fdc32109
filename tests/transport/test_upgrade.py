"""The HTTP-Upgrade wire: which requests are a tunnel, and bytes that arrived with the switch."""

from __future__ import annotations

import socket

import pytest

from tun2g.transport import upgrade


@pytest.mark.pure
@pytest.mark.parametrize("request_line,headers", [
    ("GET /_tun2g/tunnel", {"Upgrade": "websocket", "Connection": "Upgrade"}),
    ("POST /_tun2g/tunnel", {"Upgrade": "tun2g", "Connection": "Upgrade"}),
    ("GET /_tun2g/tunnel", {"Upgrade": "tun2g"}),
    ("GET /other", {"Upgrade": "tun2g", "Connection": "Upgrade"}),
])
def test_only_the_exact_request_is_a_tunnel(request_line, headers):
    from tun2g.http import RequestHead

    method, target = request_line.split()
    assert not upgrade.is_tunnel_request(RequestHead(method, target, headers=list(headers.items())))
    assert upgrade.is_tunnel_request(RequestHead("GET", "/_tun2g/tunnel",
                                                 headers=[("upgrade", "TUN2G"), ("connection", "keep-alive, Upgrade")]))


def test_bytes_that_came_with_the_switch_are_read_first_by_recv_and_recv_into():
    left, right = socket.socketpair()
    with left, right:
        connection = upgrade.UpgradedStream(left, b"abcdef")
        right.sendall(b"ghi")
        buffer = bytearray(4)
        assert connection.recv_into(buffer, 4) == 4 and bytes(buffer) == b"abcd"
        assert connection.recv(10) == b"ef"
        assert connection.recv(10) == b"ghi"
