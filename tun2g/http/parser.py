"""Sans-I/O HTTP/1.1 parsing over httptools (llhttp): feed the bytes of a connection, pop events.

One ``MessageParser`` reads one direction of one connection: requests on a
server's side, responses on a client's side. ``receive_data(bytes)`` (b"" at
EOF) queues events in ``events``, in wire order:

* ``HeadEvent``: a parsed head with its body framing;
* ``bytes``: the next piece of the current message's *decoded* body;
* ``END``: the current message is complete;
* ``Upgraded``: the connection switched protocols; ``rest`` holds the raw bytes after it;
* ``CLOSED``: the peer closed cleanly between messages;
* an ``HTTPError`` instance: the peer broke the protocol here (raise it).

Pipelined messages simply queue one after another. llhttp does the grammar;
this module adds what httptools leaves out: the head size limit, HEAD
responses (llhttp cannot be told the request was HEAD), EOF handling, and
body framing as a number.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools

from .heads import HTTPError, RequestHead, ResponseHead

# Node.js allows 16 KiB of head, Apache and nginx 8 KiB per line; 64 KiB is
# generous for cookies-heavy browsers and still bounds memory per connection.
DEFAULT_MAX_HEAD_SIZE = 65536

# Body framing of a message: a number >= 0 is an exact length (0: no body).
CHUNKED = -1      # chunked transfer coding
UNTIL_CLOSE = -2  # the body ends when the sender closes (responses only)

_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_FRAMING_NAME_LENGTHS = frozenset(map(len, ("transfer-encoding", "content-length", "connection", "host")))
# What an authority (RFC 3986 section 3.2, without userinfo) may contain: reg-name or IP, and a port.
_AUTHORITY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END = _Marker("END")
CLOSED = _Marker("CLOSED")


@dataclass(slots=True)
class HeadEvent:
    """A message head as parsed, with what the parser learned about its framing."""

    head: RequestHead | ResponseHead
    framing: int          # a length >= 0, CHUNKED or UNTIL_CLOSE
    keep_alive: bool      # the sender allows another message on this connection after this one
    upgrade: bool = False  # a request asking to switch protocols, or a 101 answering one


@dataclass(slots=True)
class Upgraded:
    """The connection left HTTP; ``rest`` are the raw bytes already received after the message."""

    rest: bytes


class _StopAfterHead(Exception):
    """Raised inside llhttp's callback to stop at the end of a HEAD response's head."""


class MessageParser:
    """Parses every request (``is_request``) or response on one connection into ``events``.

    The llhttp parser holds its callbacks (bound methods of a `_Parse`), so the `_Parse` refers
    to it only while it feeds it: no reference cycle, and a finished connection's parser is
    freed by its reference count, never left to the cyclic garbage collector.
    """

    __slots__ = ("events", "_parse", "_llhttp")

    def __init__(self, is_request: bool, max_head_size: int = DEFAULT_MAX_HEAD_SIZE) -> None:
        parse = self._parse = _Parse(is_request, max_head_size)
        self.events: deque = parse.events
        self._llhttp, parse._llhttp = parse._llhttp, None

    def receive_data(self, data: bytes) -> None:
        """Parse ``data`` (the next bytes from the peer; b"" means EOF) into ``events``."""
        parse = self._parse
        parse._llhttp = self._llhttp
        try:
            parse.receive_data(data)
        finally:
            self._llhttp, parse._llhttp = parse._llhttp, None  # it may have started a new one

    @property
    def is_request(self) -> bool:
        return self._parse.is_request

    @property
    def finished(self) -> bool:
        """No more parsing: EOF, an error or a protocol switch; ``terminal_event`` is reported for ever after."""
        return self._parse.finished

    @property
    def terminal_event(self):
        return self._parse.terminal_event

    @property
    def request_method(self) -> str:
        """For responses: the method of the request being answered (HEAD has no response body)."""
        return self._parse.request_method

    @request_method.setter
    def request_method(self, method: str) -> None:
        self._parse.request_method = method


class _Parse:
    """A MessageParser's state and llhttp's callbacks."""

    def __init__(self, is_request: bool, max_head_size: int) -> None:
        self.events: deque = deque()
        self.is_request = is_request
        self.max_head_size = max_head_size
        # For responses: the method of the request being answered (HEAD has no response body).
        self.request_method = "GET"
        self.finished = False       # no more parsing: EOF, error or protocol switch
        self.terminal_event = None  # what to report for ever after once finished
        self._in_message = False
        self._in_head = False
        self._head_bytes_bound = 0   # upper bound of head bytes seen in earlier feeds
        self._feeding = 0           # length of the data being fed right now
        self._framing = 0
        self._reseating = False     # parsing a made-up head that only restores body framing
        self._last_head: HeadEvent | None = None
        self._target = self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._new_llhttp()

    def _new_llhttp(self) -> None:
        self._llhttp: Any = (httptools.HttpRequestParser if self.is_request else httptools.HttpResponseParser)(self)

    # --- feeding -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.finished:
            return
        if not data:
            self._receive_eof()
            return
        self._feeding = len(data)
        upgraded_at = -1
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            upgraded_at = upgrade.args[0]
        except httptools.HttpParserCallbackError as exc:
            cause = _our_exception(exc)
            if isinstance(cause, _StopAfterHead):
                self._after_head_only(data)
            elif isinstance(cause, HTTPError):
                self._finish(cause)
            else:
                raise
        except httptools.HttpParserError as exc:
            self._finish(HTTPError(400, f"malformed HTTP {self._what}: {exc}"))
        else:
            if self._in_head:
                self._head_bytes_bound += len(data)
                if self._head_bytes_bound > self.max_head_size:
                    self._finish(HTTPError(431, f"the {self._what} head is larger than {self.max_head_size} bytes"))
            return
        if upgraded_at >= 0:
            # Outside the except block: a reseat parses more bytes, and an error there must not
            # carry the upgrade as its context (llhttp then hid our HTTPError: an uncaught
            # HttpParserCallbackError instead of a 400).
            self._upgraded(data[upgraded_at:])

    @property
    def _what(self) -> str:
        return "request" if self.is_request else "response"

    def _receive_eof(self) -> None:
        if not self._in_message:
            self._finish(CLOSED)
        elif self._in_head:
            self._finish(HTTPError(400, f"the connection closed in the middle of a {self._what} head"))
        elif self._framing == UNTIL_CLOSE:
            self.events.append(END)
            self._finish(CLOSED)
        else:
            self._finish(HTTPError(400, f"the connection closed before the end of the {self._what} body"))

    def _finish(self, terminal) -> None:
        self.finished = True
        self.terminal_event = terminal
        self.events.append(terminal)

    def _upgraded(self, rest: bytes) -> None:
        if self._reseating:
            # An Upgrade request with a body: llhttp skipped the body as if it were the
            # new protocol. Decline the upgrade (it is hop-by-hop, so a proxy may) and
            # parse the body normally through a fresh parser primed with a made-up head.
            self._new_llhttp()
            framing = "Transfer-Encoding: chunked" if self._framing == CHUNKED else f"Content-Length: {self._framing}"
            self.receive_data(f"POST / HTTP/1.1\r\n{framing}\r\n\r\n".encode() + rest)
            return
        self.finished = True
        self.terminal_event = HTTPError(400, "the connection switched protocols; it carries no more HTTP")
        self.events.append(Upgraded(rest))

    def _after_head_only(self, data: bytes) -> None:
        # A HEAD response ends with its head; llhttp would wait for a body, so restart it.
        # A well-behaved server sends nothing after the head, so the feed ends there.
        self._new_llhttp()
        if not data.endswith(b"\r\n\r\n"):
            self._last_head.keep_alive = False  # stray bytes after the head: do not reuse

    # --- llhttp callbacks (called from inside feed_data) --------------------------

    def on_message_begin(self) -> None:
        if self._reseating:
            return
        self._in_message = True
        self._in_head = True
        self._head_bytes_bound = 0
        self._target = self._reason = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Never the made-up head's: a reseat starts after on_headers_complete swapped the list out.
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self._reseating:
            self._reseating = False
            return
        self._in_head = False
        if self._head_bytes_bound + self._feeding > self.max_head_size:
            size = len(self._target) + len(self._reason) + sum(len(k) + len(v) + 4 for k, v in self._headers)
            if size > self.max_head_size:
                raise HTTPError(431, f"the {self._what} head is larger than {self.max_head_size} bytes")
        llhttp = self._llhttp
        version = llhttp.get_http_version()
        if version[0] != "1":
            raise HTTPError(505, f"HTTP version {version} is not supported; use HTTP/1.1")
        version = _VERSIONS.get(version) or f"HTTP/{version}"
        transfer_encoding = content_length = connection = None
        hosts = 0
        for name, value in self._headers:
            if len(name) not in _FRAMING_NAME_LENGTHS:
                continue
            lowered = name.lower()
            if lowered == "transfer-encoding":
                transfer_encoding = value
            elif lowered == "content-length":
                content_length = value
            elif lowered == "connection":
                connection = value if connection is None else f"{connection},{value}"
            elif lowered == "host":
                hosts += 1
        keep_alive = version == "HTTP/1.1"
        if connection is not None:
            connection = connection.lower()
            if connection == "close":
                keep_alive = False
            elif connection != "keep-alive" or not keep_alive:
                tokens = {token.strip() for token in connection.split(",")}
                keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
        if self.is_request:
            if hosts > 1:
                raise HTTPError(400, "the request has more than one Host header")
            head = RequestHead(llhttp.get_method().decode("ascii"), self._target.decode("latin-1"), version,
                               self._headers)
            framing = self._framing_of(transfer_encoding, content_length, 0)
            upgrade = llhttp.should_upgrade()
            if upgrade and head.method == "CONNECT":
                raise HTTPError(501, "CONNECT is not supported: this is a reverse proxy, not a forward proxy")
            if head.target[:1] != "/":
                _to_origin_form(head)
            if upgrade and framing != 0:
                self._reseating, upgrade = True, False
        else:
            status = llhttp.get_status_code()
            head = ResponseHead(status, self._reason.decode("latin-1"), version, self._headers)
            upgrade = status == 101
            if status < 200 or status in (204, 304) or self.request_method == "HEAD":
                framing = 0
            else:
                framing = self._framing_of(transfer_encoding, content_length, UNTIL_CLOSE)
            if framing == UNTIL_CLOSE:
                keep_alive = False
        self._framing = framing
        self._last_head = event = HeadEvent(head, framing, keep_alive, upgrade)
        self._headers = []  # llhttp reports chunked trailers through on_header too: keep them off the head
        self.events.append(event)
        if self.request_method == "HEAD" and not self.is_request and head.status >= 200:
            self.events.append(END)
            self._in_message = False
            raise _StopAfterHead()

    def _framing_of(self, transfer_encoding: str | None, content_length: str | None, default: int) -> int:
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise HTTPError(501, f"transfer coding {transfer_encoding!r} is not supported (only chunked)")
            return CHUNKED
        if content_length is not None:
            return int(content_length)  # llhttp has checked it is a number and not repeated
        return default

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self._reseating:
            return  # llhttp "completed" an Upgrade request by skipping its body; the reseat parses it
        self._in_message = False
        self.events.append(END)


def _our_exception(error: BaseException) -> BaseException | None:
    """The exception one of our callbacks raised inside llhttp (it is the context of llhttp's error)."""
    cause = error.__context__
    while cause is not None and not isinstance(cause, (HTTPError, _StopAfterHead)):
        cause = cause.__context__
    return cause


def _to_origin_form(head: RequestHead) -> None:
    """Make a request whose target is not origin-form ("/path") safe to forward, or refuse it.

    RFC 9112 section 3.2.2: the authority of an absolute-form target replaces Host
    (routing uses it) and the target forwarded on is origin-form. "*" is kept for
    OPTIONS; any other form (a relative path, another scheme, userinfo) is a 400.
    """
    target = head.target
    if target == "*" and head.method == "OPTIONS":
        return
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise HTTPError(400, f"invalid request target {target[:100]!r}: expected /path or http://host/path")
    end = len(rest)
    for index, char in enumerate(rest):
        if char in "/?#":
            end = index
            break
    authority, path = rest[:end], rest[end:]
    if not authority or not _AUTHORITY_CHARS.issuperset(authority):
        raise HTTPError(400, f"invalid authority in the request target {target[:100]!r}")
    if path.startswith("#"):
        path = ""
    head.target = path if path.startswith("/") else "/" + path
    head.set("Host", authority)
