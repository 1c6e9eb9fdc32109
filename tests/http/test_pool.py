"""BackendPool against real backends: URL joining, reuse, stale connections, retry, HTTPS."""

import socket

import gevent
import pytest
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from tun2g.http import BackendPool, MessageReader, UpstreamError

from .support import read_request, wait_for


@pytest.mark.parametrize("backend, target, joined", [
    ("http://b:1", "/x", "/x"),
    ("http://b:1", "/", "/"),
    ("http://b:1/base", "/x", "/base/x"),
    ("http://b:1/base/", "/x", "/base/x"),
    ("http://b:1/base", "/", "/base/"),
    ("http://b:1/base?k=v", "/x?q=1", "/base/x?k=v&q=1"),
    ("http://b:1/base?k=v", "/x", "/base/x?k=v"),
    ("http://b:1", "/x?", "/x?"),
])
def test_join_path_like_go_single_host_reverse_proxy(backend, target, joined):
    assert BackendPool(backend).join_path(target) == joined


def test_url_parts_and_bad_urls():
    pool = BackendPool("https://app.test:8443/base")
    assert (pool.scheme, pool.host_header, pool.path_prefix, pool.address) == (
        "https", "app.test:8443", "/base", ("app.test", 8443))
    assert BackendPool("http://app.test").address == ("app.test", 80)
    with pytest.raises(ValueError, match="must look like"):
        BackendPool("ftp://x")


class CountingBackend:
    """A raw keep-alive backend answering 'ok'; ``policy(connection_index, request_index)`` may say "close"."""

    def __init__(self, raw_backend, policy=lambda conn, req: "answer"):
        self.connections = 0
        self.closed = Event()  # set each time the backend drops a connection on purpose
        self.policy = policy
        self.port = raw_backend(self._serve)

    def _serve(self, sock):
        index = self.connections
        self.connections += 1
        reader = MessageReader(sock)
        served = 0
        while reader.read_request_head() is not None:
            if self.policy(index, served) == "close":
                sock.close()
                self.closed.set()
                return
            served += 1
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def exchange_through(pool: BackendPool) -> bytes:
    """One GET forwarded by pool.forward_exchange to a socketpair; returns the raw response bytes."""
    public, ours = socket.socketpair()
    public.sendall(b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n")
    reader = MessageReader(ours)
    head = reader.read_request_head()
    result = pool.forward_exchange(head, reader, ours)
    assert result.status == 200
    ours.close()
    data = b""
    while chunk := public.recv(65536):
        data += chunk
    public.close()
    return data


def test_connections_are_reused(raw_backend):
    backend = CountingBackend(raw_backend)
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    for _ in range(3):
        assert exchange_through(pool).endswith(b"\r\n\r\nok")
    assert backend.connections == 1
    pool.close()


def test_a_connection_the_backend_closed_while_idle_is_not_reused(raw_backend):
    backend = CountingBackend(raw_backend, policy=lambda conn, req: "close" if req == 1 else "answer")
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    sock, reader = pool.acquire()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert reader.read_response_head("GET").status == 200 and reader.read_body() == b"ok"
    pool.release(sock, reader, True)
    # Make the backend close it: the pool must notice at the next acquire.
    idle_sock, _, _ = pool._idle[-1]
    idle_sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    wait_for(backend.closed, "the backend to drop the idle connection")
    fresh, fresh_reader = pool.acquire()
    assert fresh is not idle_sock and fresh_reader.messages_read == 0
    pool.release(fresh, fresh_reader, False)
    pool.close()


def test_a_bodyless_request_on_a_connection_closed_just_after_release_is_retried(raw_backend):
    # The pool polls every kept connection before reuse; a backend closing it between the
    # poll and the request is covered by the retry.
    backend = CountingBackend(raw_backend, policy=lambda conn, req: "close" if (conn, req) == (0, 1) else "answer")
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    assert exchange_through(pool).endswith(b"ok")
    idle_sock, _, _ = pool._idle[-1]
    idle_sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # makes the backend close it while idle
    wait_for(backend.closed, "the backend to drop the idle connection")
    assert exchange_through(pool).endswith(b"\r\n\r\nok")
    assert backend.connections == 2
    pool.close()


def test_bodyless_request_is_retried_once_when_a_reused_connection_dies(raw_backend):
    # The first connection answers one request, then drops the second without answering.
    backend = CountingBackend(raw_backend, policy=lambda conn, req: "close" if (conn, req) == (0, 1) else "answer")
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    assert exchange_through(pool).endswith(b"ok")
    assert exchange_through(pool).endswith(b"ok")
    assert backend.connections == 2
    pool.close()


def test_a_new_connection_failing_is_not_retried(raw_backend):
    backend = CountingBackend(raw_backend, policy=lambda conn, req: "close")
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    with pytest.raises(UpstreamError):
        exchange_through(pool)
    assert backend.connections == 1


def test_refused_backend_raises_oserror():
    from tests.fixtures.net import free_port
    with pytest.raises(OSError):
        BackendPool(f"http://127.0.0.1:{free_port()}").acquire()


def test_https_backend_verified_with_ca_file_and_insecure_mode(kcp_certs):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "6")])
        return [b"secret"]
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None,
                        certfile=kcp_certs.cert_file, keyfile=kcp_certs.key_file)
    server.start()
    try:
        url = f"https://127.0.0.1:{server.server_port}"
        for pool in (BackendPool(url, ca_file=kcp_certs.ca_file), BackendPool(url, tls_verify=False)):
            sock, reader = pool.acquire()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert reader.read_response_head("GET").status == 200 and reader.read_body() == b"secret"
            pool.release(sock, reader, False)
        with pytest.raises(OSError):  # a self-signed chain without the CA must not be trusted
            BackendPool(url).acquire()
    finally:
        server.stop()



def test_pool_keeps_as_many_connections_as_were_busy_at_once(raw_backend):
    backend = CountingBackend(raw_backend)
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    for _ in range(2):
        held = [pool.acquire() for _ in range(40)]
        for sock, reader in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert reader.read_response_head("GET").status == 200 and reader.read_body() == b"ok"
        for sock, reader in held:
            pool.release(sock, reader, True)
    assert backend.connections == 40
    pool.close()


def test_ipv6_literal_backend(raw_backend):
    try:
        probe = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = probe.getsockname()[1]

    def serve_one():
        conn, _ = probe.accept()
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv6")
        conn.close()
    server = gevent.spawn(serve_one)
    pool = BackendPool(f"http://[::1]:{port}/")
    sock, reader = pool.acquire()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert reader.read_response_head("GET").status == 200 and reader.read_body() == b"v6"
    pool.release(sock, reader, False)
    server.join(timeout=5)
    probe.close()
