"""The standalone public HTTP front: one greenlet per public connection.

It parses each request head, picks a tunnel by Host and lets the HTTP layer
stream the exchange between the public socket and a fresh smux stream. This
path moves bytes without building WSGI environs; `tun2g.wsgi` is the
mountable alternative.
"""

from __future__ import annotations

import time

from gevent.server import StreamServer

from tun2g.errors import CantOpenSessionStream
from tun2g.http import DownstreamError, HTTPError, MessageReader, UpstreamError, forward_exchange, simple_response
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
        reader = MessageReader(sock)
        try:
            while True:
                try:
                    head = reader.read_request_head()
                except HTTPError as exc:
                    _send_quietly(sock, simple_response(exc.status, f"{exc.message}\n".encode(), close=True))
                    return
                if head is None or not self.handle_request(head, reader, sock, peer_ip):
                    return
        except (OSError, DownstreamError):
            return  # the public client went away between requests
        finally:
            sock.close()

    def handle_request(self, head, reader, sock, peer_ip: str) -> bool:
        """Proxy one request; True when the public connection may carry another."""
        started = time.monotonic()
        if upgrade.is_tunnel_request(head):  # a tunnel client on the public port (--conn-type upgrade)
            upgrade.serve(self.server, sock, reader.take_buffered(),
                          proto="upgrade+tls" if self.scheme == "https" else "upgrade")
            return False
        request_id = head.get("X-Request-Id") or new_request_id()
        host = head.host or ""
        cluster, hop = self.server.cluster, None
        if cluster is not None:
            try:
                hop = cluster.accept_hop(head)  # a request another node forwarded: serve it here or 502
            except HopRefused as exc:
                self._log(head, host, cluster.refuse_hop(sock, head, peer_ip, exc).status, started, request_id, None)
                return False
        if hop is None:
            prepare_request(head, request_id=request_id, peer_ip=peer_ip, scheme=self.scheme)
        tried = []
        while True:
            connection = self.server.route(host, exclude=tried)
            if connection is None and cluster is not None and hop is None and not tried:
                outcome = cluster.forward(head, reader, sock, host, request_id)  # None: no node has one
                if outcome is not None:
                    self._log(head, host, outcome.status, started, request_id, None)
                    return outcome.keep_alive
            if connection is None:
                body = no_backends_body(host, request_id)
                if tried:  # there were tunnels, and each broke under this request
                    body = gateway_error_body(502, "Bad Gateway", "The tunnel to this site's backend broke.",
                                              request_id)
                keep = head.keep_alive and not _has_body(head)
                _send_quietly(sock, simple_response(502, body, content_type=HTML, version=head.version,
                                                    headers=[("X-Request-Id", request_id)], close=not keep))
                self._log(head, host, 502, started, request_id, None)
                return keep
            try:
                stream = connection.open_stream()
            except CantOpenSessionStream as exc:
                self.server.retire(connection, str(exc))
                tried.append(connection)
                continue
            break
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
            self._log(head, host, 502, started, request_id, connection)
            return False
        except DownstreamError:
            return False  # the public client left: only this stream ends, never the tunnel
        finally:
            stream.close()
            connection.in_flight -= 1
            connection.served += 1
        self._log(head, host, result.status, started, request_id, connection)
        return result.keep_alive

    def _log(self, head, host, status, started, request_id, connection) -> None:
        if self.access_log:
            log.info("request", method=head.method, host=host, path=head.target, status=status,
                     ms=round((time.monotonic() - started) * 1000, 2), request_id=request_id,
                     backend=connection.id if connection else "-")


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
