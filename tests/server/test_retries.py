"""A tunnel that dies under a request: an idempotent, bodyless request goes to the next tunnel; others get a 502.

Two tunnels serve one domain. The "doomed" tunnel's backend closes its own
tunnel client's session when a request for /die reaches it, before answering,
so the failure lands after the request reached a backend: exactly the case
where replaying a POST would run it twice. The healthy tunnel is kept busy
with one held request, so least-loaded routing picks the doomed one first.
"""

from __future__ import annotations

import gevent
import pytest
import requests
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from tests.fixtures.tunnel import DOMAIN, wait_until


class _Recorder:
    """A backend that records what reached it; when `doomed`, /die closes its own tunnel client first; /hold waits."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.tunnel_client = None  # the RunningClient that serves this backend
        self.doomed = False
        self.release = Event()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        self.seen.append((method, path))
        if path == "/die" and self.doomed:
            self.tunnel_client.client.close()  # the tunnel goes down with the request on it
            self.release.wait(10)  # never answer before the session is gone
        if path == "/hold":
            self.release.wait(30)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]


@pytest.fixture
def two_tunnels(plain_deployment, start_client):
    servers, recorders = [], []
    for _ in range(2):
        recorder = _Recorder()
        server = WSGIServer(("127.0.0.1", 0), recorder, log=None, error_log=None)
        server.start()
        servers.append(server)
        recorders.append(recorder)
    token = plain_deployment.grant()
    for recorder, server in zip(recorders, servers):
        recorder.tunnel_client = start_client(plain_deployment.client_config(
            token, f"http://127.0.0.1:{server.server_port}"))
    wait_until(lambda: len(plain_deployment.server.get_all_backends()) == 2, message="both tunnels registered")
    hold = gevent.spawn(requests.get, plain_deployment.http_url + "/hold", headers={"Host": DOMAIN}, timeout=30)
    wait_until(lambda: any(("GET", "/hold") in r.seen for r in recorders), message="the held request")
    healthy, doomed = recorders if ("GET", "/hold") in recorders[0].seen else reversed(recorders)
    doomed.doomed = True
    yield plain_deployment, doomed, healthy
    for recorder in recorders:
        recorder.release.set()
    hold.join(timeout=10)
    for server in servers:
        server.stop(timeout=1)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_an_idempotent_request_is_served_by_the_next_tunnel(two_tunnels, method):
    deployment, doomed, healthy = two_tunnels
    response = requests.request(method, deployment.http_url + "/die", headers={"Host": DOMAIN}, timeout=15)
    assert response.status_code == 200
    assert doomed.seen.count((method, "/die")) == 1 and healthy.seen.count((method, "/die")) == 1


@pytest.mark.parametrize("body", [b"", b"pay once"])
def test_a_post_that_reached_a_backend_gets_a_clean_502_and_is_never_replayed(two_tunnels, body):
    deployment, doomed, healthy = two_tunnels
    response = requests.post(deployment.http_url + "/die", data=body, headers={"Host": DOMAIN,
                                                                               "X-Request-Id": "pay-1"}, timeout=15)
    assert response.status_code == 502 and response.headers["X-Request-Id"] == "pay-1"
    assert b"pay-1" in response.content
    assert doomed.seen.count(("POST", "/die")) == 1 and ("POST", "/die") not in healthy.seen


def test_round_trip_replays_a_get_but_not_a_post(two_tunnels):
    deployment, doomed, healthy = two_tunnels
    session = requests.Session()
    session.mount("http://", deployment.server.adapter())
    assert session.get(f"http://{DOMAIN}/die", timeout=15).status_code == 200
    assert healthy.seen.count(("GET", "/die")) == 1
