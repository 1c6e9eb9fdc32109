"""One KCP conversation as a socket-like byte stream, over C ikcp (siokcp).

The ARQ itself is skywind3000's C ikcp, wire-identical to kcp-go's
(docs/protocol.md#kcp-segment), through the ``siokcp`` binding: sans-I/O, uint32 conv,
settable stream mode and windows, ``check()`` for timer scheduling. Around it
this module applies kcp-go's rules: writes cut to one mss per message, write
admission by window, flush on every write, flush after input when the send
window slid (or always with ``ack_nodelay``). Datagrams arrive through
``_input``/``_after_input`` from the socket's reader (see kcp.py).
"""

from __future__ import annotations

import dataclasses
import errno
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.lock
import siokcp
from gevent.event import Event

from tun2g.transport import kcp_wire

# kcp-go's NewKCP sets rmt_wnd to 32 until the peer's first segment says otherwise.
INITIAL_REMOTE_WINDOW = 32


@dataclass(frozen=True)
class KCPOptions:
    """KCP knobs; the defaults are kcp-go's ``Dial``/``Listen`` defaults (docs/protocol.md#kcp-profiles).

    ``mtu`` is the whole UDP payload, headers included; ``crypt_header`` adds
    the 20-byte nonce + CRC32 header (kcptun ``--crypt none``); ``idle_timeout``
    (seconds, None = never) closes a connection that received nothing valid
    for that long: KCP itself has no close segment and no liveness check.
    """

    nodelay: bool = False
    interval: int = 100
    resend: int = 0
    nc: bool = False
    snd_wnd: int = 32
    rcv_wnd: int = 32
    mtu: int = 1400
    stream_mode: bool = False
    ack_nodelay: bool = False
    crypt_header: bool = False
    idle_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        smallest = self.overhead + 50  # ikcp_setmtu refuses less than 50
        if not smallest <= self.mtu <= kcp_wire.MAX_DATAGRAM_SIZE:
            raise ValueError(f"KCP mtu {self.mtu} is out of range: use {smallest}..1500"
                             " (the whole UDP payload; kcp-go reads 1500-byte datagrams)")
        if not 10 <= self.interval <= 5000:
            raise ValueError(f"KCP interval {self.interval} ms is out of range: use 10..5000 like kcp-go")
        if self.snd_wnd < 1 or self.rcv_wnd < 1:
            raise ValueError("KCP windows must be at least 1 segment")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("KCP idle_timeout must be positive seconds, or None to never reap")

    @classmethod
    def fast(cls, **changes) -> KCPOptions:
        """A preset for throughput that any kcp-go peer on defaults still understands.

        It only changes local timing and windows (segments stay frg 0, no new
        headers): nodelay, 10 ms ticks, fast resend, no congestion window,
        1024-segment windows, stream mode, ACKs flushed right after input.
        """
        preset = cls(nodelay=True, interval=10, resend=2, nc=True, snd_wnd=1024, rcv_wnd=1024,
                     stream_mode=True, ack_nodelay=True)
        return dataclasses.replace(preset, **changes)

    @property
    def overhead(self) -> int:
        """Bytes kcp-go framing adds in front of the KCP segments of each datagram."""
        return kcp_wire.CRYPT_HEADER_SIZE if self.crypt_header else 0


def _discard_output(_datagram: bytes) -> int:
    return 0


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "KCP connection is closed")


