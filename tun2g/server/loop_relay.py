"""The response to a public request, read from its tunnel stream by event-loop callbacks.

The common public request (no body, kept alive, over plain HTTP) goes up a tunnel stream with one
queued write and its front's greenlet returns at once to wait for the client's next bytes: that one
wait replaces the two of a greenlet that also waits for the response (docs/performance.md). This
reads the response as the stream's readable callback delivers it, to the stream's own
`MessageReader` (`MessageReader.feed`: the same parser and limits), and says which way it goes on:
whole and small, to be written from the callback; or anything else, to a greenlet running the one
complete relay (`forward_exchange(sent=)`), from the point reached.
"""

from __future__ import annotations

import time
from typing import Callable

from tun2g import smux
from tun2g.http import MessageReader, RequestHead, ResponseHead, fed_response_ready, take_small_response
from tun2g.http.reader import RECV_SIZE
from tun2g.smux.timer import deadlines


class LoopRelay:
    """One bodiless request's response, awaited on ``stream`` without a greenlet.

    Exactly one of these is called once, from the event loop, with the stream's callback and the
    deadline gone: ``response(relay, head, payload, body, keep_alive)`` with a final response of at
    most SMALL_BODY framed body, here whole (``payload``: what goes to the client, its head made by
    `take_small_response` after ``response_filter``); ``handover(relay)`` for anything else (an
    interim, big or unframed response, the stream reset or ended), whose reader holds what was
    read; ``timed_out(relay)`` when no response head came within ``timeout`` seconds. `abandon()`
    stops it first (the client left).
    """

    __slots__ = ("stream", "reader", "request", "request_reader", "active", "_response_filter", "_deadlines",
                 "_watch", "_response", "_handover", "_timed_out")

    def __init__(self, stream: smux.Stream, reader: MessageReader, request: RequestHead,
                 request_reader: MessageReader, timeout: float | None,
                 response_filter: Callable[[ResponseHead], None] | None, *,
                 response: Callable[[LoopRelay, ResponseHead, bytes, bytes, bool], None],
                 handover: Callable[[LoopRelay], None], timed_out: Callable[[LoopRelay], None]) -> None:
        self.stream = stream
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
        stream.on_readable(self._readable)

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

    def _stop(self) -> None:
        self.active = False
        self.stream.on_readable(None)
        if self._watch is not None:
            self._deadlines.cancel(self._watch)
            self._watch = None

    def _readable(self) -> None:
        if not self.active:
            return  # a late call: it was stopped meanwhile
        stream, reader = self.stream, self.reader
        while True:
            try:
                data = stream.recv_nowait(RECV_SIZE)
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
            if not data:
                return  # EOF fed: the parser's verdict comes with it (a cut response is an error event)
        self._stop()
        if not ready:
            self._handover(self)
            return
        head, payload, body, keep_alive = take_small_response(reader, self.request, self.request_reader,
                                                              self._response_filter)
        self._response(self, head, payload, body, keep_alive)
