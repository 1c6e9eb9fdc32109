"""`tun2g login` once, then `tun2g http PORT`: connected, the public URL the server names, a line per request."""

import os
import stat
import subprocess
import sys

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


def test_login_then_http_port_serves_and_prints_the_public_url(tmp_path, backend):
    backend_url, _app = backend
    backend_port = int(backend_url.rsplit(":", 1)[1].split("/")[0])
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_TOKEN"):
        env.pop(name, None)
    http_port, tunnel_port = free_port(), free_port()
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                    f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0",
                                    "--public-url", "https://{domain}"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
