"""Fixtures for the smux tests: real loopback connections, session pairs, raw-socket peers."""

import hashlib
import socket

import gevent
import pytest

from tun2g.smux import Config, Session, SessionClosedError, StreamResetError
from tun2g.smux.frame import FrameDecoder, PSH, UPD


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real TCP connection on 127.0.0.1 (client end first)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for end in (client, server):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_session_finished(session: Session) -> None:
    """The session is closed and none of its greenlets lives on."""
    assert session.wait_closed(5), "session did not close"
    gevent.joinall(session.greenlets, timeout=5)
    assert all(greenlet.dead for greenlet in session.greenlets), session.greenlets


class SessionPair:
    """A client and a server Session over one real connection; closed and leak-checked at teardown."""

    def __init__(self, client_config=None, server_config=None, transport="tcp"):
        client_end, server_end = tcp_pair() if transport == "tcp" else socket.socketpair()
        self.client = Session(client_end, client=True, config=client_config)
        self.server = Session(server_end, client=False, config=server_config)

    def close(self):
        for session in (self.client, self.server):
            session.close()
        for session in (self.client, self.server):
            assert_session_finished(session)


@pytest.fixture
def make_pair():
    """make_pair(client_config=None, server_config=None, transport="tcp") -> SessionPair."""
    pairs = []

    def make(*args, **kwargs):
        pair = SessionPair(*args, **kwargs)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


@pytest.fixture
def pair(make_pair):
    return make_pair()


def serve_echo(session: Session) -> gevent.Greenlet:
    """Accept streams forever and echo each one until EOF, then close it."""

    def echo(stream):
        buffer = bytearray(65536)
        try:
            while count := stream.recv_into(buffer):
                stream.sendall(memoryview(buffer)[:count])
        except (SessionClosedError, StreamResetError, BrokenPipeError):
            pass  # the test ended the session or reset this stream on purpose
        stream.close()

    def accept_loop():
        while True:
            try:
                stream = session.accept_stream()
            except SessionClosedError:
                return
            gevent.spawn(echo, stream)

    return gevent.spawn(accept_loop)


def read_to_eof(stream, chunk: int = 1 << 20) -> bytes:
    parts = []
    while True:
        data = stream.recv(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


class RawPeer:
    """The other end of a Session, speaking hand-made bytes over a real TCP connection."""

    def __init__(self, version=1):
        self.sock, session_end = tcp_pair()
        self.session_end = session_end
        self.decoder = FrameDecoder(version)
        self.frames = []  # decoded (cmd, sid, value) with PSH payloads joined
        self._payload = bytearray()
        self.sock.settimeout(5)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frames(self, until, timeout: float = 5.0):
        """Read and decode until ``until(self.frames)`` is true; returns the frames."""
        with gevent.Timeout(timeout, AssertionError(f"no matching frames within {timeout}s: {self.frames}")):
            while not until(self.frames):
                data = self.sock.recv(1 << 20)
                if not data:
                    raise AssertionError(f"connection closed; frames so far: {self.frames}")
                for cmd, sid, value, complete in self.decoder.feed(data):
                    if cmd == PSH:
                        self._payload += value
                        if complete:
                            self.frames.append((PSH, sid, bytes(self._payload)))
                            self._payload.clear()
                    else:
                        self.frames.append((cmd, sid, value))
        return self.frames

    def psh_bytes(self, sid: int) -> int:
        return sum(len(value) for cmd, frame_sid, value in self.frames if cmd == PSH and frame_sid == sid)

    def close(self):
        self.sock.close()


@pytest.fixture
def raw_peer():
    """raw_peer(version=1) -> RawPeer; its sockets are closed at teardown."""
    peers = []

    def make(version=1):
        peer = RawPeer(version)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
        peer.session_end.close()


def quiet_config(**changes) -> Config:
    """A Config with keepalive off, so tests see only the frames they cause."""
    return Config(keepalive_disabled=True).copy(**changes)


__all__ = ["PSH", "UPD", "RawPeer", "SessionPair", "assert_session_finished", "quiet_config", "read_to_eof",
           "serve_echo", "sha256", "tcp_pair"]
