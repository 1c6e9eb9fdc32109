"""Frozen peers cost no request more than a moment: a SIGSTOPped node is skipped, a SIGSTOPped Redis is not waited for."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.client import ClientConfig
from tun2g.storage import RedisStorage

FAST = 3.0  # seconds: a frozen node's domain is answered within this (a health probe, then the breaker)
AT_ONCE = 0.5  # seconds: a lookup answered from the cache while Redis is frozen


def timed_get(url: str, host: str = DOMAIN, timeout: float = 30) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = requests.get(url, headers={"Host": host}, timeout=timeout).status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic() - started


def test_requests_for_a_frozen_nodes_domain_get_a_fast_answer(redis_server, node_processes, backend, start_client):
    n1, n2 = node_processes(2, ttl=10.0)  # a long TTL: the frozen node stays in the registry all along
    storage = RedisStorage(redis_server.url)
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    start_client(ClientConfig(server_addr=n1.tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                              plain=True, backoff_initial=0.05, backoff_max=0.3))
    wait_until(lambda: timed_get(n2.url)[0] == 200, message="n2 forwarding to n1")
    os.kill(n1.proc.pid, signal.SIGSTOP)
    try:
        answers = [timed_get(n2.url) for _ in range(5)]
        print("frozen node: answers (status, seconds):", [(s, round(t, 2)) for s, t in answers])
        assert all(status in (502, 503) for status, _ in answers), answers
        assert max(took for _, took in answers) < FAST, answers
        assert max(took for _, took in answers[1:]) < 0.5, answers  # the breaker is open: no probe wait
        assert "node_skipped" in n2.log()
    finally:
        os.kill(n1.proc.pid, signal.SIGCONT)
    wait_until(lambda: timed_get(n2.url, timeout=5)[0] == 200, timeout=15, message="n2 forwarding again")
    assert "node_answering" in n2.log()


@pytest.fixture
def two_nodes_long_ttl(cluster_node, backend, start_client):
    """Nodes a and b (registry TTL 10 s); app.test's tunnel on a only."""
    a, b = cluster_node("a", registry_ttl=10.0), cluster_node("b", registry_ttl=10.0)
    url, _app = backend
    start_client(a.client_config(a.grant(), url))
    wait_until(lambda: [x.node for x in b.server.get_all_backends()] == ["a"], message="a's backend listed on b")
    return a, b


def test_a_frozen_redis_delays_no_request_with_a_cached_answer(two_nodes_long_ttl, redis_server):
    a, b = two_nodes_long_ttl
    assert timed_get(b.http_url)[0] == 200  # b has the answer cached now
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        answers = []
        deadline = time.monotonic() + 3.5  # past the 1 s cache TTL, Redis' 2 s command timeout and a retry
        while time.monotonic() < deadline:
            answers.append(timed_get(b.http_url))
        slowest = max(took for _, took in answers)
        print(f"frozen Redis: {len(answers)} forwarded requests, slowest {slowest:.3f} s")
        assert {status for status, _ in answers} == {200}, answers[:5]
        assert slowest < AT_ONCE, sorted(answers, key=lambda answer: -answer[1])[:5]
        assert timed_get(a.http_url)[1] < AT_ONCE  # and the local path never asked Redis
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: timed_get(b.http_url, host="elsewhere.test")[0] == 502, timeout=10,
               message="lookups answered by Redis again")
