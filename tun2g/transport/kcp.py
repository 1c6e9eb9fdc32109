"""KCP over UDP that speaks exactly what kcp-go 5.6.1 speaks, driven by gevent.

``kcp_dial`` is kcp-go's ``Dial``, ``KCPListener`` its ``Listen``; both hand out
:class:`KCPStream` byte streams (kcp_conn.py). This module owns the UDP
sockets: one greenlet per socket reads datagrams (``_DatagramPump``) and routes
them, the client locking onto its first responder, the listener keeping one
session per remote address. Nothing here blocks the hub.
"""

from __future__ import annotations

import _socket
import ipaddress
import secrets
import time
from collections import Counter
from collections.abc import Callable

import gevent
import gevent.queue
from gevent import socket

from tun2g.transport import kcp_wire
from tun2g.transport.kcp_conn import KCPStream, KCPOptions

__all__ = ["KCPStream", "KCPListener", "KCPOptions", "KCP_PROFILES", "kcp_dial", "options_for"]

# Named presets for the command line. "fast" changes only local timing and
# windows, so a Go kcp-go peer on its defaults still understands every datagram;
# "kcp-go" is exactly kcp-go's defaults (what Go tun2 runs, ~0.1-0.5 MB/s).
KCP_PROFILES = ("fast", "kcp-go")


def options_for(profile: str) -> KCPOptions:
    """The KCPOptions of a named profile (see KCP_PROFILES)."""
    if profile == "fast":
        return KCPOptions.fast()
    if profile == "kcp-go":
        return KCPOptions()
    raise ValueError(f"unknown KCP profile {profile!r}; use one of {', '.join(KCP_PROFILES)}")

# kcp-go's listener accept queue (docs/protocol.md#conv-and-sessions).
DEFAULT_BACKLOG = 128
# Session bounds of a listener (docs/protocol.md#unproven-peers). An unproven
# session's peer has not yet ACKed anything we sent: its address may be forged.
DEFAULT_MAX_SESSIONS = 4096
DEFAULT_MAX_UNPROVEN = 1024  # over it, the oldest unproven session makes room
DEFAULT_MAX_UNPROVEN_PER_SOURCE = 256  # per IPv4 address / IPv6 /64; over it, new ones wait
# An unproven session ends after this long without a datagram from its peer,
# or with our data unacknowledged.
DEFAULT_PROOF_TIMEOUT = 3.0
# kcptun's --sockbuf: room for a window of datagrams arriving between two reads.
SOCKET_BUFFER_SIZE = 4 * 1024 * 1024
# Datagrams handled before the pump yields, so a flood never starves the hub.
PUMP_BATCH = 64


