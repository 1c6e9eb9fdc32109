"""`tun2g token` and `tun2g route`: in-process through click, and as real processes and scripts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fixtures.net import env_without_proxies
from tun2g.cli import main
from tun2g.storage import NoSuchToken, RedisStorage, open_storage

REPO = Path(__file__).resolve().parents[2]


def run(*args, input=None):
    """Invoke `tun2g ARGS` in-process; returns click's Result."""
    return CliRunner().invoke(main, list(args), input=input)


def ok(*args, input=None) -> str:
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def fails(*args, code=1, input=None) -> str:
    """Run a command expected to fail; check it printed one clear line, not a traceback. Returns stderr."""
    result = run(*args, input=input)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    return result.stderr


# -- tokens ---------------------------------------------------------------------------------------

def test_create_prints_the_secret_once_and_how_to_use_it(storage_env):
    ok("route", "add", "app.example.com", "--user", "alice")
    out = ok("token", "create", "--user", "alice", "--note", "laptop")
    secret = out.split("only its hash is stored:")[1].split()[0]
    assert open_storage().has_token(secret) == ("alice", ["connect"])
    assert f"--token {secret}" in out and "--domain app.example.com" in out and "tun2g client" in out
    listing = ok("token", "list")
    assert secret not in listing and "alice" in listing and "laptop" in listing


def test_create_without_a_route_says_how_to_add_one(storage_env):
    out = ok("token", "create", "--user", "bob")
    assert "tun2g route add DOMAIN --user bob" in out


def test_create_quiet_and_json_are_for_scripts(storage_env):
    secret = ok("token", "create", "--user", "ci", "--quiet").strip()
    assert open_storage().has_token(secret)[0] == "ci"
    record = json.loads(ok("token", "create", "--user", "ci", "--scope", "connect", "--scope", "admin", "--json"))
    assert record["user"] == "ci" and record["scopes"] == ["connect", "admin"]
    assert open_storage().has_token(record["token"]) == ("ci", ["connect", "admin"])


def test_a_token_without_connect_scope_is_flagged(storage_env):
    assert "cannot open tunnels" in ok("token", "create", "--user", "ops", "--scope", "admin")


def test_list_filters_by_user_and_speaks_json(storage_env):
    assert ok("token", "list").startswith("no tokens in sqlite:")
    for user in ("alice", "bob", "alice"):
        ok("token", "create", "--user", user)
    rows = ok("token", "list", "--user", "alice").splitlines()
    assert rows[0].split() == ["ID", "USER", "SCOPES", "CREATED", "NOTE"] and len(rows) == 3
    records = json.loads(ok("token", "list", "--json"))
    assert [r["user"] for r in records] == ["alice", "bob", "alice"]
    assert set(records[0]) == {"id", "user", "scopes", "created", "note"}  # never the secret
    assert ok("token", "list", "--user", "carol").strip() == f"no tokens for carol in sqlite:{storage_env}/tun2g.sqlite3"


def test_revoke_stops_the_token_and_unknown_ids_fail_cleanly(storage_env):
    record = json.loads(ok("token", "create", "--user", "alice", "--json"))
    assert ok("token", "revoke", record["id"]).strip() == f"Revoked token {record['id']}."
    with pytest.raises(NoSuchToken):
        open_storage().has_token(record["token"])
    assert fails("token", "revoke", record["id"]).strip() == (
        f"tun2g token: no token with id '{record['id']}' (see `tun2g token list`)")


def test_import_registers_an_existing_go_token(storage_env):
    go_token = "an-existing-go-tun2-client-token-0123456789"
    assert "Imported token" in ok("token", "import", "--user", "alice", "--secret", "-", input=go_token + "\n")
    assert open_storage().has_token(go_token) == ("alice", ["connect"])
    assert "already registered" in fails("token", "import", "--user", "bob", "--secret", go_token)


def test_import_prompts_for_the_secret_and_warns_when_short(storage_env):
    result = run("token", "import", "--user", "alice", input="short\n")
    assert result.exit_code == 0 and result.stdout.startswith("Token secret: ")
    assert "only 5 characters" in result.stderr
    assert open_storage().has_token("short")[0] == "alice"


