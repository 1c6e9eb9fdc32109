"""Server.round_trip: one HTTP exchange through a tunnel, for callers that are not sockets.

The WSGI front and the requests adapter hand over a request head and a body
(bytes, an iterable of bytes or a file) and get back a streaming response, the
Python counterpart of Go's `http.RoundTripper`.
"""

from __future__ import annotations


import gevent

from tun2g.errors import CantOpenSessionStream, CantReadResponse, CantWriteRequest
from tun2g.http import (LAST_CHUNK, HTTPError, MessageReader, RequestHead, ResponseHead, encode_chunk,
                        encode_request_head, forwardable_headers)

from tun2g.requestid import new_request_id
from tun2g.pages import no_backends_body
from tun2g.smux import SessionClosedError

READ_SIZE = 65536


class TunnelResponse:
    """A response whose body is read from the tunnel stream as the caller asks for it."""

    def __init__(self, head: ResponseHead, reader=None, on_close=None, body: bytes = b""):
        self.head = head
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self._reader = reader
        self._on_close = on_close
        self._pending = body

    def read(self, amount: int = READ_SIZE) -> bytes:
        """Up to `amount` more body bytes; b"" at the end (then the stream is closed)."""
        if self._pending:
            piece, self._pending = self._pending[:amount], self._pending[amount:]
            return piece
        if self._reader is None:
            return b""
        try:
            piece = self._reader.read_body(amount)
        except (OSError, HTTPError, SessionClosedError) as exc:
            self.close()
            raise CantReadResponse(str(exc)) from exc
        if not piece:
            self.close()
        return piece

    def __iter__(self):
        while True:
            piece = self.read()
            if not piece:
                return
            yield piece

    def close(self) -> None:
        """Release the stream (idempotent)."""
        self._reader = None
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback()


def round_trip(server, head: RequestHead, body=None) -> TunnelResponse:
    """Send `head` (and `body`) to a tunnel for head.host; the no-backend page if there is none."""
    request_id = head.get("X-Request-Id") or new_request_id()
    head.set("X-Request-Id", request_id)
    connection = server.route(head.host or "")
    if connection is None and server.cluster is not None:
        forwarded = server.cluster.round_trip(head, body, request_id)  # None: no other node has one either
        if forwarded is not None:
            return forwarded
    if connection is None:
        page = no_backends_body(head.host or "", request_id)
        return TunnelResponse(ResponseHead(502, "Bad Gateway", headers=[
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page))),
            ("X-Request-Id", request_id)]), body=page)
    stream = connection.open_stream()
    connection.in_flight += 1

    def finish():
        stream.close()
        connection.in_flight -= 1
        connection.served += 1

    try:
        pump = send_request(stream, head, body)
        reader = MessageReader(stream)
        try:
            response = reader.read_response_head(head.method)
            while 100 <= response.status < 200 and response.status != 101:
                response = reader.read_response_head(head.method)
        except (OSError, HTTPError, SessionClosedError) as exc:
            if connection.is_closed:
                server.retire(connection, str(exc))
            raise CantReadResponse(str(exc)) from exc
        finally:
            if pump is not None and pump.dead and pump.exception is not None:
                raise CantWriteRequest(str(pump.exception)) from pump.exception
    except BaseException:
        finish()
        raise
    response.set("X-Request-Id", request_id)
    return TunnelResponse(response, reader, on_close=finish)


def send_request(stream, head: RequestHead, body):
    """Write the request; a streamed body goes out from its own greenlet (full duplex)."""
    head.headers = forwardable_headers(head.headers)
    if body is None or isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body or b"")
        if data or head.method in ("POST", "PUT", "PATCH"):
            head.set("Content-Length", str(len(data)))
        try:
            stream.sendall(encode_request_head(head) + data)
        except (OSError, SessionClosedError) as exc:
            raise CantOpenSessionStream(str(exc)) from exc
        return None
    if isinstance(body, str):
        raise TypeError("round_trip body must be bytes, an iterable of bytes or a binary file, not str")
    chunked = head.content_length is None
    stream.sendall(encode_request_head(head, chunked=chunked))
    return gevent.spawn(_pump_body, stream, _pieces(body), chunked)


def _pieces(body):
    if hasattr(body, "read"):
        while True:
            piece = body.read(READ_SIZE)
            if not piece:
                return
            yield piece
    else:
        yield from body


def _pump_body(stream, pieces, chunked: bool) -> None:
    for piece in pieces:
        if piece:
            stream.sendall(encode_chunk(piece) if chunked else piece)
    if chunked:
        stream.sendall(LAST_CHUNK)
