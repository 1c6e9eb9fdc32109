"""Moves one HTTP exchange between two socket-like objects: request up, response down, bodies streamed."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import gevent

from tun2g.log import get_logger
from tun2g.transport.base import CloseWatch, PeerCloseNotifier, capabilities_of, close_watch_of, wait_readable

from .encode import LAST_CHUNK, encode_chunk, encode_request_head, encode_response_head
from .heads import HTTPError, RequestHead, ResponseHead, forwardable_headers
from .parser import CHUNKED, HeadEvent
from .reader import RECV_SIZE, HeadTimeout, MessageReader

# With ``watch_downstream``, a response head slower than this arms the peek at a downstream
# socket (faster exchanges never pay for a watching greenlet).
WATCH_AFTER = 0.1


# The largest response body relayed from an event-loop callback (bigger ones are streamed by a greenlet):
# it is buffered whole and written at once, which a stream's window (64 KiB by default) and a socket's
# buffer mostly take.
SMALL_BODY = 32 * 1024


# RFC 9110 section 9.2.2: requests whose repetition has the effect of one, so a proxy may retry them.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


# Methods whose empty body is still announced (Content-Length: 0), as Go's Transport does.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


log = get_logger(__name__)


class Meter(Protocol):
    """Told of the bytes of one exchange as they move (live counters, a capture's tee of the bodies).

    ``size``: bytes written (heads and framing included); ``body``: the body bytes among
    them, unframed (b"" for heads and for a spliced connection's raw bytes).
    """

    def up(self, size: int, body: bytes) -> None: ...

    def down(self, size: int, body: bytes) -> None: ...


class UpstreamError(Exception):
    """The upstream failed before any final response went downstream: answer the client with a 502.

    ``replayable``: nothing of the exchange reached the client, and either the request
    never reached the upstream whole or it is idempotent and had no body to consume,
    so the same request may be sent to another upstream instead.
    """

    def __init__(self, message: str, *, replayable: bool = False) -> None:
        super().__init__(message)
        self.replayable = replayable


class UpstreamTimeout(UpstreamError):
    """No final response head came within the response timeout (answer 504); the upstream is not reusable."""


class DownstreamError(Exception):
    """The downstream peer went away (or broke HTTP) mid-exchange: drop the upstream connection.

    ``http_error``: the client's request body broke HTTP (e.g. a malformed chunk) before
    anything went downstream, so it can still be answered (with ``http_error.status``).
    """

    def __init__(self, message: str, *, http_error: HTTPError | None = None) -> None:
        super().__init__(message)
        self.http_error = http_error


@dataclass(frozen=True, slots=True)
class ExchangeTimeouts:
    """Bounds on the waits of one exchange (None: wait as long as it takes).

    ``response``: from the whole request having gone upstream to the final
    response head. ``body``: the longest a body relay (either direction) may make
    no progress: no byte read, or a write blocked. ``watch_downstream``: notice the
    downstream peer leaving and end the exchange at once, closing the upstream, as the
    downstream declares it can be watched (`tun2g.transport.base.CloseWatch`): a socket
    is peeked at while the response head is awaited with no request body left to read
    (EOF or a reset; bytes it pipelined do not count); a stream that notifies (smux) is
    watched from the request to the response's last byte. Others (TLS) are not watched.
    """

    response: float | None = None
    body: float | None = None
    watch_downstream: bool = False


@dataclass(slots=True)
class ExchangeResult:
    """How one forwarded exchange ended."""

    status: int              # the final status sent downstream
    keep_alive: bool         # the downstream connection may carry another request
    upstream_reusable: bool  # the upstream connection is at a clean message boundary and keep-alive
    upgraded: bool = False   # a 101 was relayed and the connections were spliced until both ended
    request_bytes: int = 0   # bytes written upstream (head, framing and body)
    response_bytes: int = 0  # bytes written downstream (interim and final heads, framing and body)
    response_complete: bool = True  # the response body went downstream whole (False: the upstream cut it)


def forward_exchange(request: RequestHead, request_reader: MessageReader, upstream, downstream, *,
                     response_filter: Callable[[ResponseHead], None] | None = None,
                     upstream_reader: MessageReader | None = None, close_upstream: bool = False,
                     timeouts: ExchangeTimeouts | None = None, meter: Meter | None = None,
                     sent: int | None = None) -> ExchangeResult:
    """Send ``request`` and its body (read from ``request_reader``) upstream and relay the response downstream.

    Hop-by-hop headers are dropped both ways and framing is set here. A request
    body is pumped by a second greenlet while the response is read (so 100-continue
    and early answers work); a bodyless request uses none. ``response_filter`` may
    edit the final response head. ``close_upstream`` sends ``Connection: close`` upstream
    (unless upgrading), for an upstream used for this one exchange: the peer can then end
    its side with the response (a tunnel client sends its FIN in the same write). Raises ``UpstreamError`` while no final response
    has gone downstream (answer 502; ``UpstreamTimeout``: 504), ``DownstreamError`` when the client side fails
    (or, with ``timeouts.watch_downstream``, leaves while the response is awaited);
    an upstream failing (or stalling past ``timeouts.body``) mid-body closes ``downstream`` and returns
    keep_alive=False. Socket timeouts set for ``timeouts`` are unset again on return.
    ``meter`` is told of every write as it happens (see `Meter`). ``sent``: the bodiless request has
    gone upstream already (that many bytes, told to the meter), e.g. from an event-loop callback;
    only its response is relayed, and the response timeout counts from this call.
    """
    if upstream_reader is None:
        upstream_reader = MessageReader(upstream)
    exchange = _Exchange(request, request_reader, upstream, downstream, upstream_reader, close_upstream)
    if sent is not None:
        exchange.request_bytes = sent
        exchange.request_sent = True
        exchange.sent_at = time.monotonic()
    if meter is not None:
        exchange.meter = meter
    if timeouts is None:
        return exchange.run(response_filter)
    exchange.timeouts = timeouts
    if timeouts.body is not None:
        upstream.settimeout(timeouts.body)
        downstream.settimeout(timeouts.body)
    try:
        return exchange.run(response_filter)
    finally:
        if timeouts.body is not None or timeouts.response is not None:
            _untime(upstream)
            _untime(downstream)


class _Exchange:
    __slots__ = ("request", "close_upstream", "request_reader", "upstream", "downstream", "upstream_reader",
                 "request_bytes", "response_bytes", "pump", "request_sent", "request_bodyless", "request_idempotent",
                 "downstream_failure", "timeouts", "sent_at", "awaiting_head", "watch_due", "watcher", "abandoned",
                 "watching", "meter")  # one per proxied request: slots make it cheaper to build and smaller

    def __init__(self, request, request_reader, upstream, downstream, upstream_reader, close_upstream) -> None:
        self.request = request
        self.close_upstream = close_upstream
        self.request_reader = request_reader
        self.upstream = upstream
        self.downstream = downstream
        self.upstream_reader = upstream_reader
        self.request_bytes = 0
        self.response_bytes = 0
        self.pump: gevent.Greenlet | None = None
        self.request_sent = False      # the whole request body went upstream
        self.request_bodyless = request_reader.body_complete  # nothing to consume: it can be sent again
        self.request_idempotent = request.method in IDEMPOTENT_METHODS
        self.downstream_failure: Exception | None = None
        self.timeouts: ExchangeTimeouts | None = None
        self.sent_at = 0.0             # when the whole request had gone upstream
        self.awaiting_head = False     # the final response head is being waited for
        self.watch_due = False         # the head is slow: watch the downstream peer once the request is sent
        self.watcher: gevent.Greenlet | None = None
        self.abandoned = False         # the downstream peer left while the response was awaited or relayed
        self.watching = True           # False once the exchange is over: a late notification does nothing
        self.meter: Meter = _NO_METER

    def run(self, response_filter) -> ExchangeResult:
        timer = None
        notifier: PeerCloseNotifier | None = None
        try:
            timeouts = self.timeouts
            if timeouts is not None and timeouts.watch_downstream:
                watch = close_watch_of(self.downstream)
                if watch is CloseWatch.NOTIFY:
                    notifier = self.downstream
                    notifier.on_peer_closed(self._downstream_left)
                elif watch is CloseWatch.PEEK:
                    # A libev timer, not a greenlet: the common fast response costs a start and a stop.
                    timer = gevent.get_hub().loop.timer(WATCH_AFTER)
            if not self.request_sent:
                self._send_request()
            if timer is not None:
                timer.start(self._head_is_slow)
            head = self._read_final_head()
            if timer is not None:
                timer.close()
                timer = None
                if self.watcher is not None:
                    self.watcher.kill()
            if response_filter is not None:
                response_filter(head)
            if head.status == 101:
                if notifier is not None:  # the splice ends with either side on its own
                    notifier.on_peer_closed(None)
                    notifier = None
                return self._splice(head)
            return self._relay_response(head)
        finally:
            if notifier is not None:
                notifier.on_peer_closed(None)
            self.watching = False
            if timer is not None:
                timer.close()
            if self.pump is not None and not self.pump.dead:
                self.pump.kill()
            if self.watcher is not None and not self.watcher.dead:
                self.watcher.kill()

    # --- request -------------------------------------------------------------------

    def _send_request(self) -> None:
        request, reader = self.request, self.request_reader
        payload = upstream_request_head(request, reader, self.close_upstream)
        chunked = reader.framing == CHUNKED
        body = b""
        if not reader.body_complete:
            body = reader.take_ready_body()
            payload += _framed(body, chunked)
        if chunked and reader.body_complete:
            payload += LAST_CHUNK
        try:
            send_all(self.upstream, payload)
        except OSError as exc:
            if self.abandoned:
                raise DownstreamError("the client left before the request went upstream") from exc
            raise UpstreamError(f"cannot send the request upstream: {_describe(exc)}",
                                replayable=self.request_bodyless) from exc
        self.request_bytes = len(payload)
        self.meter.up(len(payload), body)
        if reader.body_complete:
            self.sent_at = time.monotonic()
            self.request_sent = True
        else:
            self.pump = gevent.spawn(self._pump_request_body, chunked)

    def _pump_request_body(self, chunked: bool) -> None:
        reader, upstream = self.request_reader, self.upstream
        while not reader.body_complete:
            try:
                data = reader.read_body()
            except (OSError, HTTPError) as exc:
                self.downstream_failure = exc
                _close_quietly(upstream)  # wakes the greenlet waiting for the response
                return
            payload = _framed(data, chunked)
            if chunked and reader.body_complete:
                payload += LAST_CHUNK
            try:
                send_all(upstream, payload)
            except OSError:
                return  # the upstream stopped reading; its response (or failure) says why
            self.request_bytes += len(payload)
            self.meter.up(len(payload), data)
        self.sent_at = time.monotonic()
        self.request_sent = True
        if self.watch_due:
            self._start_watch()

    # --- watching the downstream peer while the response is awaited ------------------

    def _head_is_slow(self) -> None:
        """Timer callback (in the hub): the head is late; watch the downstream once nothing more is to be read."""
        if self.awaiting_head:
            self.watch_due = True
            if self.request_sent:
                self._start_watch()

    def _start_watch(self) -> None:
        if self.watcher is None and self.awaiting_head:
            self.watcher = gevent.spawn(self._watch_downstream)

    def _watch_downstream(self) -> None:
        """Peek at the downstream socket (it declares CloseWatch.PEEK): EOF (or a reset) means the
        peer left; any byte ends the watch.

        Bytes are never consumed (MSG_PEEK): a pipelined request stays for the next exchange.
        """
        sock = self.downstream
        while self.awaiting_head:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except socket.timeout:
                continue  # the body timeout set on the socket: keep watching
            except OSError:
                data = b""  # reset by the peer: gone as well
            if data:
                return  # readable but not EOF (a pipelined request): nothing to say
            if self.awaiting_head:
                self._downstream_left()
            return

    def _downstream_left(self) -> None:
        """The downstream peer is gone: close the upstream, which wakes the greenlet reading it."""
        if self.watching and not self.abandoned:
            self.abandoned = True
            _close_quietly(self.upstream)

    # --- response ------------------------------------------------------------------

    def _read_final_head(self) -> ResponseHead:
        timeouts = self.timeouts
        if timeouts is None:
            return self._read_final_head_once()
        self.awaiting_head = True
        try:
            if timeouts.response is None:
                return self._read_final_head_once()
            self.upstream.settimeout(timeouts.response)
            while True:
                try:
                    return self._read_final_head_once()
                except _HeadWaitExpired:
                    left = self._response_time_left(timeouts.response)
                    if left is None:
                        raise UpstreamTimeout(f"no response from upstream within {timeouts.response:g} s") from None
                    self.upstream.settimeout(left)
        finally:
            self.awaiting_head = False
            if timeouts.body is not None or timeouts.response is not None:
                _set_timeout(self.upstream, timeouts.body)

    def _response_time_left(self, timeout: float) -> float | None:
        """How much longer to wait for the head; None when the response timeout has passed."""
        if not self.request_sent:
            if self.pump is not None and not self.pump.dead:
                return timeout  # the request body is still going up: the clock has not started
            return None  # the body pump stopped (the upstream stopped reading it)
        left = self.sent_at + timeout - time.monotonic()
        return left if left > 0.001 else None

    def _read_final_head_once(self) -> ResponseHead:
        try:
            return self.upstream_reader.read_final_response_head(self.request.method, self._relay_interim)
        except (OSError, HTTPError) as exc:
            if self.abandoned:
                raise DownstreamError("the client left while the response was awaited") from exc
            if isinstance(exc, socket.timeout) and self.timeouts is not None and self.timeouts.response is not None:
                raise _HeadWaitExpired() from exc
            failure = self.downstream_failure
            if failure is not None:
                answerable = failure if isinstance(failure, HTTPError) and self.response_bytes == 0 else None
                raise DownstreamError(f"the client failed while sending its body: {_describe(failure)}",
                                      http_error=answerable) from exc
            raise UpstreamError(f"no valid response from upstream: {_describe(exc)}",
                                replayable=self.request_bodyless and self.request_idempotent
                                and self.response_bytes == 0) from exc

    def _relay_interim(self, head: ResponseHead) -> None:
        # RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client; 100 only to one that waits for it.
        if self.request.version == "HTTP/1.1" and (head.status != 100 or self.request.expects_continue):
            self._send_down(encode_response_head(head, headers=forwardable_headers(head.headers)), b"")

    def _relay_response(self, head: ResponseHead) -> ExchangeResult:
        reader = self.upstream_reader
        payload, keep_alive = downstream_response_head(head, self.request, self.request_reader, reader)
        chunked_out = reader.framing < 0 and self.request.version == "HTTP/1.1"
        body = reader.take_ready_body()
        payload += _framed(body, chunked_out)
        complete = reader.body_complete
        if complete and chunked_out:
            payload += LAST_CHUNK
        self._send_down(payload, body)
        while not complete:
            try:
                data = reader.read_body()
            except (OSError, HTTPError) as exc:
                if self.abandoned:
                    raise DownstreamError("the client left while the response was relayed") from exc
                if self.downstream_failure is not None:
                    raise DownstreamError(f"the client failed: {_describe(self.downstream_failure)}") from exc
                _close_quietly(self.downstream)  # no terminating chunk: the client sees the cut
                result = self._result(head.status, False, False)
                result.response_complete = False
                return result
            complete = reader.body_complete
            payload = _framed(data, chunked_out)
            if complete and chunked_out:
                payload += LAST_CHUNK
            if payload:
                self._send_down(payload, data)
        return self._result(head.status, keep_alive, reader.keep_alive)

    def _result(self, status: int, keep_alive: bool, upstream_keep_alive: bool, upgraded: bool = False):
        return ExchangeResult(status, keep_alive, upstream_keep_alive and self.request_sent, upgraded,
                              self.request_bytes, self.response_bytes)

    def _send_down(self, payload: bytes, body: bytes) -> None:
        try:
            send_all(self.downstream, payload)
        except OSError as exc:
            raise DownstreamError(f"cannot write to the client: {_describe(exc)}") from exc
        self.response_bytes += len(payload)
        self.meter.down(len(payload), body)

    # --- protocol switch -----------------------------------------------------------

    def _splice(self, head: ResponseHead) -> ExchangeResult:
        if self.timeouts is not None:  # a switched connection (WebSocket) may rightly sit idle for long
            _untime(self.upstream)
            _untime(self.downstream)
        upgrade = head.get("Upgrade")
        if not self.request_reader.upgrade:
            raise UpstreamError("upstream answered 101 Switching Protocols to a request that did not ask for it")
        if not upgrade or not self.upstream_reader.switched_protocols:
            raise UpstreamError("upstream sent a 101 Switching Protocols without a valid Upgrade header")
        headers = forwardable_headers(head.headers) + [("Connection", "Upgrade"), ("Upgrade", upgrade)]
        self._send_down(encode_response_head(head, headers=headers) + self.upstream_reader.take_buffered(), b"")
        upward = gevent.spawn(_copy_raw, self.downstream, self.upstream, self.request_reader.take_buffered(),
                              self.meter.up)
        self.response_bytes += _copy_raw(self.upstream, self.downstream, b"", self.meter.down)
        self.request_bytes += upward.get()
        return self._result(101, False, False, upgraded=True)


def upstream_request_head(request: RequestHead, reader: MessageReader, close_upstream: bool = False) -> bytes:
    """The head that goes upstream for ``request``, as ``reader`` parsed it: hop-by-hop fields dropped, the
    framing as measured, ``Connection: close`` with ``close_upstream`` (see `forward_exchange`)."""
    # The framing goes out as the parser measured it, never as a copied header: a body the
    # next hop would not expect is the next request on a kept-alive connection (smuggling).
    headers = forwardable_headers(request.headers, keep_length=False)
    upgrade = request.get("Upgrade") if reader.upgrade else None
    connection = None
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", upgrade)]
    elif close_upstream:
        connection = "close"
    framing = reader.framing
    length = framing if framing > 0 or (framing == 0 and request.method in _BODY_METHODS) else None
    return encode_request_head(request, chunked=framing == CHUNKED, connection=connection, headers=headers,
                               content_length=length)


def downstream_response_head(head: ResponseHead, request: RequestHead, request_reader: MessageReader,
                             reader: MessageReader) -> tuple[bytes, bool]:
    """``(the head that goes downstream, whether the downstream connection stays open after it)`` for the
    final response ``head`` as ``reader`` parsed it, answering ``request`` as ``request_reader`` parsed it.

    An unframed body (chunked or until close) goes on chunked to an HTTP/1.1 client.
    """
    client_speaks_11 = request.version == "HTTP/1.1"
    chunked_out = reader.framing < 0 and client_speaks_11
    keep_alive = (request_reader.keep_alive and request_reader.body_complete and not request_reader.upgrade
                  and (reader.framing >= 0 or client_speaks_11))
    connection = ("keep-alive" if not client_speaks_11 else None) if keep_alive else "close"
    # A bodyless answer's Content-Length (HEAD, 204, 304) describes another response: copied.
    # Any other's is the framing the parser measured.
    bodyless = head.status < 200 or head.status in (204, 304) or request.method == "HEAD"
    payload = encode_response_head(head, chunked=chunked_out, connection=connection,
                                   headers=forwardable_headers(head.headers, keep_length=bodyless),
                                   content_length=None if bodyless or reader.framing < 0 else reader.framing)
    return payload, keep_alive


def fed_response_ready(reader: MessageReader) -> bool | None:
    """What the bytes fed to the response ``reader`` (`MessageReader.feed`) allow a callback: True, a final
    response with a framed body of at most SMALL_BODY is here whole (`take_small_response`); None, more
    is needed; False, anything else (an interim, bigger or unframed response, an error, EOF), which
    ``forward_exchange(sent=)`` relays with the same reader."""
    event = reader.next_event
    if event is None:
        return None
    if type(event) is not HeadEvent or event.head.status < 200 or not 0 <= event.framing <= SMALL_BODY:
        return False
    if not reader.complete:
        return None
    return reader.whole  # else cut by EOF or broken: the greenlet relays what came, as it would have


def take_small_response(reader: MessageReader, request: RequestHead, request_reader: MessageReader,
                        response_filter: Callable[[ResponseHead], None] | None = None
                        ) -> tuple[ResponseHead, bytes, bytes, bool]:
    """The response `fed_response_ready` found whole, as it goes downstream: ``(its head, the bytes to write,
    the body among them, whether the downstream connection stays open)``; ``response_filter`` may edit the
    head first, as in `forward_exchange`."""
    head = reader.read_final_response_head(request.method)
    if response_filter is not None:
        response_filter(head)
    payload, keep_alive = downstream_response_head(head, request, request_reader, reader)
    body = reader.take_ready_body()
    return head, payload + body, body, keep_alive


class _NoMeter:
    __slots__ = ()

    def up(self, size: int, body: bytes) -> None:
        pass

    def down(self, size: int, body: bytes) -> None:
        pass


_NO_METER = _NoMeter()


class _HeadWaitExpired(Exception):
    """One wait for the response head ran out (the response timeout may not have, if the body was slow to send)."""


def _set_timeout(sock, timeout: float | None) -> None:
    try:
        sock.settimeout(timeout)
    except OSError:
        pass  # closed meanwhile


def _untime(sock) -> None:
    _set_timeout(sock, None)


def send_all(sock, data: bytes) -> None:
    """``sock.sendall(data)``, trying one plain ``send`` first.

    Most writes fit the socket buffer at once; this skips the getsockopt call and
    the extra frames gevent's sendall spends on every call.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _framed(data: bytes, chunked: bool) -> bytes:
    return encode_chunk(data) if chunked and data else data


def _copy_raw(source, sink, first: bytes, count: Callable[[int, bytes], None]) -> int:
    """Copy raw bytes until ``source`` ends; then half-close ``sink`` (or close both on error)."""
    copied = 0
    try:
        if first:
            send_all(sink, first)
            copied = len(first)
            count(copied, b"")
        while True:
            data = source.recv(RECV_SIZE)
            if not data:
                break
            send_all(sink, data)
            copied += len(data)
            count(len(data), b"")
        if not capabilities_of(sink).half_close:
            raise OSError("this stream cannot be half-closed")  # e.g. TLS: shutdown() ends reading too
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        # One direction broke (or cannot half-close): end both, waking the other direction.
        _close_quietly(source)
        _close_quietly(sink)
    return copied


class Later(Protocol):
    """An exchange that a `serve_requests` handler started and event-loop callbacks go on with.

    The handler returned before its response went out; the serve loop then waits for the peer's next
    bytes, which for a client that waits for each response is the one wait of the whole exchange.
    """

    done: bool  # the exchange has ended (its response written, or the connection to be ended)
    ended: Callable[[], None] | None  # called once it has ended, for the handler's own count

    def wait(self) -> bool:
        """Wait for the exchange to end; True when the connection may carry another request."""
        ...

    def abandon(self) -> None:
        """The peer left (EOF, a reset) before the exchange ended: end it now."""
        ...


def serve_requests(sock, handle: Callable[[RequestHead, MessageReader], "bool | Later"],
                   reject: Callable[[HTTPError], bytes], *, head_timeout: float | None = None,
                   idle_timeout: float | None = None, reader: MessageReader | None = None) -> None:
    """Read request heads from ``sock`` and pass each to ``handle`` while it returns True (or a `Later`
    that ends with the connection kept).

    A malformed or oversized head is answered with ``reject(error)`` and ends the
    connection; the peer leaving ends it quietly. The caller closes ``sock``.
    ``head_timeout``: each head must arrive whole within it (else a 408, or a quiet
    close if nothing came); ``idle_timeout``: a kept-alive connection waits at most
    this long for its next request (see `MessageReader.read_request_head`). ``reader``: the one
    that has read ``sock`` so far, if any (what it holds is served first).
    """
    if reader is None:
        reader = MessageReader(sock)
    try:
        while True:
            try:
                head = reader.read_request_head(head_timeout=head_timeout, idle_timeout=idle_timeout)
            except HeadTimeout as exc:
                if exc.started:
                    sock.settimeout(head_timeout)  # a peer that does not read cannot hold us here either
                    sock.sendall(reject(exc))
                return
            except HTTPError as exc:
                log.info("request_refused", status=exc.status, reason=exc.message)
                if head_timeout is not None:
                    sock.settimeout(head_timeout)
                sock.sendall(reject(exc))
                return
            if head is None:
                return
            kept = handle(head, reader)
            if kept is True:
                continue
            if kept is False or not _await_next(kept, sock, reader, idle_timeout):
                return
    except (OSError, DownstreamError):
        return  # the peer went away between requests


def _await_next(later: Later, sock, reader: MessageReader, idle_timeout: float | None) -> bool:
    """Wait for the peer's next bytes while ``later`` ends its exchange; False: end the connection.

    The bytes are fed to ``reader`` only once the exchange has ended, so nothing parses the next
    request while the current one's response may still read ``reader``'s state. The socket's one
    timeout is the idle timeout meanwhile (a greenlet taking the exchange over sets its own before
    writing), and nothing here changes it again before the exchange has ended.
    """
    if reader.next_event is not None:  # the next request came with this one (pipelined): nothing to wait for
        return later.wait()
    data: bytes | None = None
    try:
        sock.settimeout(idle_timeout)
        wait_readable(sock)  # nothing can have come yet: the request has only just gone up
        data = sock.recv(RECV_SIZE)
    except socket.timeout:
        pass
    except OSError:
        later.abandon()  # a reset, or the socket closed by the exchange that ended the connection
        return False
    if not data:
        if data == b"" or later.done:  # the peer left, or stayed idle after the response
            later.abandon()
            return False
        if not later.wait():  # the idle wait ran out while the response was awaited: it starts again
            return False
        _untime(sock)
        return True
    if not later.wait():
        return False
    reader.feed(data)  # read_request_head sets the socket's timeout for what is still to come, then unsets it
    return True


def _close_quietly(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
