"""A request stream kept open between exchanges, and served from event-loop callbacks while it needs no wait.

A tun2g server sends one exchange after another on a kept stream (docs/protocol.md#request-streams).
Between them the stream holds no greenlet: its readable callback parses what arrives. The
`Client` decides what to do with each request head; the common one (bodiless, to a plain-HTTP
backend with an idle pooled connection) goes up with one non-blocking send, and its response,
parsed from the backend socket's watcher callback, is queued whole for the session's next write. Whatever
would wait (a body, a big or unframed response, a full window, a dial, an error page) goes to a
worker greenlet running the one complete implementation (`Client._forward`), from the point
reached, and the stream is parked again when that exchange leaves it open. docs/performance.md
says why: each greenlet wait costs a switch out and back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from gevent.hub import get_hub

from tun2g import smux
from tun2g.http import (BackendPool, ExchangeResult, MessageReader, RequestHead, fed_response_ready,
                        take_small_response)
from tun2g.http.parser import CLOSED, HeadEvent
from tun2g.http.reader import RECV_SIZE
from tun2g.log import get_logger
from tun2g.transport.base import read_watcher

if TYPE_CHECKING:
    import _socket

    from tun2g.client.telemetry import Observed

log = get_logger(__name__)

class KeptStream:
    """One request stream of the tunnel, waiting between exchanges for its next request head.

    ``on_request(kept, head)`` is called from the event loop with each request head read while
    parked (it must not block); ``on_unreadable(kept)`` when what came is not a request (an HTTP
    error to answer, from a greenlet). ``idle_seconds``: a parked stream with no request for that
    long is closed.
    """

    __slots__ = ("stream", "reader", "peer_ip", "parked", "_on_request", "_on_unreadable", "_idle_seconds",
                 "_idle_timer")

    def __init__(self, stream: smux.Stream, reader: MessageReader, peer_ip: str, *,
                 on_request: Callable[[KeptStream, RequestHead], None],
                 on_unreadable: Callable[[KeptStream], None], idle_seconds: float) -> None:
        self.stream = stream
        self.reader = reader
        self.peer_ip = peer_ip
        self.parked = False
        self._on_request = on_request
        self._on_unreadable = on_unreadable
        self._idle_seconds = idle_seconds
        self._idle_timer: Any = None  # a libev timer, made at the first park

    # --- between exchanges ------------------------------------------------------------

    def park(self) -> None:
        """Wait for the next request without a greenlet; close the stream after ``idle_seconds`` without one."""
        self.parked = True
        timer = self._idle_timer
        if timer is None:
            timer = self._idle_timer = get_hub().loop.timer(self._idle_seconds, self._idle_seconds)
        timer.again(self._idle_expired)
        self.stream.on_readable(self._readable)  # called at once when something is there already
        if self.reader.next_event is not None:
            get_hub().loop.run_callback(self._readable)  # a request read along with the last one

    def _unpark(self) -> None:
        self.parked = False
        self._idle_timer.stop()
        self.stream.on_readable(None)

    def close(self) -> None:
        """Close the stream (a FIN to the server) and stop waiting for it."""
        if self.parked:
            self._unpark()
        if self._idle_timer is not None:
            self._idle_timer.close()
            self._idle_timer = None
        self.stream.close()
        log.debug("stream_closed", stream=self.stream.id)

    def _idle_expired(self) -> None:
        if self.parked:
            self.close()

    def _readable(self) -> None:
        if not self.parked:
            return  # a late call: the stream was handed on meanwhile
        stream, reader = self.stream, self.reader
        while reader.next_event is None:
            try:
                data = stream.recv_nowait(RECV_SIZE)
            except (smux.StreamResetError, smux.SessionClosedError, OSError):
                self.close()
                return
            if data is None:
                return  # part of a head so far: the parser bounds its size, the idle timer its wait
            reader.feed(data)  # b"" (EOF): CLOSED between requests, an HTTPError inside one
        event = reader.next_event
        if event is CLOSED:
            self.close()
            return
        self._unpark()
        head = reader.read_request_head() if type(event) is HeadEvent else None
        if head is not None:
            self._on_request(self, head)
        else:
            self._on_unreadable(self)


class LoopExchange:
    """A bodiless request sent up on an idle backend connection; its response, relayed from callbacks.

    ``handover(exchange)`` continues it in a greenlet (a big or unframed response, an interim one,
    the backend failing: what the one complete implementation handles); ``done(exchange, result)``
    when the whole response was read, or ``abandoned(exchange, why)`` when the server dropped the
    stream first. One of them is called once, from the event loop, with every watcher stopped;
    after ``done``, ``pending`` holds the response if it could not be written without waiting.
    """

    __slots__ = ("kept", "head", "pool", "connection", "raw", "sent", "observed", "pending", "active", "_watcher",
                 "_handover", "_done", "_abandoned")

    def __init__(self, kept: KeptStream, head: RequestHead, pool: BackendPool, connection: tuple,
                 raw: _socket.socket, sent: int, observed: Observed | None, *,
                 handover: Callable[[LoopExchange], None], done: Callable[[LoopExchange, ExchangeResult], None],
                 abandoned: Callable[[LoopExchange, str], None]) -> None:
        self.kept = kept
        self.head = head
        self.pool = pool
        self.connection = connection  # (backend socket, its MessageReader)
        self.raw = raw                # the socket's non-blocking core, read from the watcher's callback
        self.sent = sent
        self.observed = observed
        self.pending = b""
        self.active = True  # until one of the three ends it
        self._handover = handover
        self._done = done
        self._abandoned = abandoned
        connection[1].expect_response(head.method)
        self._watcher = watcher = read_watcher(connection[0])
        watcher.start(self._response_readable)
        kept.stream.on_peer_closed(self._server_left)

    def _stop(self) -> None:
        self.active = False
        self._watcher.stop()
        self.kept.stream.on_peer_closed(None)

    def _server_left(self) -> None:
        # Scheduled by the server's FIN, it may run after the response ended the exchange in the same loop
        # turn: the connection may then be the next exchange's (its watcher too), and is left alone.
        if not self.active:
            return
        self._stop()
        self._abandoned(self, "the server dropped the stream while the response was awaited")

    def _response_readable(self) -> None:
        if not self.active:
            return
        reader = self.connection[1]
        try:
            data = self.raw.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # a reset: the parser reports the response cut, as at EOF
        reader.feed(data)
        ready = fed_response_ready(reader)
        if ready is None:
            return  # the rest of the head, or of a body of at most SMALL_BODY
        self._stop()
        if not ready:
            self._handover(self)  # an error or EOF included: the greenlet's retry rules apply
            return
        observed = self.observed
        head, payload, body, keep_alive = take_small_response(
            reader, self.head, self.kept.reader, observed.response_filter if observed is not None else None)
        if observed is not None:
            observed.down(len(payload), body)
        result = ExchangeResult(head.status, keep_alive, reader.keep_alive, False, self.sent, len(payload))
        if not self.kept.stream.queue_nowait(payload):  # written with the other streams' of this turn
            self.pending = payload  # the window is short or much is queued: a greenlet writes it
        self._done(self, result)
