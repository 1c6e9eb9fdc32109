"""Kept-alive request streams (docs/protocol.md#request-streams): a tun2g client's streams carry one
exchange after another; at most MAX_IDLE_STREAMS wait per tunnel, each at most IDLE_STREAM_SECONDS; a
stream the client closed, or that holds bytes past its response, is never used again; a request that
meets a kept stream dying is sent again on a new one when that is safe. A Go client keeps one stream per
exchange (tests/server/test_go_tun2_client.py).
"""

from __future__ import annotations

import gevent
import pytest
import requests

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.client import client as client_module
from tun2g.server import tunnel as tunnel_module

pytestmark = pytest.mark.timeout(60)


def _get(deployment, path: str = "/", **options) -> requests.Response:
    return requests.get(deployment.http_url + path, headers={"Host": DOMAIN}, timeout=10, **options)


def _the_tunnel(deployment):
    wait_until(lambda: len(deployment.server.tunnels) == 1, message="registration")
    return next(iter(deployment.server.tunnels))


def test_requests_one_after_another_share_one_kept_stream(plain_deployment, backend, start_client):
    url, _app = backend
    running = start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _the_tunnel(plain_deployment)
    for _ in range(20):  # each from a new public connection: the stream outlives them
        assert _get(plain_deployment).text == "hello from backend\n"
    assert tunnel.idle_streams == 1 and tunnel.session.num_streams == 2  # it and the control stream
    assert tunnel._idle_streams[0][0].id == 4  # the first stream after the control stream (2) served all 20
    assert running.client.requests_served == 20


def test_concurrent_requests_keep_at_most_the_cap_and_idle_streams_expire(plain_deployment, backend,
                                                                          start_client, monkeypatch):
    monkeypatch.setattr(tunnel_module, "MAX_IDLE_STREAMS", 4)
    monkeypatch.setattr(tunnel_module, "IDLE_STREAM_SECONDS", 0.3)
    url, app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _the_tunnel(plain_deployment)
    waiting = [gevent.spawn(_get, plain_deployment, "/wait") for _ in range(12)]
    wait_until(lambda: tunnel.in_flight == 12, message="12 requests at the backend at once")
    app.release.set()
    gevent.joinall(waiting, timeout=20, raise_error=True)
    assert [w.value.text for w in waiting] == ["released\n"] * 12
    assert tunnel.idle_streams == 4 and tunnel.session.num_streams == 5  # the other 8 were closed
    wait_until(lambda: tunnel.session.num_streams == 1, timeout=5, message="the idle streams expired")
    assert tunnel.idle_streams == 0
    assert _get(plain_deployment).status_code == 200  # a new stream after they expired


def test_a_kept_stream_the_client_closed_is_not_used_again(plain_deployment, backend, start_client):
    url, _app = backend
    running = start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _the_tunnel(plain_deployment)
    assert _get(plain_deployment).status_code == 200
    client_streams = running.client._session._state.streams
    kept = next(state for sid, state in client_streams.items() if sid != 2)  # not the control stream
    kept.handle.close()  # as a client ending an idle stream would
    wait_until(lambda: tunnel.session.num_streams == 1 or tunnel.idle_streams == 1
               and not tunnel._idle_streams[0][0].reusable, message="the FIN to reach the server")
    assert _get(plain_deployment).status_code == 200
    assert tunnel.idle_streams == 1 and tunnel._idle_streams[0][0].id != kept.sid


def test_a_client_closes_a_stream_the_server_left_idle_too_long(plain_deployment, backend, start_client,
                                                                  monkeypatch):
    monkeypatch.setattr(client_module, "STREAM_IDLE_SECONDS", 0.1)  # the client waits 0.2 s for a next request
    url, _app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _the_tunnel(plain_deployment)
    assert _get(plain_deployment).status_code == 200
    kept = tunnel._idle_streams[0][0]
    wait_until(lambda: kept.fin_received, timeout=5, message="the client to close the idle stream")
    assert _get(plain_deployment).status_code == 200  # on a new stream
    assert tunnel._idle_streams[-1][0].id != kept.id


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_bytes_past_a_response_never_reach_the_next_visitor(plain_deployment, hand_made_client):
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    client = hand_made_client(lambda n, head: _ok(b"first") + forged if n == 1 else _ok(b"fresh %d" % n))
    tunnel = _the_tunnel(plain_deployment)
    assert _get(plain_deployment).text == "first"
    second = _get(plain_deployment)
    assert second.text == "fresh 2"  # on a new stream: the one holding extra bytes was dropped
    assert len(client.streams) == 2 and tunnel.idle_streams == 1


def test_a_get_meeting_a_dying_kept_stream_is_sent_again_on_a_new_one(plain_deployment, hand_made_client):
    # The second request's stream is closed unanswered, as when a client ends an idle stream just as
    # the server sends on it: a GET is safe to send again.
    client = hand_made_client(lambda n, head: None if n == 2 else _ok(b"answer %d" % n))
    _the_tunnel(plain_deployment)
    assert _get(plain_deployment).text == "answer 1"
    assert _get(plain_deployment).text == "answer 3"
    assert client.requests == 3 and len(client.streams) == 2


def test_a_post_meeting_a_dying_kept_stream_is_not_sent_twice(plain_deployment, hand_made_client):
    client = hand_made_client(lambda n, head: None if n == 2 else _ok(b"answer %d" % n))
    _the_tunnel(plain_deployment)
    assert _get(plain_deployment).text == "answer 1"
    response = requests.post(plain_deployment.http_url + "/order", data=b"pay once", headers={"Host": DOMAIN},
                             timeout=10)
    assert response.status_code == 502 and response.headers["X-Request-Id"] in response.text
    assert client.requests == 2  # the body went up once, and never again


def test_a_hostile_client_answering_with_connection_close_gets_no_stream_kept(plain_deployment,
                                                                              hand_made_client):
    client = hand_made_client(lambda n, head: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    tunnel = _the_tunnel(plain_deployment)
    for _ in range(3):
        assert _get(plain_deployment).text == "ok"
    assert len(client.streams) == 3 and tunnel.idle_streams == 0
