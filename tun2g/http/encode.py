"""Encoding of HTTP/1.1 heads, chunks and small complete responses to bytes (sans-I/O)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Iterable

from .heads import RequestHead, ResponseHead

LAST_CHUNK = b"0\r\n\r\n"


def _header_block(headers: Iterable[tuple[str, str]], extra: str) -> str:
    lines = "\r\n".join(map(": ".join, headers))
    return f"{lines}\r\n{extra}\r\n" if lines else f"{extra}\r\n"


def _framing_lines(chunked: bool, connection: str | None, content_length: int | None = None) -> str:
    if chunked:
        extra = "Transfer-Encoding: chunked\r\n"
    elif content_length is not None:
        extra = f"Content-Length: {content_length}\r\n"
    else:
        extra = ""
    if connection:
        extra += f"Connection: {connection}\r\n"
    return extra


def encode_request_head(head: RequestHead, *, chunked: bool = False, connection: str | None = None,
                        headers: Iterable[tuple[str, str]] | None = None, content_length: int | None = None) -> bytes:
    """``head`` as bytes in HTTP/1.1 form (a proxy sends its own version, RFC 9110 section 6.2).

    ``headers`` replaces ``head.headers`` when given; ``chunked``, ``content_length`` and
    ``connection`` append ``Transfer-Encoding: chunked`` (or ``Content-Length: <n>``) and
    ``Connection: <value>``: a proxy emits the framing it parsed, never a copied header.
    """
    block = _header_block(head.headers if headers is None else headers,
                          _framing_lines(chunked, connection, content_length))
    return f"{head.method} {head.target} HTTP/1.1\r\n{block}".encode("latin-1")


def encode_response_head(head: ResponseHead, *, chunked: bool = False, connection: str | None = None,
                         headers: Iterable[tuple[str, str]] | None = None, content_length: int | None = None) -> bytes:
    """``head`` as bytes with an HTTP/1.1 status line; options as in ``encode_request_head``."""
    block = _header_block(head.headers if headers is None else headers,
                          _framing_lines(chunked, connection, content_length))
    reason = head.reason or _reason_phrase(head.status)
    return f"HTTP/1.1 {head.status} {reason}\r\n{block}".encode("latin-1")


def write_request_head(sock, head: RequestHead, *, chunked: bool = False, connection: str | None = None) -> None:
    """Send ``head`` on ``sock`` (see ``encode_request_head``)."""
    sock.sendall(encode_request_head(head, chunked=chunked, connection=connection))


def write_response_head(sock, head: ResponseHead, *, chunked: bool = False, connection: str | None = None) -> None:
    """Send ``head`` on ``sock`` (see ``encode_response_head``)."""
    sock.sendall(encode_response_head(head, chunked=chunked, connection=connection))


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding; ``data`` must not be empty (that is ``LAST_CHUNK``)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def simple_response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
                    headers: Iterable[tuple[str, str]] = (), version: str = "HTTP/1.1", close: bool = False) -> bytes:
    """A complete response with a Content-Length body, as bytes (error pages, health answers)."""
    lines = [f"{version} {status} {_reason_phrase(status)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    lines.extend(map(": ".join, headers))
    if close:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body
