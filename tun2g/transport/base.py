"""ByteStream: the socket-like type every tun2g transport implements, and what each one can do.

Sockets, TLS sockets, smux streams, KCP streams, TLS over memory BIOs and
upgraded HTTP connections all carry bytes the same way. Code above the
transports is written against `ByteStream` and asks `capabilities_of()` what
a stream can do instead of sniffing types and attributes: our own classes
declare a `capabilities` attribute, and the standard library's sockets are
described here, in the one place that knows them.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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


@dataclass(frozen=True)
class Capabilities:
    """What a ByteStream supports beyond the common calls."""

    gathered_writes: bool = False  # sendmsg() writes several buffers in one system call
    half_close: bool = False       # shutdown(SHUT_WR) ends our direction only; the peer may go on sending
    tcp: bool = False              # a TCP socket underneath: TCP_NODELAY applies to it
    plain_send: bool = False       # send() is a cheap single system call (worth trying before sendall)


PLAIN_TCP = Capabilities(gathered_writes=True, half_close=True, tcp=True, plain_send=True)
# TLS cannot be half-closed (an SSLSocket's shutdown ends reading too) and refuses sendmsg.
TLS_OVER_TCP = Capabilities(tcp=True, plain_send=True)
OTHER_SOCKET = Capabilities(gathered_writes=True, half_close=True, plain_send=True)  # unix sockets, socketpairs
UNKNOWN = Capabilities()


def capabilities_of(stream) -> Capabilities:
    """The declared capabilities of ``stream`` (standard-library sockets are described here)."""
    declared = getattr(stream, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    if isinstance(stream, ssl.SSLSocket):  # gevent's SSLSocket subclasses it when patched
        return TLS_OVER_TCP
    try:
        from gevent import ssl as gevent_ssl
    except ImportError:  # pragma: no cover - gevent is a dependency
        gevent_ssl = None
    if gevent_ssl is not None and isinstance(stream, gevent_ssl.SSLSocket):
        return TLS_OVER_TCP
    if isinstance(stream, socket.socket) or _is_gevent_socket(stream):
        return PLAIN_TCP if stream.family in (socket.AF_INET, socket.AF_INET6) else OTHER_SOCKET
    return UNKNOWN


def _is_gevent_socket(stream) -> bool:
    from gevent import socket as gevent_socket

    return isinstance(stream, gevent_socket.socket)