class _DatagramPump:
    """Owns one UDP socket: reads it in its own greenlet and hands datagrams to a handler.

    The handler returns the connection it fed (or None). After a burst, each
    fed connection settles once, so a burst of input costs one flush.
    """

    def __init__(self, sock, handle: Callable[[bytes, object], KCPStream | None]):
        self._sock = sock
        self._handle = handle
        self._watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop reading and close the socket (datagrams sent before this have left).

        Called from other greenlets only: it waits for the reader to end so the
        fd is never closed under a live watcher.
        """
        self._greenlet.kill(block=True)
        self._watcher.close()
        self._sock.close()

    def _run(self) -> None:
        hub = gevent.get_hub()
        touched: dict[int, KCPStream] = {}
        handled = 0
        while True:
            try:
                datagram, address = self._sock.recvfrom(65536)
            except BlockingIOError:
                self._settle(touched)
                hub.wait(self._watcher)
                continue
            connection = self._handle(datagram, address)
            if connection is not None:
                touched[id(connection)] = connection
                connection = None  # this frame must not keep a forgotten session alive while it waits
            handled += 1
            if handled % PUMP_BATCH == 0:
                self._settle(touched)
                gevent.sleep(0)

    @staticmethod
    def _settle(touched: dict[int, KCPStream]) -> None:
        for connection in touched.values():
            connection._after_input()
        touched.clear()


def _udp_socket(family: int, bind_address) -> _socket.socket:
    # The unpatched socket: the pump waits for readiness itself so it can drain
    # a burst without a hub switch per datagram, and ikcp's output callback
    # must never yield.
    sock = _socket.socket(family, _socket.SOCK_DGRAM)
    for option in (_socket.SO_RCVBUF, _socket.SO_SNDBUF):
        sock.setsockopt(_socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
    sock.setblocking(False)
    sock.bind(bind_address)
    return sock


def _resolve(host: str, port: int):
    family, _, _, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    return family, address


def kcp_dial(host: str, port: int, options: KCPOptions = KCPOptions()) -> KCPStream:
    """Open a KCP conversation to host:port like kcp-go's Dial; no packet leaves until the first send.

    The socket is unconnected and locks onto the address of the first valid
    datagram it receives. The listener only learns of us from our data, so the
    caller must send first (a TLS ClientHello, a smux NOP, ...).
    """
    family, peer = _resolve(host, port)
    sock = _udp_socket(family, ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
    locked = []

    def handle(datagram: bytes, address) -> KCPStream | None:
        if locked and address != locked[0]:
            return None
        inbound = kcp_wire.parse_datagram(datagram, options.crypt_header)
        if inbound is None or inbound.conv != connection.conv:
            return None
        if not locked:
            locked.append(address)
        connection._input(inbound.kcp)
        return connection

    connection = KCPStream(sock, peer, secrets.randbits(32), options, lambda _connection: pump.stop())
    pump = _DatagramPump(sock, handle)
    return connection


class KCPListener:
    """A kcp-go compatible listener: one UDP socket, one session per remote address.

    Like kcp-go, a datagram with a new conv from a known address replaces that
    address's session only if it carries sn 0. Unlike kcp-go, only a sane
    datagram with PUSH sn 0 creates a session (junk and late segments don't),
    and idle sessions are reaped (``options.idle_timeout``).

    Nor is it a reflector (docs/protocol.md#unproven-peers): until a peer ACKs a
    segment we sent, its session sends at most ``amplification_factor`` times
    the bytes the peer sent and ends ``proof_timeout`` seconds after the peer's
    last datagram (or after our first unacknowledged data). At most
    ``max_sessions`` sessions, ``max_unproven`` of them unproven (the oldest
    gives way to a new one) and ``max_unproven_per_source`` per source IP
    (IPv6: per /64; a new one waits for the client's retransmission).
    """

    def __init__(self, host: str, port: int, options: KCPOptions = KCPOptions(), backlog: int = DEFAULT_BACKLOG, *,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_unproven: int = DEFAULT_MAX_UNPROVEN,
                 max_unproven_per_source: int = DEFAULT_MAX_UNPROVEN_PER_SOURCE,
                 proof_timeout: float = DEFAULT_PROOF_TIMEOUT,
                 amplification_factor: int = kcp_wire.DEFAULT_AMPLIFICATION_FACTOR):
        if min(max_sessions, max_unproven, max_unproven_per_source) < 1 or proof_timeout <= 0:
            raise ValueError("KCP listener caps must be at least 1 and proof_timeout positive")
        self._options = options
        self._max_sessions = max_sessions
        self._max_unproven = max_unproven
        self._max_unproven_per_source = max_unproven_per_source
        self._proof_timeout = proof_timeout
        self._amplification_factor = amplification_factor
        family, address = _resolve(host, port)
        self._sock = _udp_socket(family, address)
        self._sessions: dict[object, KCPStream] = {}
        self._unproven: dict[KCPStream, str] = {}  # oldest first -> its source key
        self._unproven_per_source: Counter[str] = Counter()
        self._backlog: gevent.queue.Queue = gevent.queue.Queue(backlog)
        self._closed = False
        self._pump = _DatagramPump(self._sock, self._handle)

    @property
    def address(self):
        """The (host, port) the listener is bound to."""
        return self._sock.getsockname()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def unproven_count(self) -> int:
        """Sessions whose peer has not yet acknowledged anything we sent."""
        return len(self._unproven)

    def accept(self, timeout: float | None = None) -> KCPStream:
        """The next new session (already carrying the client's first data)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise OSError(9, "KCP listener is closed")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                connection = self._backlog.get(timeout=remaining)
            except gevent.queue.Empty:
                raise TimeoutError("no KCP session arrived before the timeout") from None
            if connection is not None and connection._error is None:
                return connection

    def close(self) -> None:
        """Stop listening and end every session (their peers see silence, as with kcp-go)."""
        if self._closed:
            return
        self._closed = True
        for connection in list(self._sessions.values()):
            connection._stop(ConnectionAbortedError("the KCP listener was closed"))
        self._pump.stop()
        if not self._backlog.full():
            self._backlog.put_nowait(None)  # wake a blocked accept()

    def __enter__(self) -> KCPListener:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _handle(self, datagram: bytes, address) -> KCPStream | None:
        inbound = kcp_wire.parse_datagram(datagram, self._options.crypt_header)
        if inbound is None or inbound.conv is None:
            return None
        session = self._sessions.get(address)
        if session is not None and inbound.conv == session.conv:
            session._input(inbound.kcp, len(datagram))
            return session
        if not kcp_wire.opens_session(inbound.kcp) or self._backlog.full():
            return None
        source = _source_key(address)
        replaced_unproven = session is not None and session in self._unproven
        if len(self._sessions) - (session is not None) >= self._max_sessions:
            return None
        if self._unproven_per_source[source] - replaced_unproven >= self._max_unproven_per_source:
            return None
        if session is not None:
            session._stop(ConnectionResetError(f"KCP peer {address} started a new conversation"))
        while len(self._unproven) >= self._max_unproven:
            oldest = next(iter(self._unproven))
            oldest._stop(ConnectionResetError(
                f"KCP peer {oldest.getpeername()} was dropped unproven to make room: too many unproven sessions"))
        session = KCPStream(self._sock, address, inbound.conv, self._options, self._forget,
                            limit=kcp_wire.AmplificationLimit(self._amplification_factor),
                            proof_timeout=self._proof_timeout, on_proven=self._proven)
        self._sessions[address] = session
        self._unproven[session] = source
        self._unproven_per_source[source] += 1
        self._backlog.put_nowait(session)
        session._input(inbound.kcp, len(datagram))
        return session

    def _proven(self, session: KCPStream) -> None:
        source = self._unproven.pop(session, None)
        if source is not None:
            self._unproven_per_source[source] -= 1
            if not self._unproven_per_source[source]:
                del self._unproven_per_source[source]

    def _forget(self, session: KCPStream) -> None:
        self._proven(session)  # no longer counted as unproven either
        address = session.getpeername()
        if self._sessions.get(address) is session:
            del self._sessions[address]
        try:
            self._backlog.queue.remove(session)  # never accepted: release it now, not at the next accept()
        except ValueError:
            pass


def _source_key(address) -> str:
    """What the per-source cap counts by: the IPv4 address, or the /64 of an IPv6 one."""
    host = address[0]
    if ":" not in host:
        return host
    try:
        return str(ipaddress.ip_network(f"{host.split('%')[0]}/64", strict=False))
    except ValueError:
        return host
