"""The request pipeline: what happens to every public request, whichever front it came in by.

The native front and a hop from another node hand over a parsed head, its
body reader and the public socket (`Pipeline.serve`); the WSGI front and
`round_trip` hand over a head and a body and get a streamed response back
(`Pipeline.round_trip`). Both go through the same steps: the hop check, the
proxy headers, the Router's candidates, the retry of a replayable request
when its upstream dies, the same pages, X-Request-Id on every answer, and
one access-log line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import gevent
from gevent.event import Event

from tun2g import pages
from tun2g.cluster import HopRefused
from tun2g.cluster.hop import HOP_HEADER, Hop
from tun2g.control import ROUTE_HEADER
from tun2g.http import DownstreamError, HTTPError, MessageReader, RequestHead, ResponseHead, UpstreamError
from tun2g.http import ExchangeTimeouts, UpstreamTimeout, forward_exchange, forwardable_headers, upstream_request_head
from tun2g.http.relay import IDEMPOTENT_METHODS, Later, Meter
from tun2g.http.client import Body, StreamedResponse, body_pieces, body_is_replayable, send_request
from tun2g.http.parser import CHUNKED
from tun2g.log import AccessLog, get_logger
from tun2g.metrics import DomainMetrics, Metrics
from tun2g.requestid import new_request_id
from tun2g.policy import Policy
from tun2g.server.acme import CHALLENGE_PREFIX
from tun2g.server.inspect import Capture, Inspector
from tun2g.server.loop_relay import LoopRelay, SocketSource, StreamSource
from tun2g.server.policy_step import PolicyBook
from tun2g.server.router import NodeUpstream, Router, Routing, Upstream, routing_key
from tun2g.smux import Stream
from tun2g.transport.base import ByteStream, nonblocking_socket

log = get_logger(__name__)
access = AccessLog(__name__)

Result = TypeVar("Result")


@dataclass(slots=True)
class Request:
    """The request in hand: its head and what the log and the pages need to know."""

    head: RequestHead
    id: str
    host: str
    peer_ip: str
    scheme: str
    started: float
    trusted: bool  # the peer is the embedding program or a trusted proxy: its forwarding headers stand
    counted: DomainMetrics | None = None  # its domain's metrics, once an upstream took it
    capture: Capture | None = None        # its capture for the inspector, when its route is inspected
    route: str | None = None              # the route key it matched, once an upstream took it (metrics, captures)
    public: bool = True                   # it came from a public client (not a hop from another node)
    policy: Policy | None = None          # its route's edge policy, once the policy step found one
    hsts: str | None = None               # Strict-Transport-Security for its response (HTTPS only)


@dataclass(frozen=True)
class HTTPSPolicy:
    """Public HTTPS rules, for every route for now (docs/https.md; per route once routes carry a policy)."""

    redirect: bool = False       # plain HTTP from the public gets a 308 to the same URL over HTTPS
    https_port: int = 443        # the port a redirect names (443: none in the URL)
    hsts_max_age: int = 0        # seconds of Strict-Transport-Security on responses over HTTPS (0: none)

    def location(self, request: "Request") -> str | None:
        """Where a plain request is redirected, or None (no redirect, or a Host that is no valid name)."""
        if not self.redirect:
            return None
        domain = routing_key(request.host)
        if domain is None:
            return None
        target = request.head.target
        path = target if target.startswith("/") else "/"  # absolute-form and '*' go to the site's root
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{domain}{port}{path}"

    @property
    def hsts(self) -> str | None:
        return f"max-age={self.hsts_max_age}" if self.hsts_max_age > 0 else None


@dataclass(frozen=True)
class Outcome:
    """How an exchange relayed between sockets ended."""

    status: int
    keep_alive: bool
    bytes_in: int = 0   # written upstream
    bytes_out: int = 0  # written to the public client


class _Exchange(Protocol[Result]):
    """How one front moves a request over an upstream, and how it answers with a page."""

    replayable: bool  # the request can be sent again after a failed attempt (as far as this front knows)
    answered: bool    # a response began to reach the client: a failure now can only end the connection

    def through(self, upstream: Upstream, meter: Meter | None) -> Result | _Later: ...

    def page(self, page: pages.Page) -> Result: ...

    def status(self, result: Result) -> int: ...

    def sizes(self, result: Result) -> tuple[int, int] | None: ...

    def response_headers(self, result: Result) -> list | None: ...

    def when_done(self, result: Result, callback) -> None:
        """Call ``callback`` once ``result``'s body has gone by (now, or when the caller closes it)."""
        ...
    def limit(self, timeouts: ExchangeTimeouts | None, max_body: int | None) -> None:
        """A route's own bounds for this exchange: its waits, and the body size past which it is cut (413)."""


