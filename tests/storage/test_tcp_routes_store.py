"""TCP routes in both stores: one owner per port, the policy kept, removal, validation of the command-line form."""

from __future__ import annotations

import sqlite3

import pytest
from click.testing import CliRunner

from tun2g.cli import main
from tun2g.storage import NoSuchRoute, SQLiteStorage, StorageError
from tun2g.storage.sqlite_store import SCHEMA_VERSION
from tun2g.storage.tcp_route import TCPRouteStore, new_tcp_route, parse_tcp_route


def test_a_tcp_route_has_one_owner_and_keeps_its_policy(storage_factory):
    store, other = storage_factory(), storage_factory()
    assert isinstance(store, TCPRouteStore)
    route = new_tcp_route("tcp:0.0.0.0:2222", "alice", 1.0, allow=("10.0.0.0/8",), deny=("10.9.0.0/16",),
                          max_connections=5)
    assert store.add_tcp_route(route) == route
    assert other.tcp_route(2222) == route  # another handle (process) sees it
    assert store.add_tcp_route(new_tcp_route("tcp:2222", "alice", 2.0)) == route  # the same owner: unchanged
    with pytest.raises(StorageError, match="already routed to user 'alice'"):
        store.add_tcp_route(new_tcp_route("tcp:0.0.0.0:2222", "bob", 3.0))
    store.add_tcp_route(new_tcp_route("tcp:[::1]:2200", "bob", 3.0))
    assert [r.port for r in store.list_tcp_routes()] == [2200, 2222]
    assert [r.host for r in store.list_tcp_routes(user="bob")] == ["::1"]
    store.remove_tcp_route(2222)
    with pytest.raises(NoSuchRoute):
        other.tcp_route(2222)
    with pytest.raises(NoSuchRoute):
        store.remove_tcp_route(2222)
    assert store.list_routes() == []  # HTTP routes untouched


@pytest.mark.pure
@pytest.mark.parametrize("text, why", [
    ("tcp:0.0.0.0:0", "not a TCP route"), ("tcp:0.0.0.0:70000", "not a TCP route"), ("tcp:host", "not a TCP"),
    ("tcp:example.com:22", "must be an IP address"),
])
def test_bad_tcp_routes_are_refused_with_the_form_to_use(text, why):
    with pytest.raises(StorageError, match=why):
        parse_tcp_route(text)
    with pytest.raises(StorageError, match="CIDR"):
        new_tcp_route("tcp:22", "alice", 0.0, allow=("10.0.0.0/40",))


@pytest.mark.pure
def test_the_tcp_table_is_its_own_migration_step(tmp_path):
    path = tmp_path / "store.sqlite3"
    SQLiteStorage(path).list_tcp_routes()
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    columns = [row[1] for row in db.execute("PRAGMA table_info(tcp_routes)")]
    assert columns == ["port", "host", "user", "created", "policy"]


@pytest.mark.pure
def test_route_add_rm_and_list_take_tcp_routes(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    runner = CliRunner()
    added = runner.invoke(main, ["route", "add", "tcp:0.0.0.0:2222", "--user", "alice", "--deny", "192.0.2.0/24",
                                 "--storage", url])
    assert added.exit_code == 0, added.output
    assert "--tcp 2222=HOST:PORT" in added.output
    listed = runner.invoke(main, ["route", "list", "--storage", url])
    assert "tcp:0.0.0.0:2222" in listed.output and "deny 192.0.2.0/24" in listed.output
    assert "no routes" not in listed.output  # only TCP routes: their table is the whole listing
    assert runner.invoke(main, ["route", "list", "--user", "bob", "--storage", url]).output.startswith("no routes")
    wrong = runner.invoke(main, ["route", "add", "app.example.com", "--user", "a", "--deny", "10.0.0.0/8",
                                 "--storage", url])
    assert wrong.exit_code == 2 and "apply to TCP routes" in wrong.output
    bad = runner.invoke(main, ["route", "add", "tcp:0.0.0.0:99999", "--user", "a", "--storage", url])
    assert bad.exit_code != 0 and isinstance(bad.exception, (SystemExit, type(None)))
    assert "tcp:HOST:PORT" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(main, ["route", "rm", "tcp:2222", "--storage", url]).exit_code == 0
