"""`tun2g server --config` and `tun2g client --config`: real processes, precedence, errors, hot reload under load."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import click
import gevent
import pytest
import requests
from click.testing import CliRunner
from gevent.pywsgi import WSGIServer

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cli.client_cmd import client
from tun2g.cli.config_cmd import ConfigCommand, config_option, route_section, settings_of
from tun2g.cli.options import env_option
from tun2g.cli.server_cmd import server
from tun2g.storage import open_storage

SPOOFED = "203.0.113.9"  # an X-Forwarded-For hop believed only from a trusted proxy


def tun2g(*args: str) -> list[str]:
    return [sys.executable, "-m", "tun2g.cli", *args]


def run_env(tmp_path: Path, **extra: str) -> dict:
    env = {key: value for key, value in env_without_proxies().items()
           if not key.startswith("TUN2G_") and key not in ("REDIS_URL", "PORT")}
    return env | {"TUN2G_DATA_DIR": str(tmp_path)} | extra


def one_line_failure(tmp_path: Path, *args: str, **env: str) -> str:
    """Run `tun2g ARGS`, expecting exit status 2 and one line on stderr (no traceback); returns that line."""
    result = subprocess.run(tun2g(*args), cwd=tmp_path, env=run_env(tmp_path, **env), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


# -- the keys and the precedence ------------------------------------------------------------------

@click.command(cls=ConfigCommand)
@config_option("DEMO_CONFIG")
@env_option("--ping-interval", env="DEMO_PING", type=float, default=5.0)
@env_option("--log-level", env="DEMO_LEVEL", type=click.Choice(["debug", "info"]), default="info")
@env_option("--trusted-proxy", "proxies", env="DEMO_PROXY", multiple=True)
@env_option("--access-log/--no-access-log", env="DEMO_ACCESS", default=True)
def demo(ping_interval, log_level, proxies, access_log):
    click.echo(json.dumps([ping_interval, log_level, list(proxies), access_log]))


def resolve(*args: str, env: dict | None = None) -> list:
    result = CliRunner().invoke(demo, list(args), env=env or {})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults(tmp_path):
    path = tmp_path / "demo.toml"
    path.write_text('ping-interval = 2\nlog-level = "debug"\ntrusted-proxy = ["10.0.0.0/8"]\naccess-log = false\n')
    assert resolve() == [5.0, "info", [], True]
    assert resolve("--config", str(path)) == [2.0, "debug", ["10.0.0.0/8"], False]
    assert resolve(env={"DEMO_CONFIG": str(path)}) == [2.0, "debug", ["10.0.0.0/8"], False]
    assert resolve("--config", str(path), env={"DEMO_PING": "3", "DEMO_ACCESS": "1"}) == [
        3.0, "debug", ["10.0.0.0/8"], True]
    assert resolve("--config", str(path), "--ping-interval", "4", "--log-level", "info", "--access-log",
                   env={"DEMO_PING": "3"}) == [4.0, "info", ["10.0.0.0/8"], True]


def test_every_option_of_both_commands_is_a_key_spelled_as_its_flag():
    for command in (server, client):
        keys = settings_of(command)
        flags = {opt[2:] for param in command.params if isinstance(param, click.Option)
                 for opt in param.opts[:1] if opt.startswith("--") and param.name not in ("help", "config_file")}
        assert set(keys) == flags
    assert {"http", "ping-interval", "trusted-proxy", "access-log", "metrics-domain-cap"} <= set(settings_of(server))
    assert settings_of(server)["access-log"][0].kind is bool and settings_of(server)["trusted-proxy"][0].multiple
    assert {"server", "token-file", "domain", "backend", "quiet"} <= set(settings_of(client))


def test_a_flag_added_to_a_command_is_a_key_of_its_file_at_once(tmp_path):
    command = click.option("--new-flag", type=int, default=1)(demo)
    assert settings_of(command)["new-flag"][0].kind is int


# -- errors: one line, file:line: key, exit 2 ---------------------------------------------------------

def test_a_missing_file_is_one_line_and_exit_2(tmp_path):
    assert one_line_failure(tmp_path, "server", "--config", "missing.toml") == (
        "tun2g server: missing.toml: cannot read the config file: No such file or directory")


@pytest.mark.parametrize("text, message", [
    ('admin = "127.0.0.1:0"\npingg-interval = 2\n', "cfg.toml:2: pingg-interval: unknown key; did you mean "
                                                  "ping-interval?"),
    ('\n\nhttp = "nowhere"\n', "cfg.toml:3: http: expected HOST:PORT (e.g. 0.0.0.0:8080 or :8080), got 'nowhere'"),
    ("ping-interval = true\n", "cfg.toml:1: ping-interval: expected a number, got true or false"),
    ('kcp-profile = "slow"\n', "cfg.toml:1: kcp-profile: 'slow' is not one of 'fast', 'kcp-go'."),
    ('tls-cert = "absent.pem"\n', "cfg.toml:1: tls-cert: File '{dir}/absent.pem' does not exist."),
    ("log-level = 'info'\nlog-level = 'debug'\n", "cfg.toml:2: log-level: not valid TOML: defined twice"),
])
def test_a_bad_server_file_names_file_line_and_key(tmp_path, text, message):
    (tmp_path / "cfg.toml").write_text(text)
    line = one_line_failure(tmp_path, "server", "--config", "cfg.toml")
    assert line.startswith("tun2g server: " + message.format(dir=tmp_path))


def test_a_bad_client_file_names_file_line_and_key(tmp_path):
    (tmp_path / "client.toml").write_text('server = "127.0.0.1:1"\ndomain = ["a"]\n')
    assert one_line_failure(tmp_path, "client", "--config", "client.toml") == (
        "tun2g client: client.toml:2: domain: expected a string, got a list")


# -- a real server process, reloaded under load --------------------------------------------------------

class ServerProcess:
    """`tun2g server --config FILE` with its stderr in a file the test polls."""

    def __init__(self, tmp_path: Path, settings: dict) -> None:
        self.config = tmp_path / "tun2g.toml"
        self.log = tmp_path / "server.log"
        self.settings = settings
        self.tables = ""
        self.write()
        self.process = subprocess.Popen(tun2g("server", "--config", str(self.config)), env=run_env(tmp_path),
                                        stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def write(self, extra: str = "") -> None:
        lines = [f"{key} = {json.dumps(value)}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n" + extra + self.tables)

    def log_has(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def server_process(tmp_path):
    http, tunnel, admin = free_port(), free_port(), free_port()
    storage = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    running = ServerProcess(tmp_path, {"http": f"127.0.0.1:{http}", "tunnel": f"127.0.0.1:{tunnel}",
                                       "admin": f"127.0.0.1:{admin}", "plain-tunnel": True, "storage": storage,
                                       "access-log": False, "admin-token": "test-admin-token"})
    try:
        for port in (http, tunnel, admin):
            wait_for_port(port)
        running.ports = (http, tunnel, admin)
        running.storage = storage
        yield running
    finally:
        running.stop()


class RequestLoop:
    """Real HTTP requests through the tunnel, one after another in a greenlet, counting every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.last_forwarded_for = ""
        self.last_policy_header: str | None = None
        self.session = requests.Session()
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            try:
                response = self.session.get(self.url, headers={"Host": DOMAIN, "X-Forwarded-For": SPOOFED},
                                            timeout=5)
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    self.last_forwarded_for = response.json()["headers"].get("X-Forwarded-For", "")
                    self.last_policy_header = response.headers.get("X-Policy")
                    self.ok += 1
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            gevent.idle()

    def stop(self) -> None:
        self.greenlet.kill(block=True, timeout=5)
        self.session.close()