def _dressed(request: Request, page: pages.Page) -> pages.Page:
    """The page as the request's route wants it shown (its own HTML for that status), else as is."""
    policy = request.policy
    template = policy.error_pages.get(page.status) if policy is not None and policy.error_pages else None
    return page if template is None else pages.with_custom_body(page, template)


class _Later:
    """A public request whose response event-loop callbacks relay (`LoopRelay`), held by the front's
    serve loop until the client's next bytes (`tun2g.http.Later`).

    ``resume(outcome)`` is the pipeline's continuation (set when the exchange comes back to it):
    the finished exchange's `Outcome`, or the `UpstreamError` that ended it, in; the request's final
    `Outcome` out. ``ended``: called once the exchange has ended (the front's count of requests in flight).
    """

    __slots__ = ("upstream", "meter", "sent", "sent_at", "relay", "in_use", "resume", "ended", "done",
                 "keep_alive", "abandoned", "_sock", "_event")

    def __init__(self, sock: ByteStream, upstream: Upstream, meter: Meter | None, sent: int) -> None:
        self.upstream = upstream
        self.meter = meter
        self.sent = sent  # bytes of the request gone up
        self.sent_at = time.monotonic()
        self.relay: LoopRelay | None = None  # while callbacks have the exchange
        self.in_use: Upstream | None = None  # while a greenlet relays over an upstream (not given back yet)
        self.resume: Callable[[Outcome | UpstreamError], object] | None = None
        self.ended: Callable[[], None] | None = None
        self.done = False
        self.keep_alive = False
        self.abandoned = False
        self._sock = sock
        self._event: Event | None = None

    def wait(self) -> bool:
        if not self.done:  # the client sent more before its response went out (pipelining)
            event = self._event = Event()
            event.wait()
        return self.keep_alive

    def abandon(self) -> None:
        if self.done or self.abandoned:
            return
        self.abandoned = True
        relay = self.relay
        if relay is not None and relay.abandon():  # still in callbacks: it ends here
            self.relay = None
            self.upstream.release(False)
            self.finish(Outcome(499, False, self.sent, 0))
        elif self.in_use is not None:  # a greenlet relays over it: closing it ends the greenlet's wait
            self.in_use.stream.close()
        # Else its upstream went back already (another request may hold it now): the greenlet writing to
        # the client fails on its own once the front closes the client's socket.

    def finish(self, outcome: Outcome | UpstreamError) -> None:
        """The exchange ended: resume the pipeline (its log line, its metrics) and let the front go on."""
        assert self.resume is not None
        try:
            final = self.resume(outcome)
        except Exception as exc:  # noqa: BLE001 - in the event loop: the connection ends, the log says why
            log.error("internal_error", error=repr(exc), exc_info=True)
            final = Outcome(500, False)
        assert isinstance(final, Outcome)  # after a failure the next candidate is served from a greenlet
        self._ended(final.keep_alive and not self.abandoned)

    def _ended(self, keep_alive: bool) -> None:
        self.done = True
        self.keep_alive = keep_alive
        self.resume = None  # it holds the exchange, which holds this: no cycle left for the collector
        if not keep_alive:
            try:
                self._sock.close()  # wakes the front's wait on it
            except OSError:
                pass
        if self._event is not None:
            self._event.set()
        if self.ended is not None:
            self.ended()


