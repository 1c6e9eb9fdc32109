"""The server name (SNI, RFC 6066 section 3) and the ALPN protocols (RFC 7301) of a TLS ClientHello, read
without terminating TLS.

Sans-I/O: `peek_server_name(data)` looks at the bytes a public connection has
sent so far and says one of three things: more bytes are needed (and at least
how many in all), the hello is complete (with its name, or None when it has no
server_name extension, and the protocols it offers by ALPN, in its order, ()
without the extension), or the bytes are no ClientHello (`ClientHelloError`).
The caller keeps the bytes and forwards them untouched, so the TLS session
stays between the visitor and the backend; nothing here needs a key.

Hostile input is bounded: a declared length past `MAX_HELLO_SIZE` is refused as
soon as its length field is read (never waited for), every length is checked
against its enclosing one, and a hello split over several TLS records is
reassembled (RFC 8446 section 5.1 allows it) as long as every record carries
handshake bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A ClientHello is some hundreds of bytes; a post-quantum key share (X25519MLKEM768)
# brings Chrome's to ~1.8 KiB. One full TLS record (2^14, RFC 8446 section 5.1) is far
# beyond any real hello, so anything larger is refused rather than buffered.
MAX_HELLO_SIZE = 16384
# Bytes of TLS records read while reassembling: the hello plus one 5-byte header per record.
MAX_RECORDS_SIZE = MAX_HELLO_SIZE + 5 * 64

RECORD_HEADER = 5
HANDSHAKE_RECORD = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME_EXTENSION = 0x0000
ALPN_EXTENSION = 0x0010
HOST_NAME = 0x00
MAX_HOST_NAME = 253
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello (or break one of its limits)."""


@dataclass(frozen=True)
class HelloPeek:
    """What the bytes so far say: ``complete`` with ``server_name`` (None: no SNI) and ``alpn`` (the offered
    protocols, () without ALPN), or ``needed`` bytes in all."""

    complete: bool
    server_name: str | None = None
    needed: int = 0
    alpn: tuple[bytes, ...] = ()
    parsed: bool = True  # False: complete, its extensions not read (the hello lacks `parse_only_if`)


def peek_server_name(data: bytes | bytearray | memoryview, *, parse_only_if: bytes | None = None) -> HelloPeek:
    """Parse the start of a TLS connection; raises ClientHelloError for anything but a ClientHello.

    With `parse_only_if`, a complete hello whose bytes do not contain it comes back unparsed (``parsed``
    False: no name, no protocols, no check of its extensions), which skips most of the work for a caller
    that looks for one thing, such as an ALPN name with its length byte."""
    view = memoryview(data).cast("B")
    handshake = bytearray()
    offset = 0
    hello_length: int | None = None
    while hello_length is None or len(handshake) < 4 + hello_length:
        if len(view) - offset < RECORD_HEADER:
            return HelloPeek(False, needed=offset + RECORD_HEADER)
        content_type, major, length = view[offset], view[offset + 1], int.from_bytes(view[offset + 3:offset + 5], "big")
        if content_type != HANDSHAKE_RECORD:
            what = "no TLS handshake record" if offset == 0 else "a non-handshake record inside the ClientHello"
            raise ClientHelloError(f"{what} (content type {content_type:#04x})")
        if major != 3:
            raise ClientHelloError(f"not a TLS record (version byte {major:#04x})")
        if length == 0:
            raise ClientHelloError("an empty TLS handshake record")  # RFC 8446 5.1: MUST NOT be sent
        if offset + RECORD_HEADER + length > MAX_RECORDS_SIZE:
            raise ClientHelloError(f"the ClientHello's records exceed {MAX_RECORDS_SIZE} bytes")
        end = offset + RECORD_HEADER + length
        if len(view) < end:
            return HelloPeek(False, needed=end)
        handshake += view[offset + RECORD_HEADER:end]
        offset = end
        if hello_length is None and len(handshake) >= 4:
            if handshake[0] != CLIENT_HELLO:
                raise ClientHelloError(f"the first handshake message is type {handshake[0]}, not a ClientHello")
            hello_length = int.from_bytes(handshake[1:4], "big")
            if hello_length > MAX_HELLO_SIZE:
                raise ClientHelloError(f"a ClientHello of {hello_length} bytes (the limit is {MAX_HELLO_SIZE})")
    if parse_only_if is not None and handshake.find(parse_only_if, 4, 4 + hello_length) < 0:
        return HelloPeek(True, parsed=False)
    server_name, alpn = _extensions(memoryview(handshake)[4:4 + hello_length])
    return HelloPeek(True, server_name=server_name, alpn=alpn)


