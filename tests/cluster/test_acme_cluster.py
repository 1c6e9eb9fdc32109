"""`tun2g server --acme` on three nodes sharing one Redis, behind HAProxy (HTTP for :80, TCP mode for :443).

A first use on one node makes that node order (the lock ``order:<name>`` keeps
the others out, even when they see the name too); pebble's HTTP-01 request
goes through a balancer over the *other* two nodes, which answer it from
Redis; pebble sees exactly one order, and every node, directly and through
the TCP balancer, serves the same certificate within about a second. With
Redis down at renewal time, the node keeps serving the certificate it has.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.test_https_cluster import _served_certificate, tcp_balancer  # noqa: F401 (a fixture)
from tests.fixtures.tunnel import wait_until
from tests.server.test_cert_manager import handshake
from tun2g.server.cert_manager import AcmeSettings

pytestmark = pytest.mark.timeout(150)

DOMAIN = "shop.test"


def test_one_node_orders_another_answers_the_challenge_and_all_serve_it(cluster_node, haproxy, tcp_balancer,
                                                                        pebble):
    settings = AcmeSettings()
    nodes = [cluster_node(f"n{i}", https_addr="127.0.0.1:0", acme=True, acme_settings=settings) for i in (1, 2, 3)]
    others = haproxy([node.running.http_address[1] for node in nodes[1:]])  # the challenge never reaches n1
    tls_port = tcp_balancer([node.running.https_address[1] for node in nodes])
    server = pebble(others.port, tls_port)
    settings.directory_url, settings.ca_bundle = server.directory_url, str(server.ca_bundle)
    nodes[0].storage.add_route(DOMAIN, "alice")
    first_use = time.time()
    with pytest.raises(OSError):
        handshake(nodes[0].running.https_address[1], DOMAIN)  # n1 orders; this handshake fails cleanly
    wait_until(lambda: nodes[0].running.acme.metrics.started.value == 1, timeout=30, message="n1 ordering")
    for node in nodes[1:]:  # they see the name too while n1 holds the lock (or has stored it already)
        try:
            handshake(node.running.https_address[1], DOMAIN)
        except OSError:
            pass
    loaded_at = {}

    def every_node_loaded() -> bool:
        for node in nodes:
            if node.running.server.config.node_id not in loaded_at and DOMAIN in node.running.certificates.names():
                loaded_at[node.running.server.config.node_id] = time.time()
        return len(loaded_at) == len(nodes)

    wait_until(every_node_loaded, timeout=60, interval=0.01, message="every node serving it")
    [info] = nodes[1].storage.list_certificates()
    assert info.source == "acme:n1"
    print(f"first handshake -> served by n1: {loaded_at['n1'] - first_use:.2f} s; "
          f"stored -> loaded: " + ", ".join(f"{n} {t - info.updated:.2f} s" for n, t in sorted(loaded_at.items())))
    assert server.orders() == 1
    assert [node.running.acme.metrics.started.value for node in nodes] == [1, 0, 0]
    wait_until(lambda: all(node.running.acme.waiting() == 0 for node in nodes), timeout=10, message="queues empty")
    assert server.orders() == 1
    root = server.root_pem()
    served = {_served_certificate(node.running.https_address[1], root) for node in nodes}
    assert len(served) == 1
    assert {_served_certificate(tls_port, root) for _ in range(3)} == served


def test_with_redis_down_at_renewal_time_the_current_certificate_is_still_served(cluster_node, pebble, redis_server):
    settings = AcmeSettings(scan_interval=0.5)
    node = cluster_node("n1", https_addr="127.0.0.1:0", acme=True, acme_settings=settings)
    port = node.running.https_address[1]
    server = pebble(node.running.http_address[1], port, validity=20)
    settings.directory_url, settings.ca_bundle = server.directory_url, str(server.ca_bundle)
    node.storage.add_route(DOMAIN, "alice")
    with pytest.raises(OSError):
        handshake(port, DOMAIN)
    wait_until(lambda: DOMAIN in node.running.certificates.names(), timeout=60, message="the certificate")
    [info] = node.storage.list_certificates()
    root = server.root_pem()
    current = handshake(port, DOMAIN, root)
    redis_server.stop()
    renew_at = info.not_before + settings.renew_fraction * (info.not_after - info.not_before)
    manager = node.running.acme
    wait_until(lambda: time.time() > renew_at and manager.scans_skipped >= 2, timeout=40, interval=0.1,
               message="renewal scans failing past the renewal point")
    assert time.time() < info.not_after
    assert handshake(port, DOMAIN, root) == current  # still served, still valid
    assert manager.metrics.started.value == 1 and server.orders() == 1
