"""Self-service names (tun2g.storage.claims) on both stores: random, owned, limited, atomic under racing processes."""

import re
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from tun2g.storage import NoSuchRoute, StorageError
from tun2g.storage.claims import CLAIM_LABEL_CHARS, ClaimLimitReached, ClaimRefused, new_claim_label

BASE = "tun.example.com"
NAME = re.compile(r"[a-z2-7]{%d}\.tun\.example\.com" % CLAIM_LABEL_CHARS)


@pytest.mark.pure
def test_labels_are_dns_safe_lowercase_and_never_repeat():
    labels = {new_claim_label() for _ in range(2000)}
    assert len(labels) == 2000
    assert all(re.fullmatch(r"[a-z2-7]{10}", label) for label in labels)


def test_a_claim_routes_a_random_name_to_the_user(any_storage):
    route = any_storage.claim_route(BASE, "alice", 3)
    assert NAME.fullmatch(route.domain) and route.user == "alice"
    assert any_storage.has_route(route.domain) == "alice"
    assert any_storage.claimed_routes(BASE, "alice") == [route.domain]
    assert [r.domain for r in any_storage.list_routes("alice")] == [route.domain]


def test_the_limit_is_per_user_and_names_the_fix(any_storage):
    mine = [any_storage.claim_route(BASE, "alice", 2).domain for _ in range(2)]
    with pytest.raises(ClaimLimitReached) as refused:
        any_storage.claim_route(BASE, "alice", 2)
    message = str(refused.value)
    assert "(2)" in message and "tun2g route rm" in message and "--domain NAME" in message
    assert all(name in message for name in mine)
    assert any_storage.claim_route(BASE, "bob", 2).user == "bob"  # another user has their own allowance
    assert len(any_storage.list_routes()) == 3


def test_routes_an_operator_added_do_not_count(any_storage):
    any_storage.add_route("fixed." + BASE, "alice")
    any_storage.add_route("app.example.org", "alice")
    assert any_storage.claim_route(BASE, "alice", 1).user == "alice"


def test_route_rm_frees_a_slot(any_storage):
    first = any_storage.claim_route(BASE, "alice", 1).domain
    with pytest.raises(ClaimLimitReached):
        any_storage.claim_route(BASE, "alice", 1)
    any_storage.remove_route(first)
    second = any_storage.claim_route(BASE, "alice", 1).domain
    assert second != first and any_storage.claimed_routes(BASE, "alice") == [second]
    with pytest.raises(NoSuchRoute):
        any_storage.has_route(first)


def test_a_freed_name_routed_to_another_user_no_longer_counts_for_the_first(any_storage):
    first = any_storage.claim_route(BASE, "alice", 1).domain
    any_storage.remove_route(first)
    any_storage.add_route(first, "bob")
    assert any_storage.claimed_routes(BASE, "alice") == []
    assert any_storage.claim_route(BASE, "alice", 1).user == "alice"


def test_a_wildcard_of_another_user_refuses_every_claim(any_storage):
    any_storage.add_route("*." + BASE, "bob")
    with pytest.raises(ClaimRefused, match=r"\*\.tun\.example\.com belongs to another user"):
        any_storage.claim_route(BASE, "alice", 3)
    assert any_storage.claim_route(BASE, "bob", 3).user == "bob"  # the wildcard's owner may
    assert [r.domain for r in any_storage.list_routes("alice")] == []


def test_a_claimed_name_follows_the_ownership_rule_afterwards(any_storage):
    name = any_storage.claim_route(BASE, "alice", 3).domain
    with pytest.raises(StorageError, match="belongs to alice"):
        any_storage.add_route(name + "/api", "bob")
    with pytest.raises(StorageError, match="would cover"):
        any_storage.add_route("*." + BASE, "bob")


@pytest.mark.parametrize("base, limit", [("com", 3), ("[::1]", 3), ("a b", 3), ("10.0.0.1", 3), (BASE, 0),
                                         (BASE, 10 ** 6)])
