"""Plain TCP endpoints with the socket options every tun2g connection wants."""

from __future__ import annotations

import socket

from gevent import socket as gsocket

from tun2g.transport.base import capabilities_of


def tune(sock) -> None:
    """Disable Nagle: small request heads and smux frames must leave at once."""
    if not capabilities_of(sock).tcp:
        return  # not TCP (KCP, a unix socket, a socketpair): nothing to tune
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def split_host_port(address: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse "host:port", "[v6]:port" or ":port" (all interfaces) into a tuple."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {address!r}")
        host, port = address, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def listen(address: str, backlog: int = 1024):
    """A listening gevent socket on "host:port" (port 0 picks a free one)."""
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def dial(address: str, timeout: float | None = 10.0):
    """Connect to "host:port"; the returned socket has TCP_NODELAY set and no timeout."""
    host, port = split_host_port(address)
    sock = gsocket.create_connection((host, port), timeout=timeout)
    sock.settimeout(None)
    tune(sock)
    return sock
