"""`tun2g login` once, then `tun2g http PORT`: connected, the public URL the server names, a line per request."""

import os
import stat
import subprocess
import sys

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


def _start_server(tmp_path, *args, http_port=None, server_env=None):
    """A `tun2g server` process with its own data and config dirs: (env, process, http port, tunnel port)."""
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_TOKEN"):
        env.pop(name, None)
    http_port, tunnel_port = http_port or free_port(), free_port()
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                    f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0", *args),
                              env=env | (server_env or {}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return env, server, http_port, tunnel_port


def test_login_then_http_port_serves_and_prints_the_public_url(tmp_path, backend):
    backend_url, _app = backend
    backend_port = int(backend_url.rsplit(":", 1)[1].split("/")[0])
    env, server, http_port, tunnel_port = _start_server(tmp_path, "--public-url", "https://{domain}")
    client = None
    try:
        wait_for_port(tunnel_port)
        subprocess.run(tun2g("route", "add", "app.localhost", "--user", "me"), env=env, check=True,
                       capture_output=True, timeout=30)
        token = subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=env, check=True,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        missing = subprocess.run(tun2g("http", "3000"), env=env, capture_output=True, text=True, timeout=30)
        assert missing.returncode == 2 and "tun2g login --server URL --token TOKEN" in missing.stderr
        subprocess.run(tun2g("login", "--server", f"localhost:{tunnel_port}", "--token", token, "--domain",
                             "app.localhost", "--ca", str(tmp_path / "data" / "tun2g-dev-cert.pem")),
                       env=env, check=True, capture_output=True, timeout=30)
        saved = tmp_path / "cfg" / "tun2g" / "credentials"
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        client = subprocess.Popen(tun2g("http", str(backend_port), "--inspect", "off"), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = [client.stdout.readline() for _ in range(2)]  # connecting, connected
        connected = next(line for line in lines if "connected as" in line)
        assert "serving https://app.localhost" in connected
        got = subprocess.run(["curl", "-s", "-H", "Host: app.localhost", f"http://127.0.0.1:{http_port}/"],
                             capture_output=True, timeout=20, check=True).stdout
        assert got == b"hello from backend\n"
        assert client.stdout.readline().startswith("GET / 200 ")
    finally:
        for process in (client, server):
            if process is not None:
                process.terminate()
                process.wait(10)


def _serve_once(args, env, marker="connected as"):
    """Run `tun2g http ...` until its connected line; returns (process, the lines up to it)."""
    process = subprocess.Popen(tun2g(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    while not lines or marker not in lines[-1]:
        line = process.stdout.readline()
        assert line, f"tun2g http ended before connecting: {lines}"
        lines.append(line)
    return process, lines


def test_http_with_no_domain_claims_a_random_name_and_reuses_it_every_day(tmp_path, backend):
    """docs/routing.md#self-service: the quick start's `tun2g http 3000` on a server that gives names."""
    import json
    import re

    backend_url, _app = backend
    backend_port = int(backend_url.rsplit(":", 1)[1].split("/")[0])
    http_port = free_port()
    env, server, http_port, tunnel_port = _start_server(
        tmp_path, "--self-service-domain", "tun.localhost", "--self-service-limit", "2",
        "--public-url", f"http://tun.localhost:{http_port}", http_port=http_port,
        server_env={"TUN2G_SELF_SERVICE_LIMIT": "9"})  # the flag wins over the variable
    client = None
    try:
        wait_for_port(tunnel_port)
        token = subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=env, check=True,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        subprocess.run(tun2g("login", "--server", f"localhost:{tunnel_port}", "--token", token,
                             "--ca", str(tmp_path / "data" / "tun2g-dev-cert.pem")),
                       env=env, check=True, capture_output=True, timeout=30)
        client, lines = _serve_once(("http", str(backend_port), "--inspect", "off"), env)
        name = re.search(r"connected as ([a-z2-7]{10}\.tun\.localhost) ", lines[-1]).group(1)
        assert f"serving http://{name}:{http_port}" in lines[-1]
        assert any(f"the server gave you {name}" in line for line in lines)
        saved = json.loads((tmp_path / "cfg" / "tun2g" / "credentials").read_text())
        assert saved["claimed_domain"] == name and saved["token"] == token
        got = subprocess.run(["curl", "-s", "-H", f"Host: {name}", f"http://127.0.0.1:{http_port}/"],
                             capture_output=True, timeout=20, check=True).stdout
        assert got == b"hello from backend\n"
        client.terminate()
        assert client.wait(30) == 0
        client, lines = _serve_once(("http", str(backend_port), "--inspect", "off"), env)
        assert f"connected as {name} " in lines[-1], "the next run serves the same URL"
        client.terminate()
        client.wait(30)
        client, lines = _serve_once(("http", str(backend_port), "--inspect", "off", "--new-name"), env)
        fresh = re.search(r"connected as (\S+) ", lines[-1]).group(1)
        assert fresh != name and fresh.endswith(".tun.localhost")
        client.terminate()
        client.wait(30)
        client = None
        refused = subprocess.run(tun2g("http", str(backend_port), "--inspect", "off", "--new-name"), env=env,
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        last = refused.stderr.strip().splitlines()[-1]  # after the key=value log lines: the one-line error
        assert "limit of this server (2)" in last and "tun2g route rm" in last and "--domain NAME" in last
    finally:
        for process in (client, server):
            if process is not None:
                process.terminate()
                process.wait(10)
