"""Request smuggling and response-queue poisoning at the HTTP layer (issue 9, item 1), with real sockets.

The cross-node, cross-tenant version is tests/server/test_cross_tenant.py; here the
pieces: Connection cannot remove framing or Host, the framing sent on is the parsed
one, and a pooled connection holding bytes nobody asked for is never reused.
"""

from __future__ import annotations

import socket

import pytest
from gevent.event import Event

from tun2g.http import BackendPool, MessageReader, RequestHead, forward_exchange, forwardable_headers
from tun2g.http.client import send_request
from tun2g.http.encode import encode_request_head

from .support import read_request, wait_for


@pytest.mark.parametrize("connection", ["close, Content-Length", "Host", "transfer-encoding, content-length",
                                        "keep-alive,HOST , X-Secret"])
def test_connection_never_removes_framing_or_host(connection):
    headers = [("Host", "a.test"), ("Connection", connection), ("Content-Length", "5"), ("X-Secret", "s")]
    kept = forwardable_headers(headers)
    assert ("Host", "a.test") in kept and ("Content-Length", "5") in kept
    assert ("X-Secret", "s") not in kept or "x-secret" not in connection.lower()
    assert not any(name.lower() == "connection" for name, _ in kept)
    assert ("Content-Length", "5") not in forwardable_headers(headers, keep_length=False)


def test_encoded_framing_comes_from_the_caller_not_a_header():
    head = RequestHead("POST", "/x", headers=[("Host", "h"), ("Content-Length", "999")])
    raw = encode_request_head(head, headers=forwardable_headers(head.headers, keep_length=False), content_length=3)
    assert raw == b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"


def relay_once(raw_request: bytes, backend_port: int) -> tuple[bytes, int]:
    """``raw_request`` read from a socketpair and forwarded to the backend with forward_exchange."""
    public, ours = socket.socketpair()
    public.settimeout(10)
    public.sendall(raw_request)
    reader = MessageReader(ours)
    head = reader.read_request_head()
    upstream = socket.create_connection(("127.0.0.1", backend_port), timeout=10)
    result = forward_exchange(head, reader, upstream, ours)
    upstream.close()
    ours.close()
    data = b""
    while chunk := public.recv(65536):
        data += chunk
    public.close()
    return data, result.status


def test_a_body_named_in_connection_reaches_the_backend_as_a_body(raw_backend):
    seen = []
    done = Event()

    def backend(sock):
        reader = MessageReader(sock)
        while (head := reader.read_request_head()) is not None:
            body = b""
            while piece := reader.read_body():
                body += piece
            seen.append((head.target, dict((k.lower(), v) for k, v in head.headers), body))
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        done.set()

    inner = b"GET /smuggled HTTP/1.1\r\nHost: other.test\r\n\r\n"
    raw = (b"POST /upload HTTP/1.1\r\nHost: a.test\r\nConnection: close, Content-Length, Host\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(inner), inner))
    response, status = relay_once(raw, raw_backend(backend))
    wait_for(done, "the backend to see the connection end")
    assert status == 200 and response.endswith(b"\r\n\r\nok")
    assert [(target, body) for target, _, body in seen] == [("/upload", inner)]
    assert seen[0][1]["content-length"] == str(len(inner)) and seen[0][1]["host"] == "a.test"


def test_send_request_never_sends_more_than_the_declared_length():
    ours, theirs = socket.socketpair()
    head = RequestHead("POST", "/x", headers=[("Host", "h"), ("Content-Length", "3"), ("Connection", "content-length")])
    pump = send_request(ours, head, iter([b"abc", b"GET /smuggled HTTP/1.1\r\n\r\n"]))
    pump.join(5)
    assert pump.dead and isinstance(pump.exception, OSError)
    ours.close()
    reader, received, body = read_request(theirs)
    assert received.content_length == 3 and body == b"abc"
    assert theirs.recv(100) == b""  # nothing after the body
    theirs.close()


class ScriptedBackend:
    """A raw keep-alive backend: for request n, ``script(n)`` bytes are sent as the whole answer."""

    def __init__(self, raw_backend, script):
        self.script = script
        self.connections = 0
        self.requests = 0
        self.answered = Event()
        self.port = raw_backend(self._serve)

    def _serve(self, sock):
        self.connections += 1
        reader = MessageReader(sock)
        while reader.read_request_head() is not None:
            while reader.read_body():
                pass
            self.requests += 1
            sock.sendall(self.script(self.requests))
            self.answered.set()


def exchange_through(pool: BackendPool, method: str = "GET", path: str = "/") -> bytes:
    public, ours = socket.socketpair()
    public.settimeout(10)
    public.sendall(f"{method} {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
    reader = MessageReader(ours)
    pool.forward_exchange(reader.read_request_head(), reader, ours)
    ours.close()
    data = b""
    while chunk := public.recv(65536):
        data += chunk
    public.close()
    return data


def answer(text: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text.encode())


def test_an_extra_response_kills_the_connection_instead_of_answering_the_next_visitor(raw_backend):
    # Request 1 gets its answer plus an unrequested one, sent a moment later in its own write.
    backend = ScriptedBackend(raw_backend, lambda n: answer(f"for request {n}"))
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    assert exchange_through(pool).endswith(b"for request 1")
    idle_sock, _, _ = pool._idle[-1]
    # The backend (or a smuggled request) produces an answer nobody asked for, on the idle connection.
    idle_sock.sendall(b"GET /unasked HTTP/1.1\r\nHost: h\r\n\r\n")
    backend.answered.clear()
    wait_for(backend.answered, "the unrequested answer")
    assert exchange_through(pool).endswith(b"for request 3")  # a new connection, not "for request 2"
    assert backend.connections == 2
    pool.close()


def test_a_body_after_a_head_response_kills_the_connection(raw_backend):
    def script(n):
        if n == 1:  # HEAD: a head, then a body it must not have, in a second write
            return b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n" + b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n"[:24]
        return answer(f"for request {n}")
    backend = ScriptedBackend(raw_backend, script)
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    data = exchange_through(pool, "HEAD")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n")  # the head only, no body
    for _ in range(2):
        assert exchange_through(pool).endswith(b"\r\n\r\nfor request %d" % backend.requests)
    assert backend.connections == 2
    pool.close()


def test_bytes_before_any_request_kill_a_kept_connection(raw_backend):
    backend = ScriptedBackend(raw_backend, lambda n: answer(f"for request {n}") + (
        answer("early") if n == 1 else b""))
    pool = BackendPool(f"http://127.0.0.1:{backend.port}")
    assert exchange_through(pool).endswith(b"for request 1")
    assert exchange_through(pool).endswith(b"for request 2")
    assert backend.connections == 2
    pool.close()
