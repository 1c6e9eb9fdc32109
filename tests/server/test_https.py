"""Public HTTPS: the certificate chosen by SNI from the store, the same pipeline as HTTP, bounded handshakes.

Real sockets and a real curl: the server gets certificates signed by a test CA
through `tun2g cert add` (or the store directly), and curl verifies the chain
with `--cacert`. An unknown name or a hello without SNI fails the handshake
with an alert (no default certificate is shown); a client that never finishes
its handshake is cut within the handshake timeout.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.fixtures.certs import ThrowawayCA
from tests.fixtures.net import require_binary
from tests.fixtures.tunnel import DOMAIN, _start, wait_until
from tun2g.storage.certificates import certificate_info


@pytest.fixture
def ca():
    return ThrowawayCA.create()


@pytest.fixture
def https_deployment(tmp_path, data_dir):
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0", https_handshake_timeout=1.0)
    yield deployment
    deployment.running.stop()


@pytest.fixture
def served(https_deployment, backend, start_client, ca):
    """An HTTPS deployment with a certificate for app.test and a connected tunnel client."""
    url, _app = backend
    store_certificate(https_deployment, ca, DOMAIN)
    start_client(https_deployment.client_config(https_deployment.grant(), url))
    return https_deployment


def store_certificate(deployment, ca: ThrowawayCA, name: str, *names: str) -> None:
    chain, key = ca.issue(*(names or (name,)))
    deployment.storage.put_certificate(certificate_info(name, chain, key, "static", time.time()))
    book = deployment.running.certificates
    wait_until(lambda: name in book.names(), timeout=5, message=f"{name} loaded")


def _port(deployment) -> int:
    return deployment.running.https_address[1]


def _curl(deployment, ca_file, host: str = DOMAIN, path: str = "/headers") -> subprocess.CompletedProcess:
    port = _port(deployment)
    return subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert", str(ca_file),
                           "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}{path}"],
                          capture_output=True, text=True, timeout=15)


def _tls_client(ca: ThrowawayCA) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.root_pem)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _handshake(deployment, context: ssl.SSLContext, server_name: str | None, session=None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", _port(deployment)), timeout=5)
    if server_name is None:
        context.check_hostname = False
    try:
        return context.wrap_socket(raw, server_hostname=server_name, session=session)
    except BaseException:
        raw.close()
        raise


def test_curl_validates_the_chain_and_the_backend_sees_https(served, ca, tmp_path):
    result = _curl(served, ca.write_root(tmp_path))
    assert result.returncode == 0, result.stderr
    headers = json.loads(result.stdout)["headers"]
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == f"{DOMAIN}:{_port(served)}"


def test_alpn_is_http1_even_when_the_client_offers_h2(served, ca):
    with _handshake(served, _tls_client(ca), DOMAIN) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_sessions_resume(served, ca):
    context = _tls_client(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is known right after the handshake
    with _handshake(served, context, DOMAIN) as first:
        session = first.session
    with _handshake(served, context, DOMAIN, session=session) as second:
        assert second.session_reused


@pytest.mark.parametrize("server_name", ["other.test", None])
def test_an_unknown_name_or_no_sni_fails_the_handshake_and_the_port_keeps_serving(served, ca, tmp_path,
                                                                                  server_name):
    with pytest.raises(ssl.SSLError) as failure:
        _handshake(served, _tls_client(ca), server_name).close()
    assert "UNRECOGNIZED_NAME" in str(failure.value).upper()
    assert _curl(served, ca.write_root(tmp_path)).returncode == 0


def test_exact_name_before_wildcard_and_wildcard_covers_one_label(https_deployment, ca):
    other_ca = ThrowawayCA.create("another CA")
    store_certificate(https_deployment, other_ca, "*.wild.test")
    store_certificate(https_deployment, ca, "exact.wild.test")
    with _handshake(https_deployment, _tls_client(ca), "exact.wild.test"):
        pass
    with _handshake(https_deployment, _tls_client(other_ca), "any.wild.test"):
        pass
    for uncovered in ("deep.any.wild.test", "wild.test"):
        with pytest.raises(ssl.SSLError):
            _handshake(https_deployment, _tls_client(other_ca), uncovered).close()


def test_a_certificate_added_by_the_command_is_served_without_restart(https_deployment, backend, start_client,
                                                                      ca, tmp_path):
    url, _app = backend
    start_client(https_deployment.client_config(https_deployment.grant(), url))
    chain, key = ca.issue(DOMAIN)
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    added = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "add", DOMAIN, "--cert",
                            str(tmp_path / "chain.pem"), "--key", str(tmp_path / "key.pem"),
                            "--storage", https_deployment.storage_url], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    wait_until(lambda: DOMAIN in https_deployment.running.certificates.names(), timeout=5, message="reload")
    assert _curl(https_deployment, ca.write_root(tmp_path)).returncode == 0
    listed = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "list", "--json", "--storage",
                             https_deployment.storage_url], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == [DOMAIN]
    assert "PRIVATE KEY" not in listed.stdout and key.splitlines()[1] not in listed.stdout


def test_a_silent_client_is_cut_at_the_handshake_timeout(https_deployment, ca):
    with socket.create_connection(("127.0.0.1", _port(https_deployment)), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01")  # the start of a hello, and nothing more
        started = time.monotonic()
        assert raw.recv(1024) == b""
        assert time.monotonic() - started < 3.0


def test_a_dribbled_hello_is_cut_at_the_handshake_timeout_in_all(https_deployment):
    with socket.create_connection(("127.0.0.1", _port(https_deployment)), timeout=5) as raw:
        started = time.monotonic()
        raw.settimeout(0.2)
        closed = False
        for byte in b"\x16\x03\x01\x02\x00" + b"\x01" * 60:
            try:
                raw.sendall(bytes([byte]))
                if raw.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - started < 3.0


def test_pending_handshakes_count_against_the_per_address_cap(tmp_path, data_dir):
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0", max_connections_per_ip=3)
    try:
        silent = [socket.create_connection(("127.0.0.1", _port(deployment)), timeout=5) for _ in range(3)]
        wait_until(lambda: deployment.running.https_front.connections == 3, timeout=5, message="3 pending")
        with socket.create_connection(("127.0.0.1", _port(deployment)), timeout=5) as refused:
            assert refused.recv(4096).startswith(b"HTTP/1.1 503")
        for sock in silent:
            sock.close()
    finally:
        deployment.running.stop()


@pytest.mark.parametrize("problem", ["wrong name", "key mismatch", "not pem"])
def test_cert_add_refuses_bad_input_in_one_line(tmp_path, ca, problem, storage_env):
    chain, key = ca.issue("right.test")
    if problem == "key mismatch":
        key = ca.issue("right.test")[1]
    if problem == "not pem":
        chain = "hello"
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    name = "wrong.test" if problem == "wrong name" else "right.test"
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", "cert", "add", name, "--cert",
                             str(tmp_path / "chain.pem"), "--key", str(tmp_path / "key.pem")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--cert/--key" in result.stderr
    assert "PRIVATE KEY" not in result.stderr + result.stdout


def test_redis_down_keeps_serving_the_loaded_certificates(tmp_path, data_dir, redis_server, ca):
    from tests.fixtures.tunnel import Deployment
    from tun2g.server.process import ServerSetup

    setup = ServerSetup(http_addr="127.0.0.1:0", https_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0",
                        admin_addr=None, plain_tunnel=True, storage_url=redis_server.url, access_log=False,
                        log_level="warning", node_id="n1")
    deployment = Deployment(running=setup.start(), storage_url=redis_server.url, cert=None, plain=True)
    try:
        store_certificate(deployment, ca, DOMAIN)
        redis_server.stop()
        book = deployment.running.certificates
        assert not book.refresh() and book.names() == [DOMAIN]
        with _handshake(deployment, _tls_client(ca), DOMAIN) as tls:
            assert tls.version()
    finally:
        deployment.running.stop()


def test_an_https_client_that_gives_up_on_a_hung_backend_frees_its_stream(https_deployment, start_client, ca):
    """The relay's watch for a public client that left (MSG_PEEK) works through TLS too (PeekableTLS)."""
    from tests.server.support import StuckBackend

    stuck = StuckBackend()
    try:
        start_client(https_deployment.client_config(https_deployment.grant("hung.test"), stuck.url,
                                                    domain="hung.test"))
        store_certificate(https_deployment, ca, "hung.test")
        hung = next(t for t in https_deployment.server.tunnels if t.domain == "hung.test")
        clients = []
        for _ in range(20):
            tls = _handshake(https_deployment, _tls_client(ca), "hung.test")
            tls.sendall(b"GET /never HTTP/1.1\r\nHost: hung.test\r\n\r\n")
            clients.append(tls)
        wait_until(lambda: hung.in_flight == 20 and stuck.open == 20, timeout=10, message="all waiting")
        for tls in clients:
            tls.close()
        started = time.monotonic()
        wait_until(lambda: hung.in_flight == 0 and https_deployment.running.https_front.connections == 0,
                   timeout=3, message="the abandoned requests released")
        assert time.monotonic() - started < 2
        assert stuck.accepted == 20
    finally:
        stuck.stop()