def applied_within_a_second(predicate, what: str) -> None:
    wait_until(predicate, timeout=1.0, interval=0.005, message=what)


def test_sighup_and_post_reload_change_live_settings_under_load_and_a_bad_file_changes_nothing(
        server_process, backend, start_client):
    from tun2g.client import ClientConfig

    http, tunnel_port, admin = server_process.ports
    storage = open_storage(server_process.storage)
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    connected = start_client(ClientConfig(server_addr=f"127.0.0.1:{tunnel_port}", token=token, domain=DOMAIN,
                                          backend_url=backend_url, plain=True, backoff_initial=0.05))
    loop = RequestLoop(f"http://127.0.0.1:{http}/headers")
    admin_url, admin_headers = f"http://127.0.0.1:{admin}", {"Authorization": "Bearer test-admin-token"}
    try:
        wait_until(lambda: loop.ok >= 20, message="requests through the tunnel")
        assert SPOOFED not in loop.last_forwarded_for  # 127.0.0.1 is not a trusted proxy yet
        assert loop.last_policy_header is None

        # Live settings (trusted-proxy, the access log, a policy) and a restart-only one (http) change at once.
        server_process.settings |= {"trusted-proxy": ["127.0.0.0/8"], "http": f"127.0.0.1:{free_port()}",
                                    "access-log": True}
        server_process.tables = f'\n[policy."{DOMAIN}"]\nresponse_headers = {{ set = {{ X-Policy = "v1" }} }}\n'
        server_process.write()
        server_process.process.send_signal(signal.SIGHUP)
        applied_within_a_second(lambda: loop.last_forwarded_for.startswith(SPOOFED), "the new trusted proxy")
        applied_within_a_second(lambda: loop.last_policy_header == "v1", "the new policy")
        wait_until(lambda: server_process.log_has("event=config_needs_restart"), message="the restart line")
        assert server_process.log_has("keys=http ") and server_process.log_has(
            "changed=access-log,policy,trusted-proxy")
        wait_until(lambda: server_process.log_has("event=request "), message="the access log, switched on")
        served = loop.ok

        # A bad file: logged, and the settings in force stay (the proxy is still trusted).
        server_process.write("ping-interval = 'often'\n")
        server_process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: server_process.log_has("event=config_reload_failed"), message="the failed reload line")
        assert server_process.log_has("tun2g.toml:9: ping-interval: expected a number, got a string")
        wait_until(lambda: loop.ok >= served + 20, message="requests after the bad reload")
        assert loop.last_forwarded_for.startswith(SPOOFED) and loop.last_policy_header == "v1"

        # The admin API: the same reload, 400 with the error, then 200 with what changed.
        refused = requests.post(f"{admin_url}/reload", json={}, headers=admin_headers, timeout=5)
        assert refused.status_code == 400 and "tun2g.toml:9: ping-interval" in refused.json()["error"]
        assert requests.post(f"{admin_url}/reload", json={}, timeout=5).status_code == 401
        del server_process.settings["trusted-proxy"]
        server_process.tables = server_process.tables.replace('"v1"', '"v2"')
        server_process.write()
        reloaded = requests.post(f"{admin_url}/reload", json={}, headers=admin_headers, timeout=5)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["changed"] == ["policy", "trusted-proxy"] and reloaded.json()["needs_restart"] == [
            "http"]
        applied_within_a_second(lambda: not loop.last_forwarded_for.startswith(SPOOFED), "the proxy untrusted")
        applied_within_a_second(lambda: loop.last_policy_header == "v2", "the policy changed again")
        wait_until(lambda: loop.ok >= served + 40, message="requests after the admin reload")
    finally:
        loop.stop()
    assert loop.failures == []
    assert connected.client.state == "connected" and connected.client.connections == 1  # the tunnel never dropped


