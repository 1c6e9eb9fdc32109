"""ACME with a real ACME server (pebble), real HTTP-01 validation against the tun2g server under test.

`tun2g cert issue` orders; pebble validates by connecting to the server's
public HTTP port, which answers from the store; the server then serves the
issued chain over HTTPS, which curl verifies with pebble's root. An unrouted
name is never ordered. Requests for unknown challenge tokens go to the site.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.fixtures.net import require_binary
from tests.fixtures.tunnel import DOMAIN, _start, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def acme_setup(tmp_path, data_dir, backend, start_client, pebble):
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0")
    start_client(deployment.client_config(deployment.grant(), backend[0]))
    server = pebble(deployment.running.http_address[1], deployment.running.https_address[1])
    yield deployment, server
    deployment.running.stop()


def _issue(deployment, server, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "issue", name, "--acme-directory",
                           server.directory_url, "--acme-ca-bundle", str(server.ca_bundle), "--acme-email",
                           "ops@example.com", "--storage", deployment.storage_url],
                          capture_output=True, text=True, timeout=100)


def test_http01_issues_for_a_routed_name_and_curl_validates_the_chain(acme_setup, tmp_path):
    deployment, server = acme_setup
    issued = _issue(deployment, server, DOMAIN)
    assert issued.returncode == 0, issued.stderr
    wait_until(lambda: DOMAIN in deployment.running.certificates.names(), timeout=5, message="served")
    [info] = deployment.storage.list_certificates()
    assert info.name == DOMAIN and "Pebble" in info.issuer and info.not_after > time.time()
    root = tmp_path / "pebble-root.pem"
    root.write_text(server.root_pem())
    port = deployment.running.https_address[1]
    result = subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert", str(root), "--resolve",
                             f"{DOMAIN}:{port}:127.0.0.1", f"https://{DOMAIN}:{port}/headers"],
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    assert '"X-Forwarded-Proto": "https"' in result.stdout
    # the pending tokens were removed, the account key stays for the next order
    import sqlite3

    with sqlite3.connect(deployment.storage_url.removeprefix("sqlite:///")) as db:
        keys = [row[0] for row in db.execute("SELECT key FROM acme")]
    assert len(keys) == 1 and keys[0].startswith("account:")


def test_an_unrouted_name_is_never_ordered(acme_setup):
    deployment, server = acme_setup
    refused = _issue(deployment, server, "unrouted.test")
    assert refused.returncode == 1 and "no route" in refused.stderr and "Traceback" not in refused.stderr
    assert deployment.storage.list_certificates() == []


def test_unknown_tokens_are_not_answered(acme_setup):
    deployment, _server = acme_setup
    from tests.server.support import connect, read_until_closed

    with connect(deployment.running.http_address[1]) as sock:
        sock.sendall(f"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = read_until_closed(sock)
    assert b"application/octet-stream" not in answer  # the site's own answer (the test backend's 404 page)
