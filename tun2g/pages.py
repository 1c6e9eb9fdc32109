"""Every response tun2g makes itself (error pages, refusals, health answers) and the one way to send one.

A `Page` is a status, a body and its extra headers. Fronts send it with
`send_page` (sockets) or turn it into a `StreamedResponse` (round trips, WSGI);
either way a page that answers a request carries that request's X-Request-Id.
Public pages say in plain words what happened and never name internal hosts.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from http import HTTPStatus

from tun2g.http import RequestHead, ResponseHead, simple_response
from tun2g.http.client import StreamedResponse
from tun2g.policy import REQUEST_ID_PLACEHOLDER, STATUS_PLACEHOLDER

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"

# Go tun2's gen502Page: the same text and, as measured, 175 bytes plus the Host
# and the request id (the original's template sits between two newlines). The
# original pasted the Host header into HTML unescaped, an injection we do not repeat.
_NO_BACKENDS = (
    "\n<html><head><title>no backends connected</title></head><body><h1>no backends connected</h1>"
    "<p>Please ensure a backend is running for {host}. This is request ID {request_id}.</p></body></html>\n"
)

_GATEWAY_ERROR = (
    "<html><head><title>{status} {title}</title></head><body><h1>{title}</h1>"
    "<p>{detail}</p><p>This is request ID {request_id}.</p></body></html>"
)


@dataclass(frozen=True)
class Page:
    """A complete response the server makes itself."""

    status: int
    body: bytes
    content_type: str = HTML
    headers: tuple[tuple[str, str], ...] = ()
    request_id: str | None = None

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase

    def all_headers(self) -> list[tuple[str, str]]:
        """Extra headers, X-Request-Id included, without Content-Type/-Length."""
        extra = list(self.headers)
        if self.request_id:
            extra.append(("X-Request-Id", self.request_id))
        return extra

    def encode(self, *, version: str = "HTTP/1.1", close: bool = True) -> bytes:
        """The page as response bytes."""
        return simple_response(self.status, self.body, content_type=self.content_type,
                               headers=self.all_headers(), version=version, close=close)

    def as_response(self) -> StreamedResponse:
        """The page as a StreamedResponse, for round trips and the WSGI front."""
        headers = [("Content-Type", self.content_type), ("Content-Length", str(len(self.body)))]
        return StreamedResponse(ResponseHead(self.status, self.reason, headers=headers + self.all_headers()),
                                body=self.body)


def send_page(sock, page: Page, request: RequestHead | None = None) -> bool:
    """Send `page` as the answer to `request` (quietly: the peer may be gone); True if the connection may go on.

    The connection is kept only when the request allows it and had no body we
    would have to read past.
    """
    keep = (request is not None and request.keep_alive and not (request.chunked or request.content_length))
    try:
        sock.sendall(page.encode(version=request.version if request is not None else "HTTP/1.1", close=not keep))
    except OSError:
        return False
    return keep


def _gateway_error(status: int, detail: str, request_id: str, headers: tuple = ()) -> Page:
    title = HTTPStatus(status).phrase
    body = _GATEWAY_ERROR.format(status=status, title=html.escape(title), detail=html.escape(detail),
                                 request_id=html.escape(request_id)).encode()
    return Page(status, body, headers=headers, request_id=request_id)


# -- the public front ---------------------------------------------------------------------

def no_backends(host: str, request_id: str) -> Page:
    """The original's 502 page for a Host with no usable tunnel anywhere."""
    body = _NO_BACKENDS.format(host=html.escape(host), request_id=html.escape(request_id)).encode()
    return Page(502, body, request_id=request_id)


def tunnel_broke(request_id: str) -> Page:
    """Every tunnel for the Host failed as we tried to use it."""
    return _gateway_error(502, "The tunnel to this site's backend broke.", request_id)


# Public pages say what happened in plain words; the technical detail (smux, hop and parser
# errors, node names) goes to the log under the same request id.

def tunnel_failed(request_id: str) -> Page:
    """The tunnel failed under this request before a response came back."""
    return _gateway_error(502, "The connection to this site's server was lost before it answered. "
                               "Retry in a moment.", request_id)


def node_failed(request_id: str) -> Page:
    """The cluster node holding the site's tunnel failed under this request."""
    return _gateway_error(502, "The part of this service that holds the site's connection stopped answering. "
                               "Retry in a moment.", request_id)


def no_node_reachable(request_id: str) -> Page:
    return _gateway_error(502, "No cluster node holding this site's tunnel could be reached.", request_id)


def registry_unavailable(request_id: str) -> Page:
    """503: the tunnel is not on this node and the shared registry cannot say where it is."""
    return _gateway_error(503, "This service cannot find the site's connection right now. Retry shortly.",
                          request_id,
                          headers=(("Retry-After", "1"),))


def internal_error(request_id: str) -> Page:
    """500: tun2g itself failed on this request (a bug); the log has the details under its request id."""
    return _gateway_error(500, "This service failed on this request. Retry; if it happens again, tell its "
                               "operator this request ID.", request_id)


