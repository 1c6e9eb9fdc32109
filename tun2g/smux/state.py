"""smux session and stream state as pure code: bytes and calls in, events and frames out.

No sockets and no greenlets here. The driver (session.py) feeds received bytes to
``SessionState.receive`` and sends what ``take_outbox`` returns; the application
side calls the read/close/shutdown/window methods. Rules: docs/protocol.md#smux.
"""

from __future__ import annotations

import time
from collections import deque

from .config import INITIAL_PEER_WINDOW, Config
from .errors import ProtocolError, StreamIdsExhaustedError
from .frame import FIN, PSH, SYN, UPD, VERSION_1, VERSION_2, FrameDecoder

_UINT32 = 0xFFFFFFFF

# Memory accounting (docs/protocol.md#memory-bounds). Each entry of a stream's chunk
# deque costs about this much beyond its payload (deque slot, object header, or a
# memoryview's 184 bytes spread over at least VIEW_MIN payload bytes); the budget and
# the backlog count it, so that 2-byte frames cannot pin 30 times their size.
CHUNK_OVERHEAD = 64
# Pieces smaller than this are copied and appended to a bytearray at the tail of the
# stream's chunks (up to COALESCE_LIMIT bytes each) instead of becoming entries of their own.
VIEW_MIN = 4096
COALESCE_LIMIT = 64 * 1024
# A peer that opens more streams than this on a session that accepts none is not a
# tun2 client: the session ends (each refusal costs us a queued FIN).
MAX_REFUSED_STREAMS = 64
# backlog_seconds measures a stream's read rate over windows of this many seconds; a
# stream not read for a whole window counts as read at the rate of that window (so 0).
RATE_WINDOW = 1.0

# An outgoing control frame: (cmd, sid, (consumed, window) for UPD else None).
OutgoingFrame = tuple


def _int32(value: int) -> int:
    """Reinterpret a uint32 as int32, as Go's smux does for its window arithmetic."""
    value &= _UINT32
    return value - (1 << 32) if value & 0x80000000 else value


class StreamState:
    """One stream's buffers, half-close flags and v2 window counters."""

    __slots__ = ("sid", "chunks", "buffered", "fin_received", "fin_sent", "read_closed", "reset_message",
                 "registered", "num_read", "read_since_update", "num_written", "peer_consumed", "peer_window",
                 "handle", "bytes_read", "rate_mark_at", "rate_mark_bytes", "read_rate", "last_read_at")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.chunks: deque[bytes | bytearray | memoryview] = deque()  # received payload not yet read
        self.buffered = 0  # sum of len(chunks); the budget also counts CHUNK_OVERHEAD per entry
        self.bytes_read = 0  # all bytes the application has read (for the v1 read rate)
        self.rate_mark_at: float | None = None  # v1 backlog_seconds: start of the current rate window
        self.rate_mark_bytes = 0  # bytes_read at rate_mark_at
        self.read_rate = 0.0  # bytes/s over the last complete window (RATE_WINDOW)
        self.last_read_at = 0.0
        self.fin_received = False  # the peer sent FIN: EOF once chunks are drained
        self.fin_sent = False  # we sent FIN: no more writes
        self.read_closed = False  # shutdown(SHUT_RD), close() or reset: incoming data is dropped
        self.reset_message: str | None = None  # why the stream was reset locally
        self.registered = True  # still in the session's stream table
        self.num_read = 0  # v2: bytes the application has read, uint32
        self.read_since_update = 0  # v2: bytes read since the last UPD we sent
        self.num_written = 0  # v2: payload bytes sent, uint32
        self.peer_consumed = 0  # v2: the peer's last reported numRead
        self.peer_window = INITIAL_PEER_WINDOW  # v2: the peer's last advertised window
        self.handle = None  # opaque slot for the I/O layer's stream object

    @property
    def at_eof(self) -> bool:
        """Nothing buffered and nothing more will come."""
        return not self.chunks and (self.fin_received or self.read_closed)

    def __repr__(self) -> str:
        return (f"<StreamState {self.sid} buffered={self.buffered} fin_received={self.fin_received} "
                f"fin_sent={self.fin_sent} registered={self.registered}>")


