"""The HTTP-Upgrade tunnel: TLS through a terminating balancer, clear refusals, and the wire exchange."""

from __future__ import annotations

import socket

import pytest
import requests

from tests.fixtures.tunnel import DOMAIN
from tun2g.client import ClientConfig
from tun2g.client import connect
from tun2g.transport import upgrade


def test_an_https_url_runs_tls_to_a_terminating_balancer_which_passes_the_upgrade(
        plain_deployment, dev_cert, haproxy, tmp_path, backend, start_client):
    cert, key = dev_cert
    pem = tmp_path / "haproxy.pem"  # HAProxy wants certificate and key in one file
    pem.write_text(open(cert).read() + open(key).read())
    balancer = haproxy([plain_deployment.running.http_address[1]], tls_pem=pem)
    backend_url, _app = backend
    token = plain_deployment.grant()
    start_client(ClientConfig(server_addr=balancer.url, token=token, domain=DOMAIN, backend_url=backend_url,
                              conn_type="upgrade", ca_file=cert, backoff_initial=0.05))
    assert [b.proto for b in plain_deployment.server.get_all_backends()] == ["upgrade"]
    response = requests.get(balancer.url + "/", headers={"Host": DOMAIN}, verify=cert, timeout=10)
    assert response.status_code == 200 and response.text == "hello from backend\n"


def test_a_server_that_does_not_switch_is_reported_with_its_answer(backend):
    backend_url, _app = backend
    config = ClientConfig(server_addr=backend_url, token="t", domain=DOMAIN, backend_url=backend_url,
                          conn_type="upgrade", plain=True)
    with pytest.raises(upgrade.UpgradeRefused, match=r"answered 'HTTP/1.1 200 OK' instead of 101"):
        connect.dial(config)


def test_the_server_answers_101_and_starts_smux_on_the_same_connection(plain_deployment):
    with socket.create_connection(("127.0.0.1", plain_deployment.running.http_address[1]), timeout=5) as sock:
        sock.sendall(upgrade.encode_request("tunnel.example"))
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 8:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert upgrade.parse_response_head(head)[0] == 101
        assert rest[:2] == b"\x01\x00"  # smux v1 SYN: the server opens the control stream at once


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