class _SocketExchange:
    """Relays between the public socket and the upstream, bodies streamed both ways.

    With ``later`` (the front's serve loop holds a `tun2g.http.Later`), a bodiless kept-alive request over
    a plain socket is sent up without waiting (a tunnel stream: one queued write; a node connection:
    one non-blocking send) and its response relayed from callbacks (`LoopRelay`); whatever would
    wait goes on in a greenlet, through the same `_forward`.
    """

    replayable = True  # forward_exchange itself says (UpstreamError.replayable) whether the body allows it
    answered = False

    def __init__(self, request: Request, reader: MessageReader, sock: ByteStream,
                 timeouts: ExchangeTimeouts | None = None, later: bool = False) -> None:
        self._request = request
        self._reader = reader
        self._sock = sock
        self._timeouts = timeouts
        self._response: ResponseHead | None = None
        self._raw = nonblocking_socket(sock) if later else None  # written to from callbacks
        self._later: _Later | None = None

    def _stamp(self, response: ResponseHead) -> None:
        policy = self._request.policy
        if policy is not None and policy.response_headers:
            response.headers = policy.response_headers.apply(response.headers)
        response.set("X-Request-Id", self._request.id)
        if self._request.hsts:
            response.set("Strict-Transport-Security", self._request.hsts)
        self._response = response
        self.answered = True

    def limit(self, timeouts: ExchangeTimeouts | None, max_body: int | None) -> None:
        self._timeouts = timeouts
        if max_body is not None and self._reader.framing == CHUNKED:  # a declared length was checked already
            self._reader.body_limit = max_body

    def through(self, upstream: Upstream, meter: Meter | None) -> Outcome | _Later:
        if self._raw is not None:
            result = self._through_loop(upstream, meter)
            if result is not None:
                return result
        return self._forward(upstream, meter, self._timeouts)

    def _forward(self, upstream: Upstream, meter: Meter | None, timeouts: ExchangeTimeouts | None,
                 sent: int | None = None) -> Outcome:
        later = self._later
        if later is not None:
            later.in_use = upstream  # a client leaving meanwhile closes it (`_Later.abandon`) until it goes back
        try:
            try:
                result = forward_exchange(self._request.head, self._reader, upstream.stream, self._sock,
                                          response_filter=self._stamp, upstream_reader=upstream.reader,
                                          close_upstream=upstream.single_use, timeouts=timeouts, meter=meter,
                                          sent=sent)
            finally:
                if later is not None:
                    later.in_use = None
        except DownstreamError as exc:
            upstream.release(False)
            error = exc.http_error
            if error is not None:  # its body broke HTTP (a bad chunk) before any answer: say so
                return self.page(pages.malformed_request(error.status, error.message, self._request.id))
            return Outcome(499, False)  # the public client left: only this exchange ends
        except UpstreamTimeout:
            upstream.release(False)
            return self._timed_out(upstream)
        except BaseException:
            upstream.release(False)
            raise
        upstream.release(result.upstream_reusable)  # a node connection at a clean boundary is kept for the next
        return Outcome(result.status, result.keep_alive, result.request_bytes, result.response_bytes)

    def _timed_out(self, upstream: Upstream) -> Outcome:
        # The backend holds the request but does not answer: 504 (the upstream is closed, not retried).
        seconds = self._timeouts.response if self._timeouts is not None else None
        log.warning("response_timeout", host=self._request.host, backend=upstream.label, seconds=seconds,
                    request_id=self._request.id)
        return self.page(pages.gateway_timeout(seconds or 0, self._request.id))

    # --- from callbacks -----------------------------------------------------------------

    def _through_loop(self, upstream: Upstream, meter: Meter | None) -> Outcome | _Later | None:
        """Send the request up without waiting and leave its response to callbacks; None when that
        would wait (a body to pump, a full window, a socket that takes none of it) or the upstream
        cannot be watched (TLS). A node connection that takes only part of the head gets the rest
        from this greenlet, which then relays the exchange itself (the Outcome)."""
        reader = self._reader
        if not reader.body_complete or not reader.keep_alive or reader.upgrade:
            return None
        stream = upstream.stream
        head = self._request.head
        if type(stream) is Stream:
            payload = upstream_request_head(head, reader, upstream.single_use)
            if not stream.queue_nowait(payload):
                return None
            source: StreamSource | SocketSource = StreamSource(stream)
        else:  # a kept connection to the node that holds the tunnel
            raw = nonblocking_socket(stream)
            if raw is None:
                return None
            payload = upstream_request_head(head, reader, upstream.single_use)
            try:
                sent = raw.send(payload)
            except OSError:  # BlockingIOError included: the greenlet path sends it, under its retry rules
                return None
            if sent < len(payload):
                return self._send_rest(upstream, meter, payload, sent)
            source = SocketSource(stream, raw)
        if meter is not None:
            meter.up(len(payload), b"")
        later = self._later = _Later(self._sock, upstream, meter, len(payload))
        timeouts = self._timeouts
        later.relay = LoopRelay(source, upstream.reader, head, reader, timeouts.response if timeouts else None,
                                self._stamp, response=self._loop_response, handover=self._loop_handover,
                                timed_out=self._loop_timed_out)
        return later

    def _send_rest(self, upstream: Upstream, meter: Meter | None, payload: bytes, sent: int) -> Outcome:
        """The rest of a head a node connection took only part of, then the exchange, from this greenlet."""
        try:
            upstream.stream.sendall(memoryview(payload)[sent:])
        except OSError as exc:
            upstream.release(False)
            raise UpstreamError(f"cannot send the request upstream: {exc}", replayable=True) from exc
        if meter is not None:
            meter.up(len(payload), b"")
        return self._forward(upstream, meter, self._timeouts, len(payload))

    def _loop_response(self, relay: LoopRelay, head: ResponseHead, payload: bytes, body: bytes,
                       keep_alive: bool) -> None:
        later = self._later
        assert later is not None and self._raw is not None
        later.relay = None
        later.upstream.release(relay.reader.keep_alive)
        try:
            written = self._raw.send(payload)
        except BlockingIOError:
            written = 0
        except OSError:  # the client is gone
            later.finish(Outcome(499, False, later.sent, 0))
            return
        if written < len(payload):  # the client's socket took only part: a greenlet writes the rest
            gevent.spawn(self._write_rest, payload, written, body, Outcome(head.status, keep_alive, later.sent,
                                                                           len(payload)))
            return
        if later.meter is not None:
            later.meter.down(len(payload), body)
        later.finish(Outcome(head.status, keep_alive, later.sent, len(payload)))

    def _loop_handover(self, relay: LoopRelay) -> None:
        assert self._later is not None
        self._later.relay = None
        gevent.spawn(self._go_on, False)

    def _loop_timed_out(self, relay: LoopRelay) -> None:
        assert self._later is not None
        self._later.relay = None
        gevent.spawn(self._go_on, True)

    def _go_on(self, timed_out: bool) -> None:
        """In a greenlet: finish the exchange the callbacks gave up (`_forward`, from the point reached)."""
        later = self._later
        assert later is not None
        self._raw = None  # another candidate, if it comes to that, is served from here
        if self._timeouts is not None:  # and never watches the client's socket: the front's wait does
            self._timeouts = dataclasses.replace(self._timeouts, watch_downstream=False)
        upstream = later.upstream
        if later.abandoned:  # the client left before this greenlet ran: nothing to wait for
            upstream.release(False)
            later.finish(Outcome(499, False, later.sent, 0))
            return
        outcome: Outcome | UpstreamError
        try:
            if timed_out:
                upstream.release(False)
                outcome = self._timed_out(upstream)
            else:
                outcome = self._forward(upstream, later.meter, self._remaining_timeouts(later), later.sent)
        except UpstreamError as exc:
            outcome = Outcome(499, False, later.sent, 0) if later.abandoned else exc
        except BaseException:
            later._ended(False)
            raise
        later.finish(outcome)

    def _remaining_timeouts(self, later: _Later) -> ExchangeTimeouts | None:
        """The exchange's timeouts for the greenlet going on with it: the response's less the time it has
        waited already."""
        timeouts = self._timeouts
        if timeouts is None or timeouts.response is None:
            return timeouts
        waited = time.monotonic() - later.sent_at
        return dataclasses.replace(timeouts, response=max(0.001, timeouts.response - waited))

    def _write_rest(self, payload: bytes, written: int, body: bytes, outcome: Outcome) -> None:
        """In a greenlet: write what the client's socket did not take from the callback."""
        later = self._later
        assert later is not None
        timeouts = self._timeouts
        try:
            if timeouts is not None and timeouts.body is not None:
                self._sock.settimeout(timeouts.body)
            self._sock.sendall(memoryview(payload)[written:])
        except OSError:
            later.finish(Outcome(499, False, later.sent, written))
            return
        if later.meter is not None:
            later.meter.down(len(payload), body)
        later.finish(outcome)

    # -------------------------------------------------------------------------------------

    def page(self, page: pages.Page) -> Outcome:
        self._response = None
        self.answered = True
        page = _dressed(self._request, page)
        return Outcome(page.status, pages.send_page(self._sock, page, self._request.head), 0, len(page.body))

    def status(self, result: Outcome) -> int:
        return result.status

    def sizes(self, result: Outcome) -> tuple[int, int] | None:
        return result.bytes_in, result.bytes_out

    def response_headers(self, result: Outcome) -> list | None:
        return None if self._response is None else self._response.headers

    def when_done(self, result: Outcome, callback) -> None:
        callback()  # relayed: the bodies went by already


