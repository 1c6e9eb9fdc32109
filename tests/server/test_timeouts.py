"""Waits on a backend are bounded: a response head that never comes is a 504, a stalled body ends the exchange.

Real server, real tunnel client, real backends on 127.0.0.1 (tests/server/support.py).
"""

from __future__ import annotations

import json
import time

import gevent
import pytest

from tests.fixtures.tunnel import DOMAIN, wait_until
from tests.server.support import StuckBackend, bounded_deployment, connect, get, header, read_response
from tests.server.support import read_until_closed

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_tunnel(tmp_path, data_dir, start_client):
    """Factory: a server with the given bounds and a client for DOMAIN in front of `backend_url`."""
    deployments = []

    def make(backend_url: str, **bounds):
        deployment = bounded_deployment(tmp_path, data_dir, **bounds)
        deployments.append(deployment)
        start_client(deployment.client_config(deployment.grant(), backend_url))
        return deployment

    yield make
    for deployment in deployments:
        deployment.running.stop()


@pytest.fixture
def stuck_backends():
    made = []

    def make(**options) -> StuckBackend:
        backend = StuckBackend(**options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


def test_backend_that_never_answers_gets_a_504_with_the_request_id(make_tunnel, stuck_backends):
    stuck = stuck_backends()
    deployment = make_tunnel(stuck.url, response_timeout=0.5)
    port = deployment.running.http_address[1]
    started = time.monotonic()
    status, head, body = get(port, DOMAIN, "/never")
    elapsed = time.monotonic() - started
    assert status == 504
    request_id = header(head, "X-Request-Id")
    assert request_id and request_id.encode() in body
    assert b"did not answer within 0.5 seconds" in body
    assert 0.4 < elapsed < 5, elapsed
    # The stream is gone on the server, and the client let go of the backend connection.
    tunnel = next(iter(deployment.server.tunnels))
    wait_until(lambda: tunnel.in_flight == 0, timeout=5, message="the request leaving the tunnel")


def test_a_slow_upload_does_not_count_against_the_response_timeout(make_tunnel, backend):
    url, _app = backend
    deployment = make_tunnel(url, response_timeout=0.3, body_timeout=2)
    port = deployment.running.http_address[1]
    pieces = [b"x" * 1000] * 6
    with connect(port) as sock:
        sock.sendall(f"POST /sink HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n"
                     f"Content-Length: {sum(map(len, pieces))}\r\n\r\n".encode())
        for piece in pieces:  # a client uploading slowly: 0.9 s in all, 3x the response timeout
            sock.sendall(piece)
            gevent.sleep(0.15)
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["length"] == 6000


def test_a_stalled_response_body_is_cut_after_the_body_timeout(make_tunnel, stuck_backends):
    stuck = stuck_backends(prefix=b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"y" * 10)
    deployment = make_tunnel(stuck.url, body_timeout=0.5)
    port = deployment.running.http_address[1]
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(f"GET /stall HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        received = read_until_closed(sock)
    elapsed = time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"y" * 10  # the cut shows: far fewer bytes than promised, then EOF
    assert 0.4 < elapsed < 5, elapsed
    tunnel = next(iter(deployment.server.tunnels))
    wait_until(lambda: tunnel.in_flight == 0, timeout=5, message="the stream released")


def test_a_stalled_request_body_is_cut_and_the_backend_connection_closed(make_tunnel, stuck_backends):
    stuck = stuck_backends()
    deployment = make_tunnel(stuck.url, body_timeout=0.5)
    port = deployment.running.http_address[1]
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 100000\r\n\r\n".encode()
                     + b"z" * 10)  # ... and not one byte more
        received = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert not received.startswith(b"HTTP/1.1 200")
    assert 0.4 < elapsed < 5, elapsed
    assert stuck.closed_by_peer.wait(5), "the client kept the backend connection of a dead upload"
    tunnel = next(iter(deployment.server.tunnels))
    wait_until(lambda: tunnel.in_flight == 0, timeout=5, message="the stream released")


def test_defaults_bound_every_wait():
    from tun2g.server.process import ServerSetup

    setup = ServerSetup()
    timeouts = setup.exchange_timeouts()
    assert (timeouts.response, timeouts.body, timeouts.watch_downstream) == (60.0, 60.0, True)
    limits = setup.front_limits(1024)
    assert (limits.head_timeout, limits.idle_timeout, limits.max_per_ip) == (15.0, 60.0, 256)
    assert 0 < limits.max_total < 1024