def test_missing_options_are_usage_errors(storage_env):
    assert "Missing option '--user'" in fails("token", "create", code=2)
    assert "Missing option '--user'" in fails("route", "add", "app.example.com", code=2)


# -- routes ---------------------------------------------------------------------------------------

def test_route_add_list_rm(storage_env):
    assert "Route app.example.com -> alice" in ok("route", "add", "App.Example.com:443", "--user", "alice")
    assert "nothing changed" in ok("route", "add", "app.example.com", "--user", "alice")
    ok("route", "add", "b.example.com", "--user", "bob")
    rows = ok("route", "list").splitlines()
    assert [row.split()[:2] for row in rows] == [["ROUTE", "USER"], ["app.example.com", "alice"],
                                                   ["b.example.com", "bob"]]
    assert [r["domain"] for r in json.loads(ok("route", "list", "--user", "bob", "--json"))] == ["b.example.com"]
    assert ok("route", "rm", "APP.example.com").strip() == "Removed route app.example.com."
    assert [r.domain for r in open_storage().list_routes()] == ["b.example.com"]


def test_route_add_wildcards_and_paths_with_strip(storage_env):
    assert "Route *.example.com -> alice" in ok("route", "add", "*.Example.com", "--user", "alice")
    assert "Route example.com/api -> alice" in ok("route", "add", "example.com", "--path", "/api/", "--strip",
                                                  "--user", "alice")
    listed = {r["domain"]: r for r in json.loads(ok("route", "list", "--json"))}
    assert listed["*.example.com"]["wildcard"] is True and listed["*.example.com"]["strip"] is False
    assert (listed["example.com/api"]["host"], listed["example.com/api"]["path"],
            listed["example.com/api"]["strip"]) == ("example.com", "/api", True)
    assert ok("route", "list").splitlines()[0].split() == ["ROUTE", "USER", "CREATED", "STRIP", "INSPECT"]
    assert fails("route", "add", "shop.example.com", "--user", "bob").strip() == (
        "tun2g route: route shop.example.com is under the wildcard *.example.com, which belongs to alice; "
        "only the wildcard's owner may add names under it")
    assert fails("route", "add", "example.com", "--path", "/a/../b", "--user", "alice").startswith(
        "tun2g route: invalid path prefix '/a/../b'")
    assert fails("route", "add", "example.com/api", "--path", "/v2", "--user", "alice").startswith("tun2g route: route")
    assert ok("route", "rm", "EXAMPLE.com/api").strip() == "Removed route example.com/api."


def test_route_inspect_switches_capture_and_list_shows_it(storage_env):
    ok("route", "add", "app.example.com", "--user", "alice")
    assert "Inspection of app.example.com is on" in ok("route", "inspect", "App.Example.com", "on")
    assert ok("route", "list").splitlines()[1].split()[-1] == "on"
    assert json.loads(ok("route", "list", "--json"))[0]["inspect"] is True
    ok("route", "inspect", "app.example.com", "off")
    assert open_storage().list_routes()[0].inspect is False
    assert fails("route", "inspect", "gone.example.com", "on").strip() == (
        "tun2g route: no route for gone.example.com (see `tun2g route list`)")


def test_route_errors_are_one_line(storage_env):
    ok("route", "add", "app.example.com", "--user", "alice")
    assert fails("route", "add", "app.example.com", "--user", "mallory").strip() == (
        "tun2g route: route app.example.com already belongs to alice; remove it first (tun2g route rm app.example.com)")
    assert fails("route", "rm", "gone.example.com").strip() == (
        "tun2g route: no route for gone.example.com (see `tun2g route list`)")
    assert fails("route", "add", "not a domain", "--user", "alice").startswith("tun2g route: invalid domain")
    assert open_storage().has_route("app.example.com") == "alice"