class _ResponseExchange:
    """Sends a head and a body and returns the response for the caller to read."""

    answered = False  # the caller gets the response (or a page) only when the exchange returns

    def __init__(self, request: Request, body: Body, timeouts: ExchangeTimeouts | None = None) -> None:
        self._request = request
        self._body = body
        self.replayable = body_is_replayable(body)
        self._timeouts = timeouts

    def through(self, upstream: Upstream, meter: Meter | None) -> StreamedResponse:
        head = self._request.head
        reader = upstream.reader or MessageReader(upstream.stream)
        pump: gevent.Greenlet | None = None
        timeouts = self._timeouts
        try:
            pump = send_request(upstream.stream, head, self._body, close=upstream.single_use, meter=meter)
        except OSError as exc:  # the request did not get out whole: it can go elsewhere
            upstream.release(False)
            raise UpstreamError(f"cannot send the request upstream: {exc}", replayable=self.replayable) from exc
        try:
            if timeouts is not None and timeouts.response is not None:
                upstream.stream.settimeout(timeouts.response)  # per read of the head: the body goes up meanwhile
            response = reader.read_final_response_head(head.method)
            if timeouts is not None and timeouts.response is not None:
                upstream.stream.settimeout(timeouts.body)
        except socket.timeout:
            upstream.stream.settimeout(None)
            upstream.release(False)
            seconds = timeouts.response if timeouts is not None else None
            log.warning("response_timeout", host=self._request.host, backend=upstream.label, seconds=seconds,
                        request_id=self._request.id)
            return self.page(pages.gateway_timeout(seconds or 0, self._request.id))
        except (OSError, HTTPError) as exc:
            upstream.release(False)
            failure = pump.exception if pump is not None and pump.dead and pump.exception else exc
            if isinstance(failure, HTTPError) and failure.status == 413:  # the body limit cut it (see limit())
                return self.page(pages.policy_refusal(413, str(failure), self._request.id))
            raise UpstreamError(f"no valid response from upstream: {failure or type(failure).__name__}",
                                replayable=self.replayable and head.method in IDEMPOTENT_METHODS) from exc
        response.headers = forwardable_headers(response.headers) + (
            [("Connection", "Upgrade"), ("Upgrade", response.get("Upgrade") or "")] if response.status == 101 else [])
        policy = self._request.policy
        if policy is not None and policy.response_headers:
            response.headers = policy.response_headers.apply(response.headers)
        response.set("X-Request-Id", self._request.id)
        if self._request.hsts:
            response.set("Strict-Transport-Security", self._request.hsts)

        def release() -> None:
            done = reader.body_complete and (pump is None or pump.successful())
            if timeouts is not None and timeouts.response is not None:
                upstream.stream.settimeout(None)
            upstream.release(done and reader.keep_alive and response.status != 101)

        return StreamedResponse(response, reader, on_close=release, meter=meter)

    def page(self, page: pages.Page) -> StreamedResponse:
        return _dressed(self._request, page).as_response()

    def limit(self, timeouts: ExchangeTimeouts | None, max_body: int | None) -> None:
        self._timeouts = timeouts
        body = self._body
        if max_body is not None and body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            self._body = _capped(body_pieces(body), max_body)

    def status(self, result: StreamedResponse) -> int:
        return result.status

    def sizes(self, result: StreamedResponse) -> tuple[int, int] | None:
        return None  # the caller reads the body after this pipeline is done with it

    def response_headers(self, result: StreamedResponse) -> list | None:
        return result.head.headers

    def when_done(self, result: StreamedResponse, callback) -> None:
        result.when_closed(callback)