# -- a real client process, reloaded ------------------------------------------------------------------

def _named_backend(name: bytes) -> WSGIServer:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(name)))])
        return [name]

    backend = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    backend.start()
    return backend


def test_client_sighup_moves_to_a_new_backend_without_dropping_the_session(tmp_path, plain_deployment):
    token = plain_deployment.grant()
    (tmp_path / "token").write_text(token + "\n")
    first, second = _named_backend(b"first"), _named_backend(b"second")
    config = tmp_path / "client.toml"
    settings = (f'server = "{plain_deployment.tunnel_addr}"\ntoken-file = "token"\ndomain = "{DOMAIN}"\n'
                f"plain = true\nno-inspect = true\nquiet = true\n")
    config.write_text(settings + f'backend = "http://127.0.0.1:{first.server_port}"\n')
    log = tmp_path / "client.log"
    out = tmp_path / "client.out"
    process = subprocess.Popen(tun2g("client", "--config", str(config)), env=run_env(tmp_path),
                               stdout=out.open("w"), stderr=log.open("w"))
    session = requests.Session()

    def body() -> bytes:
        response = session.get(plain_deployment.http_url, headers={"Host": DOMAIN}, timeout=5)
        assert response.status_code == 200, response.text
        return response.content

    try:
        wait_until(lambda: plain_deployment.server.get_backends_for_domain(DOMAIN), message="the client process")
        assert body() == b"first"
        assert "GET /" not in out.read_text()  # quiet: no line per request
        config.write_text(settings.replace("quiet = true", "quiet = false") +
                          f'backend = "http://127.0.0.1:{second.server_port}"\nlog-level = "debug"\n')
        process.send_signal(signal.SIGHUP)
        applied_within_a_second(lambda: body() == b"second", "the new backend")
        assert "changed=backend,log-level,quiet" in log.read_text()
        wait_until(lambda: body() and "GET / 200" in out.read_text(), message="a status line, quiet now off")
        config.write_text(settings + "backend = 5\n")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "event=config_reload_failed" in log.read_text(), message="the failed reload line")
        assert "client.toml:7: backend: expected a string, got a whole number" in log.read_text()
        assert body() == b"second"
        assert len(plain_deployment.server.get_backends_for_domain(DOMAIN)) == 1  # the same session throughout
        assert "event=connected" in log.read_text() and log.read_text().count("event=connected") == 1
    finally:
        session.close()
        process.terminate()
        process.wait(10)
        first.stop(timeout=1)
        second.stop(timeout=1)


def test_without_a_config_file_post_reload_says_there_is_none(plain_deployment):
    response = requests.post(f"{plain_deployment.admin_url}/reload", json={}, headers=plain_deployment.admin_headers,
                             timeout=5)
    assert response.status_code == 400 and "started without --config" in response.json()["error"]