@pytest.mark.parametrize("command", [(), ("token",), ("token", "create"), ("token", "list"), ("token", "revoke"),
                                     ("token", "import"), ("route",), ("route", "add"), ("route", "rm"),
                                     ("route", "list"), ("route", "inspect")])
def test_every_command_has_help_with_examples(command):
    out = ok(*command, "--help")
    assert "Usage:" in out and ("Example" in out or "Quick start" in out)
    if len(command) == 2:
        assert "--storage URL" in out and "TUN2G_STORAGE" in out


# -- Redis ----------------------------------------------------------------------------------------

def test_storage_flag_and_redis_url_select_redis(storage_env, redis_server, monkeypatch):
    secret = ok("token", "create", "--user", "alice", "--quiet", "--storage", redis_server.url).strip()
    assert RedisStorage(redis_server.url).has_token(secret)[0] == "alice"
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    assert "alice" in ok("token", "list")
    assert not (storage_env / "tun2g.sqlite3").exists()  # nothing went to the SQLite file


def test_redis_down_is_one_line_and_exit_1(storage_env, redis_server):
    redis_server.stop()
    message = fails("route", "list", "--storage", redis_server.url)
    assert message.startswith(f"tun2g route: cannot reach Redis at {redis_server.url}")
    assert message.count("\n") == 1


# -- real processes -------------------------------------------------------------------------------

def process(command, env_extra, input=None):
    env = {key: value for key, value in env_without_proxies().items()
           if key not in ("TUN2G_STORAGE", "REDIS_URL", "TUN2G_DATA_DIR")}
    env.update(env_extra)
    return subprocess.run(command, cwd=REPO, env=env, input=input, capture_output=True, text=True, timeout=30)


def test_python_m_tun2g_cli(tmp_path):
    env = {"TUN2G_DATA_DIR": str(tmp_path)}
    cli = [sys.executable, "-m", "tun2g.cli"]
    assert process([*cli, "route", "add", "app.example.com", "--user", "alice"], env).returncode == 0
    created = process([*cli, "token", "create", "--user", "alice", "--quiet"], env)
    assert created.returncode == 0, created.stderr
    assert store_in(tmp_path).has_token(created.stdout.strip()) == ("alice", ["connect"])
    failed = process([*cli, "route", "add", "app.example.com", "--user", "bob"], env)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("tun2g route: route app.example.com already belongs to alice")
    assert "Traceback" not in failed.stderr and failed.stderr.count("\n") == 1


def test_operator_scripts_against_redis_url(redis_server):
    env = {"REDIS_URL": redis_server.url}
    assert process([str(REPO / "scripts/tun2g-route"), "add", "app.example.com", "--user", "alice"],
                   env).returncode == 0
    created = process([str(REPO / "scripts/tun2g-token"), "create", "--user", "alice", "--json"], env)
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    assert RedisStorage(redis_server.url).has_token(record["token"])[0] == "alice"
    listing = process([str(REPO / "scripts/tun2g-token"), "list"], env)
    assert record["id"] in listing.stdout and record["token"] not in listing.stdout
    for script in ("tun2g-token", "tun2g-route"):
        helped = process([str(REPO / "scripts" / script), "--help"], env)
        assert helped.returncode == 0 and f"Usage: {script}" in helped.stdout
    redis_server.stop()
    down = process([str(REPO / "scripts/tun2g-route"), "list"], env)
    assert down.returncode == 1 and "cannot reach Redis" in down.stderr.splitlines()[-1]


def test_console_script_when_installed(tmp_path):
    console = shutil.which("tun2g")
    if console is None:
        pytest.skip("tun2g is not installed (pip install -e .); `python -m tun2g.cli` is tested instead")
    listed = process([console, "route", "list"], {"TUN2G_DATA_DIR": str(tmp_path)})
    assert listed.returncode == 0 and listed.stdout.startswith("no routes in sqlite:")


def store_in(data_dir):
    """The store `tun2g` opens with TUN2G_DATA_DIR=data_dir."""
    return open_storage(f"sqlite://{os.path.join(data_dir, 'tun2g.sqlite3')}")