def _capped(pieces: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """A streamed body that raises HTTPError(413) once it passes `limit` bytes (the pump then stops)."""
    sent = 0
    for piece in pieces:
        sent += len(piece)
        if sent > limit:
            raise HTTPError(413, f"The request body is larger than this site allows ({limit} bytes).")
        yield piece


class Pipeline:
    """Every front's request path: one Router, one set of rules."""

    def __init__(self, router: Router, *, access_log: bool = True,
                 trusted_proxies: TrustedProxies | None = None, timeouts: ExchangeTimeouts | None = None,
                 metrics: Metrics | None = None, inspector: Inspector | None = None,
                 policies: PolicyBook | None = None, https: HTTPSPolicy | None = None,
                 acme_challenge: Callable[[str], str | None] | None = None) -> None:
        self.router = router
        self.policies = policies    # None: no edge policy at all
        self.https = https or HTTPSPolicy()
        # A pending ACME HTTP-01 answer for a request target (tun2g.server.acme), None: not ours.
        self.acme_challenge = acme_challenge
        self.metrics = metrics      # None: nothing counted
        self.inspector = inspector  # None: nothing captured
        self.access_log = access_log
        self.trusted_proxies = TrustedProxies() if trusted_proxies is None else trusted_proxies
        self._any_trusted = bool(self.trusted_proxies.networks)
        # Bounds on each exchange's waits (response head, stalled bodies, the client leaving);
        # `tun2g.server.process` sets them from its defaults. None: unbounded.
        self.timeouts = timeouts
        self._next_traceback = 0.0  # monotonic: when an internal error's traceback is logged again

    def set_trusted_proxies(self, cidrs: Iterable[str]) -> None:
        """Believe the forwarding headers of these peers from the next request on (a config reload)."""
        self.trusted_proxies = TrustedProxies(cidrs)
        self._any_trusted = bool(self.trusted_proxies.networks)

    def serve(self, head: RequestHead, reader: MessageReader, sock: ByteStream, *, peer_ip: str,
              scheme: str, later: bool = False) -> bool | Later:
        """Proxy one request read from a public socket; True when the connection may carry another.

        ``later``: the caller's serve loop can hold a `tun2g.http.Later` (`serve_requests`), returned for an
        exchange whose response callbacks relay."""
        request = self._request(head, peer_ip, scheme)
        result = self._run(request, _SocketExchange(request, reader, sock, self.timeouts, later))
        return result if type(result) is _Later else result.keep_alive

    def round_trip(self, head: RequestHead, body: Body = None, *, peer_ip: str | None = None,
                   scheme: str = "http") -> StreamedResponse:
        """Send one request and return its streamed response (or the page that answers it)."""
        request = self._request(head, peer_ip, scheme)
        response = self._run(request, _ResponseExchange(request, body, self.timeouts))
        assert not isinstance(response, _Later)  # only a socket exchange leaves its response to callbacks
        return response

    def client_address(self, head: RequestHead, peer_ip: str) -> str:
        """The client's address: the peer, or behind trusted proxies the last X-Forwarded-For hop they did not add."""
        if not (self._any_trusted and peer_ip in self.trusted_proxies):
            return peer_ip
        hops = [hop.strip() for value in head.get_all("X-Forwarded-For") for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if hop not in self.trusted_proxies:
                return hop
        return hops[0] if hops else peer_ip

    def _request(self, head: RequestHead, peer_ip: str | None, scheme: str) -> Request:
        # In-process callers, or a trusted proxy.
        trusted = peer_ip is None or (self._any_trusted and peer_ip in self.trusted_proxies)
        request_id = head.get("X-Request-Id")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):  # a caller's own id, if it is a plain token
            request_id = new_request_id()
        hsts = self.https.hsts if scheme == "https" else None
        return Request(head, request_id, head.host or "", peer_ip or "", scheme, time.monotonic(), trusted,
                       hsts=hsts)

    def _run(self, request: Request, exchange: _Exchange[Result]) -> Result | _Later:
        head = request.head
        try:
            hop = self.router.accept_hop(head)
        except HopRefused as exc:
            log.warning("hop_refused", remote=request.peer_ip, host=request.host, reason=str(exc))
            return self._finish(request, exchange, exchange.page(pages.hop_refused(str(exc), request.id)), "-")
        if hop is None and request.scheme == "http" and request.peer_ip:  # a public visitor, not a library caller
            if self.acme_challenge is not None and head.method == "GET" and head.target.startswith(CHALLENGE_PREFIX):
                answer = self.acme_challenge(head.target)  # only our pending tokens; others go to the site
                if answer is not None:
                    return self._finish(request, exchange, exchange.page(pages.acme_challenge(answer, request.id)),
                                        "-")
            location = self.https.location(request)
            if location is not None:
                return self._finish(request, exchange, exchange.page(pages.https_redirect(location, request.id)), "-")
        if hop is None:
            prepare_request(head, request_id=request.id, peer_ip=request.peer_ip, scheme=request.scheme,
                            trusted=request.trusted)
        else:  # the origin node prepared it, and named it: keep that id in this node's log and pages
            request.id = head.get("X-Request-Id") or request.id
            request.public = False
        return self._guarded(request, exchange, self._route, request, exchange, hop)

    def _guarded(self, request: Request, exchange: _Exchange[Result], step: Callable[..., Result | _Later],
                 *args) -> Result | _Later:
        """``step(*args)``, with a bug in tun2g answered by a page (while nothing reached the client) and logged."""
        try:
            return step(*args)
        except (OSError, DownstreamError):
            raise  # the public client's socket broke: the front ends the connection quietly, as before
        except Exception as exc:  # a bug in tun2g: the visitor gets a page and the log the traceback, by request id
            now = time.monotonic()
            traceback = now >= self._next_traceback  # a bug a visitor can trigger at will must not flood the log
            if traceback:
                self._next_traceback = now + TRACEBACK_INTERVAL
            log.error("internal_error", host=request.host, request_id=request.id, error=repr(exc),
                      exc_info=traceback)
            if exchange.answered:
                raise  # a response is under way: only ending the connection tells the client it broke
            return self._finish(request, exchange, exchange.page(pages.internal_error(request.id)), "-")

    def _route(self, request: Request, exchange: _Exchange[Result], hop: Hop | None) -> Result | _Later:
        """Route the prepared request, apply its edge policy and relay it over the first upstream that takes it."""
        routing = self.router.route(request.head, request.id, hop)
        if request.public and self.policies is not None:
            refusal = self._policy_step(request, routing.route, exchange)
            if refusal is not None:
                return self._finish(request, exchange, exchange.page(refusal), "-")
        return self._relay(request, exchange, routing, iter(routing), None)

    def _relay(self, request: Request, exchange: _Exchange[Result], routing: Routing,
               candidates: Iterator[Upstream], meter: Meter | None) -> Result | _Later:
        """Relay over the next of ``candidates`` that serves it: another one after a dead upstream, while
        nothing reached the client and the request may be sent again."""
        for upstream in candidates:
            if meter is None:
                meter = self._meter(request, routing.route)
            try:
                result = exchange.through(upstream, meter)
            except UpstreamError as exc:
                page = self._upstream_failed(request, exchange, upstream, exc)
                if page is None:
                    continue  # nothing reached the client: the next upstream serves it
                return page
            if isinstance(result, _Later):  # its callbacks resume here when the exchange ends
                result.resume = partial(self._resumed, request, exchange, routing, candidates, meter, upstream)
                return result
            return self._served(request, exchange, upstream, result)
        if self.metrics is not None and routing.unreachable_nodes:
            self.metrics.hops["unreachable"].inc(len(routing.unreachable_nodes))
        return self._finish(request, exchange, exchange.page(routing.page), "-")

    def _resumed(self, request: Request, exchange: _Exchange[Result], routing: Routing,
                 candidates: Iterator[Upstream], meter: Meter | None, upstream: Upstream,
                 outcome: Result | UpstreamError) -> Result | _Later:
        """Where `_relay` left off when callbacks took the exchange: ``outcome`` is how it ended. A failure
        comes in a greenlet, so the next candidate may be tried."""
        if not isinstance(outcome, UpstreamError):
            return self._served(request, exchange, upstream, outcome)
        return self._guarded(request, exchange, self._next_after, request, exchange, routing, candidates, meter,
                             upstream, outcome)

    def _next_after(self, request: Request, exchange: _Exchange[Result], routing: Routing,
                    candidates: Iterator[Upstream], meter: Meter | None, upstream: Upstream,
                    failure: UpstreamError) -> Result | _Later:
        """The page for ``upstream``'s failure, or the next candidate's answer when it may have the request."""
        page = self._upstream_failed(request, exchange, upstream, failure)
        if page is not None:
            return page
        return self._relay(request, exchange, routing, candidates, meter)

    def _upstream_failed(self, request: Request, exchange: _Exchange[Result], upstream: Upstream,
                         exc: UpstreamError) -> Result | None:
        """The answer after ``upstream`` failed, or None when the next candidate may serve the request."""
        if self.metrics is not None and isinstance(upstream, NodeUpstream):
            self.metrics.hops["failed"].inc()
        gone = upstream.failed(str(exc))
        if gone and exc.replayable and exchange.replayable:
            return None
        return self._finish(request, exchange, exchange.page(upstream.failure_page(str(exc), request.id)),
                            upstream.label)

    def _served(self, request: Request, exchange: _Exchange[Result], upstream: Upstream, result: Result) -> Result:
        if self.metrics is not None and isinstance(upstream, NodeUpstream):
            self.metrics.hops["ok"].inc()
        return self._finish(request, exchange, result, upstream.label)

    def _policy_step(self, request: Request, route: str | None, exchange: _Exchange) -> pages.Page | None:
        """The route's edge policy (tun2g.server.policy_step), on the node the request came in by only.

        A hop was checked by the node that forwarded it, which keeps the client's socket,
        address and the rate buckets; the receiving node trusts the signed hop.
        """
        assert self.policies is not None
        policy = self.policies.get(route)
        if policy is None:
            return None
        request.policy = policy
        refusal = self.policies.check(policy, route or "", request.head,
                                      self.client_address(request.head, request.peer_ip), request.id)
        if refusal is None and (policy.timeout is not None or policy.max_body is not None):
            timeouts = self.timeouts or ExchangeTimeouts()
            if policy.timeout is not None:
                timeouts = dataclasses.replace(timeouts, response=policy.timeout)
            exchange.limit(timeouts, policy.max_body)
        return refusal

    def _meter(self, request: Request, route: str | None) -> Meter | None:
        """What counts this request's bytes (its route's cached metrics) and, if inspected, captures it.

        `route`: the route key the Router matched (a wildcard or a path route, else the normalized Host),
        so `tun2g route inspect '*.example.com' on` captures the names under it."""
        metrics, inspector = self.metrics, self.inspector
        if metrics is None and inspector is None:
            return None
        domain = request.route = route
        if domain is None:
            return None
        counted = request.counted = metrics.domain(domain) if metrics is not None else None
        if inspector is not None and request.public and inspector.enabled(domain):
            capture = request.capture = inspector.capture(counted)
            return capture
        return counted

    def _finish(self, request: Request, exchange: _Exchange[Result], result: Result, label: str) -> Result:
        metrics = self.metrics
        if metrics is None and not self.access_log and request.capture is None:
            return result
        seconds = time.monotonic() - request.started
        status = exchange.status(result)
        if metrics is not None:
            (request.counted or metrics.unrouted).finished(status, seconds)
        if request.capture is not None and self.inspector is not None:
            # After the body: at once for a relayed exchange, when the caller closes a streamed response.
            exchange.when_done(result, lambda: self._offer(request, exchange, result, status, seconds, label))
        if self.access_log:
            head = request.head
            sizes = exchange.sizes(result)
            access.request(head.method, request.host, head.target, status, round(seconds * 1000, 2),
                           request.peer_ip or "-", sizes[0] if sizes else "-", sizes[1] if sizes else "-",
                           request.id, label)
        return result

    def _offer(self, request: Request, exchange: _Exchange[Result], result: Result, status: int, seconds: float,
               label: str) -> None:
        capture, inspector = request.capture, self.inspector
        assert capture is not None and inspector is not None
        domain = routing_key(request.host) or request.host
        head = request.head
        inspector.offer(request.route or domain, capture.record(  # kept under its route: `tun2g inspect ROUTE`
            domain=domain, node=inspector.node, method=head.method, path=head.target, status=status,
            seconds=seconds, client_ip=request.peer_ip, request_id=request.id, request_headers=head.headers,
            response_headers=exchange.response_headers(result), backend=label))


class TrustedProxies:
    """The peers (`--trusted-proxy CIDR`, e.g. a balancer in front) whose forwarding headers are believed."""

    MAX_CACHED = 4096  # peer addresses remembered; public clients choose theirs, so the cache is bounded

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())
        self._known: dict[str, bool] = {}

    def __contains__(self, peer_ip: str) -> bool:
        if not self.networks:
            return False
        known = self._known.get(peer_ip)
        if known is None:
            try:
                address = ipaddress.ip_address(peer_ip)
                known = any(address in network for network in self.networks)
            except ValueError:
                known = False
            if len(self._known) >= self.MAX_CACHED:
                self._known.clear()
            self._known[peer_ip] = known
        return known


