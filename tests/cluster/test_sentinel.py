"""Redis that fails over: tun2g nodes on a Sentinel-managed Redis (master, 2 replicas, 3 Sentinels), all real.

A failover of the master under load loses no request to a local session and
remote routing is back within 5 s; after Redis loses its data the nodes
rebuild the registry from their own memory.
"""

from __future__ import annotations

import subprocess
import sys
import time

import gevent
import pytest
import redis
import requests

from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.storage import RedisStorage, StorageError, open_storage
from tun2g.storage.redis_connect import RedisURLError, parse_sentinel_url

TTL = 2.0
RECOVERY = 5.0  # seconds: remote routing must be back within this after a failover starts


@pytest.mark.pure
def test_sentinel_urls_parse_and_bad_ones_say_what_to_write():
    assert parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/mymaster/3?sentinel_password=s") == (
        [("10.0.0.1", 26379), ("::1", 26380)], "mymaster", 3, None, "pw", "s")
    assert parse_sentinel_url("redis+sentinel://h:1/svc")[1:3] == ("svc", 0)
    for bad in ("redis+sentinel:///svc", "redis+sentinel://h/svc", "redis+sentinel://h:99999/svc",
                "redis+sentinel://h:1", "redis+sentinel://h:1/svc/x", "redis+sentinel://h:1/a/2/3"):
        with pytest.raises(RedisURLError, match="redis\\+sentinel://"):
            parse_sentinel_url(bad)
        with pytest.raises(StorageError, match="invalid Redis URL"):
            open_storage(bad)


def test_a_bad_sentinel_url_is_one_line_from_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", "token", "list", "--storage",
                             "redis+sentinel://127.0.0.1/svc"], capture_output=True, text=True, timeout=30,
                            env=env_without_proxies())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "not host:port" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_store_follows_a_failover(redis_sentinel):
    storage = open_storage(redis_sentinel.url)
    try:
        assert isinstance(storage, RedisStorage)
        storage.add_route("app.test", "alice")
        _info, token = storage.create_token("alice")
        old = redis_sentinel.master_port()
        new = redis_sentinel.failover()
        assert new != old
        # A write after the failover reaches the new master (the old one, now a replica, refuses writes).
        wait_until(lambda: _try(lambda: storage.add_route("other.test", "alice")), timeout=RECOVERY,
                   message="a write through the store after the failover")
        assert storage.has_token(token) == ("alice", ["connect"])
        assert redis.Redis(port=new, decode_responses=True).hget("tun2g:route:other.test", "user") == "alice"
    finally:
        storage.close()


def _try(call) -> bool:
    try:
        call()
    except StorageError:
        return False
    return True


def get(base_url: str, host: str) -> int:
    try:
        return requests.get(base_url + "/", headers={"Host": host}, timeout=10).status_code
    except requests.RequestException:
        return -1


