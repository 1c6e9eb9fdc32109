"""Three `tun2g server` processes behind a real HAProxy, sharing a real Redis: the scale-out contract."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import gevent
import pytest
import requests

from tests.fixtures.cluster import ADMIN_TOKEN, CLUSTER_SECRET
from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.cluster.hop import HOP_HEADER, sign
from tun2g.storage import RedisStorage

DOMAINS = ("one.test", "two.test", "three.test")
TTL = 2.0


def get(base_url: str, host: str, path: str = "/headers", **kwargs) -> requests.Response:
    headers = {"Host": host, **kwargs.pop("headers", {})}
    return requests.get(base_url + path, headers=headers, timeout=10, **kwargs)


def admin_backends(node) -> list[dict]:
    return requests.get(node.admin_url + "/backends", headers=node.admin_headers, timeout=5).json()


def served_by_backend(response: requests.Response, host: str) -> bool:
    return response.status_code == 200 and response.json()["headers"]["Host"] == host


@pytest.fixture
def cluster(redis_server, node_processes, haproxy, backend, start_client):
    """n1, n2, n3 behind HAProxy; one.test's client on n1, two.test's on n2, three.test's on n3."""
    nodes = node_processes(3, ttl=TTL)
    balancer = haproxy([node.http_port for node in nodes])
    storage = RedisStorage(redis_server.url)
    for domain in DOMAINS:
        storage.add_route(domain, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend

    def connect(domain: str, node):
        config = ClientConfig(server_addr=node.tunnel_addr, token=token, domain=domain, backend_url=backend_url,
                              plain=True, backoff_initial=0.05, backoff_max=0.3)
        return start_client(config)

    clients = {domain: connect(domain, node) for domain, node in zip(DOMAINS, nodes)}
    wait_until(lambda: all(len(admin_backends(node)) == 3 for node in nodes), message="every node seeing 3 backends")
    return nodes, balancer, clients, connect


def test_every_request_through_the_balancer_reaches_its_backend(cluster):
    nodes, balancer, _clients, _connect = cluster
    placement = {b["domain"]: b["node"] for b in admin_backends(nodes[0])}
    assert placement == {"one.test": "n1", "two.test": "n2", "three.test": "n3"}
    for _ in range(10):  # round robin: each domain meets its own node once in three, two others forward
        for domain in DOMAINS:
            response = get(balancer.url, domain)
            assert served_by_backend(response, domain), (domain, response.status_code, response.text[:200])
    for node in nodes:  # and every node, asked directly, serves every domain
        for domain in DOMAINS:
            assert served_by_backend(get(node.url, domain), domain)


def test_a_killed_node_leaves_the_registry_within_the_ttl_and_its_clients_can_move(cluster):
    nodes, balancer, clients, connect = cluster
    nodes[2].kill()
    killed_at = time.monotonic()
    wait_until(lambda: "three.test" not in {b["domain"] for b in admin_backends(nodes[0])}, timeout=TTL + 2,
               message="n3's backend leaving the shared registry")
    assert time.monotonic() - killed_at <= TTL + 1.0  # expiry is exact; the rest is polling under load
    for _ in range(6):
        assert get(balancer.url, "three.test").status_code == 502
        assert served_by_backend(get(balancer.url, "one.test"), "one.test")
    clients["three.test"].close()
    connect("three.test", nodes[1])  # the client reconnects to a live node
    wait_until(lambda: served_by_backend(get(nodes[0].url, "three.test"), "three.test"), timeout=5,
               message="n1 forwarding three.test to n2")
    for _ in range(6):
        assert served_by_backend(get(balancer.url, "three.test"), "three.test")


def test_redis_restart_mid_traffic_loses_no_local_request_and_remote_routing_recovers(cluster, redis_server):
    nodes, balancer, _clients, _connect = cluster
    local_statuses, remote_statuses = [], []
    stop = gevent.event.Event()

    def local_traffic():  # one.test asked on n1, which holds its tunnel
        while not stop.is_set():
            local_statuses.append(get(nodes[0].url, "one.test", "/").status_code)

    def remote_traffic():  # two.test asked on n1: needs the registry
        while not stop.is_set():
            remote_statuses.append(get(nodes[0].url, "two.test", "/").status_code)

    workers = [gevent.spawn(local_traffic), gevent.spawn(remote_traffic)]
    wait_until(lambda: len(local_statuses) > 20, message="traffic flowing")
    redis_server.stop()
    wait_until(lambda: 503 in remote_statuses, timeout=TTL + 5, message="n1 answering 503 once its answer is stale")
    down_count = len(local_statuses)
    wait_until(lambda: len(local_statuses) > down_count + 50, message="local traffic while Redis is down")
    redis_server.start()
    recovered = len(remote_statuses)
    wait_until(lambda: remote_statuses[-1] == 200 and len(remote_statuses) > recovered, timeout=TTL + 5,
               message="remote routing after Redis came back")
    stop.set()
    gevent.joinall(workers, timeout=10)
    assert set(local_statuses) == {200}, f"{len(local_statuses)} local requests: {sorted(set(local_statuses))}"
    assert set(remote_statuses) <= {200, 503}
    wait_until(lambda: all(served_by_backend(get(balancer.url, d), d) for d in DOMAINS), timeout=TTL + 5,
               message="every domain through the balancer again")
    for node in nodes:
        log = node.log()
        assert log.count("redis_unavailable") <= 2, log[-3000:]  # once per outage, not once per request
        assert "Traceback" not in log, log[-3000:]


def test_forged_node_to_node_requests_are_refused(cluster):
    nodes, balancer, _clients, _connect = cluster
    timestamp = int(time.time() * 1000)
    forged = sign(b"not-the-cluster-secret", origin="n1", to="n2", timestamp=timestamp, method="GET",
                  host="two.test", target="/headers", request_id="x1", forwarded_for="10.1.1.1")
    stale = sign(CLUSTER_SECRET.encode(), origin="n1", to="n2", timestamp=timestamp - 3_600_000, method="GET",
                 host="two.test", target="/headers", request_id="x1", forwarded_for="10.1.1.1")
    for header in (forged, stale, "v1;node=n1;ts=1;sig=00"):
        for base_url in (balancer.url, nodes[1].url):
            response = get(base_url, "two.test", headers={HOP_HEADER: header, "X-Request-Id": "x1",
                                                          "X-Forwarded-For": "10.1.1.1"})
            assert response.status_code == 403, response.text


def test_backends_and_kill_commands_work_from_any_node(cluster):
    nodes, _balancer, _clients, _connect = cluster

    def tun2g(*args):
        return subprocess.run([sys.executable, "-m", "tun2g.cli", *args], capture_output=True, text=True,
                              timeout=30, env=env_without_proxies() | {"TUN2G_ADMIN_TOKEN": ADMIN_TOKEN})

    listed = json.loads(tun2g("backends", "--admin", nodes[1].admin_url, "--json").stdout)
    assert sorted((b["domain"], b["node"]) for b in listed) == [("one.test", "n1"), ("three.test", "n3"),
                                                                ("two.test", "n2")]
    table = tun2g("backends", "--admin", nodes[1].admin_url).stdout
    assert "node" in table.splitlines()[0] and "n3" in table
    victim = next(b["id"] for b in listed if b["node"] == "n3")
    result = tun2g("kill", "--admin", nodes[0].admin_url, victim)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: victim not in {b["id"] for b in admin_backends(nodes[2])}, timeout=5,
               message="n3 disconnecting the backend n1 was asked to kill")
    assert tun2g("kill", "--admin", nodes[0].admin_url, "no-such-id").returncode == 1


def test_a_client_behind_the_balancer_moves_to_a_live_node_by_itself(cluster, redis_server, backend, start_client):
    nodes, balancer, _clients, _connect = cluster
    storage = RedisStorage(redis_server.url)
    storage.add_route("roam.test", "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    start_client(ClientConfig(server_addr=balancer.url, token=token, domain="roam.test", backend_url=backend_url,
                              conn_type="upgrade", plain=True, backoff_initial=0.05, backoff_max=0.3))

    def holder():
        return {b["node"] for b in admin_backends(nodes[0]) if b["domain"] == "roam.test"}

    wait_until(lambda: len(holder()) == 1, message="roam.test registered")
    first = holder().pop()
    next(node for node in nodes if node.node_id == first).kill()
    survivor = next(node for node in nodes if node.node_id != first)
    wait_until(lambda: (holder_now := {b["node"] for b in admin_backends(survivor) if b["domain"] == "roam.test"})
               and first not in holder_now, timeout=TTL + 5, message="the client re-registered on a live node")
    for _ in range(6):
        assert served_by_backend(get(balancer.url, "roam.test"), "roam.test")
