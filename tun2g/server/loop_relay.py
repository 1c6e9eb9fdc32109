"""The response to a public request, read from its upstream by event-loop callbacks.

The common public request (no body, kept alive, over plain HTTP) goes up its upstream (a tunnel
stream, or a kept connection to the node that holds the tunnel) without waiting, and its front's
greenlet returns at once to wait for the client's next bytes: that one wait replaces the two of a
greenlet that also waits for the response (docs/performance.md). This reads the response as the
upstream's readable callback delivers it, to the upstream's own `MessageReader`
(`MessageReader.feed`: the same parser and limits), and says which way it goes on: whole and
small, to be written from the callback; or anything else, to a greenlet running the one complete
relay (`forward_exchange(sent=)`), from the point reached.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from tun2g import smux
from tun2g.http import MessageReader, RequestHead, ResponseHead, fed_response_ready, take_small_response
from tun2g.http.reader import RECV_SIZE
from tun2g.smux.timer import deadlines
from tun2g.transport.base import read_watcher

if TYPE_CHECKING:
    import _socket


class StreamSource:
    """A tunnel stream, read from its readable callback."""

    __slots__ = ("stream",)

    def __init__(self, stream: smux.Stream) -> None:
        self.stream = stream

    def start(self, callback: Callable[[], None]) -> None:
        self.stream.on_readable(callback)

    def stop(self) -> None:
        self.stream.on_readable(None)

    def recv(self) -> bytes | None:
        """What has come (b"" at EOF), None if nothing; raises on a reset or a dead session."""
        return self.stream.recv_nowait(RECV_SIZE)


class SocketSource:
    """A plain TCP connection (to another node), read from its own fd watcher's callback."""

    __slots__ = ("raw", "_watcher")

    def __init__(self, sock, raw: _socket.socket) -> None:
        self.raw = raw  # the non-blocking socket ``sock`` wraps (`transport.base.nonblocking_socket`)
        self._watcher = read_watcher(sock)

    def start(self, callback: Callable[[], None]) -> None:
        self._watcher.start(callback)

    def stop(self) -> None:
        self._watcher.stop()

    def recv(self) -> bytes | None:
        try:
            return self.raw.recv(RECV_SIZE)
        except BlockingIOError:
            return None


class LoopRelay:
    """One bodiless request's response, awaited on ``source`` without a greenlet.

    Exactly one of these is called once, from the event loop, with the source's callback and the
    deadline gone: ``response(relay, head, payload, body, keep_alive)`` with a final response of at
    most SMALL_BODY framed body, here whole (``payload``: what goes to the client, its head made by
    `take_small_response` after ``response_filter``); ``handover(relay)`` for anything else (an
    interim, big or unframed response, the upstream reset, ended or closed under it), whose reader
    holds what was read; ``timed_out(relay)`` when no response head came within ``timeout`` seconds.
    `abandon()` stops it first (the client left).
    """

    __slots__ = ("source", "reader", "request", "request_reader", "active", "_response_filter", "_deadlines",
                 "_watch", "_response", "_handover", "_timed_out")

    def __init__(self, source: StreamSource | SocketSource, reader: MessageReader, request: RequestHead,
                 request_reader: MessageReader, timeout: float | None,
                 response_filter: Callable[[ResponseHead], None] | None, *,
                 response: Callable[[LoopRelay, ResponseHead, bytes, bytes, bool], None],
                 handover: Callable[[LoopRelay], None], timed_out: Callable[[LoopRelay], None]) -> None:
        self.source = source
        self.reader = reader
        self.request = request
        self.request_reader = request_reader
        self.active = True
        self._response_filter = response_filter
        self._response = response
        self._handover = handover
        self._timed_out = timed_out
        reader.expect_response(request.method)
        # A set and a removal in the shared deadline timer's tick, not a timer per request.
        self._deadlines = found = deadlines()
        self._watch = None if timeout is None else found.wake_at(time.monotonic() + timeout, self)
        source.start(self._readable)

    def abandon(self) -> bool:
        """Stop waiting (the client left); False when it had ended already."""
        if not self.active:
            return False
        self._stop()
        return True

    def set(self) -> None:
        """Deadlines' call when the timeout has passed (a relay is filed there as an Event is)."""
        self._watch = None  # fired: Deadlines has let go of it (a cancel now would count it twice)
        if not self.active:
            return
        self._stop()
        if self.reader.next_event is None:
            self._timed_out(self)
        else:
            self._handover(self)  # the head came in time: the body's own timeouts apply in the greenlet

    def throw(self, error) -> None:
        """gevent's call when the socket being watched is closed (its watcher's callback is ours): a node
        connection cut in flight by the forwarder's health check. The greenlet's read reports it."""
        if self.active:
            self._stop()
            self._handover(self)

    def _stop(self) -> None:
        self.active = False
        self.source.stop()
        if self._watch is not None:
            self._deadlines.cancel(self._watch)
            self._watch = None

    def _readable(self) -> None:
        if not self.active:
            return  # a late call: it was stopped meanwhile
        source, reader = self.source, self.reader
        while True:
            try:
                data = source.recv()
            except (smux.StreamResetError, smux.SessionClosedError, OSError):
                self._stop()
                self._handover(self)  # the greenlet's read raises it again, under the relay's retry rules
                return
            if data is None:
                return  # part of the response so far
            reader.feed(data)
            ready = fed_response_ready(reader)
            if ready is not None:
                break
            if not data:  # EOF, and still no verdict: never wait on an end (a socket stays readable there)
                ready = False
                break
        self._stop()
        if not ready:
            self._handover(self)
            return
        head, payload, body, keep_alive = take_small_response(reader, self.request, self.request_reader,
                                                              self._response_filter)
        self._response(self, head, payload, body, keep_alive)
