"""A TCP connection entering node B reaches the client on node A, over the signed hop."""

from __future__ import annotations

import socket

import pytest

from tests.fixtures.net import free_port
from tests.fixtures.tunnel import USER, wait_until
from tests.tcp.test_tcp_routes import local_echo  # noqa: F401  (a fixture)
from tun2g.client.tcp_forward import TCPForwarder
from tun2g.storage.tcp_route import new_tcp_route


def test_a_connection_on_a_node_without_the_tunnel_is_spliced_to_the_node_with_it(cluster_node, start_client,
                                                                                     local_echo):  # noqa: F811
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
