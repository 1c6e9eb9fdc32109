"""The tunnel client lets go of its backend connection as soon as the server abandons a request.

A backend that accepts, reads the request and never answers; public clients
that give up. The server resets the smux stream (its FIN); the tun2g client,
which cannot peek at a stream, is told by the stream itself and closes its
backend connection at once: the backend sees it closed within 2 s, and the
client's streams, greenlets and the process's fds return to their baseline,
also after 200 of them. The same holds while a response body is relayed.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.fixtures.tunnel import wait_until
from tests.server.support import StuckBackend, bounded_deployment, connect

pytestmark = pytest.mark.timeout(60)

HUNG = "hung.test"
MANY = 200


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def stuck():
    backend = StuckBackend()
    yield backend
    backend.stop()


def _tunnel_to(tmp_path, data_dir, start_client, backend_url, **bounds):
    deployment = bounded_deployment(tmp_path, data_dir, **bounds)
    running = start_client(deployment.client_config(deployment.grant(HUNG), backend_url, domain=HUNG))
    return deployment, running.client


def test_abandoned_requests_close_the_backend_connections_at_once(tmp_path, data_dir, start_client, stuck):
    deployment, client = _tunnel_to(tmp_path, data_dir, start_client, stuck.url)
    try:
        port = deployment.running.http_address[1]
        session = client._session
        baseline_streams, baseline_fds = session.num_streams, _fds()
        for round_size in (1, MANY):  # one alone, then many at once: nothing accumulates
            socks = []
            for _ in range(round_size):
                sock = connect(port)
                sock.sendall(f"GET /never HTTP/1.1\r\nHost: {HUNG}\r\n\r\n".encode())
                socks.append(sock)
            wait_until(lambda: stuck.open == round_size, timeout=15, message=f"{round_size} requests at the backend")
            assert session.num_streams >= baseline_streams + round_size
            for sock in socks:
                sock.close()
            started = time.monotonic()
            wait_until(lambda: stuck.open == 0, timeout=5, message="the backend connections closed by the client")
            assert time.monotonic() - started < 2
            wait_until(lambda: session.num_streams <= baseline_streams, timeout=3, message="the client's streams freed")
            wait_until(lambda: _fds() <= baseline_fds, timeout=3, message="the fds back to the baseline")
            wait_until(lambda: len(client._handlers) <= 64, timeout=3, message="the stream workers parked or gone")
        assert client._session is session  # the tunnel itself stayed up throughout
        assert stuck.accepted == 1 + MANY  # nothing was sent to the backend again
    finally:
        deployment.running.stop()


def test_a_stream_cut_mid_body_closes_the_backend_connection(tmp_path, data_dir, start_client):
    """The server gives up on a stalled body (its --body-timeout): the client drops the backend at once."""
    stalled = StuckBackend(prefix=b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    deployment, client = _tunnel_to(tmp_path, data_dir, start_client, stalled.url, body_timeout=0.5)
    try:
        port = deployment.running.http_address[1]
        with connect(port) as sock:
            sock.sendall(f"GET /stalls HTTP/1.1\r\nHost: {HUNG}\r\n\r\n".encode())
            received = b""
            while b"x" * 1000 not in received:
                piece = sock.recv(65536)
                assert piece, "closed before the first part of the body"
                received += piece
            wait_until(stalled.closed_by_peer.is_set, timeout=4,
                       message="the backend connection closed after the server cut the stream")
        assert stalled.open == 0
    finally:
        deployment.running.stop()
        stalled.stop()


def test_a_slow_answer_still_reaches_a_server_that_waits(plain_deployment, start_client, backend):
    """The watch is no timeout: a stream the server keeps open gets its late response."""
    url, app = backend
    client = start_client(plain_deployment.client_config(plain_deployment.grant(), url)).client
    port = plain_deployment.running.http_address[1]
    with connect(port) as sock:
        sock.sendall(b"GET /wait HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        wait_until(lambda: "/wait" in app.seen_paths, timeout=5, message="the request at the backend")
        app.release.set()
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"released\n")
    assert client.requests_served == 1