def _extensions(hello: memoryview) -> tuple[str | None, tuple[bytes, ...]]:
    """The host_name of the hello's server_name extension (None without one) and its ALPN protocol names
    (RFC 8446 4.1.2 layout)."""
    reader = _Reader(hello, "ClientHello")
    reader.take(2 + 32)                     # legacy_version, random
    reader.vector(1, maximum=32)            # legacy_session_id
    suites = reader.vector(2, minimum=2)    # cipher_suites
    if len(suites) % 2:
        raise ClientHelloError("the cipher suite list has an odd length")
    reader.vector(1, minimum=1)             # legacy_compression_methods
    if reader.remaining == 0:
        return None, ()                     # no extensions at all (TLS 1.0-1.2 allow it)
    extensions = _Reader(reader.vector(2), "extensions")
    reader.finish()
    found: str | None = None
    alpn: tuple[bytes, ...] = ()
    seen: set[int] = set()
    while extensions.remaining:
        kind = int.from_bytes(extensions.take(2), "big")
        body = extensions.vector(2)
        if kind in seen:
            raise ClientHelloError(f"extension {kind} appears twice")  # RFC 8446 4.2
        seen.add(kind)
        if kind == SERVER_NAME_EXTENSION:
            found = _host_name(body)
        elif kind == ALPN_EXTENSION:
            alpn = _protocols(body)
    return found, alpn


def _protocols(body: memoryview) -> tuple[bytes, ...]:
    """ALPN's ProtocolNameList (RFC 7301 3.1): at least one name, each 1 to 255 bytes."""
    entries = _Reader(body, "application_layer_protocol_negotiation")
    names = _Reader(entries.vector(2, minimum=2), "ALPN protocol list")
    entries.finish()
    protocols = []
    while names.remaining:
        protocols.append(bytes(names.vector(1, minimum=1)))
    return tuple(protocols)


def _host_name(body: memoryview) -> str | None:
    entries = _Reader(body, "server_name")
    names = _Reader(entries.vector(2), "server_name list")
    entries.finish()
    host: str | None = None
    while names.remaining:
        name_type = names.take(1)[0]
        name = names.vector(2, minimum=1)
        if name_type != HOST_NAME:
            continue  # no other type is defined; unknown ones are skipped (RFC 6066 3)
        if host is not None:
            raise ClientHelloError("more than one host_name in server_name")  # RFC 6066 3: MUST NOT
        host = _valid_host(bytes(name))
    return host


def _valid_host(raw: bytes) -> str:
    """A DNS host name in ASCII (RFC 6066: no trailing dot, no IP literal), lower-cased."""
    try:
        text = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise ClientHelloError("the server name is not ASCII") from None
    text = text[:-1] if text.endswith(".") else text
    if not text or len(text) > MAX_HOST_NAME or not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise ClientHelloError(f"the server name {text[:64]!r} is not a host name")
    return text


class _Reader:
    """Bounds-checked reads over one length-delimited part of the hello."""

    def __init__(self, data: memoryview, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, count: int) -> memoryview:
        if count > self.remaining:
            raise ClientHelloError(f"the {self._what} ends early")
        piece = self._data[self._offset:self._offset + count]
        self._offset += count
        return piece

    def vector(self, length_bytes: int, *, minimum: int = 0, maximum: int | None = None) -> memoryview:
        length = int.from_bytes(self.take(length_bytes), "big")
        if length < minimum or (maximum is not None and length > maximum):
            raise ClientHelloError(f"a field of the {self._what} has a bad length ({length})")
        return self.take(length)

    def finish(self) -> None:
        if self.remaining:
            raise ClientHelloError(f"{self.remaining} stray bytes after the {self._what}")
