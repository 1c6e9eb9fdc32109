"""Stored edge policies: both stores keep them by route key, bump the revision, and an old SQLite file loads."""

from __future__ import annotations

import sqlite3

import pytest

from tun2g.storage import NoSuchPolicy, SQLiteStorage, StorageError


def test_policies_are_kept_by_route_and_bump_the_revision(storage_factory):
    writer, reader = storage_factory(), storage_factory()
    before = reader.revision()
    writer.set_policy("App.Test:8080", {"rate": "10/s"})
    writer.set_policy("*.example.com", {"deny": ["10.0.0.0/8"]})
    writer.set_policy("example.com/api/", {"max_body": "1M"})
    assert reader.revision() != before
    assert reader.get_policy("app.test") == {"rate": "10/s"}
    assert sorted(reader.list_policies()) == ["*.example.com", "app.test", "example.com/api"]
    writer.set_policy("app.test", {"rate": "5/s"})
    assert reader.get_policy("app.test") == {"rate": "5/s"}
    moved = reader.revision()
    writer.remove_policy("app.test")
    assert reader.revision() != moved
    with pytest.raises(NoSuchPolicy):
        reader.get_policy("app.test")
    with pytest.raises(NoSuchPolicy):
        writer.remove_policy("app.test")


def test_bad_route_keys_and_oversized_policies_are_refused(any_storage):
    for route in ("", "bad host", "example.com/a b", "exa\nmple.com"):
        with pytest.raises(StorageError):
            any_storage.set_policy(route, {})
    with pytest.raises(StorageError):
        any_storage.set_policy("app.test", {"error_pages": {"502": "x" * (3 << 20)}})
    assert any_storage.list_policies() == {}


@pytest.mark.pure
def test_a_schema_2_database_gains_the_policies_table(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1); INSERT INTO schema_version VALUES (2);
        CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL UNIQUE, user TEXT NOT NULL,
                             scopes TEXT NOT NULL, created REAL NOT NULL, note TEXT NOT NULL DEFAULT '');
        CREATE TABLE routes (domain TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL,
                             inspect INTEGER NOT NULL DEFAULT 0);
        INSERT INTO routes VALUES ('app.test', 'alice', 1.0, 0);
    """)
    db.close()
    store = SQLiteStorage(path)
    try:
        assert store.has_route("app.test") == "alice"
        store.set_policy("app.test", {"rate": "1/s"})
        assert store.list_policies() == {"app.test": {"rate": "1/s"}}
    finally:
        store.close()
