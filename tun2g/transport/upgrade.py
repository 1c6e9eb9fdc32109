"""The HTTP-Upgrade tunnel's wire bits: a tunnel client connects through the server's public HTTP port.

Platforms such as Heroku expose one HTTP port, so the client asks to switch
protocols on it and then speaks smux exactly as on the tunnel port::

    GET /_tun2g/tunnel HTTP/1.1          HTTP/1.1 101 Switching Protocols
    Host: tunnel.example                 Upgrade: tun2g
    Upgrade: tun2g                       Connection: Upgrade
    Connection: Upgrade

With an https:// server URL the client runs TLS first (usually to the
platform's router, which then passes the upgraded connection through). The
client side dials in `tun2g.client.connect`; the server's fronts hand an
upgraded connection to `Server.serve_tunnel`.
"""

from __future__ import annotations

import dataclasses
import socket

from tun2g.transport.base import capabilities_of

TUNNEL_PATH = "/_tun2g/tunnel"
UPGRADE_TOKEN = "tun2g"
MAX_RESPONSE_HEAD = 16 * 1024
SWITCHING_PROTOCOLS = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tun2g\r\nConnection: Upgrade\r\n"
                       b"Cache-Control: no-store\r\n\r\n")


class UpgradeRefused(OSError):
    """The server (or a proxy before it) did not switch to the tunnel protocol."""

    status: int = 0  # the HTTP status it answered instead of 101


def is_tunnel_request(head) -> bool:
    """Whether a request head asks for the tun2g tunnel (method, path and Upgrade token all match)."""
    upgrade = head.get("Upgrade")
    return (head.method == "GET" and head.target.partition("?")[0] == TUNNEL_PATH and upgrade is not None
            and upgrade.strip().lower() == UPGRADE_TOKEN and "upgrade" in head.connection_tokens())


def encode_request(host_header: str) -> bytes:
    """The client's upgrade request."""
    from tun2g import __version__

    return (f"GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
            f"Connection: Upgrade\r\nUser-Agent: tun2g/{__version__}\r\n\r\n").encode("latin-1")


def parse_response_head(data: bytes) -> tuple[int, str]:
    """(status, status line) of a response head; raises UpgradeRefused when it is not HTTP."""
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise UpgradeRefused(f"the server did not answer the tunnel upgrade with HTTP: {status_line[:80]!r}")
    return int(parts[1]), status_line


class UpgradedStream:
    """A socket after the switch: bytes that came with the 101 (or the request) are read first.

    With `own_socket=False` close() only shuts the socket down, leaving the
    closing to the server that accepted it (gunicorn keeps its own handle).
    """

    def __init__(self, sock, leftover: bytes = b"", own_socket: bool = True):
        self._sock = sock
        self._leftover = leftover
        self._own_socket = own_socket
        self.sendall = sock.sendall
        # Not read from the hub: the bytes that came with the switch wait here, not in the socket.
        self.capabilities = dataclasses.replace(capabilities_of(sock), hub_reads=False)
        if self.capabilities.gathered_writes:
            self.sendmsg = sock.sendmsg

    def recv(self, size: int) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:size], self._leftover[size:]
            return data
        return self._sock.recv(size)

    def recv_into(self, buffer, size: int = 0) -> int:
        if self._leftover:
            size = min(size or len(buffer), len(self._leftover))
            buffer[:size] = self._leftover[:size]
            self._leftover = self._leftover[size:]
            return size
        return self._sock.recv_into(buffer, size)

    def close(self) -> None:
        if self._own_socket:
            self._sock.close()
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __getattr__(self, name):
        if name == "sendmsg":
            raise AttributeError(name)  # only where the socket underneath gathers writes
        return getattr(self._sock, name)  # settimeout, getpeername, setsockopt, fileno ...


def read_response_head(sock) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_RESPONSE_HEAD:
            raise UpgradeRefused(f"the server's answer to the tunnel upgrade has no end of head within "
                                 f"{MAX_RESPONSE_HEAD} bytes")
        piece = sock.recv(4096)
        if not piece:
            raise UpgradeRefused("the server closed the connection instead of answering the tunnel upgrade")
        data += piece
    head, _, leftover = data.partition(b"\r\n\r\n")
    return head, leftover


def is_tunnel_environ(environ) -> bool:
    """`is_tunnel_request` for a WSGI environ."""
    return (environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO") == TUNNEL_PATH
            and environ.get("HTTP_UPGRADE", "").strip().lower() == UPGRADE_TOKEN
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower())
