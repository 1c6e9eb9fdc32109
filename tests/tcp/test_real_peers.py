"""Real peers through TCP routes: OpenSSH, redis-cli against redis-server, TLS passthrough to nginx with curl."""

from __future__ import annotations

import getpass
import os
import subprocess

import pytest

from tests.fixtures.net import free_port, require_binary, wait_for_port
from tests.fixtures.tunnel import DOMAIN, USER, _start, wait_until
from tests.tcp.test_tcp_routes import _route, _serve, tcp_deployment  # noqa: F401  (a fixture)
from tun2g.client.tcp_forward import TCPForwarder
from tun2g.transport.tls import make_dev_certificate


@pytest.fixture
def sshd(tmp_path):
    """OpenSSH's sshd on a free port, as the current user, with a throwaway host key and user key."""
    binary = require_binary("/usr/sbin/sshd") if not _which("sshd") else _which("sshd")
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True,
                       timeout=30)
    (tmp_path / "authorized_keys").write_text((tmp_path / "user.pub").read_text())
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host'}\n"
                      f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPidFile {tmp_path / 'sshd.pid'}\n"
                      "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin yes\n")
    if os.geteuid() == 0:  # root's sshd needs its privilege-separation directory (systemd makes it at boot)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    process = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, tmp_path / "user"
    finally:
        process.terminate()
        process.wait(10)


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name) or shutil.which(f"/usr/sbin/{name}")


def test_ssh_runs_a_command_through_a_tcp_route(tcp_deployment, start_client, sshd):  # noqa: F811
    ssh_port, user_key = sshd
    port = free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{ssh_port}"])
    result = subprocess.run(
        [require_binary("ssh"), "-p", str(port), "-i", str(user_key), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
         f"{getpass.getuser()}@127.0.0.1", "echo through-the-tunnel; uname -s"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["through-the-tunnel", "Linux"]


def test_redis_cli_talks_to_a_tunnelled_redis_server(tcp_deployment, start_client, redis_server):  # noqa: F811
    port = free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{redis_server.port}"])
    cli = require_binary("redis-cli")
    for command, expected in ((["SET", "k", "through"], "OK"), (["GET", "k"], "through"), (["PING"], "PONG")):
        result = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *command], capture_output=True,
                                text=True, timeout=30)
        assert result.stdout.strip() == expected, result.stderr


@pytest.fixture
def nginx_tls(tmp_path):
    """nginx serving HTTPS for secure.test with its own certificate (the tunnel never sees the key)."""
    binary = require_binary("nginx")
    cert, key = make_dev_certificate(tmp_path / "nginx-cert", hostnames=("secure.test",))
    port = free_port()
    (tmp_path / "nginx.conf").write_text(f"""
daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; worker_processes 1;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
  fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
  server {{ listen 127.0.0.1:{port} ssl; server_name secure.test;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ return 200 "end-to-end from nginx\\n"; }} }} }}
""")
    process = subprocess.Popen([binary, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, cert
    finally:
        process.terminate()
        process.wait(10)


def test_tls_passthrough_by_sni_reaches_nginx_end_to_end(tmp_path, data_dir, start_client, nginx_tls):
    nginx_port, ca = nginx_tls
    deployment = _start(tmp_path, data_dir, plain=True, tls_passthrough="127.0.0.1:0")
    try:
        token = deployment.grant("secure.test")
        config = deployment.client_config(token, "http://127.0.0.1:9", domain="secure.test",
                                          tcp=TCPForwarder.from_specs(tls_specs=[f"secure.test=127.0.0.1:{nginx_port}"]))
        start_client(config)
        wait_until(lambda: "secure.test" in deployment.server.tcp.passthrough_names(), message="the name served")
        public = deployment.running.passthrough_address[1]
        curl = [require_binary("curl"), "-sS", "--max-time", "20", "--cacert", str(ca),
                "--resolve", f"secure.test:{public}:127.0.0.1", f"https://secure.test:{public}/"]
        result = subprocess.run(curl, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "end-to-end from nginx\n"
        # A name nobody serves, and a visitor that sends no SNI: reset, never another tenant's backend.
        other = subprocess.run([*curl[:-3], "--resolve", f"other.test:{public}:127.0.0.1",
                                f"https://other.test:{public}/"], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "end-to-end" not in other.stdout
        no_sni = subprocess.run([*curl[:-3], "-k", f"https://127.0.0.1:{public}/"], capture_output=True, text=True,
                                timeout=30)
        assert no_sni.returncode != 0 and "end-to-end" not in no_sni.stdout
        assert deployment.server.metrics.tcp_connections["no_tunnel"].value == 2
    finally:
        deployment.running.stop()


def test_a_tls_name_the_user_does_not_own_is_rejected(tmp_path, data_dir, start_client):
    deployment = _start(tmp_path, data_dir, plain=True)
    try:
        deployment.grant("secure.test", user="bob")
        token = deployment.grant(DOMAIN, user=USER)
        config = deployment.client_config(token, "http://127.0.0.1:9", reconnect=False,
                                          tcp=TCPForwarder.from_specs(tls_specs=["secure.test=127.0.0.1:1"]))
        running = start_client(config, wait=False)
        assert running.rejected.wait(10)
        assert "does not belong" in str(running.error)
    finally:
        deployment.running.stop()