class Received:
    """What one chunk of received bytes changed (a plain slotted class: one per read)."""

    __slots__ = ("opened", "changed", "error")

    def __init__(self) -> None:
        self.opened: list[StreamState] = []  # new streams for accept, in SYN order
        self.changed: set[StreamState] = set()  # got data, FIN, UPD or a reset
        self.error: ProtocolError | None = None  # the peer misbehaved; the session must end


class SessionState:
    """The stream table, the session receive budget and the frames waiting to be sent."""

    def __init__(self, config: Config, client: bool) -> None:
        self.config = config
        self.client = client
        negotiated = config.version is None
        # A negotiating client adopts the first frame's version and follows a switch to 2;
        # a negotiating server starts in 1 and switches when upgrade() is called.
        self.decoder = FrameDecoder(config.version if client or not negotiated else VERSION_1,
                                    upgradable=negotiated and client)
        self._version = self.decoder.version
        self.negotiable = negotiated and not client  # upgrade() still possible
        self.streams: dict[int, StreamState] = {}
        # Go's bucket: the reader pauses while it is <= 0. Payload plus CHUNK_OVERHEAD per chunk.
        self.budget = config.initial_receive_buffer or config.max_receive_buffer
        self._budget_held_back = config.max_receive_buffer - self.budget
        self._next_id = 1 if client else 0
        self._ids_exhausted = False
        self.refused_streams = 0
        self.outbox: list[OutgoingFrame] = []  # read it with take_outbox()
        self.backlog = config.stream_backlog(self._version) if self._version else 0
        self.clock = time.monotonic

    @property
    def version(self) -> int | None:
        """The version we speak; None until an automatic client has seen the first frame."""
        return self._version

    def upgrade(self) -> None:
        """A negotiating server switches to version 2 now (docs/protocol.md#version-negotiation).

        From here on we send version 2 and run its flow control; the decoder accepts the
        peer's version-1 frames until its first version-2 frame, then only version 2.
        """
        if not self.negotiable or self._version != VERSION_1:
            raise ValueError("only a negotiating server (Config(version=None)) still in version 1 can upgrade")
        self.negotiable = False
        self._version = VERSION_2
        self.decoder.upgradable = True
        self.backlog = self.config.stream_backlog(VERSION_2)

    def release_receive_buffer(self) -> None:
        """Raise the budget from initial_receive_buffer to max_receive_buffer (once)."""
        self.budget += self._budget_held_back
        self._budget_held_back = 0

    def take_outbox(self) -> list[OutgoingFrame]:
        """Control frames (FIN, UPD) that state changes produced, oldest first; clears them."""
        frames, self.outbox = self.outbox, []
        return frames

    # --- opening -----------------------------------------------------------------

    def open_stream(self) -> StreamState:
        """Allocate the next id (client 3, 5, ...; server 2, 4, ...) and register the stream.

        The caller sends the SYN; registering first means no reply can be lost.
        """
        sid = self._next_id + 2
        while sid in self.streams:  # a misbehaving peer opened one of our ids; Go would clobber it
            sid += 2
        if self._ids_exhausted or sid > _UINT32:
            self._ids_exhausted = True
            raise StreamIdsExhaustedError(
                "no stream ids left on this smux session (go-away); open a new session")
        self._next_id = sid
        stream = StreamState(sid)
        self.streams[sid] = stream
        return stream

    # --- receiving ---------------------------------------------------------------

    def receive(self, data, keep_views: bool = False) -> Received:
        """Apply received bytes; arbitrary chunking is fine.

        With ``keep_views`` (``data`` must then be immutable, e.g. bytes) streams keep
        zero-copy views of large payload pieces instead of copies. Small pieces are
        still copied, so a view never pins a buffer more than 8 times its own size.
        """
        result = Received()
        events = self.decoder.feed(data)
        self._min_view = max(len(data) >> 3, VIEW_MIN) if keep_views else 1 << 62
        decoded = self.decoder.version
        if decoded != self._version and (self._version is None or decoded == VERSION_2):
            # A client learned the version, or followed the server's switch to 2.
            self._version = decoded
            self.backlog = self.config.stream_backlog(decoded)
        self._receive(events, result)
        result.error = self.decoder.error
        return result

    def _receive(self, events, result: Received) -> None:
        streams = self.streams
        changed = result.changed
        min_view = self._min_view
        for cmd, sid, value, _complete in events:
            if cmd == PSH:
                stream = streams.get(sid)
                size = len(value)
                if stream is None or not size or stream.read_closed:
                    continue  # unknown or closed stream: payload is read and dropped
                chunks = stream.chunks
                if size >= min_view:
                    chunks.append(value)
                    self.budget -= size + CHUNK_OVERHEAD
                else:
                    tail = chunks[-1] if chunks else None
                    if type(tail) is bytearray and len(tail) + size <= COALESCE_LIMIT:
                        tail += value
                        self.budget -= size
                    else:
                        chunks.append(bytearray(value))
                        self.budget -= size + CHUNK_OVERHEAD
                stream.buffered += size
                changed.add(stream)
                if stream.buffered > self.backlog and stream.buffered > self.stream_backlog(stream):
                    self._reset(stream)
            elif cmd == SYN:
                if sid not in streams:
                    if not self.config.accept_peer_streams:
                        self._refuse(sid, result)
                        continue
                    stream = streams[sid] = StreamState(sid)
                    result.opened.append(stream)
            elif cmd == FIN:
                stream = streams.get(sid)
                if stream is not None:
                    stream.fin_received = True
                    changed.add(stream)
                    if stream.fin_sent:
                        self._unregister(stream)
            elif cmd == UPD:
                stream = streams.get(sid)
                if stream is not None:
                    stream.peer_consumed, stream.peer_window = value
                    changed.add(stream)
            # NOP: only activity, which decoder.headers_decoded already counts.

    def _refuse(self, sid: int, result: Received) -> None:
        """A SYN on a session that accepts no streams: answer FIN, keep nothing."""
        self.refused_streams += 1
        if self.refused_streams > MAX_REFUSED_STREAMS:
            if result.error is None and self.decoder.error is None:
                self.decoder.error = ProtocolError(
                    f"smux protocol error from peer: it opened {self.refused_streams} streams on a session that "
                    "accepts none (a tun2 client never opens streams)")
            return
        self.outbox.append((FIN, sid, None))

    def stream_backlog(self, stream: StreamState) -> int:
        """The unread bytes ``stream`` may hold: the session's backlog or, in version 1 with
        backlog_seconds, that many seconds of the stream's observed read rate if more."""
        seconds = self.config.backlog_seconds
        if seconds is None or self._version != VERSION_1 or self.config.max_stream_backlog is not None \
                or stream.rate_mark_at is None:
            return self.backlog
        now = self.clock()
        if now - stream.last_read_at > RATE_WINDOW:
            return self.backlog  # not read for a whole window: its rate is 0
        elapsed = now - stream.rate_mark_at
        if elapsed < RATE_WINDOW and stream.read_rate:
            rate = stream.read_rate
        else:
            rate = (stream.bytes_read - stream.rate_mark_bytes) / max(elapsed, 0.1)
        return max(self.backlog, int(seconds * rate))

    def reset_stalled(self) -> list[StreamState]:
        """Reset the streams now over their backlog (their read rate fell while the reader
        was paused on the budget); returns them. Only backlog_seconds makes any."""
        if self.config.backlog_seconds is None:
            return []
        stalled = [stream for stream in self.streams.values()
                   if stream.buffered > self.backlog and stream.buffered > self.stream_backlog(stream)]
        for stream in stalled:
            self._reset(stream)
        return stalled

    def _reset(self, stream: StreamState) -> None:
        limit = self.stream_backlog(stream)
        stream.reset_message = (
            f"stream {stream.sid} reset: its reader fell more than {limit} bytes behind "
            "(the peer kept sending while nobody read it); read streams promptly or raise max_stream_backlog")
        self.close_stream(stream)

    # --- the application side ----------------------------------------------------

    def read(self, stream: StreamState, size: int) -> bytes:
        """Take up to ``size`` buffered bytes (b"" when nothing is buffered)."""
        chunks = stream.chunks
        if not chunks or size <= 0:
            return b""
        first = chunks[0]
        if len(first) >= size or len(chunks) == 1:  # the common case: one chunk, one copy at most
            if len(first) > size:
                chunks[0] = memoryview(first)[size:]  # a view: no quadratic copying on small reads
                first = memoryview(first)[:size]
            else:
                chunks.popleft()
                self.budget += CHUNK_OVERHEAD
            self._consumed(stream, len(first))
            return first if type(first) is bytes else bytes(first)
        pieces, taken = [], 0
        while chunks and taken < size:
            chunk = chunks.popleft()
            self.budget += CHUNK_OVERHEAD
            if taken + len(chunk) > size:
                chunks.appendleft(memoryview(chunk)[size - taken:])
                self.budget -= CHUNK_OVERHEAD
                chunk = memoryview(chunk)[:size - taken]
            pieces.append(chunk)
            taken += len(chunk)
        self._consumed(stream, taken)
        return b"".join(pieces)

    def read_into(self, stream: StreamState, target: memoryview) -> int:
        """Copy buffered bytes into ``target`` (a byte memoryview); returns how many."""
        chunks = stream.chunks
        filled, room = 0, len(target)
        while chunks and filled < room:
            chunk = chunks[0]
            take = min(len(chunk), room - filled)
            if take < len(chunk):
                target[filled:filled + take] = memoryview(chunk)[:take]
                chunks[0] = memoryview(chunk)[take:]
            else:
                target[filled:filled + take] = chunk
                chunks.popleft()
                self.budget += CHUNK_OVERHEAD
            filled += take
        if filled:
            self._consumed(stream, filled)
        return filled

    def _consumed(self, stream: StreamState, size: int) -> None:
        stream.buffered -= size
        self.budget += size
        stream.bytes_read += size
        if self.config.backlog_seconds is not None:
            now = stream.last_read_at = self.clock()
            if stream.rate_mark_at is None:
                stream.rate_mark_at, stream.rate_mark_bytes = now, stream.bytes_read - size
            elif now - stream.rate_mark_at >= RATE_WINDOW:
                stream.read_rate = (stream.bytes_read - stream.rate_mark_bytes) / (now - stream.rate_mark_at)
                stream.rate_mark_at, stream.rate_mark_bytes = now, stream.bytes_read
        # Counted in both versions, so that a session switched to 2 mid-stream reports
        # the same totals as the peer's num_written.
        stream.num_read = (stream.num_read + size) & _UINT32
        if self._version == 2 and not stream.read_closed:
            stream.read_since_update += size
            # Go: on the first read (numRead == n) and after each half buffer read.
            if stream.read_since_update >= self.config.max_stream_buffer // 2 or stream.num_read == size:
                self.outbox.append((UPD, stream.sid, (stream.num_read, self.config.max_stream_buffer)))
                stream.read_since_update = 0

    def send_window(self, stream: StreamState) -> int:
        """How many more payload bytes the stream may send now (v1: effectively unlimited)."""
        if self._version != 2:
            return 1 << 62
        inflight = _int32(stream.num_written - stream.peer_consumed)
        if inflight < 0:
            raise ProtocolError(
                f"smux protocol error from peer: stream {stream.sid} reports {stream.peer_consumed} bytes "
                f"consumed but only {stream.num_written} were sent")
        return _int32(stream.peer_window) - inflight

    def record_sent(self, stream: StreamState, size: int) -> None:
        """Count ``size`` payload bytes as handed to the writer."""
        stream.num_written = (stream.num_written + size) & _UINT32

    def shutdown_write(self, stream: StreamState) -> None:
        """Queue our FIN once; a stream both sides have finished leaves the table."""
        if not stream.fin_sent:
            stream.fin_sent = True
            self.outbox.append((FIN, stream.sid, None))
        if stream.fin_received:
            self._unregister(stream)

    def shutdown_read(self, stream: StreamState) -> None:
        """Drop buffered data and everything that still arrives for the stream."""
        stream.read_closed = True
        if stream.chunks:
            self.budget += stream.buffered + CHUNK_OVERHEAD * len(stream.chunks)
            stream.buffered = 0
            stream.chunks.clear()

    def close_stream(self, stream: StreamState) -> None:
        """Go's Stream.Close: FIN once, drop buffered data, forget the stream."""
        self.shutdown_read(stream)
        if not stream.fin_sent:
            stream.fin_sent = True
            self.outbox.append((FIN, stream.sid, None))
        self._unregister(stream)

    def _unregister(self, stream: StreamState) -> None:
        if stream.registered:
            stream.registered = False
            if self.streams.get(stream.sid) is stream:
                del self.streams[stream.sid]
