"""Helpers for the public-port bounds tests: bounded deployments, raw HTTP over sockets, stuck backends."""

from __future__ import annotations

import socket
import time

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from tests.fixtures.backends import read_head
from tests.fixtures.tunnel import DOMAIN, _start
from tun2g import smux
from tun2g.control import Auth, decode_reply
from tun2g.http import MessageReader


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


# Between the pieces of a hand-made answer: long enough that each arrives in a read of its own.
PIECE_PAUSE = 0.005


class HandMadeClient:
    """A tun2g-level client speaking smux by hand: answers each request on a stream with ``answer(n, head)``
    (bytes to write; a list of pieces, written one by one a moment apart, a None among them closing
    the stream there; or None to close the stream unanswered), n counting requests across streams."""

    def __init__(self, deployment, answer):
        self.session, self.control, reply = handshake(deployment, 1, deployment.grant())
        assert reply["ok"] is True
        self.answer = answer
        self.requests = 0
        self.streams = []
        self.seen = []  # (stream id, head) of every request, in order
        self._greenlets = [gevent.spawn(self._accept)]

    def _accept(self):
        while True:
            stream = self.session.accept_stream()
            self.streams.append(stream.id)
            self._greenlets.append(gevent.spawn(self._serve, stream))

    def _serve(self, stream):
        reader = MessageReader(stream)
        while (head := reader.read_request_head()) is not None:
            while reader.read_body():
                pass
            self.requests += 1
            self.seen.append((stream.id, head))
            payload = self.answer(self.requests, head)
            if payload is None:
                stream.close()
                return
            for piece in payload if isinstance(payload, list) else [payload]:
                if piece is None:
                    stream.close()
                    return
                stream.sendall(piece)
                if isinstance(payload, list):
                    gevent.sleep(PIECE_PAUSE)  # the server gets the pieces in separate reads

    def close(self):
        gevent.killall(self._greenlets)
        self.session.close()
