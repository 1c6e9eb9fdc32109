"""The Redis backend registry, against a real redis-server: publish, look up, expire, recover, kill."""

from __future__ import annotations

import gevent
import pytest
import redis
from gevent.event import Event

from tests.fixtures.cluster import backend_record, commands_between, redis_command_counts
from tests.fixtures.tunnel import wait_until
from tun2g.cluster.registry import ClusterUnavailable, NodeRef, RedisRegistry
from tun2g.errors import NoSuchBackend


class Node:
    """A registry plus the local backends it publishes (what a Server would list)."""

    def __init__(self, url: str, node_id: str, registry_class=RedisRegistry, **options):
        self.backends = []
        self.killed = []
        self.kill_seen = Event()
        self.registry = registry_class(url, node_id, f"http://{node_id}.internal:8080",
                                      snapshot=lambda: list(self.backends), on_kill=self._on_kill, **options)

    def _on_kill(self, backend_id):
        if backend_id not in {b.id for b in self.backends}:
            raise NoSuchBackend(backend_id)
        self.killed.append(backend_id)
        self.kill_seen.set()

    def add(self, backend_id, domain):
        self.backends.append(backend_record(backend_id, domain, node=self.registry.node_id))
        self.registry.changed()


@pytest.fixture
def nodes(redis_server):
    made = []

    def make(node_id, **options):
        node = Node(redis_server.url, node_id, **options)
        node.registry.start()
        made.append(node)
        return node

    yield make
    for node in made:
        node.registry.close()


def test_a_backend_published_by_one_node_is_found_by_another(nodes):
    a, b = nodes("a"), nodes("b", cache_ttl=0)
    assert b.registry.lookup("app.test") == []
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") == [NodeRef("a", "http://a.internal:8080")],
               message="node a's backend visible from b")
    assert a.registry.lookup("app.test") == []  # a node never forwards to itself


def test_the_whole_cluster_is_listed_with_each_backends_node(nodes):
    a, b = nodes("a"), nodes("b")
    a.add("b1", "one.test")
    b.add("b2", "two.test")
    wait_until(lambda: [x.id for x in a.registry.remote_backends()] == ["b2"], message="b's backend listed on a")
    assert [(x.id, x.node, x.domain) for x in b.registry.remote_backends()] == [("b1", "a", "one.test")]


def test_lookups_are_cached_and_concurrent_misses_share_one_redis_call(nodes, redis_server):
    a, b = nodes("a"), nodes("b", cache_ttl=30)
    a.add("b1", "app.test")
    wait_until(lambda: a.registry.publish_now() and a.registry._published == {"app.test"})
    wait_until(lambda: b.registry.listening, message="b's subscription confirmed (only then are answers cached)")
    before = redis_command_counts(redis_server.url)
    results = gevent.joinall([gevent.spawn(b.registry.lookup, "app.test") for _ in range(50)], raise_error=True)
    for _ in range(100):
        b.registry.lookup("app.test")
    used = commands_between(before, redis_command_counts(redis_server.url))
    assert [r.value for r in results] == [[NodeRef("a", "http://a.internal:8080")]] * 50
    assert used.get("zrangebyscore") == 1


def test_a_change_invalidates_other_nodes_caches_over_pubsub(nodes):
    a, b = nodes("a"), nodes("b", cache_ttl=60)
    assert b.registry.lookup("app.test") == []  # cached negative answer for a minute
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") != [], message="invalidation of b's cached miss")


def test_an_answer_is_trusted_briefly_only_while_invalidations_cannot_reach_the_node(nodes, redis_server):
    a = nodes("a")
    b = Node(redis_server.url, "b", cache_ttl=60)  # never started: not subscribed to invalidations
    try:
        assert b.registry.lookup("app.test") == []
        a.add("b1", "app.test")
        wait_until(lambda: b.registry.lookup("app.test") != [], timeout=5,
                   message="b asking Redis again within a second, not trusting for 60 s a miss nobody can invalidate")
    finally:
        b.registry.close()


class HeldAnswers(RedisRegistry):
    """A registry whose Redis answers wait for `release`, so a change can land while a query is in flight."""

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.answered, self.release, self.invalidated = Event(), Event(), Event()

    def _fetch(self, domain):
        nodes = super()._fetch(domain)
        self.answered.set()
        self.release.wait(5)
        return nodes

    def _on_message(self, channel, data):
        super()._on_message(channel, data)
        if channel.endswith("invalidate"):
            self.invalidated.set()


def test_an_answer_older_than_a_change_heard_meanwhile_is_not_cached(nodes, redis_server):
    a, b = nodes("a"), nodes("b", registry_class=HeldAnswers, cache_ttl=60)
    held = b.registry
    wait_until(lambda: held.listening, message="b's subscription confirmed")
    miss = gevent.spawn(held.lookup, "app.test")
    try:
        assert held.answered.wait(5)  # Redis said "nobody" ...
        a.add("b1", "app.test")
        assert held.invalidated.wait(5)  # ... then the change was heard before that answer was stored
    finally:
        held.release.set()
    assert miss.get(timeout=5) == []
    assert held.lookup("app.test") == [NodeRef("a", "http://a.internal:8080")]


