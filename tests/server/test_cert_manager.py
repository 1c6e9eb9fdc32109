"""`tun2g server --acme` against a real ACME server (pebble), with real HTTP-01 validation.

A handshake for a routed name with no certificate fails cleanly and makes the
server order one; the next handshake is served the issued chain, which curl
verifies with pebble's root. An unrouted SNI never reaches pebble. A
short-lived certificate (pebble's certificateValidityPeriod) is renewed before
it expires (its reused authorization not answered again) and served without a
restart.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.fixtures.net import require_binary
from tests.fixtures.tunnel import DOMAIN, _start, wait_until
from tun2g.server.cert_manager import AcmeSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def acme_server(tmp_path, data_dir, backend, start_client, pebble):
    """Factory: a server with --acme on SQLite, a client serving DOMAIN, and pebble validating against it."""
    started = []

    def start(validity: int | None = None, scan_interval: float = 60.0, authz_reuse: int = 50):
        settings = AcmeSettings(scan_interval=scan_interval)
        deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0", acme=True,
                            acme_settings=settings)
        started.append(deployment)
        start_client(deployment.client_config(deployment.grant(), backend[0]))
        server = pebble(deployment.running.http_address[1], deployment.running.https_address[1], validity, authz_reuse)
        settings.directory_url, settings.ca_bundle = server.directory_url, str(server.ca_bundle)
        return deployment, server

    yield start
    for deployment in started:
        deployment.running.stop()


def handshake(port: int, name: str, root: str | None = None) -> bytes:
    """The DER certificate served for `name` (verified with `root` when given); ssl.SSLError when refused."""
    context = ssl.create_default_context(cadata=root) if root else ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        return tls.getpeercert(binary_form=True)


def refused(port: int, name: str) -> str:
    """The handshake for `name` fails with the server's unrecognized_name alert; the error text."""
    with pytest.raises(ssl.SSLError) as failure:
        handshake(port, name)
    assert "UNRECOGNIZED_NAME" in str(failure.value).upper()
    return str(failure.value)


def test_first_use_orders_a_routed_name_and_the_next_handshake_is_served(acme_server, tmp_path):
    deployment, server = acme_server()
    running = deployment.running
    port = running.https_address[1]
    started = time.monotonic()
    refused(port, DOMAIN)  # this handshake fails cleanly; it made the server order
    wait_until(lambda: DOMAIN in running.certificates.names(), timeout=60, message="the certificate served")
    served_after = time.monotonic() - started
    print(f"first handshake -> certificate served: {served_after:.2f} s")
    root = tmp_path / "pebble-root.pem"
    root.write_text(server.root_pem())
    result = subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert", str(root), "--resolve",
                             f"{DOMAIN}:{port}:127.0.0.1", f"https://{DOMAIN}:{port}/headers"],
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    assert '"X-Forwarded-Proto": "https"' in result.stdout
    assert server.orders() == 1
    acme = running.acme
    assert (acme.metrics.started.value, acme.metrics.succeeded.value, acme.metrics.failed.value) == (1, 1, 0)
    exposition = running.server.metrics.exposition().decode()
    assert "tun2g_acme_orders_succeeded_total 1.0" in exposition and "tun2g_acme_issue_seconds_count 1.0" in exposition
    # `tun2g cert list` names the node that ordered it
    listing = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "list", "--json", "--storage",
                              deployment.storage_url], capture_output=True, text=True, timeout=30)
    [record] = json.loads(listing.stdout)
    assert record["name"] == DOMAIN and record["source"] == f"acme:{running.server.config.node_id}"
    assert "Pebble" in record["issuer"] and record["not_after"] > time.time()
    table = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "list", "--storage", deployment.storage_url],
                           capture_output=True, text=True, timeout=30).stdout
    assert f"acme:{running.server.config.node_id}" in table and "Pebble" in table
    # the order lock was released and the tokens removed; the account key stays
    store = deployment.storage
    assert store.acme_value(f"order:{DOMAIN}") is None


