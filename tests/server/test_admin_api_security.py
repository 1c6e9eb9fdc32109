"""The admin API against a browser and a careless bind: token by default, Host check, JSON-only changes."""

import os
import stat
import subprocess
import sys

import pytest
import requests

from tests.fixtures.net import env_without_proxies, free_port
from tests.fixtures.tunnel import DOMAIN
from tun2g.errors import ConfigurationError
from tun2g.server.process import ServerSetup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tun2g(*args, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tun2g.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(data_dir) -> dict:
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(data_dir)}
    for name in ("TUN2G_ADMIN_TOKEN", "TUN2G_ADMIN_URL", "TUN2G_STORAGE", "REDIS_URL"):
        env.pop(name, None)
    return env


def test_without_the_token_every_endpoint_is_401(plain_deployment):
    d = plain_deployment
    for method, path in (("GET", "/backends"), ("GET", "/status"), ("POST", "/backends/x/kill")):
        assert requests.request(method, d.admin_url + path, json={}, timeout=5).status_code == 401
        wrong = requests.request(method, d.admin_url + path, json={}, timeout=5,
                                 headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and "admin token" in wrong.json()["error"]
    assert requests.get(d.admin_url + "/status", headers=d.admin_headers, timeout=5).status_code == 200


def test_the_token_is_made_once_in_the_data_dir_private_and_reused(plain_deployment, data_dir, tmp_path):
    path = data_dir / "admin-token"
    assert path.read_text().strip() == plain_deployment.running.admin_token
    assert len(plain_deployment.running.admin_token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="none", admin_addr="127.0.0.1:0",
                        storage_url=f"sqlite:///{tmp_path / 'other.sqlite3'}", log_level="warning").start()
    try:
        assert again.admin_token == plain_deployment.running.admin_token
    finally:
        again.stop()


def test_an_explicit_token_overrides_the_file(tmp_path, data_dir):
    running = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="none", admin_addr="127.0.0.1:0",
                          admin_token="operator-chosen", storage_url=f"sqlite:///{tmp_path / 's.sqlite3'}",
                          log_level="warning").start()
    try:
        url = f"http://127.0.0.1:{running.admin_address[1]}/status"
        assert requests.get(url, headers={"Authorization": "Bearer operator-chosen"}, timeout=5).status_code == 200
        assert not (data_dir / "admin-token").exists()
    finally:
        running.stop()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "127.0.0.1:1", "localhost", "10.0.0.1:{port}", ""])
def test_a_foreign_host_header_is_403_even_with_the_token(plain_deployment, host):
    """DNS rebinding: the victim's browser sends the attacker's name as Host, so the token never matters."""
    d = plain_deployment
    port = d.running.admin_address[1]
    response = requests.get(d.admin_url + "/backends", headers={**d.admin_headers, "Host": host.format(port=port)},
                            timeout=5)
    assert response.status_code == 403
    assert "is not this admin API's address" in response.json()["error"]


def test_curl_with_a_rebound_host_is_refused(plain_deployment):
    d = plain_deployment
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: evil.example",
                             "-H", f"Authorization: Bearer {d.running.admin_token}", d.admin_url + "/backends"],
                            capture_output=True, text=True, timeout=20, env=env_without_proxies())
    assert result.stdout == "403"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_the_loopback_names_of_the_listen_address_are_accepted(plain_deployment, host):
    d = plain_deployment
    port = d.running.admin_address[1]
    response = requests.get(d.admin_url + "/status", headers={**d.admin_headers, "Host": host.format(port=port)},
                            timeout=5)
    assert response.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_cross_site_style_post_is_415_and_the_tunnel_stays(tunnel, content_type):
    """What a web page can send without a preflight (text/plain and forms) never kills a tunnel."""
    deployment, _app, client = tunnel
    backend_id = deployment.server.get_all_backends()[0].id
    headers = dict(deployment.admin_headers)
    if content_type:
        headers["Content-Type"] = content_type
    refused = requests.post(f"{deployment.admin_url}/backends/{backend_id}/kill", data=b"{}", headers=headers,
                            timeout=5)
    assert refused.status_code == 415 and "application/json" in refused.json()["error"]
    assert [b.id for b in deployment.server.get_all_backends()] == [backend_id]
    assert client.connected.is_set()
    assert requests.get(deployment.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200
    killed = requests.post(f"{deployment.admin_url}/backends/{backend_id}/kill", json={},
                           headers={**deployment.admin_headers, "Content-Type": "application/json; charset=utf-8"},
                           timeout=5)
    assert killed.status_code == 200 and killed.json() == {"killed": backend_id}


def test_the_cli_reads_the_token_file_and_kill_sends_json(tunnel, data_dir):
    deployment, _app, client = tunnel
    env = cli_env(data_dir)
    listed = tun2g("backends", "--admin", deployment.admin_url, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    backend_id = deployment.server.get_all_backends()[0].id
    assert DOMAIN in listed.stdout and backend_id in listed.stdout
    client.connected.clear()
    killed = tun2g("kill", "--admin", deployment.admin_url, backend_id, env=env)
    assert killed.returncode == 0 and backend_id in killed.stdout, killed.stderr
    client.wait_connected()
    assert backend_id not in {b.id for b in deployment.server.get_all_backends()}


def test_the_cli_with_a_wrong_token_fails_in_one_line(plain_deployment, data_dir):
    result = tun2g("backends", "--admin", plain_deployment.admin_url, "--admin-token", "wrong",
                   env=cli_env(data_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "admin token missing or wrong" in result.stderr


def test_a_non_loopback_admin_address_without_a_token_is_refused(tmp_path):
    port = free_port()
    result = tun2g("server", "--http", "127.0.0.1:0", "--tunnel", "none", "--admin", f"0.0.0.0:{port}",
                   "--storage", f"sqlite:///{tmp_path / 's.sqlite3'}", env=cli_env(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--admin" in lines[0] and "--admin-token" in lines[0], result.stderr
    assert not (tmp_path / "admin-token").exists()
    for address in (f":{port}", f"[::]:{port}", f"192.0.2.1:{port}", f"example.com:{port}"):
        with pytest.raises(ConfigurationError, match="--admin-token"):
            ServerSetup(admin_addr=address).start()


def test_a_non_loopback_admin_address_with_a_token_starts(tmp_path, data_dir):
    running = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="none", admin_addr="0.0.0.0:0", admin_token="t0k",
                          storage_url=f"sqlite:///{tmp_path / 's.sqlite3'}", log_level="warning").start()
    try:
        port = running.admin_address[1]
        auth = {"Authorization": "Bearer t0k"}
        assert requests.get(f"http://127.0.0.1:{port}/status", headers=auth, timeout=5).status_code == 200
        rebound = requests.get(f"http://127.0.0.1:{port}/status", headers={**auth, "Host": f"evil.example:{port}"},
                               timeout=5)
        assert rebound.status_code == 403
    finally:
        running.stop()
