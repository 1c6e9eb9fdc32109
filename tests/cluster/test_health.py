"""The node health check: answered by a live event loop only, 503 while stopping, used by the balancer."""

from __future__ import annotations

import os
import signal
import socket
import time

import requests

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.client import ClientConfig
from tun2g.storage import RedisStorage


def test_the_public_port_and_the_admin_api_answer_health_checks(cluster_node):
    node = cluster_node("a")
    for host in ("anything.test", DOMAIN, "10.0.0.1"):
        response = requests.get(node.http_url + "/_tun2g/health", headers={"Host": host}, timeout=5)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "node": "a", "tunnels": 0}
        assert response.headers["Cache-Control"] == "no-store"
    head = requests.head(node.http_url + "/_tun2g/health?probe=1", timeout=5)
    assert head.status_code == 200 and head.content == b""
    admin = requests.get(node.admin_url + "/health", timeout=5)
    assert admin.status_code == 200 and admin.json()["status"] == "ok"


def test_only_the_health_path_is_reserved(cluster_node):
    node = cluster_node("a")
    for path in ("/_tun2g/healthz", "/health", "/x/_tun2g/health"):
        response = requests.get(node.http_url + path, headers={"Host": "site.test"}, timeout=5)
        assert response.status_code == 502 and "no backends connected" in response.text  # the tenant's path
    post = requests.post(node.http_url + "/_tun2g/health", headers={"Host": "site.test"}, timeout=5)
    assert post.status_code == 502


def test_health_keeps_the_connection_alive(cluster_node):
    node = cluster_node("a")
    with socket.create_connection(("127.0.0.1", node.running.http_address[1]), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(b"GET /_tun2g/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer


def test_a_stopping_node_answers_503_draining(cluster_node):
    node = cluster_node("a")
    node.server.draining = True
    response = requests.get(node.http_url + "/_tun2g/health", timeout=5)
    assert response.status_code == 503 and response.json()["status"] == "draining"
    assert requests.get(node.admin_url + "/health", timeout=5).status_code == 503


def test_haproxy_stops_sending_to_a_frozen_node(redis_server, node_processes, haproxy, backend, start_client):
    n1, n2 = node_processes(2)
    balancer = haproxy([n1.http_port, n2.http_port])
    storage = RedisStorage(redis_server.url)
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    start_client(ClientConfig(server_addr=n1.tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                              plain=True, backoff_initial=0.05, backoff_max=0.3))

    def through_balancer(timeout: float = 10) -> tuple[int, float]:
        started = time.monotonic()
        try:
            status = requests.get(balancer.url + "/", headers={"Host": DOMAIN}, timeout=timeout).status_code
        except requests.RequestException:
            status = 0
        return status, time.monotonic() - started

    wait_until(lambda: all(through_balancer()[0] == 200 for _ in range(4)), message="both nodes serving")
    os.kill(n2.proc.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # HAProxy's check (every 300 ms, down after 2 misses of 500 ms) takes n2 out: meanwhile a request
        # it sent there may wait, so poll with a short timeout until every answer is fast.
        wait_until(lambda: all(through_balancer(timeout=1)[0] == 200 for _ in range(4)), timeout=10,
                   message="HAProxy sending everything to n1")
        print(f"HAProxy took n2 out within {time.monotonic() - frozen_at:.2f} s of SIGSTOP")
        answers = [through_balancer() for _ in range(20)]
        assert {status for status, _ in answers} == {200}, answers
        assert max(took for _, took in answers) < 0.5, answers
    finally:
        os.kill(n2.proc.pid, signal.SIGCONT)
    wait_until(lambda: requests.get(n2.url + "/_tun2g/health", timeout=2).status_code == 200, timeout=10,
               message="n2 healthy again")