def test_an_unrouted_sni_orders_nothing_and_fails_cleanly(acme_server):
    deployment, server = acme_server()
    running = deployment.running
    port = running.https_address[1]
    for name in ("unrouted.test", "x." + DOMAIN, "127.0.0.1.nip.test"):
        refused(port, name)
    wait_until(lambda: running.acme.waiting() == 0, timeout=10, message="the manager looked at every name")
    assert server.orders() == 0
    assert running.acme.metrics.started.value == 0
    assert deployment.storage.list_certificates() == []
    # and the server still serves plain HTTP for the routed name as before
    refused(port, "unrouted.test")


def test_a_flood_of_random_snis_stays_within_the_queue_cap_and_orders_nothing(acme_server):
    import gevent

    from tun2g.server.cert_manager import QUEUE_CAP

    deployment, server = acme_server()
    running = deployment.running
    port = running.https_address[1]
    peak = []

    def one(index: int) -> None:
        refused(port, f"scan-{index}.unrouted.test")
        peak.append(running.acme.waiting())

    flood = [gevent.spawn(one, index) for index in range(300)]
    gevent.joinall(flood, timeout=60, raise_error=True)
    assert len(peak) == 300 and max(peak) <= QUEUE_CAP
    wait_until(lambda: running.acme.waiting() == 0, timeout=30, message="the queue drained")
    assert server.orders() == 0 and running.acme.metrics.started.value == 0
    refused(port, DOMAIN)  # a routed name still gets its order after the flood
    wait_until(lambda: DOMAIN in running.certificates.names(), timeout=60, message="the certificate served")


def test_a_short_lived_certificate_is_renewed_and_served_without_restart(acme_server):
    # every renewal finds its authorization valid already (pebble reuses them all): nothing to answer then
    deployment, server = acme_server(validity=12, scan_interval=0.5, authz_reuse=100)
    running = deployment.running
    port = running.https_address[1]
    refused(port, DOMAIN)
    wait_until(lambda: DOMAIN in running.certificates.names(), timeout=60, message="the first certificate")
    root = server.root_pem()
    first = handshake(port, DOMAIN, root)
    [info] = deployment.storage.list_certificates()
    assert info.not_after - info.not_before <= 13
    wait_until(lambda: handshake(port, DOMAIN, root) != first, timeout=60, interval=0.2,
               message="the renewed certificate served")
    [renewed] = deployment.storage.list_certificates()
    assert renewed.not_after > info.not_after
    assert running.acme.metrics.renewals.value >= 1
    assert server.orders() >= 2


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_the_command_line_server_orders_on_first_use(tmp_path, data_dir, pebble, challenge):
    """`tun2g server --acme` as a user runs it (TUN2G_ACME from the environment, the --acme-* flags).

    With tls-alpn-01 the server is HTTPS-only (`--http none`) and pebble's HTTP-01 port reaches nobody,
    so only the HTTPS port can have validated."""
    from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
    from tun2g.storage import open_storage

    http_port, https_port = free_port(), free_port()
    server = pebble(http_port if challenge == "http-01" else free_port(), https_port)
    public = ["--http", f"127.0.0.1:{http_port}"] if challenge == "http-01" else ["--http", "none"]
    storage_url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    store = open_storage(storage_url)
    store.add_route(DOMAIN, "alice")
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(data_dir), "TUN2G_ACME": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tun2g.cli", "server", *public, "--https",
         f"127.0.0.1:{https_port}", "--tunnel", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--plain-tunnel",
         "--storage", storage_url, "--node-id", "edge-1", "--acme-directory", server.directory_url,
         "--acme-ca-bundle", str(server.ca_bundle), "--acme-email", "ops@example.com",
         "--acme-challenge", challenge],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(https_port, timeout=30)
        refused(https_port, DOMAIN)
        root = server.root_pem()

        def served() -> bool:
            try:
                handshake(https_port, DOMAIN, root)
                return True
            except OSError:
                return False

        wait_until(served, timeout=60, interval=0.1, message="the CLI server serving its ACME certificate")
        [info] = store.list_certificates()
        assert info.source == "acme:edge-1" and server.orders() == 1
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)
        store.close()
    assert "acme_certificate_stored" in err and "Traceback" not in err
