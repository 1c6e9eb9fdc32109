"""A bug in tun2g's own request path answers the visitor with a plain 500 page and its request id, and
logs one line with the traceback under the same id: never a dropped connection without a word."""

from __future__ import annotations

import io
import socket

import gevent
import pytest

from tun2g.http import MessageReader, RequestHead
from tun2g.log import configure, flush
from tun2g.server.pipeline import Pipeline
from tun2g.server.router import Router
from tun2g.server.tunnels import Tunnels


class BrokenRouter(Router):
    """A router with a bug: every lookup raises."""

    def route(self, head, request_id, hop=None):
        raise KeyError("a bug in routing")


@pytest.fixture
def log_lines():
    out = io.StringIO()
    configure("info", stream=out)
    yield lambda: (flush(), out.getvalue())[1]
    configure("info")


def test_a_bug_on_the_public_socket_answers_500_with_the_request_id_and_logs_the_traceback(log_lines):
    pipeline = Pipeline(BrokenRouter(Tunnels()), access_log=True)
    visitor, front = socket.socketpair()
    visitor.settimeout(5)
    front.settimeout(5)
    with visitor, front:
        visitor.sendall(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\nGET /b HTTP/1.1\r\nHost: app.test\r\n\r\n")
        reader = MessageReader(front)
        for _ in range(2):  # the connection goes on: the next request is answered as well
            head = reader.read_request_head()
            assert pipeline.serve(head, reader, front, peer_ip="198.51.100.7", scheme="http") is True
        answers = MessageReader(visitor)
        for _ in range(2):
            response = answers.read_final_response_head("GET")
            body = b"".join(iter(answers.read_body, b""))
            request_id = response.get("X-Request-Id")
            assert response.status == 500 and request_id and request_id.encode() in body
            assert b"KeyError" not in body and b"routing" not in body  # no internals for the public
    logged = log_lines()
    errors = [line for line in logged.splitlines() if "event=internal_error" in line]
    assert len(errors) == 2 and "KeyError" in errors[0] and "Traceback" in errors[0]
    assert f"request_id={request_id}" in errors[1] and "KeyError" in errors[1]
    assert "Traceback" not in errors[1]  # one traceback per TRACEBACK_INTERVAL
    assert "status=500" in logged  # the access line counts it


def test_a_flood_of_requests_hitting_a_bug_logs_every_id_and_one_traceback(log_lines):
    pipeline = Pipeline(BrokenRouter(Tunnels()), access_log=False)
    ids = set()
    for _ in range(200):
        response = pipeline.round_trip(RequestHead("GET", "/", "HTTP/1.1", [("Host", "app.test")]))
        assert response.head.status == 500
        ids.add(response.head.get("X-Request-Id"))
    errors = [line for line in log_lines().splitlines() if "event=internal_error" in line]
    assert len(ids) == 200 and len(errors) == 200
    assert all(any(f"request_id={request_id}" in line for line in errors) for request_id in ids)
    assert sum("Traceback" in line for line in errors) == 1
    assert sum(map(len, errors)) < 200 * 400  # short lines after the first, not 200 tracebacks


def test_a_bug_under_a_round_trip_returns_the_500_page():
    pipeline = Pipeline(BrokenRouter(Tunnels()), access_log=False)
    response = pipeline.round_trip(RequestHead("GET", "/", "HTTP/1.1", [("Host", "app.test")]))
    assert response.head.status == 500 and response.head.get("X-Request-Id")


@pytest.mark.parametrize("error", [gevent.GreenletExit(), ConnectionResetError(104, "reset by the client")])
def test_a_killed_greenlet_or_a_broken_client_socket_is_not_taken_for_a_bug(error, log_lines):
    class FailingRouter(Router):
        def route(self, head, request_id, hop=None):
            raise error

    pipeline = Pipeline(FailingRouter(Tunnels()), access_log=False)
    with pytest.raises(type(error)):
        pipeline.round_trip(RequestHead("GET", "/", "HTTP/1.1", [("Host", "app.test")]))
    assert "internal_error" not in log_lines()
