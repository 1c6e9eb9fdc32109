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

import time
from dataclasses import dataclass
from typing import Protocol, TypeVar

import gevent

from tun2g import pages
from tun2g.cluster import HopRefused
from tun2g.cluster.hop import HOP_HEADER, Hop
from tun2g.http import DownstreamError, HTTPError, MessageReader, RequestHead, ResponseHead, UpstreamError
from tun2g.http import forward_exchange, forwardable_headers
from tun2g.http.client import Body, StreamedResponse, body_is_replayable, send_request
from tun2g.log import get_logger
from tun2g.requestid import new_request_id
from tun2g.server.router import Router, Upstream
from tun2g.transport.base import ByteStream

log = get_logger(__name__)

Result = TypeVar("Result")


@dataclass
class Request:
    """The request in hand: its head and what the log and the pages need to know."""

    head: RequestHead
    id: str
    host: str
    peer_ip: str
    scheme: str
    started: float


@dataclass(frozen=True)
class Outcome:
    """How an exchange relayed between sockets ended."""

    status: int
    keep_alive: bool


class _Exchange(Protocol[Result]):
    """How one front moves a request over an upstream, and how it answers with a page."""

    replayable: bool  # the request can be sent again after a failed attempt (as far as this front knows)

    def through(self, upstream: Upstream) -> Result: ...

    def page(self, page: pages.Page) -> Result: ...

    def status(self, result: Result) -> int: ...


class _SocketExchange:
    """Relays between the public socket and the upstream, bodies streamed both ways."""

    replayable = True  # forward_exchange itself says (UpstreamError.replayable) whether the body allows it

    def __init__(self, request: Request, reader: MessageReader, sock: ByteStream) -> None:
        self._request = request
        self._reader = reader
        self._sock = sock

    def _stamp(self, response: ResponseHead) -> None:
        response.set("X-Request-Id", self._request.id)

    def through(self, upstream: Upstream) -> Outcome:
        reusable = False
        try:
            result = forward_exchange(self._request.head, self._reader, upstream.stream, self._sock,
                                      response_filter=self._stamp, upstream_reader=upstream.reader,
                                      close_upstream=upstream.single_use)
            reusable = result.upstream_reusable  # before the release below (it was set after: never reused)
        except DownstreamError as exc:
            error = exc.http_error
            if error is not None:  # its body broke HTTP (a bad chunk) before any answer: say so
                return self.page(pages.malformed_request(error.status, error.message, self._request.id))
            return Outcome(499, False)  # the public client left: only this exchange ends
        finally:
            upstream.release(reusable)
        return Outcome(result.status, result.keep_alive)

    def page(self, page: pages.Page) -> Outcome:
        return Outcome(page.status, pages.send_page(self._sock, page, self._request.head))

    def status(self, result: Outcome) -> int:
        return result.status


class _ResponseExchange:
    """Sends a head and a body and returns the response for the caller to read."""

    def __init__(self, request: Request, body: Body) -> None:
        self._request = request
        self._body = body
        self.replayable = body_is_replayable(body)

    def through(self, upstream: Upstream) -> StreamedResponse:
        head = self._request.head
        reader = upstream.reader or MessageReader(upstream.stream)
        pump: gevent.Greenlet | None = None
        try:
            pump = send_request(upstream.stream, head, self._body, close=upstream.single_use)
            response = reader.read_final_response_head(head.method)
        except (OSError, HTTPError) as exc:
            upstream.release(False)
            failure = pump.exception if pump is not None and pump.dead and pump.exception else exc
            raise UpstreamError(f"no valid response from upstream: {failure or type(failure).__name__}",
                                replayable=self.replayable) from exc
        response.headers = forwardable_headers(response.headers) + (
            [("Connection", "Upgrade"), ("Upgrade", response.get("Upgrade") or "")] if response.status == 101 else [])
        response.set("X-Request-Id", self._request.id)

        def release() -> None:
            done = reader.body_complete and (pump is None or pump.successful())
            upstream.release(done and reader.keep_alive and response.status != 101)

        return StreamedResponse(response, reader, on_close=release)

    def page(self, page: pages.Page) -> StreamedResponse:
        return page.as_response()

    def status(self, result: StreamedResponse) -> int:
        return result.status


