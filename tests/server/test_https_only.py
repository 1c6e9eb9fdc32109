"""`tun2g server --http none`: public HTTPS only, and one clear line where that cannot work.

A real server with no plain HTTP listener serves a tunnelled site over HTTPS
(curl verifies the chain); the refused combinations (no --https,
--https-redirect, --acme, a Redis store) are one line each and exit status 2,
never a traceback; `--acme` without `--https` likewise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.fixtures.certs import ThrowawayCA
from tests.fixtures.net import env_without_proxies, require_binary
from tests.fixtures.tunnel import DOMAIN, Deployment, wait_until
from tun2g.server.process import ServerSetup
from tun2g.storage.certificates import certificate_info

SERVER = ["server", "--tunnel", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--plain-tunnel"]


def test_an_https_only_server_serves_a_tunnel_over_https(tmp_path, data_dir, backend, start_client):
    ca = ThrowawayCA.create()
    storage_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    setup = ServerSetup(http_addr="none", https_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0",
                        admin_addr="127.0.0.1:0", plain_tunnel=True, storage_url=storage_url, access_log=False,
                        log_level="warning")
    deployment = Deployment(running=setup.start(), storage_url=storage_url, cert=None, plain=True)
    try:
        running = deployment.running
        assert running.http_address is None and running.front is None
        chain, key = ca.issue(DOMAIN)
        deployment.storage.put_certificate(certificate_info(DOMAIN, chain, key, "static", time.time()))
        wait_until(lambda: DOMAIN in running.certificates.names(), timeout=5, message="loaded")
        start_client(deployment.client_config(deployment.grant(), backend[0]))
        port = running.https_address[1]
        result = subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert",
                                 str(ca.write_root(tmp_path)), "--resolve", f"{DOMAIN}:{port}:127.0.0.1",
                                 f"https://{DOMAIN}:{port}/headers"], capture_output=True, text=True, timeout=15)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["headers"]["X-Forwarded-Proto"] == "https"
    finally:
        deployment.running.stop()


@pytest.mark.parametrize("argv, words", [
    (["--http", "none"], "--http none needs --https"),
    (["--http", "none", "--https", "127.0.0.1:0", "--https-redirect"], "--https-redirect"),
    (["--http", "none", "--https", "127.0.0.1:0", "--acme"], "--acme-challenge tls-alpn-01"),
    (["--http", "none", "--https", "127.0.0.1:0", "--storage", "redis://127.0.0.1:1/0"], "Redis"),
    (["--http", "127.0.0.1:0", "--acme"], "--acme needs --https"),
])
def test_what_cannot_work_is_one_line_and_status_2(tmp_path, argv, words):
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_TRACEBACK"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", *SERVER, *argv], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr, result.stderr
