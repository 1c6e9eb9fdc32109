"""The responses the server itself produces: the no-backend page and gateway errors."""

from __future__ import annotations

import html

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


def no_backends_body(host: str, request_id: str) -> bytes:
    """The original's 502 body for a Host with no usable tunnel."""
    return _NO_BACKENDS.format(host=html.escape(host), request_id=html.escape(request_id)).encode()


def gateway_error_body(status: int, title: str, detail: str, request_id: str) -> bytes:
    """A short HTML page for a proxy error that happened on our side."""
    return _GATEWAY_ERROR.format(status=status, title=html.escape(title), detail=html.escape(detail),
                                 request_id=html.escape(request_id)).encode()
