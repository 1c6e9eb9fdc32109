"""The README walk-through, as a user types it: real processes, real curl."""

import socket
import subprocess
import sys

import pytest
import requests
from click.testing import CliRunner

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import wait_until
from tun2g.cli import main


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


def grant(env, domain: str) -> str:
    """`tun2g route add` + `tun2g token create --quiet`, as the README does; returns the token."""
    subprocess.run(tun2g("route", "add", domain, "--user", "me"), env=env, check=True, capture_output=True,
                   timeout=30)
    return subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=env, check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def connect_client(env, domain: str, *args) -> subprocess.Popen:
    """A `tun2g client` process for `domain`, returned once it says it is connected."""
    client = subprocess.Popen(tun2g("client", "--domain", domain, *args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert "connecting to" in client.stdout.readline()
    assert f"connected as {domain}" in client.stdout.readline()
    return client


def curl(http_port: int, domain: str) -> bytes:
    return subprocess.run(["curl", "-s", "-H", f"Host: {domain}", f"http://127.0.0.1:{http_port}/"],
                          capture_output=True, timeout=20, check=True).stdout


def test_readme_walkthrough(tmp_path, backend):
    backend_url, _app = backend
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    env.pop("REDIS_URL", None)
    env.pop("TUN2G_STORAGE", None)
    http_port, tunnel_port, admin_port = free_port(), free_port(), free_port()
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                    f"127.0.0.1:{tunnel_port}", "--admin", f"127.0.0.1:{admin_port}"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = None
    try:
        wait_for_port(http_port)
        wait_for_port(tunnel_port)
        token = grant(env, "app.localhost")
        cert = tmp_path / "tun2g-dev-cert.pem"
        assert cert.exists(), "the server makes a development certificate when given none"
        client = connect_client(env | {"TUN2G_TOKEN": token}, "app.localhost", "--server", f"localhost:{tunnel_port}",
                                "--ca", str(cert), "--backend", backend_url)
        assert curl(http_port, "app.localhost") == b"hello from backend\n"
        assert client.stdout.readline().startswith("GET / 200 ")  # the client's line for that request
        # As the README types them: no --admin, no token (the server recorded both in the data dir).
        listing = subprocess.run(tun2g("backends"), env=env,
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        assert "app.localhost" in listing and "tcp+tls" in listing
        backend_id = listing.splitlines()[1].split()[0]
        killed = subprocess.run(tun2g("kill", backend_id), env=env,
                                capture_output=True, text=True, timeout=30)
        assert killed.returncode == 0 and backend_id in killed.stdout
        assert "retrying in" in client.stdout.readline()
        wait_until(lambda: requests.get(f"http://127.0.0.1:{http_port}/", headers={"Host": "app.localhost"},
                                        timeout=5).status_code == 200, message="the client to reconnect")
    finally:
        for process in (client, server):
            if process is not None:
                process.terminate()
                process.wait(10)


def test_client_exits_2_with_a_hint_when_rejected(tmp_path, backend):
    backend_url, _app = backend
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    http_port, tunnel_port = free_port(), free_port()
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                    f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0", "--plain-tunnel"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(tunnel_port)
        result = subprocess.run(tun2g("client", "--server", f"127.0.0.1:{tunnel_port}", "--plain", "--token", "nope",
                                      "--domain", "x.localhost", "--backend", backend_url), env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert "invalid token" in result.stderr and "no route" not in result.stderr
        assert "tun2g route list" in result.stderr
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("command", ["server", "client", "token", "route", "backends", "kill", "cert", "inspect"])
def test_every_command_has_complete_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    group_or_command = main.commands[command]
    for param in getattr(group_or_command, "params", []):
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert opt in result.output, f"{command} --help does not mention {opt}"
        if getattr(param, "help", None) is None and param.param_type_name == "option" and opt != "--help":
            pytest.fail(f"{command} {opt} has no help text")


def test_bad_address_is_a_clear_usage_error():
    result = CliRunner().invoke(main, ["server", "--http", "nonsense"])
    assert result.exit_code == 2
    assert "expected HOST:PORT" in result.output


@pytest.mark.parametrize("profile", ["fast", "kcp-go"])
def test_kcp_tunnel_from_the_command_line(tmp_path, backend, profile):
    backend_url, _app = backend
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    http_port, kcp_port = free_port(), free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel", "127.0.0.1:0",
                                    "--admin", "127.0.0.1:0", "--kcp", f"127.0.0.1:{kcp_port}",
                                    "--kcp-profile", profile), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        wait_for_port(http_port)
        token = grant(env, "kcp.localhost")
        client = connect_client(env, "kcp.localhost", "--server", f"localhost:{kcp_port}", "--conn-type", "kcp",
                                "--kcp-profile", profile, "--ca", str(tmp_path / "tun2g-dev-cert.pem"),
                                "--token", token, "--backend", backend_url)
        assert curl(http_port, "kcp.localhost") == b"hello from backend\n"
    finally:
        for process in (client, server):
            if process is not None:
                process.terminate()
                process.wait(10)
