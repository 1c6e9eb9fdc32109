"""ByteStream: the socket-like type every tun2g transport implements, and what each one can do.

Sockets, TLS sockets, smux streams, KCP streams, TLS over memory BIOs and
upgraded HTTP connections all carry bytes the same way. Code above the
transports is written against `ByteStream` and asks `capabilities_of()` what
a stream can do instead of sniffing types and attributes: our own classes
declare a `capabilities` attribute, and the standard library's sockets are
described here, in the one place that knows them.
"""

from __future__ import annotations

import _socket
import enum
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import gevent


@runtime_checkable
class ByteStream(Protocol):
    """A bidirectional, ordered byte stream with socket-style calls."""

    def recv(self, size: int) -> bytes: ...

    def recv_into(self, buffer, nbytes: int = 0) -> int: ...

    def send(self, data) -> int: ...

    def sendall(self, data) -> None: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def getpeername(self): ...

    def shutdown(self, how: int) -> None: ...

    def close(self) -> None: ...


class CloseWatch(enum.Enum):
    """How a stream's peer closing can be noticed while we are not reading it (e.g. a response is awaited)."""

    NONE = "none"      # it cannot: the close shows only when we next read or write
    PEEK = "peek"      # recv(1, MSG_PEEK) reads EOF without consuming bytes (plain sockets)
    NOTIFY = "notify"  # the stream calls back (`PeerCloseNotifier.on_peer_closed`), e.g. a smux stream's FIN


@runtime_checkable
class PeerCloseNotifier(Protocol):
    """A stream declaring ``CloseWatch.NOTIFY``."""

    def on_peer_closed(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once (from the event loop) when the peer can take no more data; None unregisters."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a ByteStream supports beyond the common calls."""

    gathered_writes: bool = False  # sendmsg() writes several buffers in one system call
    half_close: bool = False       # shutdown(SHUT_WR) ends our direction only; the peer may go on sending
    tcp: bool = False              # a TCP socket underneath: TCP_NODELAY applies to it
    plain_send: bool = False       # send() is a cheap single system call (worth trying before sendall)
    close_watch: CloseWatch = CloseWatch.NONE  # how the peer's leaving can be watched (see CloseWatch)
    # recv() with the timeout at 0 never waits, and the file descriptor's readiness says when to read:
    # the event loop can read it from a callback, with no greenlet (a TLS socket's buffered bytes are
    # read on until it says want-read).
    hub_reads: bool = False


PLAIN_TCP = Capabilities(gathered_writes=True, half_close=True, tcp=True, plain_send=True,
                         close_watch=CloseWatch.PEEK, hub_reads=True)
# TLS cannot be half-closed (an SSLSocket's shutdown ends reading too) and refuses sendmsg; MSG_PEEK
# would peek at the records, not the plaintext (a close_notify, or a renegotiation, is not EOF there).
TLS_OVER_TCP = Capabilities(tcp=True, plain_send=True, hub_reads=True)
# A TLS socket wrapped so that a peek reads plaintext and keeps it for the next read (tun2g.server.https).
PEEKABLE_TLS = Capabilities(tcp=True, plain_send=True, close_watch=CloseWatch.PEEK)
OTHER_SOCKET = Capabilities(gathered_writes=True, half_close=True, plain_send=True,  # unix sockets, socketpairs
                            close_watch=CloseWatch.PEEK, hub_reads=True)
UNKNOWN = Capabilities()


def capabilities_of(stream) -> Capabilities:
    """The declared capabilities of ``stream`` (standard-library sockets are described here)."""
    kind = _kind_of(stream)
    if kind is _SOCKET:
        return PLAIN_TCP if stream.family in (socket.AF_INET, socket.AF_INET6) else OTHER_SOCKET
    if kind is _DECLARING:
        declared = getattr(stream, "capabilities", None)
        return declared if isinstance(declared, Capabilities) else UNKNOWN
    return kind


def close_watch_of(stream) -> CloseWatch:
    """``capabilities_of(stream).close_watch``, without a socket's family lookup (the relay asks per exchange)."""
    kind = _kind_of(stream)
    return CloseWatch.PEEK if kind is _SOCKET else capabilities_of(stream).close_watch


def nonblocking_socket(stream) -> _socket.socket | None:
    """The non-blocking socket a gevent stream socket wraps (its ``send`` and ``recv`` raise
    BlockingIOError instead of waiting), or None for anything else (TLS included)."""
    raw = getattr(stream, "_sock", None) if _kind_of(stream) is _SOCKET else None
    if isinstance(raw, _socket.socket) and raw.type == socket.SOCK_STREAM and raw.gettimeout() == 0.0:
        return raw
    return None


def read_watcher(sock):
    """An fd watcher for ``sock`` being readable, to ``start(callback)`` and ``stop()`` again: a gevent
    socket's own (idle while no greenlet reads it, so no new watcher, fcntl or epoll_ctl per use), else
    a new one. Stop it before any greenlet reads the socket."""
    watcher = getattr(sock, "_read_event", None) if _kind_of(sock) is _SOCKET else None
    if watcher is None or watcher.active:
        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
    return watcher


def wait_readable(sock) -> None:
    """Wait, under ``sock``'s timeout (socket.timeout past it), until it has something to read (data, EOF,
    an error), reading nothing: for a reader that knows nothing has come yet, a gevent socket's own
    wait, sparing the recv that would only say EAGAIN. Anything else returns at once (its recv waits)."""
    if _kind_of(sock) is _SOCKET:
        sock._wait(sock._read_event)


def recv_without_waiting(stream) -> tuple[Callable[[int], bytes], bool]:
    """``(recv, drains)`` for a stream with ``hub_reads``: ``recv(size)`` never waits (it raises
    BlockingIOError, or ssl.SSLWantReadError, when nothing has come), and with ``drains`` a read
    shorter than ``size`` proves the stream holds nothing more (its fd becomes readable again first).

    A gevent stream socket is read through the non-blocking socket object it wraps (its own recv
    would wait), sparing two timeout changes per read. Anything else, TLS included, reads with its
    timeout at 0 and never drains: OpenSSL may hold bytes the fd does not show, even when
    ``pending()`` says no plaintext is left (tests/smux's 3 MiB over TLS fails when a short read
    with nothing pending is taken for drained).
    """
    raw = nonblocking_socket(stream)
    if raw is not None:
        return raw.recv, True

    def recv(size: int) -> bytes:
        previous = stream.gettimeout()
        stream.settimeout(0.0)
        try:
            return stream.recv(size)
        finally:
            try:
                stream.settimeout(previous)
            except OSError:
                pass  # closed meanwhile
    return recv, False


# Markers: a socket (its family decides), a type whose objects may declare `capabilities`.
_SOCKET = Capabilities()
_DECLARING = Capabilities()
# What each type of stream is, found once per type: a gevent socket's getattr of a missing
# attribute and its `family` cost a microsecond each.
_KINDS: dict[type, Capabilities] = {}


def _kind_of(stream) -> Capabilities:
    kind = _KINDS.get(type(stream))
    if kind is None:
        kind = _KINDS[type(stream)] = _classify(stream)
    return kind


def _classify(stream) -> Capabilities:
    if isinstance(stream, ssl.SSLSocket):  # gevent's SSLSocket subclasses it when patched
        return TLS_OVER_TCP
    from gevent import socket as gevent_socket, ssl as gevent_ssl

    if isinstance(stream, gevent_ssl.SSLSocket):
        return TLS_OVER_TCP
    if isinstance(stream, (socket.socket, gevent_socket.socket)):
        return _SOCKET
    return _DECLARING
