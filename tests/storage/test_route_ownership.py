"""Route keys in both stores: the ownership rule for hosts and wildcards, strip, and old data still loading."""

import sqlite3

import pytest

from tun2g.storage import NoSuchRoute, SQLiteStorage, StorageError


def test_wildcard_owner_alone_registers_names_under_it(any_storage):
    any_storage.add_route("*.example.com", "alice")
    assert any_storage.add_route("app.example.com", "alice").user == "alice"
    with pytest.raises(StorageError, match=r"under the wildcard \*\.example\.com, which belongs to alice"):
        any_storage.add_route("bob.example.com", "bob")
    with pytest.raises(StorageError, match="belongs to alice"):
        any_storage.add_route("bob.example.com/api", "bob")
    # One label only: a deeper name and the parent itself are not under the wildcard.
    assert any_storage.add_route("a.b.example.com", "bob").user == "bob"
    assert any_storage.add_route("example.com", "bob").user == "bob"
    with pytest.raises(NoSuchRoute):
        any_storage.has_route("bob.example.com")


def test_a_wildcard_cannot_be_laid_over_another_users_names(any_storage):
    any_storage.add_route("shop.example.com/cart", "bob")
    with pytest.raises(StorageError, match=r"would cover shop\.example\.com/cart, which belongs to bob"):
        any_storage.add_route("*.example.com", "alice")
    any_storage.remove_route("shop.example.com/cart")
    assert any_storage.add_route("*.example.com", "alice").user == "alice"


def test_every_route_on_one_host_has_one_owner(any_storage):
    any_storage.add_route("example.com", "alice")
    with pytest.raises(StorageError, match="which belongs to alice"):
        any_storage.add_route("example.com/api", "bob")
    added = any_storage.add_route("Example.COM/api/", "alice", strip=True)
    assert (added.domain, added.host, added.path, added.strip) == ("example.com/api", "example.com", "/api", True)
    assert any_storage.has_route("example.com/api") == "alice"
    with pytest.raises(StorageError, match="belongs to alice"):
        any_storage.add_route("example.com/api", "bob")


def test_strip_is_stored_listed_and_changed_by_adding_again(storage_factory):
    first, second = storage_factory(), storage_factory()
    first.add_route("example.com/api", "alice", strip=True)
    listed = {route.domain: route for route in second.list_routes()}
    assert listed["example.com/api"].strip is True
    assert listed["example.com/api"].as_json()["path"] == "/api"
    again = first.add_route("example.com/api", "alice", strip=False)
    assert again.strip is False and second.list_routes()[0].strip is False
    assert second.set_route_inspect("example.com/api", True).strip is False


def test_adding_a_route_changes_the_revision(any_storage):
    """Servers reload their routing table when the revision moves (tun2g.server.revocation)."""
    before = any_storage.revision()
    any_storage.add_route("*.example.com", "alice")
    assert any_storage.revision() != before


@pytest.mark.pure
def test_a_database_of_schema_2_loads_and_gains_route_keys(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1), (2);
        CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL UNIQUE, user TEXT NOT NULL,
                             scopes TEXT NOT NULL, created REAL NOT NULL, note TEXT NOT NULL DEFAULT '');
        CREATE INDEX tokens_by_user ON tokens (user);
        CREATE TABLE routes (domain TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL,
                             inspect INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX routes_by_user ON routes (user);
        INSERT INTO routes VALUES ('shop.example.com', 'bob', 1.0, 1), ('localhost', 'carol', 2.0, 0),
                                  ('[::1]', 'dave', 3.0, 0);
    """)
    db.commit()
    db.close()
    storage = SQLiteStorage(path)
    try:
        assert [(r.domain, r.user, r.inspect, r.strip) for r in storage.list_routes()] == [
            ("[::1]", "dave", False, False), ("localhost", "carol", False, False),
            ("shop.example.com", "bob", True, False)]
        # The migrated rows take part in the ownership rule.
        with pytest.raises(StorageError, match="would cover shop.example.com"):
            storage.add_route("*.example.com", "alice")
    finally:
        storage.close()


def test_old_redis_routes_join_the_ownership_rule(redis_server):
    import redis

    from tun2g.storage import RedisStorage

    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    raw.hset("tun2g:route:shop.example.com", mapping={"user": "bob", "created": "1.0"})  # as an older tun2g wrote
    raw.sadd("tun2g:routes", "shop.example.com")
    storage = RedisStorage(redis_server.url)
    try:
        assert storage.list_routes()[0].strip is False
        with pytest.raises(StorageError, match="would cover shop.example.com"):
            storage.add_route("*.example.com", "alice")
        assert raw.smembers("tun2g:route-parent:example.com") == {"shop.example.com"}
    finally:
        storage.close()
        raw.close()
