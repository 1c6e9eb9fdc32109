"""The ACME order lock (``order:<name>``) in both stores: one holder at a time, released only by its owner,
free again once its TTL has passed (a node that died while ordering frees the name)."""

from __future__ import annotations

import gevent

from tests.fixtures.tunnel import wait_until


def test_one_holder_and_only_the_owner_releases(storage_factory):
    first, second = storage_factory(), storage_factory()  # two handles, as two nodes would hold
    assert first.acquire_acme_lock("order:app.test", "n1:a", 60)
    assert not second.acquire_acme_lock("order:app.test", "n2:b", 60)
    assert not second.release_acme_lock("order:app.test", "n2:b")  # not its lock: still held
    assert not second.acquire_acme_lock("order:app.test", "n2:b", 60)
    assert second.acquire_acme_lock("order:other.test", "n2:b", 60)  # locks are per name
    assert first.release_acme_lock("order:app.test", "n1:a")
    assert not first.release_acme_lock("order:app.test", "n1:a")  # released once
    assert second.acquire_acme_lock("order:app.test", "n2:b", 60)


def test_an_expired_lock_is_taken_and_the_old_owner_cannot_release_it(storage_factory):
    first, second = storage_factory(), storage_factory()
    assert first.acquire_acme_lock("order:app.test", "n1:a", 0.2)
    wait_until(lambda: second.acquire_acme_lock("order:app.test", "n2:b", 60), timeout=10,
               message="the expired lock taken")
    assert not first.release_acme_lock("order:app.test", "n1:a")  # the late owner leaves the new one's lock
    assert not first.acquire_acme_lock("order:app.test", "n1:a", 60)


def test_racing_acquirers_get_exactly_one_lock(storage_factory):
    handles = [storage_factory() for _ in range(4)]
    attempts = [gevent.spawn(handle.acquire_acme_lock, "order:race.test", f"n{i}:{j}", 60)
                for i, handle in enumerate(handles) for j in range(8)]
    gevent.joinall(attempts, timeout=30, raise_error=True)
    assert sum(1 for attempt in attempts if attempt.value) == 1
