"""A smux session over any socket-like transport, driven by gevent.

Reading (transport -> SessionState -> wake streams) runs in the event loop's callbacks on
sockets and TLS sockets (an fd watcher, no greenlet: an idle session holds none), and in a
reader greenlet on other transports (KCP), or while reading must wait for the application
(the budget spent, a stream past its backlog, a full accept queue). Writes go out from
hub callbacks too (writer.FrameWriter); keepalive runs on the process's shared timer
(timer.py), one entry per session. All protocol rules live in state.py; this module only
moves bytes and wakes waiters.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event

from tun2g.transport.base import capabilities_of, recv_without_waiting

from .config import ACCEPT_BACKLOG, Config
from .errors import SessionClosedError
from .frame import FIN, SYN
from .state import SessionState
from .stream import Stream
from .timer import deadlines, shared_timer
from .writer import FrameWriter

# recv() this much at a time: a few frames per call at full speed, so per-call
# costs (syscall, greenlet switch, event dispatch) stay small next to the copying.
# recv() rather than recv_into(): each chunk is a fresh immutable bytes object, so
# streams can keep zero-copy views of it (measured ~1.4x faster than copying out of
# a reused buffer, see state.SessionState.receive).
READ_BUFFER_SIZE = 128 * 1024

# A stream holding more than half its backlog makes the reader wait up to this long
# for its application to catch up before reading on, so that a reader that is merely
# scheduled later than the reader greenlet never trips the reset. A stream that does
# not catch up in time gets no second grace (until it has caught up): a stuck stream
# delays the others once, by this much, before it is reset. Keep it well under the
# tun2 server's 1-s health-ping timeout.
BACKLOG_GRACE = 0.1

# While the budget is spent, the reader looks this often for a stream whose reader has
# stopped (Config.backlog_seconds), well within the tun2 server's 3-s health-ping timeout.
STALL_CHECK_INTERVAL = 0.25

# Reads one hub callback makes before it lets the loop run others (a flood cannot hold the loop).
HUB_READS = 8

# close() first lets the writer send what stream calls queued without waiting (a reply
# written just before closing, say), for at most this long.
CLOSE_FLUSH_TIMEOUT = 1.0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Session:
    """One smux session; ``client`` picks odd (client) or even (server) stream ids."""

    def __init__(self, transport, client: bool, config: Config | None = None) -> None:
        config = config if config is not None else Config()
        config.validate()
        self.config = config
        self.client = client
        self._transport = transport
        _set_nodelay(transport)
        self._state = SessionState(config, client)
        self._closed = False
        self._close_reason: Exception | None = None
        self._closed_event = Event()
        self._close_callbacks: list[Callable[[Session], None]] = []
        self._accept_queue: deque[Stream] = deque()
        self._accept_ready = Event()
        self._accept_space = Event()
        self._budget_ready = Event()
        self._drained = Event()  # an application read happened (see BACKLOG_GRACE)
        self._version_known = Event()
        if self._state.version is not None:
            self._version_known.set()
        self._writer = FrameWriter(transport, config.max_frame_size, self._state.version, self._on_write_error)
        self._reader: gevent.Greenlet | None = None  # the reader greenlet, while there is one
        self._loop = gevent.get_hub().loop
        self._deadlines = deadlines()  # the timeouts of its streams' blocked calls
        self._watcher = None  # the fd watcher of hub reads (capabilities.hub_reads)
        if capabilities_of(transport).hub_reads:
            self._recv_now, self._short_read_drains = recv_without_waiting(transport)
            self._watcher = self._loop.io(transport.fileno(), 1)
            self._resume_hub_reads()
        else:
            self._reader = gevent.spawn(self._read_loop)
        self._keepalive = None if config.keepalive_disabled else self._start_keepalive(
            config.keepalive_interval, config.keepalive_timeout)

    # --- public API ----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """True once the session has died, for whatever reason."""
        return self._closed

    @property
    def close_reason(self) -> Exception | None:
        """Why the session died (None while it is open)."""
        return self._close_reason

    @property
    def num_streams(self) -> int:
        """Streams in the table: open in at least one direction and not closed locally."""
        return len(self._state.streams)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received on this session's streams and not yet read by the application (for metrics)."""
        return sum(stream.buffered for stream in self._state.streams.values())

    @property
    def version(self) -> int | None:
        """The protocol version in use (None while an automatic client waits for the first frame)."""
        return self._state.version

    @property
    def greenlets(self) -> list[gevent.Greenlet]:
        """The session's own greenlets (all dead once it is closed); for leak checks."""
        return [g for g in (self._reader, self._writer.greenlet) if g is not None]

    @property
    def transport(self):
        """The underlying socket-like object."""
        return self._transport

    def open_stream(self) -> Stream:
        """Open a new stream; its SYN is queued after the stream is registered."""
        self._raise_if_closed()
        stream = Stream(self, self._state.open_stream())
        self._writer.send_control(SYN, stream.id)
        return stream

    def accept_stream(self, timeout: float | None = None) -> Stream:
        """Wait for the next stream the peer opens; socket.timeout after ``timeout`` seconds."""
        deadline = _deadline(timeout)
        while not self._accept_queue:
            self._raise_if_closed()
            self._accept_ready.clear()
            if not self._accept_ready.wait(_remaining(deadline)) and not self._accept_queue:
                if deadline is not None and time.monotonic() >= deadline:
                    self._raise_if_closed()
                    raise socket.timeout(f"no stream was opened by the peer within {timeout} s")
        self._raise_if_closed()
        stream = self._accept_queue.popleft()
        self._accept_space.set()
        return stream

    def upgrade(self) -> None:
        """Switch a negotiating server session (Config(version=None)) from version 1 to 2.

        Frames not yet written go out as version 2; the peer must be a tun2g client that
        asked for it (docs/protocol.md#version-negotiation). ValueError otherwise.
        """
        self._raise_if_closed()
        self._state.upgrade()
        self._writer.set_version(self._state.version)

    def set_keepalive(self, interval: float, timeout: float) -> None:
        """Change this session's keepalive (e.g. once the peer is known to be a tun2g peer)."""
        if not 0 < interval <= timeout:
            raise ValueError(f"keepalive needs 0 < interval <= timeout, got {interval} / {timeout}")
        if self._closed:
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive = self._start_keepalive(interval, timeout)

    def release_receive_buffer(self) -> None:
        """Raise the budget from Config.initial_receive_buffer to max_receive_buffer."""
        self._state.release_receive_buffer()
        if self._state.budget > 0:
            self._budget_ready.set()

    def close(self) -> None:
        """Close the session and its transport, silently (like Go: no frame is sent).

        Data that stream calls have queued is written first (within CLOSE_FLUSH_TIMEOUT),
        as Go's blocking writes would have done before their Close.
        """
        if not self._closed and gevent.getcurrent() is not gevent.get_hub():
            self._writer.flush(CLOSE_FLUSH_TIMEOUT)
        self._die(SessionClosedError("smux session closed by the local application"))

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the session is closed; False if it is still open after ``timeout`` seconds."""
        return self._closed_event.wait(timeout)

    def add_close_callback(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` once, in its own greenlet, when the session dies."""
        if self._closed:
            gevent.spawn(callback, self)
        else:
            self._close_callbacks.append(callback)

    def __repr__(self) -> str:
        role = "client" if self.client else "server"
        status = f"closed: {self._close_reason}" if self._closed else f"{self.num_streams} streams"
        return f"<smux.Session {role} v{self.version} {status}>"

    # --- used by Stream ------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise SessionClosedError(f"smux session is closed: {self._close_reason}") from self._close_reason

    def _flush_outbox(self) -> None:
        if not self._state.outbox:
            return
        writer = self._writer
        for cmd, sid, value in self._state.take_outbox():
            if cmd == FIN:
                writer.send_data(sid, None)  # behind the stream's queued data
            else:
                writer.send_control(cmd, sid, value)

    def _after_stream_call(self) -> None:
        """A stream call read or closed something: send its FIN/UPD frames, resume a paused reader."""
        self._flush_outbox()
        self._drained.set()
        if self._state.budget > 0:
            self._budget_ready.set()

    def _wait_version(self, deadline: float | None) -> bool:
        return self._version_known.wait(_remaining(deadline))

    def _die(self, reason: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._writer.close()
        try:
            self._transport.close()
        except Exception:  # noqa: BLE001 - a dying transport must not stop the clean-up below
            pass
        for stream_state in list(self._state.streams.values()):
            stream_state.handle._wake()
        for event in (self._accept_ready, self._accept_space, self._budget_ready, self._version_known,
                      self._closed_event):
            event.set()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            gevent.spawn(callback, self)

    def _on_write_error(self, error: Exception) -> None:
        if isinstance(error, ConnectionError):
            self._die(SessionClosedError(f"the peer closed the smux connection: {error}"))
        else:
            self._die(SessionClosedError(f"writing to the transport failed: {error!r}"))

    # --- greenlets -------------------------------------------------------------------

    def _resume_hub_reads(self) -> None:
        self._watcher.start(self._read_in_hub)
        self._loop.run_callback(self._read_in_hub)  # bytes already buffered (TLS) show no readiness

    def _read_in_hub(self) -> None:
        """Hub callback: read what the transport holds, without waiting, and dispatch it; hand over to a
        reader greenlet when the budget is spent or dispatching must wait for the application."""
        if self._closed or self._reader is not None:
            return
        state, recv = self._state, self._recv_now
        try:
            for _ in range(HUB_READS):
                if state.budget <= 0:
                    self._read_from_greenlet(None)
                    return
                size = self._read_size()
                try:
                    data = recv(size)
                except (BlockingIOError, ssl.SSLWantReadError):
                    return  # the watcher calls again when more comes
                if not len(data):
                    self._peer_closed()
                    return
                received = state.receive(data, keep_views=type(data) is bytes)
                if self._dispatch_must_wait(received):
                    self._read_from_greenlet(received)
                    return
                if not self._dispatch(received):
                    return
                if self._short_read_drains and len(data) < size:
                    return  # nothing more is there: the watcher calls when something comes
            self._loop.run_callback(self._read_in_hub)  # more may be waiting: after the others' turn
        except Exception as exc:
            self._read_failed(exc)

    def _dispatch_must_wait(self, received) -> bool:
        """Whether dispatching ``received`` waits: for room in the accept queue, or for a stream past half
        its backlog to be read (see _wait_for_backlogged)."""
        if received.opened and len(self._accept_queue) + len(received.opened) > ACCEPT_BACKLOG:
            return True
        return any(self._past_half_backlog(stream_state) and not stream_state.handle._grace_spent
                   for stream_state in received.changed)

    def _read_from_greenlet(self, received) -> None:
        """Reading must wait for the application: a reader greenlet takes over (dispatching ``received``
        first) until it can hand back to the hub."""
        self._watcher.stop()
        self._reader = gevent.spawn(self._read_loop, received)

    def _read_loop(self, received=None) -> None:
        state = self._state
        recv = self._transport.recv
        try:
            if received is not None and not self._dispatch(received):
                return
            while True:
                while state.budget <= 0:  # Go semantics: stop reading until the application reads
                    self._budget_ready.clear()
                    if not self._budget_ready.wait(STALL_CHECK_INTERVAL) and state.budget <= 0:
                        # backlog_seconds: a stream whose reader stopped is cut, freeing the budget.
                        for stream_state in state.reset_stalled():
                            stream_state.handle._wake()
                        self._flush_outbox()
                if self._watcher is not None:  # nothing to wait for any more: the hub reads on
                    self._reader = None
                    self._resume_hub_reads()
                    return
                data = recv(self._read_size())
                if not len(data):
                    self._peer_closed()
                    return
                # Views are safe only into immutable chunks the transport will not reuse.
                if not self._dispatch(state.receive(data, keep_views=type(data) is bytes)):
                    return
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            self._read_failed(exc)

    def _peer_closed(self) -> None:
        where = " in the middle of a frame" if self._state.decoder.in_frame else ""
        self._die(SessionClosedError(f"the peer closed the smux connection{where}"))

    def _read_failed(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionError):
            self._die(SessionClosedError(f"the peer closed the smux connection: {exc}"))
        else:
            self._die(SessionClosedError(f"reading from the transport failed: {exc!r}"))

    def _dispatch(self, received) -> bool:
        """Wake streams and queue accepts for one received chunk; False when the session died."""
        if self._writer.version != self._state.version and self._state.version is not None:
            # An automatic client learned the version, or followed the server's switch to 2.
            self._writer.set_version(self._state.version)
            self._version_known.set()
        opened = [Stream(self, stream_state) for stream_state in received.opened]
        for stream_state in received.changed:
            stream_state.handle._wake()
        self._flush_outbox()
        self._wait_for_backlogged(received.changed)
        for stream in opened:
            while len(self._accept_queue) >= ACCEPT_BACKLOG and not self._closed:
                self._accept_space.clear()
                self._accept_space.wait()
            self._accept_queue.append(stream)
            self._accept_ready.set()
        if received.error is not None:
            self._die(received.error)
        return not self._closed

    def _read_size(self) -> int:
        """How much to read next: never more than the budget left (Go overshoots by at
        most a frame too), and never more than half a backlog, so that a stream passes
        its backlog only after it was given BACKLOG_GRACE to catch up."""
        state = self._state
        size = min(READ_BUFFER_SIZE, state.budget)
        if state.backlog:
            size = min(size, state.backlog // 2)
        return max(size, 1024)

    def _past_half_backlog(self, stream_state) -> bool:
        state = self._state
        buffered = stream_state.buffered
        return buffered > state.backlog // 2 and buffered > state.stream_backlog(stream_state) // 2

    def _wait_for_backlogged(self, changed) -> None:
        """Give streams past half their backlog one chance to be read before reading on."""
        state = self._state
        deadline = None
        for stream_state in changed:
            stream = stream_state.handle
            if not self._past_half_backlog(stream_state):
                stream._grace_spent = False
                continue
            if stream._grace_spent:
                continue
            deadline = deadline or _deadline(BACKLOG_GRACE)  # one grace for the whole chunk
            while stream_state.buffered > state.stream_backlog(stream_state) // 2 and not self._closed:
                self._drained.clear()
                if not self._drained.wait(_remaining(deadline)):
                    stream._grace_spent = True
                    break

    def _start_keepalive(self, interval: float, timeout: float):
        """Go's two tickers as one shared-timer entry: each tick sends a NOP unless the session
        wrote something since the last tick, and closes the session when no frame header
        arrived for ``timeout`` (never while our own budget keeps us from reading)."""
        self._keepalive_interval, self._keepalive_timeout = interval, timeout
        self._headers_at_last_tick = self._state.decoder.headers_decoded
        self._heard_at = self._ticked_at = time.monotonic()
        self._stall_forgiven = False
        self._writes_at_last_tick = self._writer.writes
        return shared_timer().call_later(interval, self._on_keepalive_tick)

    def _on_keepalive_tick(self) -> float | None:
        if self._closed:
            return None
        now = time.monotonic()
        state = self._state
        headers = state.decoder.headers_decoded
        # A tick far behind its time means this process was stalled: the peer's frames may be
        # waiting unread in the socket, so this one tick (not two in a row) judges no timeout.
        stalled, self._ticked_at = now - self._ticked_at > 2 * self._keepalive_interval, now
        if headers != self._headers_at_last_tick or state.budget <= 0:
            self._headers_at_last_tick = headers
            self._heard_at = now
            self._stall_forgiven = False
        elif stalled and not self._stall_forgiven:
            self._stall_forgiven = True
        elif now - self._heard_at >= self._keepalive_timeout:
            self._die(SessionClosedError(f"keepalive timeout: nothing received in {self._keepalive_timeout:g} s"))
            return None
        else:
            self._stall_forgiven = False
        writer = self._writer
        if writer.version is not None:
            if writer.writes == self._writes_at_last_tick:
                writer.send_keepalive()
            self._writes_at_last_tick = writer.writes
        return self._keepalive_interval


def _set_nodelay(transport) -> None:
    """TCP_NODELAY on TCP transports: smux frames are small and latency-sensitive."""
    if not capabilities_of(transport).tcp:
        return
    try:
        transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
