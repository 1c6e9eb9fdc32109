"""TLS passthrough on the public HTTPS port, and a passthrough name's allow/deny lists.

Real peers: nginx holds secure.test's certificate and key, curl verifies it with
that CA through the `--https` port (the tunnel never has the key), while app.test
on the same port is still terminated with its stored certificate.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.fixtures.net import require_binary
from tests.fixtures.tunnel import DOMAIN, _start, wait_until
from tests.server.test_https import ca, store_certificate  # noqa: F401  (a fixture)
from tests.tcp.test_real_peers import nginx_tls  # noqa: F401  (a fixture)
from tun2g.client.tcp_forward import TCPForwarder
from tun2g.policy import Policy

NAME = "secure.test"


@pytest.fixture
def shared_port(tmp_path, data_dir, start_client, backend, nginx_tls, ca):  # noqa: F811
    """One HTTPS port: app.test terminated here, secure.test passed through to nginx; (deployment, nginx CA)."""
    nginx_port, nginx_ca = nginx_tls
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0", https_handshake_timeout=1.0)
    try:
        store_certificate(deployment, ca, DOMAIN)
        url, _app = backend
        start_client(deployment.client_config(deployment.grant(), url))
        tls = TCPForwarder.from_specs(tls_specs=[f"{NAME}=127.0.0.1:{nginx_port}"])
        start_client(deployment.client_config(deployment.grant(NAME), "http://127.0.0.1:9", domain=NAME, tcp=tls))
        wait_until(lambda: NAME in deployment.server.tcp.passthrough_names(), message="the name served")
        yield deployment, nginx_ca
    finally:
        deployment.running.stop()


def _curl(deployment, ca_file, host: str) -> subprocess.CompletedProcess:
    port = deployment.running.https_address[1]
    return subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert", str(ca_file),
                           "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"],
                          capture_output=True, text=True, timeout=15)


def _set_policy(deployment, data: dict) -> None:
    deployment.storage.set_policy(NAME, Policy.from_mapping(data, "test").as_mapping())
    deployment.server.policies.refresh(deployment.storage)


def test_a_passthrough_name_on_the_https_port_reaches_nginx_end_to_end(shared_port, ca, tmp_path):  # noqa: F811
    deployment, nginx_ca = shared_port
    result = _curl(deployment, nginx_ca, NAME)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "end-to-end from nginx\n"
    # The tunnel's own certificate book never held the passthrough name.
    assert NAME not in deployment.running.certificates.names()
    # The HTTPS name on the same port is still terminated here, with its stored certificate.
    ca_file = tmp_path / "app-ca.pem"
    ca_file.write_text(ca.root_pem)
    app = _curl(deployment, ca_file, DOMAIN)
    assert app.returncode == 0, app.stderr
    assert "end-to-end" not in app.stdout


def test_a_passthrough_names_deny_list_resets_and_its_allow_list_admits(shared_port):
    deployment, nginx_ca = shared_port
    metrics = deployment.server.metrics
    _set_policy(deployment, {"deny": ["127.0.0.0/8"]})
    denied = _curl(deployment, nginx_ca, NAME)
    assert denied.returncode != 0 and "end-to-end" not in denied.stdout
    assert metrics.tcp_connections["refused_by_policy"].value == 1
    _set_policy(deployment, {"allow": ["10.0.0.0/8"]})
    assert _curl(deployment, nginx_ca, NAME).returncode != 0
    assert metrics.tcp_connections["refused_by_policy"].value == 2
    _set_policy(deployment, {"allow": ["127.0.0.1/32"]})
    allowed = _curl(deployment, nginx_ca, NAME)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == "end-to-end from nginx\n"


def _closes(sock: socket.socket) -> bool:
    """True when the server ends the connection (FIN or RST) before the socket's own timeout."""
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: ended too
    return True


def test_a_stalled_or_dribbled_client_hello_is_cut_within_the_handshake_timeout(shared_port):
    deployment, _nginx_ca = shared_port
    front = deployment.running.https_front
    address = deployment.running.https_address
    started = time.monotonic()
    # A record header promising a large hello, a few bytes, then nothing: cut at the 1 s timeout.
    with socket.create_connection(address, timeout=4) as stalled:
        stalled.sendall(b"\x16\x03\x01\x3f\xff\x01\x00")
        assert _closes(stalled)
    assert time.monotonic() - started < 3
    # One byte at a time (the pace is the attack, not synchronisation): cut within the timeout too.
    started = time.monotonic()
    with socket.create_connection(address, timeout=4) as dribbler:
        dribbler.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"\x16\x03\x01\x3f\xff" + b"\x01" * 60:
            try:
                dribbler.send(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - started > 3:
                break
            time.sleep(0.05)
        assert _closes(dribbler)
    assert time.monotonic() - started < 4
    wait_until(lambda: front.connections == 0, timeout=5, message="the front's connections released")
