"""The server's common exchange relayed from callbacks (tun2g.server.loop_relay, docs/performance.md).

A bodiless kept-alive request goes up its tunnel stream with one queued write and its response is
read by the stream's callback and written to the public socket from there; the front's greenlet
only waits for the client's next bytes. Anything that would wait (a big, chunked or interim
response, a response cut or broken, a client socket that takes only part) goes on in a greenlet
through the one complete relay. These tests count both ways with spies around the real methods,
and feed the relay hostile answers from a tunnel client written by hand.
"""

from __future__ import annotations

import socket

import pytest
from gevent.event import Event

from tests.fixtures.tunnel import DOMAIN, wait_until
from tests.server.support import bounded_deployment, connect, header, read_response
from tun2g.http import SMALL_BODY
from tun2g.server import loop_relay, pipeline

pytestmark = pytest.mark.timeout(60)

PIPELINED = 200  # requests sent at once by the tests that fill the socket buffers


class _Counts:
    """How many exchanges callbacks took (relays made) and gave up to a greenlet (hand-overs)."""

    def __init__(self, monkeypatch) -> None:
        self.relays = self.greenlets = 0
        made, go_on = loop_relay.LoopRelay.__init__, pipeline._SocketExchange._go_on

        def counted_relay(relay, *args, **kwargs):
            self.relays += 1
            made(relay, *args, **kwargs)

        def counted_go_on(exchange, *args):
            self.greenlets += 1
            go_on(exchange, *args)

        monkeypatch.setattr(loop_relay.LoopRelay, "__init__", counted_relay)
        monkeypatch.setattr(pipeline._SocketExchange, "_go_on", counted_go_on)


@pytest.fixture
def counts(monkeypatch) -> _Counts:
    return _Counts(monkeypatch)


def _request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n{extra}\r\n".encode()


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def _the_tunnel(deployment):
    wait_until(lambda: len(deployment.server.tunnels) == 1, message="registration")
    return next(iter(deployment.server.tunnels))


