"""The public front as a WSGI application, mountable in any WSGI stack.

`WSGIFront(server)` routes each request by Host through `server.round_trip`
and streams the response body back. Under gevent's or gunicorn's gevent
server it is fully cooperative. The standalone `tun2g server` uses the faster
native front (tun2g.front) instead; WebSocket upgrades need that one.
"""

from __future__ import annotations

from urllib.parse import quote

from tun2g.errors import Tun2Error
from tun2g.front import prepare_request
from tun2g.http import RequestHead, forwardable_headers
from tun2g.log import get_logger
from tun2g.pages import gateway_error_body
from tun2g.requestid import new_request_id
from tun2g.transport import upgrade

log = get_logger(__name__)

_WSGI_SPECIAL_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}


class WSGIFront:
    """A WSGI callable over a Server."""

    def __init__(self, server, scheme: str | None = None):
        self.server = server
        self.scheme = scheme

    def __call__(self, environ, start_response):
        if upgrade.is_tunnel_environ(environ):  # a tunnel client on this port (--conn-type upgrade)
            return upgrade.serve_wsgi(self.server, environ, start_response)
        head = request_head_from_environ(environ)
        request_id = head.get("X-Request-Id") or new_request_id()
        prepare_request(head, request_id=request_id, peer_ip=environ.get("REMOTE_ADDR", "unknown"),
                        scheme=self.scheme or environ.get("wsgi.url_scheme", "http"))
        try:
            response = self.server.round_trip(head, _body(environ, head))
        except Tun2Error as exc:
            page = gateway_error_body(502, "Bad Gateway", f"The backend's tunnel failed: {exc}", request_id)
            start_response("502 Bad Gateway", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(page)))])
            return [page]
        start_response(f"{response.status} {response.reason or 'Unknown'}", forwardable_headers(response.headers))
        return _ClosingIterator(response)


class _ClosingIterator:
    """Streams the body and releases the tunnel stream when the server calls close()."""

    def __init__(self, response):
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


def _body(environ, head):
    length = head.content_length
    stream = environ.get("wsgi.input")
    if stream is None or length == 0:
        return None
    if length is None and not environ.get("wsgi.input_terminated"):
        return None  # no Content-Length and a server that cannot say where the body ends: none
    return _LimitedReader(stream, length)


class _LimitedReader:
    """Reads at most `length` bytes (all when None) from wsgi.input."""

    def __init__(self, stream, length):
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