def test_the_server_flags_override_the_file_in_a_real_process(tmp_path):
    http_in_file, http_in_env, admin = free_port(), free_port(), free_port()
    (tmp_path / "tun2g.toml").write_text(f'http = "127.0.0.1:{http_in_file}"\nadmin = "127.0.0.1:{admin}"\n'
                                         f'tunnel = "none"\nadmin-token = "t"\n')
    process = subprocess.Popen(tun2g("server", "--config", "tun2g.toml"), cwd=tmp_path,
                               env=run_env(tmp_path, TUN2G_HTTP=f"127.0.0.1:{http_in_env}"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(http_in_env)
        wait_for_port(admin)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{http_in_file}/", timeout=2)
    finally:
        process.terminate()
        process.wait(10)


# -- the documented examples ---------------------------------------------------------------------

def _documented_example(title: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    return text.split(f"## `{title}`, annotated", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]


@pytest.mark.pure
@pytest.mark.parametrize("title, command", [("tun2g.toml", server), ("client.toml", client)])
def test_the_annotated_examples_hold_every_key_and_pass_the_checks(title, command):
    from tun2g.config import check_settings, parse_config

    example = _documented_example(title)
    keys = settings_of(command)
    check_settings(parse_config(example.encode(), title), {key: setting for key, (setting, _o) in keys.items()})
    uncommented = "\n".join(line.lstrip("# ") for line in example.splitlines())
    documented = {line.split("=", 1)[0].strip() for line in uncommented.splitlines() if "=" in line}
    assert set(keys) - documented == set(), f"docs/config.md's {title} lacks these keys"


def test_a_readable_file_holding_a_secret_gets_a_warning(tmp_path):
    path = tmp_path / "demo.toml"
    @click.command(cls=ConfigCommand)
    @config_option("DEMO_CONFIG")
    @click.option("--admin-token")
    @click.option("--token-file")
    def command(admin_token, token_file):
        pass

    path.write_text('admin-token = "s3cret"\ntoken-file = "t"\n')
    path.chmod(0o644)
    result = CliRunner().invoke(command, ["--config", str(path)])
    assert result.exit_code == 0 and result.stderr.strip() == (
        f"tun2g command: warning: {path} holds admin-token and other users can read it: chmod 600 {path}")
    path.chmod(0o600)
    assert CliRunner().invoke(command, ["--config", str(path)]).stderr == ""


def test_policy_tables_are_checked_when_the_file_is_read(tmp_path):
    """With the edge-policy module a bad policy names its key inside the table; without it (this branch alone)
    a [policy] table is refused in one line rather than silently ignored."""
    import importlib.util

    (tmp_path / "cfg.toml").write_text('admin = "127.0.0.1:0"\n\n[policy."app.example.com"]\nrate = "10/s"\n\n'
                                       '[policy."b.example.com"]\nmax_body = "lots"\n')
    line = one_line_failure(tmp_path, "server", "--config", "cfg.toml")
    if importlib.util.find_spec("tun2g.policy") is None:
        assert line == ('tun2g server: cfg.toml:3: policy."app.example.com": edge policies in the config file need '
                        'the policy module, which this build lacks')
    else:
        assert line.startswith('tun2g server: cfg.toml:7: policy."b.example.com".max_body: ')


@click.command(cls=ConfigCommand)
@config_option("DEMO_CONFIG", sections={"route": route_section})
@click.option("--route", "route_specs", multiple=True)
def routes_demo(route_specs):
    click.echo(json.dumps(list(route_specs)))


def test_route_tables_become_the_repeatable_route_flag(tmp_path):
    path = tmp_path / "client.toml"
    path.write_text('[[route]]\nkey = "example.com/api"\nbackend = "http://127.0.0.1:4000"\n\n'
                    '[[route]]\nkey = "*.example.com"\nbackend = "http://127.0.0.1:5000"\n')
    result = CliRunner().invoke(routes_demo, ["--config", str(path)])
    assert json.loads(result.stdout) == ["example.com/api=http://127.0.0.1:4000", "*.example.com=http://127.0.0.1:5000"]
    path.write_text('route = ["a.example=http://127.0.0.1:1"]\n')
    assert json.loads(CliRunner().invoke(routes_demo, ["--config", str(path)]).stdout) == ["a.example=http://127.0.0.1:1"]
    path.write_text('[[route]]\nkey = "a.example"\nbackend = "http://127.0.0.1:1"\n[[route]]\nkey = "b.example"\n'
                    'backnd = "http://127.0.0.1:2"\n')
    result = CliRunner().invoke(routes_demo, ["--config", str(path)])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"tun2g routes-demo: {path}:6: route[1].backnd: unknown key; did you mean backend?")
    path.write_text('[[route]]\nkey = "a.example"\n')
    assert CliRunner().invoke(routes_demo, ["--config", str(path)]).stderr.strip() == (
        f'tun2g routes-demo: {path}:1: route[0]: each [[route]] needs backend = "..." (a string)')