class _Responses:
    """Reads responses with a Content-Length one after another, keeping what a read took past one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.data:
            self._more()
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        length = int(header(head, "Content-Length") or 0)
        while len(self.data) < length:
            self._more()
        body, self.data = self.data[:length], self.data[length:]
        return head, body

    def _more(self) -> None:
        piece = self.sock.recv(65536)
        assert piece, f"closed with {self.data[:200]!r} unread"
        self.data += piece


def _read_chunked(sock: socket.socket, head_and_rest: bytes) -> bytes:
    """The decoded body of a chunked response whose head and first bytes are ``head_and_rest``."""
    data = head_and_rest.partition(b"\r\n\r\n")[2]
    body = b""
    while True:
        while b"\r\n" not in data:
            data += sock.recv(65536)
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        while len(data) < size + 2:
            data += sock.recv(65536)
        body, data = body + data[:size], data[size + 2:]
        if size == 0:
            return body


def test_kept_alive_gets_are_answered_from_callbacks_on_one_connection(plain_deployment, backend,
                                                                       start_client, counts):
    url, _app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _the_tunnel(plain_deployment)
    front = plain_deployment.running.front
    ids = set()
    with connect(plain_deployment.running.http_address[1]) as sock:
        for _ in range(20):
            sock.sendall(_request("/"))
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and body == b"hello from backend\n"
            assert header(head, "X-Backend") == "test"
            ids.add(header(head, "X-Request-Id"))
    assert counts.relays == 20 and counts.greenlets == 0
    assert len(ids) == 20 and None not in ids
    wait_until(lambda: front.requests_in_flight == 0 and tunnel.in_flight == 0, message="nothing left in flight")
    assert tunnel.idle_streams == 1  # one kept stream carried all 20


def test_pipelined_requests_are_answered_in_order(plain_deployment, backend, start_client, counts):
    url, _app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    _the_tunnel(plain_deployment)
    with connect(plain_deployment.running.http_address[1]) as sock:
        codes = (200, 201, 202, 203, 226, 299, 400, 404, 418, 503)
        sock.sendall(b"".join(_request(f"/status/{code}") for code in codes))
        responses = _Responses(sock)
        for code in codes:
            head, body = responses.next()
            assert head.startswith(b"HTTP/1.1 %d" % code) and body == b"status %d\n" % code
    assert counts.relays == 10


def test_responses_of_every_shape_on_one_connection(plain_deployment, hand_made_client, counts):
    big = bytes(range(256)) * (2 * SMALL_BODY // 256)
    answers = {
        "/small": _ok(b"small"),
        "/trickle": [bytes([byte]) for byte in _ok(b"one byte at a time")],
        "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        "/big": _ok(big),
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "/interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + _ok(b"after hints"),
    }
    hand_made_client(lambda n, head: answers.get(head.target, _ok(b"")))
    _the_tunnel(plain_deployment)
    with connect(plain_deployment.running.http_address[1]) as sock:
        for path, want in (("/small", b"small"), ("/trickle", b"one byte at a time"), ("/big", big)):
            sock.sendall(_request(path))
            head, body = read_response(sock, limit=4 * SMALL_BODY)
            assert head.startswith(b"HTTP/1.1 200") and body == want and header(head, "X-Request-Id")
        sock.sendall(_request("/no-content"))
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 204") and head.endswith(b"\r\n\r\n")
        sock.sendall(_request("/head", method="HEAD"))
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and header(head, "Content-Length") == "5"
        assert head.endswith(b"\r\n\r\n")  # and no body
        sock.sendall(_request("/chunked"))
        assert _read_chunked(sock, sock.recv(65536)) == b"hello"
        sock.sendall(_request("/interim"))
        data = b""
        while b"after hints" not in data:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 103") and b"HTTP/1.1 200" in data
    # Small, trickled, 204 and HEAD answered from callbacks; big, chunked and interim went on in a greenlet.
    assert counts.relays == 7 and counts.greenlets == 3


def test_a_response_cut_mid_body_ends_the_connection_and_never_spins(plain_deployment, hand_made_client, counts):
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    hand_made_client(lambda n, head: [cut, None])  # then the client ends the stream
    tunnel = _the_tunnel(plain_deployment)
    with connect(plain_deployment.running.http_address[1]) as sock:
        sock.sendall(_request("/cut"))
        data = b""
        while (piece := sock.recv(65536)):
            data += piece
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"only this")  # the cut shows: no more, closed
    # The greenlet relay reported the cut: before the fix a callback waited on it for ever.
    assert counts.relays == 1 and counts.greenlets == 1
    wait_until(lambda: tunnel.in_flight == 0 and tunnel.idle_streams == 0, message="the cut stream dropped")


def test_a_garbage_answer_is_retried_once_on_a_new_stream_then_a_502(plain_deployment, hand_made_client, counts):
    client = hand_made_client(lambda n, head: _ok(b"first") if n == 1 else b"NOT HTTP AT ALL\r\n\r\n")
    tunnel = _the_tunnel(plain_deployment)
    with connect(plain_deployment.running.http_address[1]) as sock:
        sock.sendall(_request("/"))
        assert read_response(sock)[1] == b"first"
        sock.sendall(_request("/"))
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 502")
    assert header(head, "X-Request-Id").encode() in body
    assert client.requests == 3  # the kept stream's garbage, then once more on a new stream
    assert len(client.streams) == 2
    wait_until(lambda: tunnel.in_flight == 0 and tunnel.idle_streams == 0, message="no broken stream kept")


def test_forged_bytes_after_a_callback_response_never_reach_the_next_visitor(plain_deployment, hand_made_client,
                                                                             counts):
    forged = _ok(b"forged")
    hand_made_client(lambda n, head: _ok(b"answer %d" % n) + (forged if n == 1 else b""))
    tunnel = _the_tunnel(plain_deployment)
    with connect(plain_deployment.running.http_address[1]) as first:
        first.sendall(_request("/"))
        assert read_response(first)[1] == b"answer 1"
    with connect(plain_deployment.running.http_address[1]) as second:
        second.sendall(_request("/"))
        assert read_response(second)[1] == b"answer 2"  # on a new stream: the poisoned one was dropped
    assert counts.relays == 2 and tunnel.idle_streams == 1


def test_responses_bigger_than_the_socket_buffers_arrive_whole_and_in_order(plain_deployment, hand_made_client,
                                                                            counts, monkeypatch):
    written_later = []
    write_rest = pipeline._SocketExchange._write_rest
    monkeypatch.setattr(pipeline._SocketExchange, "_write_rest",
                        lambda exchange, *args: written_later.append(1) or write_rest(exchange, *args))
    # Each small enough for callbacks; 6.5 MB in all, past what loopback's send buffer grows to (4 MiB).
    bodies = [bytes([n]) * SMALL_BODY for n in range(PIPELINED)]
    hand_made_client(lambda n, head: _ok(bodies[int(head.target[1:])]) if head.target[1:].isdigit() else _ok(b""))
    _the_tunnel(plain_deployment)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    with sock:
        sock.connect(("127.0.0.1", plain_deployment.running.http_address[1]))
        sock.sendall(b"".join(_request(f"/{n}") for n in range(PIPELINED)))
        wait_until(lambda: written_later, message="a response the client's socket took only part of")
        responses = _Responses(sock)
        for n in range(PIPELINED):
            head, body = responses.next()
            assert head.startswith(b"HTTP/1.1 200") and body == bodies[n], n
    assert counts.relays == PIPELINED and counts.greenlets == 0  # writing the rest is no hand-over of the exchange


def test_a_client_that_never_reads_is_dropped_after_the_body_timeout(tmp_path, data_dir, hand_made_client,
                                                                      monkeypatch):
    timed_out = []
    write_rest = pipeline._SocketExchange._write_rest

    def watched(exchange, *args):
        write_rest(exchange, *args)
        timed_out.append(exchange._later.keep_alive is False)

    monkeypatch.setattr(pipeline._SocketExchange, "_write_rest", watched)
    deployment = bounded_deployment(tmp_path, data_dir, body_timeout=0.5, idle_timeout=60)
    hand_made_client(lambda n, head: _ok(b"x" * SMALL_BODY), deployment)
    tunnel = _the_tunnel(deployment)
    front = deployment.running.front
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    with sock:
        sock.connect(("127.0.0.1", deployment.running.http_address[1]))
        sock.sendall(_request("/") * PIPELINED)  # and none of the answers read
        wait_until(lambda: timed_out, timeout=10, message="a write that cannot finish")
        wait_until(lambda: front.connections == 0, timeout=5, message="the connection dropped")
    assert timed_out == [True]  # the one write that could not finish ended the connection
    assert front.requests_in_flight == 0
    wait_until(lambda: tunnel.in_flight == 0, message="the tunnel's requests released")
    deployment.running.stop()


def test_a_client_leaving_while_its_response_is_awaited_frees_the_stream_at_once(plain_deployment,
                                                                                 hand_made_client, counts):
    answered = Event()
    client = hand_made_client(lambda n, head: answered.wait(30) and None)
    tunnel = _the_tunnel(plain_deployment)
    front = plain_deployment.running.front
    with connect(plain_deployment.running.http_address[1]) as sock:
        sock.sendall(_request("/slow"))
        wait_until(lambda: client.requests == 1 and tunnel.in_flight == 1, message="the request at the client")
    wait_until(lambda: tunnel.in_flight == 0 and front.requests_in_flight == 0 and front.connections == 0,
               timeout=3, message="the abandoned request released")
    assert counts.relays == 1 and counts.greenlets == 0
    answered.set()


def test_a_client_leaving_after_its_stream_went_back_never_touches_the_request_now_on_it(plain_deployment,
                                                                                      hand_made_client, monkeypatch):
    """A's response is only partly written (its socket is full: A reads nothing) when its stream, given
    back, carries B's POST; A leaving then must end A's write only, not B's exchange."""
    writing = Event()
    write_rest = pipeline._SocketExchange._write_rest

    def watched(exchange, *args):
        writing.set()
        write_rest(exchange, *args)

    monkeypatch.setattr(pipeline._SocketExchange, "_write_rest", watched)
    answer_b = Event()

    def answer(n, head):
        if head.method == "POST":
            answer_b.wait(10)
            return _ok(b"for b")
        return _ok(b"x" * SMALL_BODY if head.target == "/a" else b"")

    client = hand_made_client(answer)
    tunnel = _the_tunnel(plain_deployment)
    front = plain_deployment.running.front
    port = plain_deployment.running.http_address[1]
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.connect(("127.0.0.1", port))
    for sent in range(1, 2 * PIPELINED + 1):  # one request after another, each once the last was answered
        a.sendall(_request("/a"))
        wait_until(lambda: writing.is_set() or (client.requests == sent and front.requests_in_flight == 0),
                   interval=0.001, message="the request answered")
        if writing.is_set():
            break
    assert writing.is_set(), "the client's socket never filled"
    assert tunnel.idle_streams == 1  # A's stream went back when its response had been read
    with connect(port) as b:
        b.sendall(f"POST /order HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 4\r\n\r\nonce".encode())
        wait_until(lambda: client.seen[-1][1].method == "POST", message="B's POST at the client")
        assert client.seen[-1][0] == client.seen[0][0]  # on the stream A's exchanges gave back
        a.close()  # A leaves while its write is pending
        wait_until(lambda: front.connections == 1, message="A's connection ended")
        answer_b.set()
        head, body = read_response(b)
    assert head.startswith(b"HTTP/1.1 200") and body == b"for b"
