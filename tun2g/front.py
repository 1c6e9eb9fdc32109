"""The standalone public HTTP front: one greenlet per public connection.

It parses each request head, picks a tunnel by Host and lets the HTTP layer
stream the exchange between the public socket and a fresh smux stream. This
path moves bytes without building WSGI environs; `tun2g.wsgi` is the
mountable alternative.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from gevent.server import StreamServer

from tun2g.errors import CantOpenSessionStream
from tun2g.http import DownstreamError, UpstreamError, forward_exchange, serve_requests, simple_response
from tun2g.cluster.hop import HOP_HEADER, HopRefused
from tun2g.log import get_logger
from tun2g.pages import gateway_error_body, no_backends_body
from tun2g.requestid import new_request_id
from tun2g.transport import upgrade
from tun2g.transport.tcp import tune

log = get_logger(__name__)

HTML = "text/html; charset=utf-8"


class HTTPFront:
    """Serves public HTTP for a Server; `serve(listener)` returns the running StreamServer."""

    def __init__(self, server, *, scheme: str = "http", access_log: bool = True):
        self.server = server
        self.scheme = scheme
        self.access_log = access_log

    def serve(self, listener) -> StreamServer:
        stream_server = StreamServer(listener, self.handle)
        stream_server.start()
        return stream_server

    def handle(self, sock, address) -> None:
        """Serve requests on one public connection until it closes."""
        tune(sock)
        peer_ip = address[0] if isinstance(address, tuple) else "unknown"
        try:
            serve_requests(sock, lambda head, reader: self.handle_request(head, reader, sock, peer_ip))
        finally:
            sock.close()

    def handle_request(self, head, reader, sock, peer_ip: str) -> bool:
        """Proxy one request; True when the public connection may carry another."""
        started = time.monotonic()
        if upgrade.is_tunnel_request(head):  # a tunnel client on the public port (--conn-type upgrade)
            upgrade.serve(self.server, sock, reader.take_buffered(),
                          proto="upgrade+tls" if self.scheme == "https" else "upgrade")
            return False
        request = _Request(head, head.get("X-Request-Id") or new_request_id(), head.host or "", started)
        cluster, hop = self.server.cluster, None
        if cluster is not None:
            try:
                hop = cluster.accept_hop(head)  # a request another node forwarded: serve it here or 502
            except HopRefused as exc:
                self._log(request, cluster.refuse_hop(sock, head, peer_ip, exc).status)
                return False
        if hop is None:
            prepare_request(head, request_id=request.id, peer_ip=peer_ip, scheme=self.scheme)
        connection, stream, broken = self._open_stream(request.host)
        if connection is None:
            if cluster is not None and hop is None and not broken:
                outcome = cluster.forward(head, reader, sock, request.host, request.id)  # None: no node has one
                if outcome is not None:
                    self._log(request, outcome.status)
                    return outcome.keep_alive
            return self._no_backend(request, sock, broken)
        return self._proxy(request, reader, sock, connection, stream)

    def _open_stream(self, host: str):
        """(connection, stream, False) for the best tunnel of `host`, retiring tunnels that
        cannot open one; (None, None, broken) when none is left (broken: some failed)."""
        tried = []
        while True:
            connection = self.server.route(host, exclude=tried)
            if connection is None:
                return None, None, bool(tried)
            try:
                return connection, connection.open_stream(), False
            except CantOpenSessionStream as exc:
                self.server.retire(connection, str(exc))
                tried.append(connection)

    def _no_backend(self, request, sock, broken: bool) -> bool:
        """The original's 502 page (or, when the tunnels broke under us, a gateway error)."""
        head = request.head
        if broken:
            body = gateway_error_body(502, "Bad Gateway", "The tunnel to this site's backend broke.", request.id)
        else:
            body = no_backends_body(request.host, request.id)
        keep = head.keep_alive and not _has_body(head)
        _send_quietly(sock, simple_response(502, body, content_type=HTML, version=head.version,
                                            headers=[("X-Request-Id", request.id)], close=not keep))
        self._log(request, 502)
        return keep

    def _proxy(self, request, reader, sock, connection, stream) -> bool:
        """Stream the exchange over `stream`; a tunnel failing before the response gives a 502."""
        head, request_id = request.head, request.id
        connection.in_flight += 1
        try:
            # One stream per exchange: Connection: close lets the client send its FIN with the response.
            result = forward_exchange(head, reader, stream, sock, close_upstream=True,
                                      response_filter=lambda response: response.set("X-Request-Id", request_id))
        except UpstreamError as exc:
            if connection.is_closed:
                self.server.retire(connection, str(exc))
            body = gateway_error_body(502, "Bad Gateway", f"The backend's tunnel failed: {exc}", request_id)
            _send_quietly(sock, simple_response(502, body, content_type=HTML, version=head.version,
                                                headers=[("X-Request-Id", request_id)], close=True))
            self._log(request, 502, connection)
            return False
        except DownstreamError:
            return False  # the public client left: only this stream ends, never the tunnel
        finally:
            stream.close()
            connection.in_flight -= 1
            connection.served += 1
        self._log(request, result.status, connection)
        return result.keep_alive

    def _log(self, request, status: int, connection=None) -> None:
        if self.access_log:
            head = request.head
            log.info("request", method=head.method, host=request.host, path=head.target, status=status,
                     ms=round((time.monotonic() - request.started) * 1000, 2), request_id=request.id,
                     backend=connection.id if connection else "-")


class _Request(NamedTuple):
    """What the access log and error pages need to know about the request in hand."""

    head: object
    id: str
    host: str
    started: float


_HOP_NAME = HOP_HEADER.lower()
_PROXY_NAMES = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", _HOP_NAME})
_PROXY_NAME_LENGTHS = frozenset(map(len, _PROXY_NAMES))


def prepare_request(head, *, request_id: str, peer_ip: str, scheme: str) -> None:
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
    forwarded_for.append(peer_ip)
    kept.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    if not has_proto:
        kept.append(("X-Forwarded-Proto", scheme))
    if not has_host:
        host = head.host
        if host:
            kept.append(("X-Forwarded-Host", host))
    kept.append(("X-Request-Id", request_id))
    head.headers = kept


def _has_body(head) -> bool:
    return head.chunked or bool(head.content_length)


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
