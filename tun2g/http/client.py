"""One HTTP request over a ByteStream for callers that hold no socket: the body in, a streamed response out.

`send_request` writes a request (the body pumped by its own greenlet when it
streams) and `StreamedResponse` hands the response body out as the caller
reads it: the Python counterpart of Go's `http.RoundTripper` response.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

import gevent

from .encode import LAST_CHUNK, encode_chunk, encode_request_head
from .heads import HTTPError, RequestHead, ResponseHead, forwardable_headers
from .reader import MessageReader

READ_SIZE = 65536

@runtime_checkable
class Readable(Protocol):
    """A binary file-like body: read(size) until b""."""

    def read(self, size: int) -> bytes: ...


# What `send_request` accepts as a body.
Body = bytes | bytearray | memoryview | Iterable[bytes] | Readable | None


class ResponseReadError(Exception):
    """The response body could not be read to its end (the upstream broke mid-body)."""


class StreamedResponse:
    """A response whose body is read from its stream as the caller asks for it.

    After a 101 the body is the raw byte stream of the switched protocol.
    `close()` (idempotent) releases the stream through `on_close`.
    """

    def __init__(self, head: ResponseHead, reader: MessageReader | None = None,
                 on_close: Callable[[], None] | None = None, body: bytes = b"") -> None:
        self.head = head
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self._reader = reader
        self._on_close = on_close
        self._pending = body
        if reader is not None and head.status == 101:
            self._pending = reader.take_buffered()

    def read(self, amount: int = READ_SIZE) -> bytes:
        """Up to `amount` more body bytes; b"" at the end (then the stream is released)."""
        if self._pending:
            piece, self._pending = self._pending[:amount], self._pending[amount:]
            return piece
        reader = self._reader
        if reader is None:
            return b""
        try:
            piece = reader.sock.recv(amount) if self.status == 101 else reader.read_body(amount)
        except (OSError, HTTPError) as exc:
            self.close()
            raise ResponseReadError(str(exc) or type(exc).__name__) from exc
        if not piece:
            self.close()
        return piece

    def __iter__(self) -> Iterator[bytes]:
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


def body_is_replayable(body: Body) -> bool:
    """Whether `body` can be sent again after a failed attempt (it is held in memory)."""
    return body is None or isinstance(body, (bytes, bytearray, memoryview))


def send_request(stream, head: RequestHead, body: Body, *, close: bool = False) -> gevent.Greenlet | None:
    """Write the request; a streamed body goes out from its own greenlet (full duplex), which is returned.

    Hop-by-hop headers are dropped and framing is set here, as `forward_exchange`
    does; an upgrade request keeps its Upgrade. `close` asks the peer to end the
    connection after the response. Raises OSError when the head cannot be written.
    """
    # The framing is emitted here from the body in hand (or the one Content-Length declared),
    # never copied: a copied header that disagreed with the body would desynchronise the peer.
    headers = forwardable_headers(head.headers, keep_length=False)
    upgrade = head.get("Upgrade") if "upgrade" in head.connection_tokens() else None
    connection = "close" if close and not upgrade else None
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", upgrade)]
    if body is None or isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body or b"")
        length = len(data) if data or head.method in ("POST", "PUT", "PATCH") else None
        stream.sendall(encode_request_head(head, connection=connection, headers=headers, content_length=length) + data)
        return None
    if isinstance(body, str):
        raise TypeError("a request body must be bytes, an iterable of bytes or a binary file, not str")
    declared = head.content_length
    chunked = declared is None
    stream.sendall(encode_request_head(head, chunked=chunked, connection=connection, headers=headers,
                                       content_length=declared))
    return gevent.spawn(_pump_body, stream, body_pieces(body), chunked, declared)


def body_pieces(body: Iterable[bytes] | Readable) -> Iterator[bytes]:
    if isinstance(body, Readable):  # a file: read it in pieces, not line by line
        while True:
            piece = body.read(READ_SIZE)
            if not piece:
                return
            yield piece
    else:
        yield from body


def _pump_body(stream, pieces: Iterator[bytes], chunked: bool, length: int | None = None) -> None:
    left = length
    for piece in pieces:
        if not piece:
            continue
        if left is not None:
            if len(piece) > left:  # never past the declared length: that would be the next request
                raise OSError(f"the request body is longer than its Content-Length ({length})")
            left -= len(piece)
        stream.sendall(encode_chunk(piece) if chunked else piece)
    if chunked:
        stream.sendall(LAST_CHUNK)
    elif left:
        raise OSError(f"the request body is shorter than its Content-Length ({length})")
