"""The public front as a WSGI application, mountable in any WSGI stack.

`WSGIFront(server)` hands each request to the server's request pipeline
(`Pipeline.round_trip`) and streams the response body back. Under gevent's
or gunicorn's gevent server it is fully cooperative. A tunnel client on this
port (HTTP Upgrade) needs a server that hands its connection over
(gunicorn's `gunicorn.socket`); the standalone `tun2g server` uses the faster
native front (tun2g.server.front), which also splices WebSocket upgrades.
"""

from __future__ import annotations

from urllib.parse import quote

from tun2g import pages
from tun2g.http import RequestHead
from tun2g.http.client import Body
from tun2g.server.server import Server
from tun2g.transport import upgrade

_WSGI_SPECIAL_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}


class WSGIFront:
    """A WSGI callable over a Server."""

    def __init__(self, server: Server, scheme: str | None = None) -> None:
        self.server = server
        self.scheme = scheme

    def __call__(self, environ, start_response):
        if upgrade.is_tunnel_environ(environ):  # a tunnel client on this port (--conn-type upgrade)
            return self._serve_tunnel(environ, start_response)
        if pages.is_health_request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")):
            page = self.server.health()
            start_response(f"{page.status} {page.reason}", [("Content-Type", page.content_type),
                                                            ("Content-Length", str(len(page.body))),
                                                            ("Cache-Control", "no-store")])
            return [page.body]
        head = request_head_from_environ(environ)
        response = self.server.pipeline.round_trip(head, _body(environ, head),
                                                   peer_ip=environ.get("REMOTE_ADDR", ""),
                                                   scheme=self.scheme or environ.get("wsgi.url_scheme", "http"))
        if response.status == 101:  # WSGI has no way to switch protocols: say so rather than hang
            response.close()
            response = pages.upgrade_unsupported(response.head.get("X-Request-Id")).as_response()
        start_response(f"{response.status} {response.reason or 'Unknown'}", response.headers)
        return _ClosingIterator(response)

    def _serve_tunnel(self, environ, start_response):
        """Take over gunicorn's socket for the tunnel's lifetime."""
        sock = environ.get("gunicorn.socket")
        if sock is None:
            page = pages.upgrade_unsupported()
            start_response(f"{page.status} {page.reason}", [("Content-Type", page.content_type),
                                                            ("Content-Length", str(len(page.body)))])
            return [page.body]
        from gunicorn.workers.base_async import ALREADY_HANDLED

        sock.sendall(upgrade.SWITCHING_PROTOCOLS)
        # gunicorn keeps reading its socket after we return: shut it down rather than close it under it.
        self.server.serve_tunnel(upgrade.UpgradedStream(sock, b"", own_socket=False), proto="upgrade")
        return ALREADY_HANDLED


class _ClosingIterator:
    """Streams the body and releases the upstream when the server calls close()."""

    def __init__(self, response) -> None:
        self._response = response

    def __iter__(self):
        return iter(self._response)

    def close(self) -> None:
        self._response.close()


def request_head_from_environ(environ) -> RequestHead:
    """Rebuild the request head a WSGI server parsed, keeping the raw target when it has it."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        target = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        elif key in _WSGI_SPECIAL_HEADERS and value:
            headers.append((_WSGI_SPECIAL_HEADERS[key], value))
    return RequestHead(environ["REQUEST_METHOD"], target, environ.get("SERVER_PROTOCOL", "HTTP/1.1"), headers)


def _body(environ, head: RequestHead) -> Body:
    length = head.content_length
    stream = environ.get("wsgi.input")
    if stream is None or length == 0:
        return None
    if length is None and not (head.chunked and environ.get("wsgi.input_terminated")):
        return None  # neither a length nor chunked framing (or a server that cannot say where it ends): none
    return _LimitedReader(stream, length)


class _LimitedReader:
    """Reads at most `length` bytes (all when None) from wsgi.input."""

    def __init__(self, stream, length: int | None) -> None:
        self._stream, self._left = stream, length

    def read(self, size: int) -> bytes:
        if self._left is not None:
            if self._left <= 0:
                return b""
            size = min(size, self._left)
        piece = self._stream.read(size)
        if self._left is not None:
            self._left -= len(piece)
        return piece
