"""Three nodes on one Redis behind HAProxy (HTTP for :80, TCP mode for :443): one order, every node serves it.

pebble validates HTTP-01 through the balancer, so the request lands on
whichever node round-robin picks, none of which ordered (`tun2g cert issue`
did, from the store's side); each answers from Redis. Then every node serves
the same certificate, directly and through the TCP balancer. TLS-ALPN-01: no
HTTP port reaches pebble at all, node 1 orders, and the TCP balancer for 443
sends pebble's acme-tls/1 handshake to nodes 2 and 3 only, which answer from
Redis; then all three serve the one certificate.
"""

from __future__ import annotations

import ssl
import socket
import subprocess
import sys

import pytest

from tests.fixtures.net import free_port, require_binary, wait_for_port
from tests.fixtures.tunnel import wait_until

pytestmark = pytest.mark.timeout(120)

DOMAIN = "shop.test"
TCP_BALANCER = """\
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend public_tls
    bind 127.0.0.1:{port}
    default_backend nodes_tls
backend nodes_tls
    balance roundrobin
{servers}
"""


@pytest.fixture
def tcp_balancer(tmp_path):
    procs = []

    def start(ports: list[int]) -> int:
        port = free_port()
        config = tmp_path / "haproxy-tcp.cfg"
        config.write_text(TCP_BALANCER.format(port=port, servers="\n".join(
            f"    server n{i} 127.0.0.1:{p}" for i, p in enumerate(ports, 1))))
        with open(tmp_path / "haproxy-tcp.log", "wb") as log:
            procs.append(subprocess.Popen([require_binary("haproxy"), "-db", "-f", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT))
        wait_for_port(port)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _served_certificate(port: int, root: str) -> bytes:
    context = ssl.create_default_context(cadata=root)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
        return tls.getpeercert(binary_form=True)


def test_one_order_through_the_balancer_and_all_three_nodes_serve_it(cluster_node, haproxy, tcp_balancer, pebble,
                                                                      redis_server):
    nodes = [cluster_node(f"n{i}", https_addr="127.0.0.1:0") for i in (1, 2, 3)]
    http_balancer = haproxy([node.running.http_address[1] for node in nodes])
    tls_port = tcp_balancer([node.running.https_address[1] for node in nodes])
    server = pebble(http_balancer.port, tls_port)
    nodes[0].storage.add_route(DOMAIN, "alice")
    issued = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "issue", DOMAIN, "--acme-directory",
                             server.directory_url, "--acme-ca-bundle", str(server.ca_bundle),
                             "--storage", redis_server.url], capture_output=True, text=True, timeout=100)
    assert issued.returncode == 0, issued.stderr
    for node in nodes:
        wait_until(lambda: DOMAIN in node.running.certificates.names(), timeout=5, message=f"{node} loaded it")
    assert len(nodes[0].storage.list_certificates()) == 1
    root = server.root_pem()
    served = {_served_certificate(node.running.https_address[1], root) for node in nodes}
    assert len(served) == 1
    assert {_served_certificate(tls_port, root) for _ in range(3)} == served


def test_tls_alpn_01_through_a_tcp_balancer_is_answered_by_a_node_that_did_not_order(cluster_node, tcp_balancer,
                                                                                     pebble, redis_server):
    from tun2g.server.acme import issue

    nodes = [cluster_node(f"n{i}", https_addr="127.0.0.1:0") for i in (1, 2, 3)]
    tls_port = tcp_balancer([node.running.https_address[1] for node in nodes[1:]])  # not the ordering node
    server = pebble(free_port(), tls_port)  # pebble's HTTP-01 port: nobody listens
    nodes[0].storage.add_route(DOMAIN, "alice")
    certificate = issue(nodes[0].storage, DOMAIN, directory_url=server.directory_url,
                        ca_bundle=str(server.ca_bundle), source="n1", challenge="tls-alpn-01")
    assert certificate.info.source == "n1" and "Pebble" in certificate.info.issuer
    for node in nodes:
        wait_until(lambda: DOMAIN in node.running.certificates.names(), timeout=5, message=f"{node} loaded it")
    assert nodes[0].storage.acme_value(f"alpn:{DOMAIN}") is None  # the pending challenge is gone
    root = server.root_pem()
    served = {_served_certificate(node.running.https_address[1], root) for node in nodes}
    assert len(served) == 1
    assert {_served_certificate(tls_port, root) for _ in range(2)} == served
