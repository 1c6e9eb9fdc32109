"""Helpers for the public-port bounds tests: bounded deployments, raw HTTP over sockets, stuck backends."""

from __future__ import annotations

import socket
import time

from gevent.event import Event
from gevent.server import StreamServer

from tests.fixtures.backends import read_head
from tests.fixtures.tunnel import DOMAIN, _start
from tun2g import smux
from tun2g.control import Auth, decode_reply


def bounded_deployment(tmp_path, data_dir, **bounds):
    """A plain-tunnel deployment whose ServerSetup gets `bounds` (header_timeout=..., max_connections=...)."""
    return _start(tmp_path, data_dir, plain=True, **bounds)


def connect(port: int, source_ip: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source_ip, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed); at most `limit` bytes."""
    data = b""
    while len(data) < limit:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data


def read_response(sock: socket.socket, limit: int = 1 << 20) -> tuple[bytes, bytes]:
    """(head, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"closed before a response head: {data!r}")
        data += piece
        assert len(data) < limit
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError("closed mid-body")
        body += piece
    return head, body


def get(port: int, host: str, path: str = "/", source_ip: str = "127.0.0.1", timeout: float = 10.0):
    """One GET with Connection: close: (status, head, body)."""
    with connect(port, source_ip, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head, body = read_response(sock)
    return int(head.split(b" ", 2)[1]), head, body


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


class StuckBackend:
    """An HTTP backend that reads each request head and then does `behaviour` (by default: never answers).

    It counts its open connections; a connection ends when the peer closes it
    (or after `hold` seconds, a bound for the test).
    """

    def __init__(self, prefix: bytes = b"", hold: float = 30.0) -> None:
        self.prefix = prefix  # sent after the head is read, before stalling (e.g. a response head and a bit)
        self.hold = hold
        self.open = 0
        self.accepted = 0
        self.heads: list[bytes] = []
        self.closed_by_peer = Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _address) -> None:
        self.open += 1
        self.accepted += 1
        try:
            self.heads.append(read_head(sock))
            if self.prefix:
                sock.sendall(self.prefix)
            deadline = time.monotonic() + self.hold
            sock.settimeout(self.hold)
            while time.monotonic() < deadline:
                if not sock.recv(65536):  # the proxy closed its connection to us
                    self.closed_by_peer.set()
                    return
        except OSError:
            self.closed_by_peer.set()
        finally:
            self.open -= 1
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


def handshake(deployment, level: int, token: str) -> tuple[smux.Session, smux.Stream, dict]:
    """Authenticate by hand over a real socket with "tun2g": level; (session, control stream, reply)."""
    sock = socket.create_connection(("127.0.0.1", deployment.running.tunnel_address[1]), timeout=5)
    session = smux.Session(sock, client=True, config=smux.Config(version=None))
    control = session.accept_stream(timeout=5)
    control.sendall(Auth(token, DOMAIN, tun2g=level).encode())
    control.settimeout(5)
    line = b""
    while not line.endswith(b"\n"):
        data = control.recv(1)
        assert data, "the server closed the control stream before its reply"
        line += data
    return session, control, decode_reply(line.strip())
