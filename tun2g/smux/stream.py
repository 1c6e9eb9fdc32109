"""A smux stream with a socket-like interface (recv/send/makefile/shutdown/timeouts)."""

from __future__ import annotations

import io
import socket
import time
from typing import Callable

from gevent import get_hub
from gevent.event import Event

from tun2g.transport.base import Capabilities, CloseWatch

from .errors import ProtocolError, SessionClosedError, StreamResetError
from .state import StreamState

# One send() hands at most this much to the writer, so that a huge sendall from one
# stream still interleaves with other streams' frames.
WRITE_CHUNK = 128 * 1024

# send() returns as soon as its bytes are queued while the session's writer holds at
# most this much unwritten payload; past it, send() waits until its bytes are written
# (backpressure). Returning at once saves the sender two greenlet switches per call
# and lets a response and the FIN after it leave in one write.
QUEUE_WITHOUT_WAITING = 256 * 1024

_PLACEHOLDER_ADDRESS = ("0.0.0.0", 0)


class Stream:
    """One bidirectional byte stream inside a smux Session; create it with Session.open_stream/accept_stream."""

    # A ByteStream (tun2g.transport.base): shutdown(SHUT_WR) sends a FIN and leaves reading open;
    # the peer leaving is told to `on_peer_closed` (a stream cannot be peeked at).
    capabilities = Capabilities(half_close=True, close_watch=CloseWatch.NOTIFY)

    def __init__(self, session, state: StreamState) -> None:
        self.session = session
        self._state = state
        state.handle = self
        self._readable = Event()
        self._writable = Event()
        self._timeout: float | None = None
        self._grace_spent = False  # the session's reader already waited once for this stream to catch up
        # smux 1.5.16 has no half-close: a FIN means the peer dropped the stream both ways.
        # Upstream 1.5.54+ lets a peer keep reading after its FIN, so writes stay allowed
        # by default; tun2 clients set this, since a tun2 server's FIN ends the exchange.
        self.peer_fin_ends_writes = False
        self._on_peer_closed: Callable[[], None] | None = None
        self._on_readable: Callable[[], None] | None = None

    @property
    def id(self) -> int:
        """The smux stream id."""
        return self._state.sid

    @property
    def closed(self) -> bool:
        """True after close() (or a reset): this side will neither read nor write any more."""
        return self._state.read_closed and self._state.fin_sent

    @property
    def is_finished(self) -> bool:
        """True when both sides have sent FIN (or the stream was closed locally)."""
        return not self._state.registered

    @property
    def reusable(self) -> bool:
        """Open both ways with nothing unread and no FIN or reset: it may carry another exchange."""
        state = self._state
        return (state.registered and not state.chunks and not state.fin_received and not state.fin_sent
                and not state.read_closed and state.reset_message is None and not self.session.is_closed)

    @property
    def fin_received(self) -> bool:
        """True once the peer has sent FIN (it will send no more data)."""
        return self._state.fin_received

    @property
    def peer_closed(self) -> bool:
        """True when the peer can take no more of our data: a reset, the session gone, or (with
        ``peer_fin_ends_writes``) its FIN."""
        state = self._state
        return (state.reset_message is not None or self.session.is_closed
                or (state.fin_received and self.peer_fin_ends_writes))

    def on_peer_closed(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once, from the event loop, when `peer_closed` becomes true (at once if it is);
        None unregisters. One callback at a time (a later one replaces it)."""
        self._on_peer_closed = callback
        if callback is not None and self.peer_closed:
            self._notify_peer_closed()

    @property
    def readable_now(self) -> bool:
        """recv() would return without waiting: data, EOF, a reset, or the session gone."""
        state = self._state
        return bool(state.chunks) or state.fin_received or state.read_closed or state.reset_message is not None \
            or self.session.is_closed

    def on_readable(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback``, from the event loop, each time the stream may have become `readable_now`
        (at once if it is); it reads what is there without waiting. None unregisters. A reader that
        holds no greenlet between messages (the server's control stream)."""
        self._on_readable = callback
        if callback is not None and self.readable_now:
            get_hub().loop.run_callback(callback)

    def __repr__(self) -> str:
        return f"<smux.Stream {self.id} {self._state!r}>"

    # --- timeouts, socket look-alikes ---------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        """None blocks, 0 never blocks (BlockingIOError), t > 0 raises socket.timeout after t seconds."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or a non-negative number of seconds")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getpeername(self):
        return self._transport_address("getpeername")

    def getsockname(self):
        return self._transport_address("getsockname")

    def _transport_address(self, name: str):
        method = getattr(self.session.transport, name, None)
        try:
            return method() if method is not None else _PLACEHOLDER_ADDRESS
        except OSError:
            return _PLACEHOLDER_ADDRESS

    def fileno(self) -> int:
        return -1

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes; b"" at EOF (peer FIN, or local shutdown/close)."""
        if bufsize <= 0 or not self._wait_readable():
            return b""
        data = self.session._state.read(self._state, bufsize)
        self.session._after_stream_call()
        return data

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Read into ``buffer`` (at most ``nbytes`` if given); 0 at EOF."""
        target = memoryview(buffer).cast("B")
        if nbytes:
            target = target[:nbytes]
        if not len(target) or not self._wait_readable():
            return 0
        count = self.session._state.read_into(self._state, target)
        self.session._after_stream_call()
        return count

    def recv_nowait(self, bufsize: int) -> bytes | None:
        """Up to ``bufsize`` bytes already here, never waiting: None when none has come, b"" at EOF;
        raises like recv on a reset or a dead session (for a reader driven by `on_readable`)."""
        state = self._state
        if not state.chunks:
            return b"" if self._at_end() else None
        data = self.session._state.read(state, bufsize)
        self.session._after_stream_call()
        return data

    def peek_first_byte(self) -> bytes:
        """The next unread byte, left unread (b"" at EOF); waits like recv.

        Lets a reader choose how to read a stream (tun2g's TCP preamble or HTTP) by its first byte.
        """
        if not self._wait_readable():
            return b""
        return bytes(memoryview(self._state.chunks[0])[:1])

    def _wait_readable(self) -> bool:
        """True when data is buffered, False at EOF; raises on reset, dead session or timeout."""
        state = self._state
        deadline = None
        while not state.chunks:
            if self._at_end():
                return False
            deadline = self._wait(self._readable, deadline, "reading")
        return True

    def _at_end(self) -> bool:
        """With nothing buffered: True at EOF (FIN, or closed for reading), False while more may come;
        raises on a reset or a dead session."""
        state = self._state
        if state.reset_message is not None:
            raise StreamResetError(state.reset_message)
        if state.fin_received or state.read_closed:
            return True
        self.session._raise_if_closed()
        return False

    # --- writing ------------------------------------------------------------------

    def send(self, data) -> int:
        """Send some of ``data``; returns how many bytes were written to the session."""
        view = memoryview(data).cast("B")
        session, state = self.session, self._state
        deadline = None
        while True:
            self._check_writable()
            if session.version is None:
                deadline = self._wait_version(deadline)
                continue
            try:
                window = session._state.send_window(state)
            except ProtocolError as exc:  # the peer's UPD made no sense: the session cannot go on
                session._die(exc)
                session._raise_if_closed()
            if window > 0 or not len(view):
                break
            if state.fin_received:  # v2: no window update can come any more (Go returns EOF)
                raise BrokenPipeError(f"stream {self.id}: the peer closed the stream and reads no more")
            deadline = self._wait(self._writable, deadline, "writing (the peer's window is full)")
        if not len(view):
            return 0
        size = min(len(view), window, WRITE_CHUNK)
        session._state.record_sent(state, size)
        chunk = view[:size]
        writer = session._writer
        if self._timeout == 0 or writer.queued_bytes + size <= QUEUE_WITHOUT_WAITING:
            # Queued without waiting: keep a copy unless the caller cannot change the bytes.
            writer.send_data(state.sid, chunk if type(chunk.obj) is bytes else bytes(chunk))
            return size
        request = writer.send_data(state.sid, chunk)
        self._wait_written(request, size, deadline)
        return size

    def sendall(self, data) -> None:
        """Send all of ``data``: queued for the writer, blocking while too much is queued already.

        As with a socket, an error the writer meets later surfaces on a later call.
        """
        view = memoryview(data).cast("B")
        while len(view):
            view = view[self.send(view):]

    def send_nowait(self, data: bytes) -> bool:
        """Send all of a small ``data`` now or nothing (False): never waits for the peer's window or
        the writer, and writes directly when the session's writer is idle (the liveness ping)."""
        if not self._room_now(len(data)):
            return False
        self.session._writer.send_data_now(self._state.sid, bytes(data))
        return True

    def queue_nowait(self, data: bytes) -> bool:
        """Queue all of ``data`` for the session's writer or nothing (False): never waits for the peer's
        window or the writer. What streams queue in one turn of the loop leaves in one write (a relayed
        response: at many connections, many responses per write)."""
        if self.session._writer.queued_bytes + len(data) > QUEUE_WITHOUT_WAITING or not self._room_now(len(data)):
            return False
        self.session._writer.send_data(self._state.sid, data)
        return True

    def _room_now(self, size: int) -> bool:
        """Whether ``size`` bytes may be sent now, and if so count them as sent (the peer's window)."""
        session, state = self.session, self._state
        try:
            self._check_writable()
            if session.version is None or session._state.send_window(state) < size:
                return False
        except (OSError, SessionClosedError, ProtocolError):
            return False
        session._state.record_sent(state, size)
        return True

    def _check_writable(self) -> None:
        state = self._state
        if state.reset_message is not None:
            raise StreamResetError(state.reset_message)
        self.session._raise_if_closed()
        if state.fin_sent:
            raise BrokenPipeError(f"stream {self.id} was shut down for writing; no more data can be sent")
        if state.fin_received and self.peer_fin_ends_writes:
            raise BrokenPipeError(f"stream {self.id}: the peer closed it (FIN); it reads no more")

    def _wait_version(self, deadline: float | None) -> float | None:
        deadline = self._start_deadline(deadline, "writing (the peer has not spoken yet)")
        if not self.session._wait_version(None if deadline is None else max(0.0, deadline - time.monotonic())):
            self._raise_timeout("writing (the peer has not spoken yet)")
        return deadline

    def _wait_written(self, request, size: int, deadline: float | None) -> None:
        """Past the queue limit, Go semantics: send() returns once its frames are written to the transport."""
        deadline = self._start_deadline(deadline, "writing")
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not request.wait(timeout):
            if self.session._writer.cancel(request):
                self.session._state.record_sent(self._state, -size)
                self._raise_timeout("writing")
            request.wait()  # already being written: the bytes are on their way
        if request.failed:
            self.session._raise_if_closed()
            raise BrokenPipeError(f"stream {self.id}: the session stopped before the data was sent")

    # --- closing ------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """SHUT_WR sends FIN (we may still read); SHUT_RD drops unread and future data; SHUT_RDWR both."""
        state = self.session._state
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            state.shutdown_read(self._state)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            state.shutdown_write(self._state)
        self.session._after_stream_call()
        self._wake()

    def close(self) -> None:
        """Send FIN unless sent, drop unread data and forget the stream (idempotent)."""
        self.session._state.close_stream(self._state)
        self.session._after_stream_call()
        self._wake()

    def makefile(self, mode: str = "r", buffering: int | None = None, *,
                 encoding: str | None = None, errors: str | None = None, newline: str | None = None):
        """A file object over the stream, like socket.makefile (closing it leaves the stream open)."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only 'r', 'w' and 'b' are supported)")
        reading, writing = "r" in mode, "w" in mode
        if not (reading or writing):
            reading = True
        raw = StreamIO(self, reading, writing)
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        if reading and writing:
            buffered = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffered = io.BufferedReader(raw, buffering)
        else:
            buffered = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffered
        text = io.TextIOWrapper(buffered, encoding, errors, newline)
        text.mode = mode
        return text

    # --- waiting --------------------------------------------------------------------

    def _wake(self) -> None:
        """Something changed (data, FIN, UPD, reset, session death): re-check blocked calls."""
        self._readable.set()
        self._writable.set()
        if self._on_peer_closed is not None and self.peer_closed:
            self._notify_peer_closed()
        if self._on_readable is not None and self.readable_now:
            get_hub().loop.run_callback(self._on_readable)  # never in the middle of the reader's frame

    def _notify_peer_closed(self) -> None:
        # Deferred to the loop: the session's reader (calling _wake) must not run the watcher's
        # clean-up (closing a backend socket, waking its reader) in the middle of a frame.
        callback, self._on_peer_closed = self._on_peer_closed, None
        if callback is not None:
            get_hub().loop.run_callback(callback)

    def _start_deadline(self, deadline: float | None, what: str) -> float | None:
        if deadline is not None or self._timeout is None:
            return deadline
        if self._timeout == 0:
            raise BlockingIOError(f"stream {self.id}: {what} would block")
        return time.monotonic() + self._timeout

    def _wait(self, event: Event, deadline: float | None, what: str) -> float | None:
        """Block on ``event`` until it is set or the stream's deadline passes; the caller re-checks
        its condition and calls again, and a call past the deadline raises the timeout."""
        deadline = self._start_deadline(deadline, what)
        event.clear()
        if deadline is None:
            event.wait()
        elif time.monotonic() >= deadline:
            self._raise_timeout(what)
        else:
            deadlines = self.session._deadlines
            watch = deadlines.wake_at(deadline, event)
            try:
                event.wait()
            finally:
                deadlines.cancel(watch)
        return deadline

    def _raise_timeout(self, what: str) -> None:
        raise socket.timeout(f"stream {self.id}: timed out {what} after {self._timeout} s")


class StreamIO(io.RawIOBase):
    """The raw file object behind Stream.makefile (wrap it in io.Buffered*)."""

    def __init__(self, stream: Stream, reading: bool, writing: bool) -> None:
        super().__init__()
        self._stream = stream
        self._reading = reading
        self._writing = writing

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def readinto(self, buffer) -> int:
        self._checkClosed()
        return self._stream.recv_into(buffer)

    def write(self, data) -> int:
        self._checkClosed()
        return self._stream.send(data)

    @property
    def name(self) -> str:
        return f"<smux stream {self._stream.id}>"