def test_a_node_that_stops_refreshing_expires_within_the_ttl(nodes):
    import time

    a, b = nodes("a", ttl=1.0), nodes("b", cache_ttl=0)
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") != [])
    gevent.killall(a.registry._tasks)  # a dies: no refresh, no deregistration
    died = time.monotonic()
    wait_until(lambda: b.registry.lookup("app.test") == [] and b.registry.remote_backends() == [], timeout=3,
               message="a's records expiring")
    assert time.monotonic() - died <= 1.0 + 0.5  # expiry is exact; the rest is polling under load


def test_a_node_that_leaves_is_removed_at_once(nodes):
    a, b = nodes("a"), nodes("b", cache_ttl=60)
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") != [])
    a.registry.close()
    wait_until(lambda: b.registry.lookup("app.test") == [] and b.registry.remote_backends() == [], timeout=2,
               message="a's records removed and b's cache invalidated")


def test_kill_reaches_the_node_holding_the_backend(nodes, redis_server):
    a, b = nodes("a"), nodes("b")
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.remote_backends() != [])
    # Kill is fire-and-forget pub/sub: wait until both nodes' subscriptions are live in Redis.
    probe = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: probe.pubsub_numsub("tun2g:kill")[0][1] == 2, message="both nodes subscribed")
    assert b.registry.kill("b1") == "a"
    assert a.kill_seen.wait(5)
    assert a.killed == ["b1"]
    with pytest.raises(NoSuchBackend):
        b.registry.kill("nope")


def test_a_restarted_empty_redis_is_repopulated_without_help(nodes, redis_server):
    a, b = nodes("a", ttl=3.0), nodes("b", cache_ttl=0)
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") != [])
    redis_server.stop()
    redis_server.start()  # empty: no persistence
    newcomer = nodes("c", cache_ttl=0)  # no cached answers: sees only what is in Redis
    wait_until(lambda: _lookup_or_none(newcomer, "app.test") == [NodeRef("a", "http://a.internal:8080")],
               timeout=5, message="a re-registered after the Redis restart")
    wait_until(lambda: not a.registry.outage.is_down, message="a noticing the recovery")


def test_while_redis_is_down_lookups_fail_fast_with_a_reason_or_use_a_recent_answer(nodes, redis_server):
    import time

    a, b = nodes("a"), nodes("b", cache_ttl=0.1)
    a.add("b1", "app.test")
    wait_until(lambda: b.registry.lookup("app.test") != [])
    redis_server.stop()
    wait_until(lambda: b.registry.outage.is_down or _lookup_fails(b, "fresh.test"), message="b noticing")
    assert b.registry.lookup("app.test") == [NodeRef("a", "http://a.internal:8080")]  # younger than the TTL
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(ClusterUnavailable, match="unreachable"):
            b.registry.lookup("never-seen.test")
    assert time.monotonic() - started < 0.5  # the breaker answers without waiting on Redis each time


def _lookup_or_none(node, domain):
    try:
        return node.registry.lookup(domain)
    except ClusterUnavailable:
        return None


def _lookup_fails(node, domain):
    return _lookup_or_none(node, domain) is None


def test_the_lookup_cache_stays_bounded_whatever_hosts_the_public_sends(nodes, monkeypatch):
    from tun2g.cluster import registry

    monkeypatch.setattr(registry, "MAX_CACHED_DOMAINS", 50)  # a limit a test can reach quickly
    b = nodes("b")
    for index in range(500):
        assert b.registry.lookup(f"random{index}.test") == []
        assert len(b.registry._cache) <= 50


def test_passthrough_names_are_shared_and_read_without_waiting_for_redis(nodes, redis_server):
    names = {"tls:secure.test", "tcp:2222"}
    a = nodes("a", ttl=1.0, published_names=lambda: set(names))
    b = nodes("b")
    assert b.registry.tls_names() == frozenset()  # the first call answers at once and starts a read
    wait_until(lambda: b.registry.tls_names() == {"secure.test"}, message="node a's passthrough name seen by b")
    before = redis_command_counts(redis_server.url)
    for _ in range(100):
        b.registry.tls_names()  # cached: a handshake never asks Redis
    assert commands_between(before, redis_command_counts(redis_server.url)).get("zrangebyscore", 0) <= 1
    names.clear()  # node a stops serving it: the name expires from the set within the TTL
    a.registry.changed()
    wait_until(lambda: b.registry.read_tls_names() == frozenset(), timeout=5, interval=0.1,
               message="the name no longer served expiring from the shared set")