class Pipeline:
    """Every front's request path: one Router, one set of rules."""

    def __init__(self, router: Router, *, access_log: bool = True) -> None:
        self.router = router
        self.access_log = access_log

    def serve(self, head: RequestHead, reader: MessageReader, sock: ByteStream, *, peer_ip: str,
              scheme: str) -> bool:
        """Proxy one request read from a public socket; True when the connection may carry another."""
        request = self._request(head, peer_ip, scheme)
        return self._run(request, _SocketExchange(request, reader, sock)).keep_alive

    def round_trip(self, head: RequestHead, body: Body = None, *, peer_ip: str | None = None,
                   scheme: str = "http") -> StreamedResponse:
        """Send one request and return its streamed response (or the page that answers it)."""
        request = self._request(head, peer_ip, scheme)
        return self._run(request, _ResponseExchange(request, body))

    def _request(self, head: RequestHead, peer_ip: str | None, scheme: str) -> Request:
        return Request(head, head.get("X-Request-Id") or new_request_id(), head.host or "", peer_ip or "",
                       scheme, time.monotonic())

    def _run(self, request: Request, exchange: _Exchange[Result]) -> Result:
        head = request.head
        try:
            hop = self.router.accept_hop(head)
        except HopRefused as exc:
            log.warning("hop_refused", remote=request.peer_ip, host=request.host, reason=str(exc))
            return self._finish(request, exchange, exchange.page(pages.hop_refused(str(exc), request.id)), "-")
        if hop is None:
            prepare_request(head, request_id=request.id, peer_ip=request.peer_ip, scheme=request.scheme)
        routing = self.router.route(head, request.id, hop)
        for upstream in routing:
            try:
                result = exchange.through(upstream)
            except UpstreamError as exc:
                gone = upstream.failed(str(exc))
                if gone and exc.replayable and exchange.replayable:
                    continue  # nothing reached the client: the next upstream serves it
                return self._finish(request, exchange, exchange.page(upstream.failure_page(str(exc), request.id)),
                                    upstream.label)
            return self._finish(request, exchange, result, upstream.label)
        return self._finish(request, exchange, exchange.page(routing.page), "-")

    def _finish(self, request: Request, exchange: _Exchange[Result], result: Result, label: str) -> Result:
        if self.access_log:
            head = request.head
            log.info("request", method=head.method, host=request.host, path=head.target,
                     status=exchange.status(result), ms=round((time.monotonic() - request.started) * 1000, 2),
                     request_id=request.id, backend=label)
        return result


_HOP_NAME = HOP_HEADER.lower()
_PROXY_NAMES = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", _HOP_NAME})
_PROXY_NAME_LENGTHS = frozenset(map(len, _PROXY_NAMES))


def prepare_request(head: RequestHead, *, request_id: str, peer_ip: str, scheme: str) -> None:
    """Add the proxy headers to a public request head (the relay drops hop-by-hop ones).

    X-Forwarded-For gets ``peer_ip`` after the values already sent (as Go's ReverseProxy);
    X-Forwarded-Proto/-Host are added unless present; X-Request-Id is set; the cluster's
    hop header is dropped (only a node of this cluster may send it, and only to another node).
    One pass over the headers: a public request may carry dozens.
    """
    kept = []
    forwarded_for = []
    has_proto = has_host = False
    for header in head.headers:
        name = header[0]
        if len(name) in _PROXY_NAME_LENGTHS:
            name = name.lower()
            if name == "x-forwarded-for":
                forwarded_for.append(header[1])
                continue
            if name == "x-request-id" or name == _HOP_NAME:
                continue
            has_proto = has_proto or name == "x-forwarded-proto"
            has_host = has_host or name == "x-forwarded-host"
        kept.append(header)
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


__all__ = ["Outcome", "Pipeline", "Request", "prepare_request"]
