"""One behaviour suite, run against both stores (SQLite file and a private redis-server)."""

import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from tun2g.storage import NoSuchRoute, NoSuchToken, Route, Storage, StorageError, TokenInfo


def test_both_stores_satisfy_the_protocol(any_storage):
    assert isinstance(any_storage, Storage)
    any_storage.ping()


# -- tokens -------------------------------------------------------------------------------

def test_a_created_token_authenticates_its_user(any_storage):
    info, secret = any_storage.create_token("alice", note="laptop")
    assert isinstance(info, TokenInfo)
    assert (info.user, info.scopes, info.note) == ("alice", ("connect",), "laptop")
    assert len(info.id) == 12 and int(info.id, 16) >= 0
    assert len(secret) == 43  # token_urlsafe(32)
    assert any_storage.has_token(secret) == ("alice", ["connect"])


def test_every_token_gets_its_own_secret_and_id(any_storage):
    first, first_secret = any_storage.create_token("alice")
    second, second_secret = any_storage.create_token("alice")
    assert first.id != second.id and first_secret != second_secret


def test_scopes_are_kept_in_order_without_duplicates(any_storage):
    _, secret = any_storage.create_token("bob", scopes=["connect", "admin", "connect"])
    assert any_storage.has_token(secret) == ("bob", ["connect", "admin"])


@pytest.mark.parametrize("scopes", [[], [""], ["two words"], ["a,b"]])
def test_bad_scopes_are_refused(any_storage, scopes):
    with pytest.raises(StorageError, match="scope"):
        any_storage.create_token("bob", scopes=scopes)


@pytest.mark.parametrize("user", ["", "   ", "a\nb", "x" * 300])
def test_bad_user_names_are_refused(any_storage, user):
    with pytest.raises(StorageError, match="user"):
        any_storage.create_token(user)


@pytest.mark.parametrize("token", ["", "nope", "x" * 43])
def test_unknown_tokens_raise_a_lookup_error(any_storage, token):
    any_storage.create_token("alice")
    with pytest.raises(NoSuchToken) as caught:
        any_storage.has_token(token)
    assert isinstance(caught.value, LookupError)


def test_tokens_list_oldest_first_and_by_user(any_storage):
    made = [any_storage.create_token(user)[0] for user in ("alice", "bob", "alice")]
    assert any_storage.list_tokens() == made
    assert any_storage.list_tokens(user="alice") == [made[0], made[2]]
    assert any_storage.list_tokens(user="carol") == []


def test_revoked_tokens_stop_authenticating_at_once_everywhere(storage_factory):
    cli, server = storage_factory(), storage_factory()  # two handles, like `tun2g token` and a server
    info, secret = cli.create_token("alice")
    assert server.has_token(secret) == ("alice", ["connect"])
    cli.revoke_token(info.id.upper())  # ids are case-insensitive
    with pytest.raises(NoSuchToken):
        server.has_token(secret)
    assert server.list_tokens() == []


def test_revoking_an_unknown_id_says_how_to_find_ids(any_storage):
    with pytest.raises(NoSuchToken, match="token list"):
        any_storage.revoke_token("0123456789ab")
    info, _ = any_storage.create_token("alice")
    any_storage.revoke_token(info.id)
    with pytest.raises(NoSuchToken):
        any_storage.revoke_token(info.id)


def test_an_existing_go_client_token_can_be_imported(any_storage):
    info = any_storage.import_token("alice", "token-the-go-clients-already-send", scopes=["connect"],
                                    note="from tun2")
    assert any_storage.has_token("token-the-go-clients-already-send") == ("alice", ["connect"])
    assert any_storage.list_tokens() == [info]
    with pytest.raises(StorageError, match=f"already registered as token {info.id}"):
        any_storage.import_token("bob", "token-the-go-clients-already-send")
    assert any_storage.has_token("token-the-go-clients-already-send")[0] == "alice"


@pytest.mark.parametrize("secret", ["", "with space", "tab\there"])
def test_unusable_secrets_cannot_be_imported(any_storage, secret):
    with pytest.raises(StorageError, match="secret"):
        any_storage.import_token("alice", secret)


# -- routes -------------------------------------------------------------------------------

def test_routes_are_found_whatever_the_case_port_or_trailing_dot(any_storage):
    route = any_storage.add_route("App.Example.COM.", "alice")
    assert (route.domain, route.user) == ("app.example.com", "alice")
    for spelling in ("app.example.com", "APP.EXAMPLE.COM", "app.example.com:8080", "app.example.com."):
        assert any_storage.has_route(spelling) == "alice"
    with pytest.raises(NoSuchRoute) as caught:
        any_storage.has_route("other.example.com")
    assert isinstance(caught.value, LookupError)


def test_adding_a_route_again_for_the_same_user_changes_nothing(any_storage):
    first = any_storage.add_route("app.example.com", "alice")
    assert any_storage.add_route("APP.example.com", "alice") == first
    assert any_storage.list_routes() == [first]