TRACEBACK_INTERVAL = 10.0  # seconds: every internal error is logged, its traceback at most once this often
_HOP_NAME = HOP_HEADER.lower()
_ROUTE_NAME = ROUTE_HEADER.lower()  # only this server tells a multi-route client a stream's route
# A request id a caller may choose (as Heroku's router allows): a plain token, so it is safe in logs and pages.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Headers that say who the client is and how it came: set by this proxy, believed only from a trusted one.
_FORWARDING_NAMES = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
                               "x-real-ip"})
_PROXY_NAMES = _FORWARDING_NAMES | {"x-request-id", _HOP_NAME, _ROUTE_NAME, "connection"}
_PROXY_NAME_LENGTHS = frozenset(map(len, _PROXY_NAMES))
# Connection options that name no header; and headers a Connection header may never remove.
_CONNECTION_OPTIONS = frozenset({"", "close", "keep-alive", "upgrade"})
_NEVER_NAMED = frozenset({"content-length", "transfer-encoding", "host"})


def prepare_request(head: RequestHead, *, request_id: str, peer_ip: str, scheme: str, trusted: bool = False) -> None:
    """Set the proxy headers on a public request head, after removing what its Connection header names.

    From an untrusted peer, the client's own X-Forwarded-*, Forwarded and X-Real-IP are
    dropped and ours written (X-Forwarded-For: the peer); from a trusted proxy they are
    kept and the peer is appended to X-Forwarded-For (as Go's ReverseProxy). X-Request-Id
    is set, the cluster's hop header and X-Tun2g-Route dropped (only a node of this cluster may send it, to
    another node). Headers the client named in Connection go now, so they can never take
    ours with them; the Connection header keeps only its options (close, upgrade) for the
    relay. One pass over the headers in the usual case: a public request may carry dozens.
    """
    # Names are compared by length first: most headers then need no lower() call.
    kept = []
    forwarded_for = []
    has_proto = has_host = False
    listing = None  # Connection values that list more than one plain option: they may name headers
    for header in head.headers:
        name = header[0]
        if len(name) in _PROXY_NAME_LENGTHS:
            name = name.lower()
            if name in _FORWARDING_NAMES:
                if not trusted:
                    continue
                if name == "x-forwarded-for":
                    forwarded_for.append(header[1])
                    continue
                has_proto = has_proto or name == "x-forwarded-proto"
                has_host = has_host or name == "x-forwarded-host"
            elif name == "x-request-id" or name == _HOP_NAME or name == _ROUTE_NAME:
                continue
            elif name == "connection" and header[1].lower() not in _CONNECTION_OPTIONS:
                listing = [] if listing is None else listing
                listing.append(header[1])
                options = _connection_options(header[1])
                if not options:
                    continue
                header = (header[0], options)
        kept.append(header)
    if listing is not None:
        named = {token.strip().lower() for value in listing for token in value.split(",")}
        named -= _CONNECTION_OPTIONS | _NEVER_NAMED
        if named:
            kept = [header for header in kept if header[0].lower() not in named]
    if peer_ip:
        forwarded_for.append(peer_ip)
    if forwarded_for:
        kept.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    if not has_proto:
        kept.append(("X-Forwarded-Proto", scheme))
    if not has_host:
        host = head.host
        if host:
            kept.append(("X-Forwarded-Host", host))
    kept.append(("X-Request-Id", request_id))
    head.headers = kept


def _connection_options(value: str) -> str:
    return ", ".join(token.strip() for token in value.split(",") if token.strip().lower() in _CONNECTION_OPTIONS)


__all__ = ["Outcome", "Pipeline", "Request", "TrustedProxies", "prepare_request"]
