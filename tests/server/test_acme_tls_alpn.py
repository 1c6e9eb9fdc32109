"""ACME TLS-ALPN-01 with a real ACME server (pebble) validating against the tun2g server's public HTTPS port.

pebble's HTTP-01 port points at a port nobody listens on, so only the HTTPS
port can validate: `tun2g cert issue --challenge tls-alpn-01` succeeds, curl
verifies the issued chain with pebble's root, and the pending challenge is gone
afterwards. The same setup with HTTP-01 fails in one line with pebble's error,
which shows the HTTP port really was out of reach.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from tests.fixtures.net import free_port
from tests.fixtures.tunnel import DOMAIN, _start, wait_until
from tests.server.test_https import _curl

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def https_only_to_pebble(tmp_path, data_dir, backend, start_client, pebble):
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0")
    start_client(deployment.client_config(deployment.grant(), backend[0]))
    server = pebble(free_port(), deployment.running.https_address[1])  # HTTP-01 would reach nobody
    yield deployment, server
    deployment.running.stop()


def issue(deployment, server, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`tun2g cert issue` against pebble, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "issue", name, "--acme-directory",
                           server.directory_url, "--acme-ca-bundle", str(server.ca_bundle), *extra,
                           "--storage", deployment.storage_url], capture_output=True, text=True, timeout=100)


def test_tls_alpn_01_issues_with_the_http_port_out_of_reach_and_curl_validates_the_chain(https_only_to_pebble,
                                                                                         tmp_path):
    deployment, server = https_only_to_pebble
    issued = issue(deployment, server, DOMAIN, "--challenge", "tls-alpn-01")
    assert issued.returncode == 0, issued.stderr
    assert f"issued certificate for {DOMAIN}" in issued.stdout
    wait_until(lambda: DOMAIN in deployment.running.certificates.names(), timeout=5, message="served")
    [info] = deployment.storage.list_certificates()
    assert "Pebble" in info.issuer and info.not_after > time.time()
    root = tmp_path / "pebble-root.pem"
    root.write_text(server.root_pem())
    result = _curl(deployment, root)
    assert result.returncode == 0, result.stderr
    assert '"X-Forwarded-Proto": "https"' in result.stdout
    assert deployment.storage.acme_value(f"alpn:{DOMAIN}") is None  # removed after the order
    assert [name for name in _acme_keys(deployment) if not name.startswith("account:")] == []


def _acme_keys(deployment) -> list[str]:
    with sqlite3.connect(deployment.storage_url.removeprefix("sqlite:///")) as db:
        return [row[0] for row in db.execute("SELECT key FROM acme")]


def test_http_01_in_the_same_setup_fails_in_one_line_with_the_acme_error(https_only_to_pebble):
    deployment, server = https_only_to_pebble
    failed = issue(deployment, server, DOMAIN)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.count("\n") == 1 and "refused the order" in failed.stderr
    assert deployment.storage.list_certificates() == []


def test_a_bad_challenge_name_is_a_usage_error(https_only_to_pebble):
    deployment, server = https_only_to_pebble
    refused = issue(deployment, server, DOMAIN, "--challenge", "dns-01")
    assert refused.returncode == 2 and "--challenge" in refused.stderr and "Traceback" not in refused.stderr
