"""A public client giving up on a slow backend frees its connection, greenlet and stream at once.

100 requests to a backend that never answers, then their clients leave: the
server's counters (open public connections, the tunnel's requests in flight,
its smux streams, live greenlets) are back to the baseline within seconds,
while another domain is served throughout. Pipelined bytes do not count as
leaving.
"""

from __future__ import annotations

import gc
import time

import gevent
import pytest

from tests.fixtures.tunnel import wait_until
from tests.server.support import StuckBackend, bounded_deployment, connect, get, read_response

pytestmark = pytest.mark.timeout(60)

HUNG, HEALTHY = "hung.test", "healthy.test"
ABANDONED = 100


@pytest.fixture
def two_sites(tmp_path, data_dir, backend, start_client):
    """A server with a tunnel for HUNG (a backend that never answers) and one for HEALTHY (the test backend)."""
    stuck = StuckBackend()
    deployment = bounded_deployment(tmp_path, data_dir)
    for domain, url in ((HUNG, stuck.url), (HEALTHY, backend[0])):
        start_client(deployment.client_config(deployment.grant(domain), url, domain=domain))
    yield deployment, stuck
    deployment.running.stop()
    stuck.stop()


def _tunnel(deployment, domain):
    return next(tunnel for tunnel in deployment.server.tunnels if tunnel.domain == domain)


def _front_greenlets(front) -> int:
    """Live greenlets serving public connections (the tunnel client in this process has its own)."""
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, gevent.Greenlet) and not obj.dead and front.handle in obj.args)


def test_abandoned_requests_free_everything_and_the_healthy_site_stays_served(two_sites):
    deployment, stuck = two_sites
    port = deployment.running.http_address[1]
    front = deployment.running.front
    hung = _tunnel(deployment, HUNG)
    baseline_greenlets = _front_greenlets(front)
    baseline_streams = hung.session.num_streams

    socks = []
    for _ in range(ABANDONED):
        sock = connect(port)
        sock.sendall(f"GET /never HTTP/1.1\r\nHost: {HUNG}\r\n\r\n".encode())
        socks.append(sock)
    wait_until(lambda: hung.in_flight == ABANDONED and stuck.open == ABANDONED, timeout=10,
               message="every request waiting at the backend")
    assert _front_greenlets(front) >= baseline_greenlets + ABANDONED
    assert get(port, HEALTHY)[0] == 200  # served while the hung site holds 100 requests

    for sock in socks:
        sock.close()
    started = time.monotonic()
    wait_until(lambda: hung.in_flight == 0 and front.connections == 0, timeout=3,
               message="the abandoned requests released")
    released = time.monotonic() - started
    wait_until(lambda: hung.session.num_streams <= baseline_streams, timeout=3, message="the streams closed")
    wait_until(lambda: _front_greenlets(front) <= baseline_greenlets, timeout=3, interval=0.1,
               message="the request greenlets gone")
    assert released < 2, released
    assert get(port, HEALTHY)[0] == 200
    assert stuck.accepted == ABANDONED  # nothing was forwarded again or late


def test_pipelined_bytes_are_not_mistaken_for_the_client_leaving(two_sites, backend):
    deployment, _stuck = two_sites
    _url, app = backend
    port = deployment.running.http_address[1]
    with connect(port) as sock:
        # The first response is held well past the watch's arming delay while the second
        # request already sits unread on the public socket.
        sock.sendall(f"GET /wait HTTP/1.1\r\nHost: {HEALTHY}\r\n\r\n"
                     f"GET /hello HTTP/1.1\r\nHost: {HEALTHY}\r\n\r\n".encode())
        wait_until(lambda: "/wait" in app.seen_paths, timeout=5, message="the first request at the backend")
        gevent.sleep(0.3)  # > WATCH_AFTER: the watch is armed and sees the pipelined bytes
        app.release.set()
        first_head, first_body = read_response(sock)
        second_head, second_body = read_response(sock)
    assert first_head.startswith(b"HTTP/1.1 200") and first_body == b"released\n"
    assert second_head.startswith(b"HTTP/1.1 200") and second_body == b"hello from backend\n"


def test_a_client_that_waits_gets_its_answer(two_sites, backend):
    """The watch is no timeout: a client still connected gets a late response."""
    deployment, _stuck = two_sites
    _url, app = backend
    port = deployment.running.http_address[1]
    with connect(port) as sock:
        sock.sendall(f"GET /wait HTTP/1.1\r\nHost: {HEALTHY}\r\nConnection: close\r\n\r\n".encode())
        wait_until(lambda: "/wait" in app.seen_paths, timeout=5, message="the request at the backend")
        gevent.sleep(0.5)
        app.release.set()
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200") and body == b"released\n"
