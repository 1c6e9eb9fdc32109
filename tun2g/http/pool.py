"""Keep-alive connections to one HTTP or HTTPS backend (the tunnel client's --backend URL)."""

from __future__ import annotations

import ipaddress
import re
import select
import socket as stdlib_socket
import time
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from gevent import monkey, socket, ssl

from .heads import HTTPError, RequestHead, ResponseHead
from .reader import MessageReader
from .relay import ExchangeResult, ExchangeTimeouts, Meter, UpstreamError, forward_exchange

# A zero-timeout poll never blocks, so the unpatched one is safe and cheaper.
_poll = monkey.get_original("select", "poll")


class BackendPool:
    """Dials ``url``'s host (TCP_NODELAY, TLS for https) and keeps idle keep-alive connections for reuse.

    The pool only grows to the peak number of concurrent exchanges; ``max_idle``
    caps what it keeps. Keep it above the expected concurrency: a smaller cap
    makes busy periods close and re-dial connections for every request.
    """

    def __init__(self, url: str, *, tls_verify: bool = True, ca_file: str | None = None,
                 connect_timeout: float = 5.0, max_idle: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL {url!r} must look like http://host:port or https://host/path")
        self.url = url
        self.scheme = parts.scheme
        self.host_header = parts.netloc
        self.path_prefix = parts.path
        self.query = parts.query
        self.address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self._ip_family = _ip_family(parts.hostname)
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[tuple[object, MessageReader, float]] = []  # (sock, reader, released at)
        self._closed = False
        self._tls = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context(cafile=ca_file)
            if not tls_verify:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    def join_path(self, target: str) -> str:
        """The request target to send the backend: the URL's path joined before it, queries merged.

        Like Go's httputil.NewSingleHostReverseProxy: "/base" + "/x" = "/base/x". Behind a
        prefix, dot segments are removed first (RFC 3986 section 5.2.4, after decoding
        percent-encoded unreserved characters, so "/%2e%2e/" is ".." too); a target that
        would climb above the prefix, the way any backend might read it (backslashes or
        %2F/%5C as separators, ";params", double encoding), raises HTTPError(400).
        """
        path, _, query = target.partition("?")
        prefix = self.path_prefix
        if prefix and prefix != "/" and ("/." in path or "%" in path or "\\" in path):
            path = confined_path(path)
        if prefix:
            if prefix.endswith("/") and path.startswith("/"):
                path = prefix + path[1:]
            elif not prefix.endswith("/") and not path.startswith("/"):
                path = f"{prefix}/{path}"
            else:
                path = prefix + path
        if self.query:
            query = f"{self.query}&{query}" if query else self.query
        return f"{path}?{query}" if query or "?" in target else path

    def acquire(self, replayable: bool = False):
        """An idle connection still open, or a new one: ``(sock, reader)``. Raises ``OSError`` if dialing fails.

        A kept connection is reused only when provably idle: its reader holds nothing and
        the socket has nothing to read. Bytes there (an extra response, the body of a
        response to HEAD, a close) would be read as the next request's answer: a
        response for another visitor, maybe another site's (response-queue poisoning).
        ``replayable`` is accepted for compatibility; every reuse is checked.
        """
        return self.take_idle() or self.dial()

    def take_idle(self) -> tuple[Any, MessageReader] | None:
        """An idle connection still open, ``(sock, reader)``, or None; never dials (see `acquire`)."""
        while self._idle:
            sock, reader, _released = self._idle.pop()
            if reader.idle and _still_idle(sock):
                return sock, reader
            sock.close()
        return None

    def dial(self):
        """A new connection: ``(sock, reader)``. Raises ``OSError`` if dialing fails."""
        sock = self._dial()
        try:
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.address[0])
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock, MessageReader(sock)

    def forward_exchange(self, request: RequestHead, request_reader: MessageReader, downstream, *,
                         response_filter: Callable[[ResponseHead], None] | None = None,
                         timeouts: ExchangeTimeouts | None = None, meter: Meter | None = None,
                         connection=None, sent: int | None = None) -> ExchangeResult:
        """``forward_exchange`` over a pooled connection, released afterwards.

        ``connection`` and ``sent``: a connection taken from this pool (`take_idle`) that the
        request already went up on (``sent`` bytes, as ``forward_exchange`` takes it); a retry
        sends it again on another.

        A kept-alive connection may be closed by the backend just as we reuse it;
        a bodyless request that fails that way is retried once on a new connection
        (as Go's Transport does). Raises ``OSError`` when the backend cannot be
        reached, and ``UpstreamError``/``DownstreamError`` as ``forward_exchange``
        (``timeouts`` and ``meter`` are its own).
        """
        replayable = request_reader.body_complete
        while True:
            if connection is not None:
                (sock, reader), connection = connection, None
            else:
                (sock, reader), sent = self.acquire(replayable), None
            reused, reusable = reader.messages_read > 0, False
            try:
                result = forward_exchange(request, request_reader, sock, downstream,
                                          response_filter=response_filter, upstream_reader=reader,
                                          timeouts=timeouts, meter=meter, sent=sent)
                reusable = result.upstream_reusable
                return result
            except UpstreamError:
                if not (reused and replayable):
                    raise
            finally:
                self.release(sock, reader, reusable)

    def _dial(self):
        if self._ip_family is None:
            return socket.create_connection(self.address, timeout=self.connect_timeout)
        # An IP literal needs no resolver round trip (gevent's resolver runs in a thread pool).
        sock = socket.socket(self._ip_family, stdlib_socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        return sock

    def release(self, sock, reader: MessageReader, reusable: bool) -> None:
        """Give a connection back: kept for reuse when ``reusable`` and there is room, else closed."""
        if reusable and not self._closed and len(self._idle) < self.max_idle and reader.idle:
            self._idle.append((sock, reader, time.monotonic()))
        else:
            sock.close()

    def close(self) -> None:
        """Close every idle connection; later releases close theirs."""
        self._closed = True
        idle, self._idle = self._idle, []
        for sock, _, _ in idle:
            sock.close()


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _decode_unreserved(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def remove_dot_segments(path: str) -> tuple[str, bool]:
    """RFC 3986 section 5.2.4 on an absolute path: (the path without "." and "..", whether ".." left the root)."""
    out: list[str] = []
    climbed = False
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            else:
                climbed = True
            continue
        out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is "/a/": the directory
    return "/" + "/".join(out), climbed


def _climbs_anywhere(path: str) -> bool:
    """Whether ``path`` climbs above its root as a lenient backend may read it (the widest reading)."""
    view = path
    for _ in range(3):  # decode until stable: "%252e" is "%2e" to a backend that decodes twice
        decoded = unquote(view, errors="replace")
        if decoded == view:
            break
        view = decoded
    depth = 0
    for segment in view.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0].strip()  # "..;/" is ".." to Tomcat and friends
        if segment in ("", "."):
            continue  # "//" collapses on many servers: count no level for it
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


def confined_path(path: str) -> str:
    """``path`` normalised for joining under a prefix; HTTPError(400) if it would climb above it."""
    if _climbs_anywhere(path):
        raise HTTPError(400, "the request path climbs above the site's root (\"..\" segments)")
    normalised, climbed = remove_dot_segments(_ESCAPE.sub(_decode_unreserved, path))
    if climbed:  # cannot happen after the widest check, but never forward one that does
        raise HTTPError(400, "the request path climbs above the site's root (\"..\" segments)")
    return normalised


def _ip_family(host: str):
    try:
        return stdlib_socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else stdlib_socket.AF_INET
    except ValueError:
        return None  # a name: resolve it at each dial


def _still_idle(sock) -> bool:
    """False when an idle connection has something to read: the backend closed it (or sent junk)."""
    # TLS: decrypted bytes already buffered in the SSL object. Looked up on the class: on a plain gevent
    # socket the instance lookup goes through its __getattr__, which raises and catches on every reuse.
    pending = getattr(type(sock), "pending", None)
    if pending is not None:
        try:
            if pending(sock):
                return False
        except (OSError, ValueError):
            return False
    try:
        poller = _poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