def test_bad_bases_and_limits_are_refused(any_storage, base, limit):
    with pytest.raises(StorageError):
        any_storage.claim_route(base, "alice", limit)
    assert any_storage.list_routes() == []


def test_a_flood_of_claims_by_one_user_holds_the_limit(any_storage):
    refused = 0
    for _ in range(200):
        try:
            any_storage.claim_route(BASE, "alice", 3)
        except ClaimLimitReached:
            refused += 1
    assert refused == 197 and len(any_storage.list_routes()) == 3
    assert len(any_storage.claimed_routes(BASE, "alice")) == 3


def test_greenlets_racing_on_separate_handles_hold_the_limit(storage_factory):
    handles = [storage_factory() for _ in range(8)]
    outcomes = []

    def claim(handle):
        for _ in range(3):
            try:
                outcomes.append(handle.claim_route(BASE, "alice", 3).domain)
            except ClaimLimitReached:
                outcomes.append(None)

    gevent.joinall([gevent.spawn(claim, handle) for handle in handles], timeout=60, raise_error=True)
    won = [name for name in outcomes if name]
    assert len(outcomes) == 24 and len(won) == 3 and len(set(won)) == 3
    assert sorted(won) == sorted(handles[0].claimed_routes(BASE, "alice"))


_RACER = """
import sys
from tun2g.storage import open_storage
from tun2g.storage.claims import ClaimLimitReached
store = open_storage(sys.argv[1])
won = 0
for round in range(4):
    for user in ("u0", "u1", "u2", "u3", "u4"):
        try:
            store.claim_route("tun.example.com", user, 3)
            won += 1
        except ClaimLimitReached:
            pass
print(won)
"""


def test_processes_racing_hold_the_limit_for_every_user(storage_factory):
    """Real processes (SQLite's BEGIN IMMEDIATE across connections, Redis WATCH/MULTI across clients)."""
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, storage_factory.url], stdout=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[2]) for _ in range(4)]
    won = [int(racer.communicate(timeout=120)[0]) for racer in racers]
    assert sum(won) == 15  # 5 users x 3 names, however the claims interleaved
    store = storage_factory()
    for user in ("u0", "u1", "u2", "u3", "u4"):
        assert len(store.claimed_routes(BASE, user)) == 3 == len(store.list_routes(user))


def _fill(store, count: int) -> None:
    """`count` names under BASE, written as add_route writes them (add_route itself checks every neighbour:
    quadratic for 2,000 names under one parent, and not what is measured here)."""
    names = [(f"n{index}.{BASE}", f"owner{index % 50}") for index in range(count)]
    if hasattr(store, "client"):  # Redis
        with store.client.pipeline(transaction=False) as pipe:
            for name, user in names:
                pipe.hset(store.key_prefix + "route:" + name, mapping={"user": user, "created": "1.0"})
                pipe.sadd(store.key_prefix + "routes", name)
                pipe.sadd(store.key_prefix + "route-parent:" + BASE, name)
            pipe.set(store.key_prefix + "route-index", "1")
            pipe.execute()
    else:
        store._run(lambda db: db.executemany("INSERT INTO routes (domain, user, created, parent) VALUES (?, ?, 1, ?)",
                                             [(name, user, BASE) for name, user in names]))
    assert len(store.list_routes()) == count


def test_claim_latency_with_2000_names_under_the_base(any_storage, storage_factory):
    """The figure in docs/routing.md#self-service: a claim among 2,000 other users' names."""
    _fill(any_storage, 2000)
    timings = []
    for index in range(50):
        started = time.perf_counter()
        any_storage.claim_route(BASE, f"user{index}", 3)
        timings.append(time.perf_counter() - started)
    timings.sort()
    median_ms, p95_ms = timings[len(timings) // 2] * 1000, timings[int(len(timings) * 0.95)] * 1000
    print(f"claim latency on {storage_factory.kind} with 2000 names: median {median_ms:.2f} ms, p95 {p95_ms:.2f} ms")
    assert median_ms < 250, "generous: a loaded 2-core machine; measured ~1 ms"