@pytest.fixture
def sentinel_cluster(redis_sentinel, node_processes, backend, start_client):
    """n1, n2 on the Sentinel URL; one.test's client on n1, two.test's on n2."""
    nodes = node_processes(2, redis_url=redis_sentinel.url, ttl=TTL)
    storage = open_storage(redis_sentinel.url)
    for domain in ("one.test", "two.test"):
        storage.add_route(domain, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    for domain, node in (("one.test", nodes[0]), ("two.test", nodes[1])):
        start_client(ClientConfig(server_addr=node.tunnel_addr, token=token, domain=domain, backend_url=backend_url,
                                  plain=True, backoff_initial=0.05, backoff_max=0.3))
    wait_until(lambda: get(nodes[0].url, "two.test") == 200 and get(nodes[1].url, "one.test") == 200,
               timeout=10, message="each node forwarding to the other")
    return nodes


class Traffic:
    """Requests in a loop on n1: one.test (its session is on n1) and two.test (forwarded to n2)."""

    def __init__(self, node) -> None:
        self.local: list[tuple[float, int]] = []
        self.remote: list[tuple[float, int]] = []
        self._stop = gevent.event.Event()
        self._workers = [gevent.spawn(self._loop, node.url, "one.test", self.local),
                         gevent.spawn(self._loop, node.url, "two.test", self.remote)]

    def _loop(self, url: str, host: str, into: list) -> None:
        while not self._stop.is_set():
            into.append((time.monotonic(), get(url, host)))

    def stop(self) -> None:
        self._stop.set()
        gevent.joinall(self._workers, timeout=15)

    def wait_remote_ok(self, message: str) -> None:
        """Until a remote request that started from now on succeeds (at most RECOVERY seconds)."""
        moment = time.monotonic()
        wait_until(lambda: any(at > moment and status == 200 for at, status in self.remote), timeout=RECOVERY,
                   interval=0.05, message=message)


def _assert_failover_survived(traffic: Traffic, started: float) -> None:
    local = [status for _at, status in traffic.local]
    assert set(local) == {200}, f"{len(local)} local requests, statuses {sorted(set(local))}"
    failed = [at for at, status in traffic.remote if at >= started and status != 200]
    if failed:
        assert max(failed) - started < RECOVERY, f"remote routing failed until {max(failed) - started:.1f} s"
    assert traffic.remote[-1][1] == 200


def test_sentinel_failover_under_load_loses_no_local_request(redis_sentinel, sentinel_cluster):
    nodes = sentinel_cluster
    traffic = Traffic(nodes[0])
    try:
        wait_until(lambda: len(traffic.local) > 20 and len(traffic.remote) > 20, message="traffic flowing")
        started = time.monotonic()
        redis_sentinel.failover()
        # The nodes keep writing the registry (every TTL/3) to whichever server is master now.
        traffic.wait_remote_ok("remote routing after the failover")
        registry = redis.Redis(port=redis_sentinel.master_port(), decode_responses=True)
        wait_until(lambda: registry.zscore("tun2g:nodes", "n1") and registry.zscore("tun2g:nodes", "n2"),
                   timeout=RECOVERY, message="both nodes refreshing on the new master")
    finally:
        traffic.stop()
    _assert_failover_survived(traffic, started)
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()[-3000:]


def test_a_killed_master_is_replaced_and_data_loss_is_rebuilt_from_the_nodes(redis_sentinel, sentinel_cluster):
    nodes = sentinel_cluster
    traffic = Traffic(nodes[0])
    try:
        wait_until(lambda: len(traffic.local) > 20, message="traffic flowing")
        old = redis_sentinel.master_port()
        started = time.monotonic()
        redis_sentinel.kill(old)  # SIGKILL: the Sentinels notice after 1 s and promote a replica
        wait_until(lambda: redis_sentinel.master_port() != old, timeout=15, message="a replica promoted")
        traffic.wait_remote_ok("remote routing after the master died")
        new_master = redis.Redis(port=redis_sentinel.master_port(), decode_responses=True)
        # Redis loses everything the nodes wrote: each rebuilds its entries from its own memory.
        new_master.flushall()
        flushed = time.monotonic()
        wait_until(lambda: new_master.zscore("tun2g:domain:two.test", "n2 " + nodes[1].url) is not None
                   and new_master.hexists("tun2g:node-backends:n1", _backend_id(nodes[0])),
                   timeout=TTL, interval=0.05, message="the registry rebuilt after FLUSHALL")
        rebuilt = time.monotonic() - flushed
        traffic.wait_remote_ok("remote routing after the data loss")
    finally:
        traffic.stop()
    local = [status for _at, status in traffic.local]
    assert set(local) == {200}, f"{len(local)} local requests, statuses {sorted(set(local))}"
    failed = [at for at, status in traffic.remote if at >= started and status != 200]
    assert not failed or max(failed) - started < 1.0 + RECOVERY + rebuilt + RECOVERY
    assert rebuilt < TTL / 3 + 0.5


def _backend_id(node) -> str:
    backends = requests.get(node.admin_url + "/backends", headers=node.admin_headers, timeout=5).json()
    return next(b["id"] for b in backends if b["node"] == node.node_id)
