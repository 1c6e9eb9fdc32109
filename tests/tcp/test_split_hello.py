"""A legitimate ClientHello that arrives in several TCP segments is routed by its SNI, on both ports.

Real peers: the standard library's TLS client writes its hello in 4 separate sends on a
TCP_NODELAY socket (tests.fixtures.tls_pieces), nginx holds secure.test's certificate and key,
and the client checks that certificate with nginx's own CA: on the dedicated --tls-passthrough
port (which reads the hello) and on the public --https port (which peeks it).
"""

from __future__ import annotations

import pytest

from tests.fixtures.tls_pieces import get_with_split_hello, hello_pieces
from tests.fixtures.tunnel import _start, wait_until
from tests.server.test_https import ca  # noqa: F401  (a fixture)
from tests.tcp.test_https_passthrough import NAME, shared_port  # noqa: F401  (a fixture)
from tests.tcp.test_real_peers import nginx_tls  # noqa: F401  (a fixture)
from tun2g.client.tcp_forward import TCPForwarder

BODY = b"end-to-end from nginx\n"


def test_hello_pieces_cut_inside_the_record_header_and_keep_every_byte():
    hello = bytes(range(256)) * 2
    parts = hello_pieces(hello, 4)
    assert len(parts) == 4 and len(parts[0]) == 3 and b"".join(parts) == hello


@pytest.mark.parametrize("pieces", [3, 6])
def test_a_split_hello_on_the_dedicated_passthrough_port_reaches_nginx(tmp_path, data_dir, start_client,
                                                                       nginx_tls, pieces):  # noqa: F811
    nginx_port, nginx_ca = nginx_tls
    deployment = _start(tmp_path, data_dir, plain=True, tls_passthrough="127.0.0.1:0")
    try:
        tls = TCPForwarder.from_specs(tls_specs=[f"{NAME}=127.0.0.1:{nginx_port}"])
        start_client(deployment.client_config(deployment.grant(NAME), "http://127.0.0.1:9", domain=NAME, tcp=tls))
        wait_until(lambda: NAME in deployment.server.tcp.passthrough_names(), message="the name served")
        response = get_with_split_hello(deployment.running.passthrough_address, NAME, nginx_ca, pieces=pieces)
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(BODY)
        metrics = deployment.server.metrics
        wait_until(lambda: metrics.tcp_connections["served"].value == 1, message="the connection counted")
        assert metrics.tcp_connections["bad_hello"].value == 0
    finally:
        deployment.running.stop()


def test_a_split_hello_on_the_https_port_is_passed_through_not_terminated(shared_port):  # noqa: F811
    deployment, nginx_ca = shared_port
    response = get_with_split_hello(deployment.running.https_address, NAME, nginx_ca, pieces=5)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(BODY)
    metrics = deployment.server.metrics
    wait_until(lambda: metrics.tcp_connections["served"].value == 1, message="the connection counted")
    assert NAME not in deployment.running.certificates.names()
