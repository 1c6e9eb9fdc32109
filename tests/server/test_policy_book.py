"""The policy book: config file over store, a bad stored policy leaves the others, bounded local buckets."""

from __future__ import annotations

import pytest

from tun2g.http import RequestHead
from tun2g.policy import Policy
from tun2g.server.policy_step import PolicyBook, head_size
from tun2g.server.rate_limit import LocalLimiter
from tun2g.storage import SQLiteStorage

pytestmark = pytest.mark.pure


@pytest.fixture
def store(tmp_path):
    storage = SQLiteStorage(tmp_path / "book.sqlite3")
    yield storage
    storage.close()


def test_the_config_file_wins_over_the_store_for_the_same_route(store):
    book = PolicyBook()
    store.set_policy("app.test", {"rate": "1/s"})
    store.set_policy("other.test", {"rate": "2/s"})
    assert book.refresh(store)
    book.set_config_policies({"app.test": Policy.from_mapping({"max_body": "1K"}, "tun2g.toml")})
    assert book.get("app.test").max_body == 1024 and book.get("app.test").rate is None
    assert book.get("other.test").rate == 2
    assert book.get("none.test") is None and book.get(None) is None
    book.set_config_policies({})
    assert book.get("app.test").rate == 1


def test_an_invalid_stored_policy_is_skipped_and_the_previous_one_kept(store):
    book = PolicyBook()
    store.set_policy("app.test", {"rate": "1/s"})
    book.refresh(store)
    kept = book.get("app.test")
    store.set_policy("app.test", {"rate": "fast"})  # by hand, or a newer tun2g
    store.set_policy("fine.test", {"max_body": "1M"})
    assert book.refresh(store)
    assert book.get("app.test") is kept and book.get("fine.test").max_body == 1 << 20
    assert not book.refresh(store)  # nothing moved: one revision read, nothing re-read


def test_an_unchanged_policy_keeps_its_object_across_refreshes(store):
    book = PolicyBook()
    store.set_policy("app.test", {"allow": ["10.0.0.0/8"]})
    book.refresh(store)
    first = book.get("app.test")
    store.set_policy("other.test", {"rate": "1/s"})
    book.refresh(store)
    assert book.get("app.test") is first


def test_local_buckets_are_bounded_and_follow_a_changed_rate():
    limiter = LocalLimiter(max_keys=100)
    for index in range(1000):
        limiter.take(f"app.test 10.0.{index // 256}.{index % 256}", 1.0, 1)
    assert len(limiter) == 100
    assert limiter.take("k", 1.0, 1) == 0 and limiter.take("k", 1.0, 1) > 0
    assert limiter.take("k", 5.0, 5) == 0  # the policy changed: a new bucket


def test_head_size_counts_the_request_line_and_headers():
    head = RequestHead("GET", "/x", "HTTP/1.1", [("Host", "a"), ("X", "yy")])
    assert head_size(head) == len(b"GET /x HTTP/1.1\r\nHost: a\r\nX: yy\r\n\r\n")