def test_a_pipelined_request_after_the_peek_is_served_whole(served, ca):
    """Bytes the watch peeked at through TLS reach the next request's reader."""
    with _handshake(served, _tls_client(ca), DOMAIN) as tls:
        tls.sendall(f"GET /headers HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n"
                    f"GET /status/201 HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        tls.settimeout(5)
        while True:
            piece = tls.recv(65536)
            if not piece:
                break
            data += piece
    assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 201" in data


@pytest.fixture
def redirecting(tmp_path, data_dir, backend, start_client, ca):
    deployment = _start(tmp_path, data_dir, plain=True, https_addr="127.0.0.1:0", https_redirect=True,
                        hsts_max_age=600)
    store_certificate(deployment, ca, DOMAIN)
    start_client(deployment.client_config(deployment.grant(), backend[0]))
    yield deployment
    deployment.running.stop()


def _plain(deployment, request: bytes) -> bytes:
    from tests.server.support import connect, read_until_closed

    with connect(deployment.running.http_address[1]) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def test_plain_http_is_redirected_to_https_and_https_carries_hsts(redirecting, ca, tmp_path):
    answer = _plain(redirecting, f"POST /a/b?c=d HTTP/1.1\r\nHost: App.Test:80\r\nContent-Length: 0\r\n"
                                 f"Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 308")
    assert f"Location: https://{DOMAIN}:{_port(redirecting)}/a/b?c=d\r\n".encode() in answer
    assert b"X-Request-Id: " in answer
    result = subprocess.run([require_binary("curl"), "-sS", "-L", "-D", "-", "--max-time", "10", "--cacert",
                             str(ca.write_root(tmp_path)), "--resolve", f"{DOMAIN}:{_port(redirecting)}:127.0.0.1",
                             "--connect-to", f"{DOMAIN}:80:127.0.0.1:{redirecting.running.http_address[1]}",
                             f"http://{DOMAIN}/headers"], capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    assert "strict-transport-security: max-age=600" in result.stdout.lower()
    assert '"X-Forwarded-Proto": "https"' in result.stdout


@pytest.mark.parametrize("host", ["a b", "", "exa_mple..test", "x" * 300])
def test_a_host_that_is_no_name_gets_no_redirect(redirecting, host):
    answer = _plain(redirecting, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert not answer.startswith(b"HTTP/1.1 308") and b"Location:" not in answer


def test_a_target_cannot_move_the_redirect_to_another_host(redirecting):
    answer = _plain(redirecting, f"GET //evil.test/x HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
                    .encode())
    assert f"Location: https://{DOMAIN}:{_port(redirecting)}//evil.test/x\r\n".encode() in answer
    # absolute-form names the host (RFC 9112 3.2.2), for routing and for the redirect alike; its path stays a path
    answer = _plain(redirecting, b"GET http://other.test/x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    assert f"Location: https://other.test:{_port(redirecting)}/x\r\n".encode() in answer


def test_health_checks_are_not_redirected(redirecting):
    answer = _plain(redirecting, b"GET /_tun2g/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


def test_redirect_without_https_is_one_line_and_exit_2(storage_env):
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", "server", "--https-redirect", "--http",
                             "127.0.0.1:0", "--admin-token", "t"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--https" in result.stderr and "Traceback" not in result.stderr
