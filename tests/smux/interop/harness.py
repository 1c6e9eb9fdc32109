"""Python ends of the smux interop tests: sessions wired to a Go smuxpeer, echo and echo-check.

A `Link` is one TCP connection between a tun2g.smux.Session and a Go smuxpeer
process, set up with the Python side as client (Go listens) or as server
(Python listens, Go dials).
"""

from __future__ import annotations

import hashlib
import random
import socket
from dataclasses import dataclass

import gevent
from gevent.pool import Group

from tests.fixtures.gopeers import PeerProcess
from tun2g.smux import Config, Session, SessionClosedError, Stream

# No single read or write in these tests may wait longer; a hang fails fast.
STREAM_TIMEOUT = 20.0

# Sizes around the 32768-byte default frame, plus empty and one byte.
EDGE_SIZES = (0, 1, 32767, 32768, 32769, 4096)


def payload(index: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes for stream number `index`."""
    return random.Random(index).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Link:
    """A Python smux session and the Go peer on the other end of its TCP connection."""

    session: Session
    go: PeerProcess  # stopped by the go_peer fixture; the session dies with its connection


def link(go_peer, python_role: str, version: int, go_mode: str, *go_args,
         config: Config | None = None) -> Link:
    """Connect a Python session (role "client" or "server") to a new Go smuxpeer in `go_mode`."""
    config = config if config is not None else Config(version=version)
    common = ("--version", version, "--mode", go_mode, *go_args)
    if python_role == "client":
        go = go_peer("smuxpeer", "--listen", "127.0.0.1:0", "--server", *common)
        port = int(go.wait_for(r"READY port=(\d+)").group(1))
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(5)
            go = go_peer("smuxpeer", "--dial", f"127.0.0.1:{listener.getsockname()[1]}", "--client", *common)
            sock, _ = listener.accept()
    sock.settimeout(None)
    return Link(Session(sock, client=python_role == "client", config=config), go)


def read_exactly(stream: Stream, size: int) -> bytes:
    """Read `size` bytes, or fewer if the stream ends first."""
    chunks, left = [], size
    while left:
        chunk = stream.recv(min(left, 256 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_to_eof(stream: Stream) -> bytes:
    chunks = []
    while chunk := stream.recv(256 * 1024):
        chunks.append(chunk)
    return b"".join(chunks)


def echo_check(stream: Stream, data: bytes) -> str:
    """Send `data` while reading its echo (same length), then close; returns the echo's sha256."""
    stream.settimeout(STREAM_TIMEOUT)
    writer = gevent.spawn(stream.sendall, data)
    try:
        echoed = read_exactly(stream, len(data))
        writer.get()
    finally:
        writer.kill()
        stream.close()
    return digest(echoed)


def echo_streams(session: Session, sizes: list[int]) -> list[tuple[int, bool]]:
    """Open one stream per size at once, echo-check each; returns (stream id, echo matched) pairs."""
    def one(index: int, size: int) -> tuple[int, bool]:
        stream = session.open_stream()
        data = payload(index, size)
        return stream.id, echo_check(stream, data) == digest(data)

    jobs = [gevent.spawn(one, index, size) for index, size in enumerate(sizes)]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


def echo_forever(stream: Stream) -> None:
    """Echo everything until EOF, then close (what the Go echo peer does)."""
    stream.settimeout(STREAM_TIMEOUT)
    try:
        while chunk := stream.recv(256 * 1024):
            stream.sendall(chunk)
    except (SessionClosedError, TimeoutError):
        pass
    finally:
        stream.close()


class EchoServer:
    """Accepts every stream the peer opens on `session` and echoes it; records the stream ids."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.accepted_ids: list[int] = []
        self._handlers = Group()
        self._acceptor = gevent.spawn(self._accept_loop)

    def _accept_loop(self) -> None:
        while True:
            try:
                stream = self.session.accept_stream()
            except SessionClosedError:
                return
            self.accepted_ids.append(stream.id)
            self._handlers.spawn(echo_forever, stream)

    def stop(self) -> None:
        self._acceptor.kill()
        self._handlers.kill()