def hop_refused(reason: str, request_id: str) -> Page:
    """403 for a node-to-node request whose signature is forged, stale or malformed."""
    return Page(403, f"tun2g: node-to-node request refused: {reason}\n".encode(), TEXT, request_id=request_id)


def gateway_timeout(seconds: float, request_id: str) -> Page:
    """504: the site's backend accepted the request but sent no response head within the response timeout."""
    return _gateway_error(504, f"The site's backend did not answer within {seconds:g} seconds.", request_id)


def policy_refusal(status: int, detail: str, request_id: str, headers: tuple = ()) -> Page:
    """401, 403, 413, 429 or 431 for a request its route's edge policy refused (docs/policy.md)."""
    return _gateway_error(status, detail, request_id, headers=headers)


def with_custom_body(page: Page, template: str) -> Page:
    """`page` with a route's own HTML instead of ours: same status and headers, its placeholders filled.

    ``{{request_id}}`` becomes the request id and ``{{status}}`` the status (both HTML-escaped).
    """
    body = template.replace(REQUEST_ID_PLACEHOLDER, html.escape(page.request_id or "")) \
                   .replace(STATUS_PLACEHOLDER, str(page.status))
    return Page(page.status, body.encode(), HTML, page.headers, page.request_id)


def acme_challenge(key_authorization: str, request_id: str) -> Page:
    """200 with an HTTP-01 key authorization (RFC 8555 8.3), for the ACME server validating an order."""
    return Page(200, key_authorization.encode(), "application/octet-stream", request_id=request_id)


def https_redirect(location: str, request_id: str) -> Page:
    """308 to the same URL over HTTPS (`tun2g server --https-redirect`); 308 keeps the method and body."""
    return Page(308, f"tun2g: this site is served over HTTPS: {location}\n".encode(), TEXT,
                headers=(("Location", location),), request_id=request_id)


def server_busy(reason: str) -> Page:
    """503 for a connection over a cap (per client address, or in all), sent before any request is read."""
    return Page(503, f"tun2g: the server is busy ({reason}); retry shortly\n".encode(), TEXT,
                headers=(("Retry-After", "1"),))


def request_timeout(request_id: str | None = None) -> Page:
    """408: a request head that did not arrive whole within the header timeout."""
    return Page(408, b"tun2g: the request head did not arrive in time\n", TEXT, request_id=request_id)


def malformed_request(status: int, message: str, request_id: str | None = None) -> Page:
    """The 4xx/5xx for a request the HTTP parser refused (400, 413, 431, 501)."""
    return Page(status, f"{message}\n".encode(), TEXT, request_id=request_id)


def upgrade_unsupported(request_id: str | None = None) -> Page:
    """501 from a WSGI server that cannot hand its connection over for a tunnel or a protocol switch."""
    return Page(501, b"tun2g: this WSGI server does not hand over its connections, so tunnel clients and "
                     b"protocol switches (WebSocket) cannot be served here; run under gunicorn -k gevent, "
                     b"or use tun2g server's own HTTP front\n", TEXT, request_id=request_id)


HEALTH_PATH = "/_tun2g/health"


def is_health_request(method: str, target: str) -> bool:
    """GET/HEAD /_tun2g/health (any query): answered by the node itself, on every Host."""
    return method in ("GET", "HEAD") and target.partition("?")[0] == HEALTH_PATH


def node_health(node_id: str, draining: bool, tunnels: int) -> Page:
    """A node's health answer: 200 while it serves, 503 once it is stopping (a balancer then sends no more)."""
    status = 503 if draining else 200
    body = json.dumps({"status": "draining" if draining else "ok", "node": node_id, "tunnels": tunnels},
                      separators=(",", ":")).encode() + b"\n"
    return Page(status, body, "application/json", headers=(("Cache-Control", "no-store"),))


def head_only(page_bytes: bytes) -> bytes:
    """A page's response bytes without its body (the answer to HEAD)."""
    return page_bytes[:page_bytes.index(b"\r\n\r\n") + 4]


# -- the tunnel client ---------------------------------------------------------------------

def health_ok() -> Page:
    """The tunnel client's own answer to the server's health ping."""
    return Page(200, b"ok\n", TEXT)


def backend_failed() -> Page:
    """The local service broke the exchange (the tunnel client's 502; the detail is in the client's log)."""
    return Page(502, b"tun2g client: the site's local service broke off its answer\n", TEXT)


def backend_unreachable(error: BaseException) -> Page:
    """The local service cannot be reached (the tunnel client's 502).

    The public reads this page: it names the kind of failure only, never the
    backend's URL, host or port (those go to the client's log).
    """
    return Page(502, f"tun2g client: cannot reach the backend ({_connect_failure(error)})\n".encode(), TEXT)


def _connect_failure(error: BaseException) -> str:
    """A short, address-free name for why a connection failed (an OSError's text may name hosts)."""
    import socket
    import ssl

    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return "name not resolved"
    if isinstance(error, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(error, ConnectionError):
        return "connection lost"
    return "connection failed"
