"""Exchanges on kept request streams, served from event-loop callbacks (tun2g.client.kept_stream).

After its first exchange a request stream waits for the next request with no greenlet, and a
bodiless request to an idle plain-HTTP backend connection is sent and answered from callbacks.
Everything else goes to a worker greenlet from the point reached. These tests drive a real
server, client and backend through both paths and through the hand-overs between them, with
backends that misbehave on a kept connection: extra bytes after a response, a close instead of
an answer, a broken response, a response that trickles in byte by byte, one that never comes.
The mechanism alone is tested over a real smux session pair: pipelined and split heads, a
malformed or oversized head, the end of the stream, the idle timeout.
"""

from __future__ import annotations

import hashlib
import socket
import time

import gevent.socket as gsocket
import pytest
import requests
from gevent.event import Event
from gevent.server import StreamServer

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g import smux
from tun2g.client.client import Client, ClientConfig
from tun2g.client.kept_stream import KeptStream, LoopExchange
from tun2g.http import SMALL_BODY, BackendPool, HTTPError, MessageReader
from tun2g.transport.base import nonblocking_socket

pytestmark = pytest.mark.timeout(60)


class ScriptedBackend:
    """Answers request n (counted over all connections) with ``answer(n, head)``: bytes to send (or a
    list of pieces, each sent alone; an Event piece holds the connection, unread, until it is set; a None
    piece closes it),
    None to close the connection unanswered, or ``STALL`` to keep it open and silent. Keeps every
    request's head and body."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.heads: list = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.closed_by_peer = Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _address) -> None:
        self.connections += 1
        sock.settimeout(20)
        reader = MessageReader(sock)
        try:
            while (head := reader.read_request_head()) is not None:
                body = b""
                while piece := reader.read_body():
                    body += piece
                self.heads.append(head)
                self.bodies.append(body)
                payload = self.answer(len(self.heads), head)
                if payload is None:
                    return
                if payload is STALL:
                    if not sock.recv(1):
                        self.closed_by_peer.set()
                    return
                for piece in payload if isinstance(payload, list) else [payload]:
                    if piece is None:  # close the connection here
                        return
                    if isinstance(piece, Event):  # hold the connection open, reading nothing more
                        piece.wait(20)
                        return
                    sock.sendall(piece)
        except (OSError, HTTPError):
            return
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


STALL = object()


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
def scripted():
    backends = []

    def start(answer) -> ScriptedBackend:
        backend = ScriptedBackend(answer)
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        backend.stop()


def _tunnel(deployment, start_client, url):
    running = start_client(deployment.client_config(deployment.grant(), url))
    wait_until(lambda: len(deployment.server.tunnels) == 1, message="registration")
    client = running.client
    handed = []
    in_worker = client._in_worker

    def counting(task):  # the real worker hand-over, counted
        handed.append(task)
        in_worker(task)

    client._in_worker = counting
    return client, handed


def _get(deployment, path: str = "/", method: str = "GET", **options) -> requests.Response:
    return requests.request(method, deployment.http_url + path, headers={"Host": DOMAIN}, timeout=10, **options)


def test_kept_exchanges_go_up_and_down_from_callbacks(plain_deployment, start_client, scripted):
    backend = scripted(lambda n, head: _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url + "/base")
    responses = [_get(plain_deployment, f"/p{i}?q=1") for i in range(20)]
    assert [r.text for r in responses] == [f"answer {i + 1}" for i in range(20)]
    assert len(handed) == 1  # the first exchange (a new stream, a dial) only
    assert backend.connections == 1 and client.requests_served == 20
    last = backend.heads[-1]
    assert (last.method, last.target) == ("GET", "/base/p19?q=1")
    # The visitor's address as the server saw it, then the server's as the client sees it.
    assert last.get("X-Forwarded-For") == "127.0.0.1, 127.0.0.1" and last.get("X-Tun2g-Route") is None


def test_bytes_after_a_response_are_never_the_next_answer(plain_deployment, start_client, scripted):
    """Response-queue poisoning on a kept connection: the extra response is dropped with its connection."""
    forged = _ok(b"forged for someone else")
    backend = scripted(lambda n, head: _ok(b"first") if n == 1 else _ok(b"answer %d" % n) + forged)
    client, _handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "first"
    texts = [_get(plain_deployment).text for _ in range(3)]  # each answer with a forged one after it
    assert texts == ["answer 2", "answer 3", "answer 4"]
    # Request 2 came from callbacks on the first connection; each poisoned one was closed, never reused.
    assert backend.connections == 3


def test_a_kept_connection_closed_instead_of_answered_is_retried_once(plain_deployment, start_client, scripted):
    backend = scripted(lambda n, head: None if n == 2 else _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    assert _get(plain_deployment).text == "answer 3"  # request 2 met the close; sent again on a new connection
    assert backend.connections == 2 and len(handed) == 2
    assert _get(plain_deployment).text == "answer 4"  # and the stream was parked again


def test_a_broken_response_on_a_kept_connection_is_retried_once_then_a_502(plain_deployment, start_client,
                                                                             scripted):
    broken = b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\nhello"
    backend = scripted(lambda n, head: broken if n in (2, 4, 5) else _ok(b"answer %d" % n))
    client, _handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    assert _get(plain_deployment).text == "answer 3"  # a GET met a broken answer on a kept connection: sent again
    failed = _get(plain_deployment)  # broken on the kept connection, and on the new one (no second retry)
    assert failed.status_code == 502 and "hello" not in failed.text
    assert _get(plain_deployment).text == "answer 6"


def test_a_small_response_cut_by_the_backend_goes_to_a_worker_and_never_spins(plain_deployment, start_client,
                                                                              scripted):
    # Head and part of a small body, then the backend closes: before the fix the reader never called the
    # response complete, and the callback (the fd readable at EOF, again and again) waited on it, spinning.
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    backend = scripted(lambda n, head: [cut, None] if n == 2 else _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    with pytest.raises(requests.exceptions.RequestException):  # the cut reaches the visitor as a cut
        _get(plain_deployment).content
    assert len(handed) == 2  # the first exchange's greenlet, and the cut one's hand-over
    assert _get(plain_deployment).text == "answer 3"


def test_responses_that_need_a_greenlet_are_relayed_whole(plain_deployment, start_client, scripted):
    big = bytes(range(256)) * (4 * SMALL_BODY // 256)  # streamed by a worker
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b"after an interim")
    trickled = [bytes([b]) for b in _ok(b"one byte at a time")]
    head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"  # what a GET would get: 8 bytes
    answers = {2: _ok(big), 3: chunked, 4: interim, 5: trickled, 6: b"HTTP/1.1 204 No Content\r\n\r\n", 7: head_only}
    backend = scripted(lambda n, head: answers.get(n, _ok(b"answer %d" % n)))
    client, _handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    assert hashlib.sha256(_get(plain_deployment).content).digest() == hashlib.sha256(big).digest()
    assert _get(plain_deployment).text == "hello world"
    assert _get(plain_deployment).text == "after an interim"  # a 100 nobody asked for goes no further
    assert _get(plain_deployment).text == "one byte at a time"
    assert _get(plain_deployment).status_code == 204
    head = _get(plain_deployment, method="HEAD")
    assert head.status_code == 200 and head.headers["Content-Length"] == "8" and head.content == b""
    assert _get(plain_deployment).text == "answer 8"  # the connection stayed in step through all of them
    assert backend.connections == 1


def test_a_request_with_a_body_on_a_kept_stream_goes_through_a_worker(plain_deployment, start_client, scripted):
    backend = scripted(lambda n, head: _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    assert _get(plain_deployment, "/form", method="POST", data=b"").text == "answer 2"
    assert len(handed) == 1  # an empty body (Content-Length: 0) is bodiless: served from callbacks
    assert backend.heads[1].get("Content-Length") == "0"
    assert _get(plain_deployment, "/chunks", method="POST", data=iter([b"chunked ", b"body"])).text == "answer 3"
    assert backend.bodies[2] == b"chunked body" and len(handed) == 2  # a body: a worker pumps it
    assert _get(plain_deployment).text == "answer 4" and len(handed) == 2  # then callbacks again


def test_a_kept_connection_that_takes_no_more_bytes_is_dropped_and_the_request_sent_on_another(
        plain_deployment, start_client, scripted):
    """The backend stops reading its kept connection: the callback's one non-blocking send cannot go
    whole, so that connection (maybe holding part of a request) is closed and a worker dials anew."""
    hold = Event()
    backend = scripted(lambda n, head: [_ok(b"answer 1"), hold] if n == 1 else _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url)
    try:
        assert _get(plain_deployment).text == "answer 1"
        kept = client.pool._idle[0][0]
        raw = nonblocking_socket(kept)
        filler = b"x" * 65536
        while True:  # fill what the kernel takes on a connection the backend no longer reads
            try:
                raw.send(filler)
            except BlockingIOError:
                break
        assert _get(plain_deployment).text == "answer 2"
        assert backend.connections == 2 and len(handed) == 2  # the first dial, then this one's
        assert kept.fileno() == -1  # closed, never to be reused
        assert _get(plain_deployment).text == "answer 3" and len(handed) == 2  # callbacks again
    finally:
        hold.set()


def test_the_server_dropping_a_kept_stream_closes_the_backend_connection(plain_deployment, start_client, scripted):
    backend = scripted(lambda n, head: STALL if n == 2 else _ok(b"answer %d" % n))
    client, handed = _tunnel(plain_deployment, start_client, backend.url)
    assert _get(plain_deployment).text == "answer 1"
    port = plain_deployment.running.http_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /stalls HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        wait_until(lambda: len(backend.heads) == 2, message="the request at the backend")
    started = time.monotonic()  # the visitor left: the server resets the stream, the client lets go
    assert backend.closed_by_peer.wait(5)
    assert time.monotonic() - started < 2
    wait_until(lambda: client.streams_in_flight == 0, timeout=3, message="nothing counted in flight")
    assert len(handed) == 1  # the wait and its end were callbacks
    assert _get(plain_deployment).text == "answer 3"


# --- the mechanism over a real smux session pair ---------------------------------------------------


@pytest.fixture
def stream_pair():
    """(the server's end, the client's end) of one stream of a smux session over a socket pair."""
    left, right = gsocket.socketpair()
    server, client = smux.Session(left, client=False), smux.Session(right, client=True)
    opened = server.open_stream()
    accepted = client.accept_stream(timeout=5)
    yield opened, accepted
    server.close()
    client.close()


def _kept(stream, idle_seconds: float = 30.0, max_head_size: int = 65536):
    heads, unreadable = [], []
    kept = KeptStream(stream, MessageReader(stream, max_head_size=max_head_size), "127.0.0.1",
                      on_request=lambda k, head: heads.append(head), on_unreadable=lambda k: unreadable.append(k),
                      idle_seconds=idle_seconds)
    return kept, heads, unreadable


def test_a_parked_stream_reads_split_and_pipelined_heads(stream_pair):
    opened, accepted = stream_pair
    kept, heads, _unreadable = _kept(accepted)
    kept.park()
    opened.sendall(b"GET /a HTTP/1.1\r\nHo")
    wait_until(lambda: kept.reader._parser is not None, timeout=5, message="the part read")  # made at the first feed
    assert heads == [] and kept.parked  # half a head: waiting for the rest
    opened.sendall(b"st: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: len(heads) == 1, timeout=5, message="the first head")
    assert heads[0].target == "/a" and not kept.parked  # handed on: parked again by whoever serves it
    kept.park()  # the second head was read with the first: served at once
    wait_until(lambda: len(heads) == 2, timeout=5, message="the pipelined head")
    assert heads[1].target == "/b"


def test_a_parked_stream_hands_on_an_oversized_head(stream_pair):
    opened, accepted = stream_pair
    kept, heads, unreadable = _kept(accepted, max_head_size=1024)
    kept.park()
    opened.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4096)  # never ends: the size limit must
    wait_until(lambda: unreadable, timeout=5, message="the oversized head handed on")
    assert heads == [] and not kept.parked
    with pytest.raises(HTTPError) as raised:  # the worker reads it as the error to answer
        kept.reader.read_request_head()
    assert raised.value.status == 431


def test_a_parked_stream_hands_on_a_malformed_head(stream_pair):
    opened, accepted = stream_pair
    kept, heads, unreadable = _kept(accepted)
    kept.park()
    opened.sendall(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    wait_until(lambda: unreadable, timeout=5, message="the malformed head handed on")
    with pytest.raises(HTTPError) as raised:
        kept.reader.read_request_head()
    assert raised.value.status == 400 and heads == []


def test_a_parked_stream_closes_at_the_peers_end_and_after_its_idle_time(stream_pair):
    opened, accepted = stream_pair
    kept, heads, unreadable = _kept(accepted, idle_seconds=0.2)
    opened.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: accepted.readable_now, timeout=5, message="the request")
    kept.park()
    wait_until(lambda: heads, timeout=5, message="the request read")
    kept.park()
    started = time.monotonic()
    wait_until(lambda: accepted.closed, timeout=5, message="the idle stream closed")
    assert time.monotonic() - started >= 0.15 and not unreadable
    assert opened.recv(10) == b""  # the server sees the FIN


def test_a_response_the_window_cannot_take_is_left_for_a_worker_to_write():
    """The relayed response is complete, but the server's window for the stream is short: nothing is
    written from the callback, and ``pending`` holds all of it for the worker."""
    config = smux.Config(version=2)
    left, right = gsocket.socketpair()
    server, client = smux.Session(left, client=False, config=config), smux.Session(right, client=True, config=config)
    backend_end, proxy_end = gsocket.socketpair()
    try:
        opened = server.open_stream()
        accepted = client.accept_stream(timeout=5)
        # The server reads none of it: a stream's first window is smux's initial 262,144 bytes.
        accepted.sendall(b"x" * 250000)
        kept, _heads, _unreadable = _kept(accepted)
        kept.reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = kept.reader.read_request_head()
        ended = []
        LoopExchange(kept, head, BackendPool("http://127.0.0.1:9"), (proxy_end, MessageReader(proxy_end)),
                     nonblocking_socket(proxy_end), 30, None, handover=lambda e: ended.append(("handover", e)),
                     done=lambda e, result: ended.append((result, e)), abandoned=lambda e, why: ended.append((why, e)))
        backend_end.sendall(_ok(b"y" * 30000))
        wait_until(lambda: ended, timeout=5, message="the response read")
        result, exchange = ended[0]
        assert (result.status, result.keep_alive, result.upstream_reusable) == (200, True, True)
        assert exchange.pending.startswith(b"HTTP/1.1 200 OK\r\n") and exchange.pending.endswith(b"y" * 30000)
        assert result.response_bytes == len(exchange.pending) and result.request_bytes == 30
        received = b""
        while len(received) < 250000:
            received += opened.recv(65536)
        assert received == b"x" * 250000  # and nothing of the response went out from the callback
        assert not opened.readable_now
    finally:
        for end in (server, client, backend_end, proxy_end):
            end.close()


def test_a_server_fin_scheduled_as_the_response_ended_leaves_the_next_exchange_alone(stream_pair):
    """The server's FIN schedules the exchange's "server left" call; when the whole response is handled
    in the same loop turn, that call runs late, after the connection went back to the pool and the next
    exchange started watching it. It must do nothing: before the fix it stopped the next exchange's
    watcher (the socket's own) and closed its connection, and that request waited until its visitor
    gave up (a 3 s stall in a benchmark, then a 499)."""
    _opened, accepted = stream_pair
    backend_end, proxy_end = gsocket.socketpair()
    pool = BackendPool("http://127.0.0.1:9")
    connection = (proxy_end, MessageReader(proxy_end))
    ended = []

    def exchange_on(kept):
        kept.reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return LoopExchange(kept, kept.reader.read_request_head(), pool, connection, nonblocking_socket(proxy_end),
                            30, None, handover=lambda e: ended.append(("handover", e)),
                            done=lambda e, result: ended.append(("done", e)),
                            abandoned=lambda e, why: ended.append(("abandoned", e)))

    try:
        first = exchange_on(_kept(accepted)[0])
        backend_end.sendall(_ok(b"first"))
        wait_until(lambda: ended, timeout=5, message="the first response")
        assert [kind for kind, _ in ended] == ["done"]
        exchange_on(_kept(accepted)[0])  # the next exchange on the same pooled connection
        first._server_left()  # the late call, as the loop runs it
        backend_end.sendall(_ok(b"second"))
        wait_until(lambda: len(ended) == 2, timeout=5, message="the second response")
        assert [kind for kind, _ in ended] == ["done", "done"]
        assert proxy_end.fileno() != -1  # the connection was not closed under the second exchange
    finally:
        backend_end.close()
        proxy_end.close()


def test_a_malformed_request_on_a_kept_stream_gets_its_page_from_a_worker():
    """What a parked stream reads that is no request is answered by a worker greenlet, never in the hub:
    here the server's window is full, so writing the page must wait (in the hub it could not)."""
    smux_config = smux.Config(version=2)
    left, right = gsocket.socketpair()
    server = smux.Session(left, client=False, config=smux_config)
    session = smux.Session(right, client=True, config=smux_config)
    config = ClientConfig(server_addr="127.0.0.1:9", token="t", domain="app.test", backend_url="http://127.0.0.1:9")
    client = Client(config)
    try:
        opened = server.open_stream()
        accepted = session.accept_stream(timeout=5)
        accepted.sendall(b"x" * 262144)  # the whole first window, unread so far
        client._keep(accepted, "127.0.0.1").park()
        opened.sendall(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        opened.settimeout(5)
        received = b""
        while chunk := opened.recv(65536):
            received += chunk
        answer = received[262144:]
        assert received[:262144] == b"x" * 262144
        assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer  # then the FIN
    finally:
        client.close()
        server.close()
        session.close()
