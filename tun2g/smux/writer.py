"""The greenlet that writes a session's frames, joining whatever is pending into one transport write."""

from __future__ import annotations

import ssl
from collections import deque
from typing import Callable

import gevent
import gevent.ssl
from gevent.event import Event

from .frame import FIN, HEADER, NOP, PSH, UPD, encode_update

# One transport write carries at most about this much payload: large enough that a
# single fast stream costs few syscalls and greenlet switches, small enough that
# other streams' frames interleave (the data queue is first come, first served).
BATCH_BYTES = 256 * 1024

# Gathered writes (sendmsg) skip joining a batch into one buffer; more pieces than
# this are joined anyway (Linux IOV_MAX is 1024).
MAX_GATHER_PARTS = 512

_pack_header = HEADER.pack


class WriteRequest:
    """Payload bytes of one stream waiting for the writer (payload None means a FIN)."""

    __slots__ = ("sid", "payload", "done", "taken", "cancelled", "failed")

    def __init__(self, sid: int, payload) -> None:
        self.sid = sid
        self.payload = payload
        self.done = Event()  # set once written, or once the writer has given up
        self.taken = False  # part of a batch being written; cancelling is too late
        self.cancelled = False
        self.failed = False  # the session died before the bytes were written


class FrameWriter:
    """Queues frames and sends them from its own greenlet, which lives only while there is work.

    Control frames (SYN, NOP, UPD) overtake queued data, as in Go's priority shaper.
    PSH payloads and FINs share one FIFO so a stream's FIN never overtakes its data.
    Frames are encoded at send time, so an automatic client can queue frames before
    it knows which version byte to put on them.
    """

    def __init__(self, transport, max_frame_size: int, version: int | None,
                 on_error: Callable[[Exception], None]) -> None:
        self._sendall = transport.sendall
        # A plain socket can write header and payload slices in one gathered syscall;
        # TLS and other transports get one joined buffer instead.
        tls = isinstance(transport, (ssl.SSLSocket, gevent.ssl.SSLSocket))
        self._sendmsg = None if tls else getattr(transport, "sendmsg", None)
        self._max_frame_size = max_frame_size
        self._on_error = on_error
        self._control: deque[tuple] = deque()
        self._data: deque[WriteRequest] = deque()
        self._version_known = Event()
        self._in_flight: list[WriteRequest] = []  # taken into the batch being sent
        self.version = None
        self.closed = False
        # Spawned on demand: an idle session then costs no writer greenlet (~8 KiB).
        self._greenlet: gevent.Greenlet | None = None
        if version is not None:
            self.set_version(version)

    @property
    def greenlet(self) -> gevent.Greenlet | None:
        """The writer greenlet while it has work (None when idle; dead or None once closed)."""
        return self._greenlet

    def set_version(self, version: int) -> None:
        """Fix the version byte; the writer starts sending what it has queued."""
        self.version = version
        self._version_known.set()

    def send_control(self, cmd: int, sid: int, value=None) -> None:
        """Queue SYN, NOP or UPD (value = (consumed, window)) ahead of data."""
        if self.closed:
            return
        if cmd == NOP and any(queued[0] == NOP for queued in self._control):
            return  # a keepalive already waits; Go drops the extra one too
        self._control.append((cmd, sid, value))
        self._start()

    def send_data(self, sid: int, payload) -> WriteRequest:
        """Queue payload bytes (or, with payload None, a FIN) behind earlier data."""
        request = WriteRequest(sid, payload)
        if self.closed:
            request.failed = True
            request.done.set()
            return request
        self._data.append(request)
        self._start()
        return request

    def cancel(self, request: WriteRequest) -> bool:
        """Withdraw a request the writer has not taken yet; True if that worked."""
        if request.taken or request.done.is_set():
            return False
        request.cancelled = True
        return True

    def close(self) -> None:
        """Stop writing and release every waiting sender (their requests fail)."""
        if self.closed:
            return
        self.closed = True
        if self._greenlet is not None and self._greenlet is not gevent.getcurrent():
            self._greenlet.kill(block=False)
        for request in (*self._in_flight, *self._data):
            request.failed = True
            request.done.set()
        self._in_flight = []
        self._data.clear()
        self._control.clear()

    def _start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self._version_known.wait()
            while self._control or self._data:
                self._write_batch()
                if not (self._control or self._data):
                    # Let the senders just woken queue their next frames before deciding
                    # to exit: a busy stream keeps one writer instead of one per batch.
                    gevent.sleep(0)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # the transport failed; the session decides what that means
            self._on_error(exc)
        finally:
            if self._greenlet is gevent.getcurrent():
                self._greenlet = None

    def _write_batch(self) -> None:
        version = self.version
        parts: list = []
        control, data = self._control, self._data
        while control:
            cmd, sid, value = control.popleft()
            if cmd == UPD:
                parts.append(encode_update(version, sid, *value))
            else:
                parts.append(_pack_header(version, cmd, 0, sid))
        taken: list[WriteRequest] = self._in_flight
        size = 0
        frame_size = self._max_frame_size
        while data and size < BATCH_BYTES:
            request = data.popleft()
            if request.cancelled:
                continue
            request.taken = True
            taken.append(request)
            payload = request.payload
            if payload is None:
                parts.append(_pack_header(version, FIN, 0, request.sid))
                continue
            length = len(payload)
            size += length
            for offset in range(0, length, frame_size):
                piece = payload[offset:offset + frame_size]
                parts.append(_pack_header(version, PSH, len(piece), request.sid))
                parts.append(piece)
        if len(parts) == 1:
            self._sendall(parts[0])
        elif self._sendmsg is not None and len(parts) <= MAX_GATHER_PARTS:
            try:
                self._gather_all(parts)
            except NotImplementedError:  # a TLS-like wrapper that refuses sendmsg before writing
                self._sendmsg = None
                self._sendall(b"".join(parts))
        elif parts:
            self._sendall(b"".join(parts))
        self._in_flight = []
        for request in taken:
            request.done.set()

    def _gather_all(self, parts: list) -> None:
        """sendmsg until every part is written (sendmsg may write only a prefix)."""
        sent = self._sendmsg(parts)
        remaining = sum(map(len, parts)) - sent
        while remaining > 0:
            index = 0
            while sent >= len(parts[index]):
                sent -= len(parts[index])
                index += 1
            parts = parts[index:]
            parts[0] = memoryview(parts[0])[sent:]
            sent = self._sendmsg(parts)
            remaining -= sent
