"""HTTP/1.1 message heads as plain records, plus the header rules a proxy follows."""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Iterable

Headers = list[tuple[str, str]]

# RFC 9110 section 7.6.1: connection-specific fields a proxy must not forward.
# "Proxy-Connection" is the non-standard ancestor of Connection; the two
# Proxy-Auth* fields belong to the hop that asked for them (as in Go's ReverseProxy).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Connection options that are not header names (or are hop-by-hop already).
_CONNECTION_OPTIONS = frozenset({"", "close", "keep-alive", "upgrade"})


class HTTPError(Exception):
    """A peer sent an HTTP message we cannot accept; ``status`` is the answer to give it.

    400 malformed, 413 body too large, 431 head too large, 501 unsupported
    (a transfer coding other than chunked, CONNECT).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class _HeaderFields:
    """Case-insensitive access to an ordered ``headers`` list (order and case are kept).

    Names are compared by length first: most headers then need no ``lower()`` call.
    """

    __slots__ = ()
    headers: Headers
    version: str

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), or ``default``."""
        name = name.lower()
        size = len(name)
        for key, value in self.headers:
            if len(key) == size and key.lower() == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        name = name.lower()
        size = len(name)
        return [value for key, value in self.headers if len(key) == size and key.lower() == name]

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` header by one ``name: value`` (kept at the first one's place)."""
        lowered = name.lower()
        size = len(lowered)
        kept: Headers = []
        placed = False
        for header in self.headers:
            key = header[0]
            if len(key) != size or key.lower() != lowered:
                kept.append(header)
            elif not placed:
                kept.append((name, value))
                placed = True
        if not placed:
            kept.append((name, value))
        self.headers = kept

    def add(self, name: str, value: str) -> None:
        """Append a ``name: value`` header, keeping any existing ones."""
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        """Drop every ``name`` header."""
        name = name.lower()
        size = len(name)
        self.headers = [h for h in self.headers if len(h[0]) != size or h[0].lower() != name]

    def append_to(self, name: str, value: str) -> None:
        """Merge every ``name`` header into one, listing ``value`` last (X-Forwarded-For style)."""
        lowered = name.lower()
        size = len(lowered)
        kept: Headers = []
        values = []
        for header in self.headers:
            key = header[0]
            if len(key) == size and key.lower() == lowered:
                values.append(header[1])
            else:
                kept.append(header)
        values.append(value)
        kept.append((name, ", ".join(values)))
        self.headers = kept

    def connection_tokens(self) -> frozenset[str]:
        """The lower-cased options listed in Connection headers (e.g. {"close"} or {"upgrade"})."""
        tokens: builtins.set[str] = builtins.set()
        for value in self.get_all("connection"):
            tokens.update(token.strip().lower() for token in value.split(","))
        tokens.discard("")
        return frozenset(tokens)

    @property
    def keep_alive(self) -> bool:
        """Whether the sender wants the connection kept open (HTTP/1.1 by default, 1.0 on request)."""
        tokens = self.connection_tokens()
        if "close" in tokens:
            return False
        return self.version != "HTTP/1.0" or "keep-alive" in tokens

    @property
    def content_length(self) -> int | None:
        """The Content-Length as an int, or None when absent or not a number."""
        value = self.get("content-length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    @property
    def chunked(self) -> bool:
        """Whether the body is sent with the chunked transfer coding."""
        value = self.get("transfer-encoding")
        return value is not None and value.rsplit(",", 1)[-1].strip().lower() == "chunked"


@dataclass(slots=True)
class RequestHead(_HeaderFields):
    """The request line and headers of one HTTP request."""

    method: str
    target: str
    version: str = "HTTP/1.1"
    headers: Headers = field(default_factory=list)

    @property
    def wants_upgrade(self) -> bool:
        """Whether the client asks to switch protocols (``Connection: upgrade`` plus ``Upgrade``)."""
        return self.get("upgrade") is not None and "upgrade" in self.connection_tokens()

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for ``100 Continue`` before sending its body."""
        value = self.get("expect")
        return value is not None and value.strip().lower() == "100-continue"

    @property
    def host(self) -> str | None:
        """The Host header, exactly as sent (case and port kept, like the original's routing key)."""
        return self.get("host")


@dataclass(slots=True)
class ResponseHead(_HeaderFields):
    """The status line and headers of one HTTP response."""

    status: int
    reason: str = ""
    version: str = "HTTP/1.1"
    headers: Headers = field(default_factory=list)


_HOP_BY_HOP_LENGTHS = frozenset(map(len, HOP_BY_HOP))
# Never removable by naming them in Connection: the message's framing (the encoder emits it
# from the parsed framing) and Host (the routing key). A peer listing them there is trying to
# desynchronise the next hop (docs/security.md, cluster request smuggling).
PROTECTED = frozenset({"content-length", "transfer-encoding", "host"})
_CONTENT_LENGTH_SIZE = len("content-length")


def forwardable_headers(headers: Iterable[tuple[str, str]], *, keep_length: bool = True) -> Headers:
    """``headers`` without the hop-by-hop fields and those named in Connection.

    Content-Length and Host survive any Connection header (see ``PROTECTED``);
    ``keep_length=False`` drops Content-Length too, for a sender that emits the
    framing itself from what the parser measured (``encode_*_head(content_length=...)``).
    """
    kept: Headers = []
    named: set[str] | None = None
    for header in headers:
        name = header[0]
        size = len(name)
        if size not in _HOP_BY_HOP_LENGTHS:
            if size == _CONTENT_LENGTH_SIZE and not keep_length and name.lower() == "content-length":
                continue
            kept.append(header)
            continue
        name = name.lower()
        if name not in HOP_BY_HOP:
            kept.append(header)
        elif name == "connection":
            value = header[1].lower()
            if value in _CONNECTION_OPTIONS:  # the usual "close" or "keep-alive": names no header
                continue
            tokens = {token.strip() for token in value.split(",")} - _CONNECTION_OPTIONS - PROTECTED
            if tokens:
                named = tokens if named is None else named | tokens
    if named:
        kept = [h for h in kept if h[0].lower() not in named]
    return kept


def strip_hop_by_hop(head: RequestHead | ResponseHead) -> None:
    """Remove the hop-by-hop headers of ``head`` in place (RFC 9110 section 7.6.1)."""
    head.headers = forwardable_headers(head.headers)


# Headers whose values an inspector shows as REDACTED (the client's and the server's alike):
# credentials, cookies, and every X-Tun2g-* (the cluster's hop signature among them).
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
REDACTED = "[redacted]"


def is_secret_header(name: str) -> bool:
    """Whether an inspector must hide the value of the header ``name``."""
    lowered = name.lower()
    return lowered in SECRET_HEADERS or lowered.startswith("x-tun2g-")
