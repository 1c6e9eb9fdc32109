"""SQLite-specific behaviour: file layout, schema version, WAL, locks held by other processes."""

import sqlite3
import stat
import subprocess
import sys

import gevent
import pytest

from tun2g.storage import SQLiteStorage, StorageError, hash_secret
from tun2g.storage import sqlite_store

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_a_new_file_is_private_in_wal_mode_with_a_schema_version(tmp_path):
    path = tmp_path / "nested" / "dir" / "tun2g.sqlite3"
    storage = SQLiteStorage(path)
    assert storage.describe() == f"sqlite:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT max(version) FROM schema_version").fetchall() == [(sqlite_store.SCHEMA_VERSION,)]
    storage.close()
    SQLiteStorage(path).close()  # reopening does not migrate twice
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM schema_version").fetchone() == (sqlite_store.SCHEMA_VERSION,)  # one row per migration


def test_secrets_are_only_stored_as_hashes(tmp_path):
    path = tmp_path / "tun2g.sqlite3"
    storage = SQLiteStorage(path)
    info, secret = storage.create_token("alice")
    storage.import_token("bob", "imported-go-token-value")
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the database, its WAL and shm
    assert hash_secret(secret).encode() in files and info.id.encode() in files
    assert secret.encode() not in files and b"imported-go-token-value" not in files
    storage.close()


def test_a_database_from_a_newer_tun2g_is_refused(tmp_path):
    path = tmp_path / "tun2g.sqlite3"
    SQLiteStorage(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StorageError, match="schema version 99.*upgrade tun2g"):
        SQLiteStorage(path)


def test_a_file_that_is_not_a_database_is_reported(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello " * 1000)
    with pytest.raises(StorageError, match=f"{path}.*not a tun2g SQLite store"):
        SQLiteStorage(path)


def test_an_unusable_directory_is_reported(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(StorageError, match="directory exists and is writable"):
        SQLiteStorage(not_a_directory / "tun2g.sqlite3")


def test_a_closed_store_says_so(sqlite_storage):
    sqlite_storage.close()
    with pytest.raises(StorageError, match="closed"):
        sqlite_storage.list_routes()


def test_a_write_waits_cooperatively_for_another_writer(tmp_path):
    path = tmp_path / "tun2g.sqlite3"
    storage = SQLiteStorage(path)
    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
    writer = gevent.spawn(storage.add_route, "app.example.com", "alice")
    # join returning on its timeout proves the hub keeps running while the writer waits
    writer.join(timeout=0.3)
    assert not writer.ready()
    assert storage.list_routes() == []  # reads are not blocked by the writer (WAL)
    other_process.execute("COMMIT")
    assert writer.get(timeout=5).user == "alice"
    other_process.close()


def test_a_lock_held_too_long_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "LOCK_WAIT_SECONDS", 0.2)
    path = tmp_path / "tun2g.sqlite3"
    storage = SQLiteStorage(path)
    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageError, match="locked"):
        storage.add_route("app.example.com", "alice")
    other_process.execute("ROLLBACK")
    assert storage.add_route("app.example.com", "alice").user == "alice"
    other_process.close()


def test_another_process_sees_changes_at_once(tmp_path):
    path = tmp_path / "tun2g.sqlite3"
    storage = SQLiteStorage(path)
    info, secret = storage.create_token("alice")
    check = ("import sys; from tun2g.storage import SQLiteStorage, NoSuchToken\n"
             "store = SQLiteStorage(sys.argv[1])\n"
             "try: print(store.has_token(sys.argv[2]))\n"
             "except NoSuchToken: print('revoked')\n")
    command = [sys.executable, "-c", check, str(path), secret]
    assert subprocess.run(command, capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip() == "('alice', ['connect'])"
    storage.revoke_token(info.id)
    assert subprocess.run(command, capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip() == "revoked"


def test_memory_store_for_quick_tests():
    storage = SQLiteStorage(":memory:")
    _, secret = storage.create_token("alice")
    assert storage.has_token(secret)[0] == "alice"
    assert storage.describe() == "sqlite::memory:"


def test_a_version_1_file_upgrades_and_its_routes_load_uninspected(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:  # the schema as version 1 left it, with one route
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (1)")
        for statement in sqlite_store._MIGRATIONS[1]:
            raw.execute(statement)
        raw.execute("INSERT INTO routes (domain, user, created) VALUES ('old.test', 'alice', 1.0)")
    store = sqlite_store.SQLiteStorage(path)
    try:
        assert [(r.domain, r.user, r.inspect) for r in store.list_routes()] == [("old.test", "alice", False)]
        assert store.set_route_inspect("OLD.test", True).inspect is True
        assert store.list_routes()[0].inspect is True
    finally:
        store.close()