class KCPStream:
    """One KCP conversation as a socket-like byte stream (recv/sendall/close...).

    Made by :func:`kcp_dial` or :meth:`KCPListener.accept`. Writes are cut to
    at most one mss per KCP message so frg stays 0, as kcp-go does; reads
    return bytes regardless of how the peer cut its segments.
    """

    def __init__(self, sock, peer, conv: int, options: KCPOptions,
                 on_close: Callable[[KCPStream], None], *,
                 limit: kcp_wire.AmplificationLimit | None = None, proof_timeout: float = 3.0,
                 on_proven: Callable[[KCPStream], None] | None = None):
        self._sock = sock
        self._peer = peer
        self._options = options
        self._on_close = on_close
        # A listener's session starts unproven (docs/protocol.md#unproven-peers):
        # ``limit`` caps what we send until the peer ACKs one of our segments.
        self._limit = limit
        self._proof_timeout = proof_timeout
        self._on_proven = on_proven
        self._held = False  # new data waits for the peer's proof
        self._wanting_since: float | None = None
        # ts on the wire is this clock: a random origin makes our ACKed ts the proof.
        self._clock_offset = secrets.randbits(32)
        self._ikcp = siokcp.KCPConnection(conv, self._output, _discard_output)
        self._configure_core(options)
        self._mss = self._ikcp.mss
        self._inbox = bytearray()
        self._readable = Event()
        self._writable = Event()
        self._write_lock = gevent.lock.Semaphore()
        self._timeout: float | None = None
        self._error: OSError | None = None
        self._read_shut = self._write_shut = False
        self._closed = False
        self._input_since_tick = False
        self._parked = False
        self._unpark = Event()
        self._una_flushed = 0
        self._last_input = time.monotonic()
        self.datagrams_dropped = 0
        self.datagrams_withheld = 0  # by the amplification limit
        self._ikcp.update(self._now_ms())  # ikcp ignores flush() until its first update
        self._updater = gevent.spawn(self._run_timers)

    def _configure_core(self, options: KCPOptions) -> None:
        core = self._ikcp
        core.setmtu(options.mtu - options.overhead)
        core.nodelay(int(options.nodelay), options.interval, options.resend, int(options.nc))
        # Set directly: ikcp_wndsize() would raise rcv_wnd to ikcp's minimum of 128.
        core.snd_wnd, core.rcv_wnd = options.snd_wnd, options.rcv_wnd
        core.rmt_wnd = INITIAL_REMOTE_WINDOW
        core.stream = int(options.stream_mode)

    # ---- socket-like API -------------------------------------------------

    @property
    def conv(self) -> int:
        """The KCP conversation id (the client picks it; the listener adopts it)."""
        return self._ikcp.conv

    @property
    def options(self) -> KCPOptions:
        return self._options

    @property
    def proven(self) -> bool:
        """True once the peer showed it receives what we send (always, for a dialed connection)."""
        return self._limit is None or self._limit.proven

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize bytes; b"" after shutdown(SHUT_RD). Raises on a dead or closed connection."""
        if bufsize <= 0:
            return b""
        deadline = self._deadline()
        while not self._pull(bufsize):
            if self._read_shut:
                return b""
            self._wait(self._readable, deadline)
        data = bytes(self._inbox[:bufsize])
        del self._inbox[:bufsize]
        return data

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Like socket.recv_into: fill buffer with up to nbytes (0 = its size)."""
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    def send(self, data) -> int:
        """Queue as much of data as the send window admits (at least one byte); return the count."""
        view = memoryview(data).cast("B")
        if not view:
            return 0
        deadline = self._deadline()
        while True:
            self._check_writable()
            queued = self._enqueue(view)
            if queued:
                self._flush()
                return queued
            self._wait(self._writable, deadline)

    def sendall(self, data) -> None:
        """Queue all of data, waiting for send window as needed; concurrent callers don't interleave."""
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        with self._write_lock:
            while view:
                self._check_writable()
                queued = self._enqueue(view)
                if queued:
                    view = view[queued:]
                    self._flush()
                else:
                    self._wait(self._writable, deadline)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def getpeername(self):
        return self._peer

    def getsockname(self):
        return self._sock.getsockname()

    def shutdown(self, how: int) -> None:
        """Stop reading and/or writing locally; KCP has nothing to tell the peer."""
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._read_shut = True
            self._readable.set()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._write_shut = True
            self._writable.set()

    def close(self) -> None:
        """Flush once and stop, like kcp-go's Close (no segment announces it)."""
        self._closed = True
        self._stop(_closed_error())

    def __enter__(self) -> KCPStream:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._error else "open"
        return f"<KCPStream conv={self.conv:#010x} peer={self._peer} {state}>"

    # ---- data path ---------------------------------------------------------

    def _enqueue(self, view: memoryview) -> int:
        """Hand mss-sized pieces to ikcp while kcp-go's write admission rule holds."""
        core, mss = self._ikcp, self._mss
        limit = self._limit
        per_segment = kcp_wire.SEGMENT_HEADER_SIZE + self._options.overhead
        queued = 0
        self._held = False
        while queued < len(view) and core.waitsnd() < min(core.snd_wnd, core.rmt_wnd):
            size = mss
            allowed = None if limit is None else limit.admissible(per_segment)
            if allowed is not None:
                if allowed <= 0:
                    self._held = True  # until the peer proves itself or sends more
                    break
                size = min(size, allowed)
            piece = view[queued : queued + size]
            core.send(piece)
            if allowed is not None:
                limit.admit(len(piece), per_segment)
            queued += len(piece)
        if queued and self._parked:
            self._unpark.set()  # retransmission timers are needed again
        return queued

    def _pull(self, wanted: int) -> bool:
        """Move delivered segments into the inbox until it holds wanted bytes; True if not empty.

        Segments stay in ikcp's receive queue until the application reads, so
        a slow reader shrinks the advertised window exactly as in kcp-go.
        """
        core = self._ikcp
        if self._closed:
            raise _closed_error()  # unread data is gone with the connection, as with a socket
        window_was_full = core.nrcv_que >= core.rcv_wnd
        while len(self._inbox) < wanted:
            segment = core.next_event()
            if segment is None:
                break
            self._inbox += segment
        if window_was_full and core.nrcv_que < core.rcv_wnd:
            self._flush()  # ikcp queued a window-update (WINS); tell the stalled sender now
        if not self._inbox and self._error is not None:
            raise type(self._error)(*self._error.args)
        return bool(self._inbox)

    def _now_ms(self) -> int:
        return (int(time.monotonic() * 1000) + self._clock_offset) & 0xFFFFFFFF

    def _flush(self) -> None:
        self._ikcp.current = self._now_ms()
        self._ikcp.flush()
        self._una_flushed = self._ikcp.snd_una

    def _output(self, datagram: bytes) -> int:
        # Called by ikcp inside flush(): must not yield, so a full socket buffer
        # drops the datagram; KCP retransmits it like any loss. So does the
        # amplification limit with a datagram over an unproven peer's budget.
        wire = kcp_wire.encode_datagram(datagram, self._options.crypt_header)
        limit = self._limit
        if limit is not None and not limit.proven:
            if not limit.may_send(len(wire)):
                self.datagrams_withheld += 1
                return 0
            limit.on_sent(len(wire), datagram)
        try:
            self._sock.sendto(wire, self._peer)
        except OSError:
            self.datagrams_dropped += 1
        return 0

    def _input(self, kcp_bytes: bytes, wire_size: int | None = None) -> None:
        """Feed one datagram's segments (called by the pump; settle with _after_input).

        ``wire_size`` is the whole datagram's size, what the amplification limit counts.
        """
        limit = self._limit
        if limit is not None and not limit.proven:
            if limit.on_receive(len(kcp_bytes) if wire_size is None else wire_size, kcp_bytes):
                self._held = False
                self._wanting_since = None
                self._writable.set()  # held data may go now
                if self._on_proven is not None:
                    self._on_proven(self)
        self._ikcp.current = self._now_ms()
        if self._ikcp.receive_data(kcp_bytes) == 0:
            self._last_input = time.monotonic()
            self._input_since_tick = True
            if self._parked:
                self._unpark.set()

    def _after_input(self) -> None:
        """kcp-go's post-input rules: flush if the send window slid (or ack_nodelay), wake waiters."""
        core = self._ikcp
        if self._error is not None:
            return
        if self._options.ack_nodelay or core.snd_una != self._una_flushed:
            self._flush()
        if core.peeksize() >= 0:
            self._readable.set()
        if core.waitsnd() < min(core.snd_wnd, core.rmt_wnd):
            self._writable.set()

    def _run_timers(self) -> None:
        """Drive ikcp's clock: tick as ``check()`` asks while there is work, park while idle.

        Idle means nothing unacknowledged, no input since the last tick (so no
        ACK is owed) and an open remote window (so no probe is due). A parked
        connection costs no wake-ups; input or a write unparks it.
        """
        core = self._ikcp
        while self._error is None:
            now = self._now_ms()
            core.update(now)
            self._una_flushed = core.snd_una
            if core.waitsnd() < min(core.snd_wnd, core.rmt_wnd):
                self._writable.set()
            silence = time.monotonic() - self._last_input
            idle_timeout = self._options.idle_timeout
            if idle_timeout is not None and silence > idle_timeout:
                self._stop(ConnectionResetError(
                    f"KCP peer {self._peer} sent nothing for {idle_timeout:g} s: it is gone or unreachable;"
                    " dial again"))
                return
            if self._proof_overdue(silence):
                self._stop(ConnectionResetError(
                    f"KCP peer {self._peer} never acknowledged what we sent (or went silent after one datagram)"
                    f" for {self._proof_timeout:g} s: dropped as a possibly spoofed source"))
                return
            unproven = not self.proven
            busy = (self._input_since_tick or core.waitsnd() > 0 or core.rmt_wnd == 0
                    or (unproven and self._held))
            self._input_since_tick = False
            if busy:
                gevent.sleep(((core.check(now) - now) & 0xFFFFFFFF) / 1000)
            else:
                wake = [] if idle_timeout is None else [idle_timeout - silence]
                if self._only_opened():
                    wake.append(self._proof_timeout - silence)
                self._parked = True
                self._unpark.clear()
                self._unpark.wait(max(0.0, min(wake)) if wake else None)
                self._parked = False

    def _only_opened(self) -> bool:
        """True while an unproven peer has sent nothing but the datagram that opened the session."""
        return self._limit is not None and not self._limit.proven and self._limit.datagrams_received <= 1

    def _proof_overdue(self, silence: float) -> bool:
        """True if an unproven peer left our data unacknowledged for proof_timeout, or fell silent after one datagram.

        A peer we never wrote to cannot prove anything: it is kept (it only gets
        ACKs, less than it sent) unless it sent a single datagram and went quiet,
        which is what a forged one looks like.
        """
        if self.proven:
            return False
        if silence > self._proof_timeout and self._only_opened():
            return True
        if not (self._held or self._ikcp.waitsnd() > 0):
            self._wanting_since = None
            return False
        now = time.monotonic()
        if self._wanting_since is None:
            self._wanting_since = now
        return now - self._wanting_since > self._proof_timeout

    # ---- lifecycle ---------------------------------------------------------

    def _stop(self, error: OSError) -> None:
        if self._error is not None:
            return
        self._flush()
        self._error = error
        self._ikcp.send_cb = _discard_output  # break the core -> self reference cycle
        self._readable.set()
        self._writable.set()
        if gevent.getcurrent() is not self._updater:
            self._updater.kill(block=False)
        self._on_close(self)

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _wait(self, event: Event, deadline: float | None) -> None:
        event.clear()
        if deadline is None:
            event.wait()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not event.wait(remaining):
            if self._timeout == 0:
                raise BlockingIOError(11, "KCP connection would block")
            raise TimeoutError("timed out waiting on the KCP connection")

    def _check_writable(self) -> None:
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        if self._write_shut:
            raise BrokenPipeError(32, "KCP connection was shut down for writing")