def test_a_route_belonging_to_another_user_is_not_taken_over(any_storage):
    any_storage.add_route("app.example.com", "alice")
    with pytest.raises(StorageError, match="route app.example.com already belongs to alice; remove it first"):
        any_storage.add_route("app.example.com", "mallory")
    assert any_storage.has_route("app.example.com") == "alice"


def test_removed_routes_are_gone_at_once_everywhere(storage_factory):
    cli, server = storage_factory(), storage_factory()
    cli.add_route("app.example.com", "alice")
    assert server.has_route("app.example.com") == "alice"
    cli.remove_route("App.Example.com:443")
    with pytest.raises(NoSuchRoute):
        server.has_route("app.example.com")
    with pytest.raises(NoSuchRoute, match="route list"):
        cli.remove_route("app.example.com")
    assert cli.add_route("app.example.com", "bob").user == "bob"  # free to take now


def test_the_inspect_flag_is_off_by_default_switches_everywhere_and_moves_the_revision(storage_factory):
    cli, server = storage_factory(), storage_factory()
    assert cli.add_route("app.example.com", "alice").inspect is False
    before = server.revision()
    assert cli.set_route_inspect("App.Example.com:443", True) == Route("app.example.com", "alice",
                                                                      cli.list_routes()[0].created, True)
    assert [(r.domain, r.inspect) for r in server.list_routes()] == [("app.example.com", True)]
    assert server.revision() != before  # servers polling the revision notice the switch
    assert cli.add_route("app.example.com", "alice").inspect is True  # adding it again keeps the flag
    cli.set_route_inspect("app.example.com", False)
    assert server.list_routes()[0].inspect is False
    with pytest.raises(NoSuchRoute, match="route list"):
        cli.set_route_inspect("nowhere.example.com", True)


def test_routes_list_by_domain_and_by_user(any_storage):
    for domain, user in [("b.example.com", "bob"), ("c.example.com", "alice"), ("a.example.com", "alice")]:
        any_storage.add_route(domain, user)
    assert [r.domain for r in any_storage.list_routes()] == ["a.example.com", "b.example.com", "c.example.com"]
    alice = any_storage.list_routes(user="alice")
    assert [(r.domain, r.user) for r in alice] == [("a.example.com", "alice"), ("c.example.com", "alice")]
    assert all(isinstance(r, Route) and r.created > 0 for r in alice)


@pytest.mark.parametrize("domain", ["", "bad domain.com", "a..b", "-x.com", "x.com:port"])
def test_invalid_domains_are_refused_with_an_example(any_storage, domain):
    with pytest.raises(StorageError, match="app.example.com"):
        any_storage.add_route(domain, "alice")


# -- concurrency ----------------------------------------------------------------------------

def test_many_greenlets_creating_tokens_at_once(any_storage):
    jobs = [gevent.spawn(any_storage.create_token, f"user{n % 5}") for n in range(60)]
    finished = gevent.joinall(jobs, timeout=20, raise_error=True)
    assert len(finished) == len(jobs), f"{len(finished)} of {len(jobs)} token creations finished within 20 s"
    created = [job.value for job in jobs]
    assert len({info.id for info, _ in created}) == 60
    assert all(any_storage.has_token(secret) == (info.user, ["connect"]) for info, secret in created)
    assert len(any_storage.list_tokens()) == 60
    assert len(any_storage.list_tokens(user="user0")) == 12


def test_two_users_racing_for_one_domain_one_wins(storage_factory):
    handles = [storage_factory() for _ in range(8)]
    jobs = [gevent.spawn(handle.add_route, "contested.example.com", f"user{n}") for n, handle in enumerate(handles)]
    gevent.joinall(jobs, timeout=20)
    winners = [job.value for job in jobs if job.successful()]
    losers = [job.exception for job in jobs if not job.successful()]
    assert len(winners) == 1 and len(losers) == 7
    assert all(isinstance(err, StorageError) and "already belongs to" in str(err) for err in losers)
    assert handles[0].has_route("contested.example.com") == winners[0].user


_WORKER = """
import sys
from tun2g.storage import StorageError, open_storage
storage = open_storage(sys.argv[1])
name = sys.argv[2]
for _ in range(25):
    storage.create_token(name)
try:
    print(storage.add_route("contested.example.com", name).user)
except StorageError as exc:
    print("refused:", exc)
"""


def test_several_processes_writing_at_once(storage_factory):
    # Like several `tun2g token create` runs, or server processes, sharing one store.
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, storage_factory.url, f"proc{n}"],
                                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, outputs
    lines = [stdout.strip() for stdout, _ in outputs]
    winners = [line for line in lines if not line.startswith("refused:")]
    assert len(winners) == 1 and all("already belongs to" in line for line in lines if line not in winners)
    storage = storage_factory()
    assert len(storage.list_tokens()) == 100
    assert storage.has_route("contested.example.com") == winners[0]
