"""The greenlet that writes a session's frames, joining whatever is pending into one transport write."""

from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event

from tun2g.transport.base import capabilities_of

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

    __slots__ = ("sid", "payload", "finished", "taken", "cancelled", "failed", "_event")

    def __init__(self, sid: int, payload) -> None:
        self.sid = sid
        self.payload = payload
        self.finished = False  # written, or the writer has given up (then ``failed``)
        self.taken = False  # part of a batch being written; cancelling is too late
        self.cancelled = False
        self.failed = False  # the session died before the bytes were written
        self._event: Event | None = None  # made only for a sender that waits

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is finished; False if ``timeout`` passed first."""
        if self.finished:
            return True
        if self._event is None:
            self._event = Event()
        return self._event.wait(timeout)

    def finish(self, failed: bool = False) -> None:
        self.failed = self.failed or failed
        self.finished = True
        if self._event is not None:
            self._event.set()


class FrameWriter:
    """Queues frames and writes what one turn of the event loop queued in one transport write.

    Control frames (SYN, NOP, UPD) overtake queued data, as in Go's priority shaper.
    PSH payloads and FINs share one FIFO so a stream's FIN never overtakes its data.
    Frames are encoded at send time, so an automatic client can queue frames before
    it knows which version byte to put on them.

    On sockets and TLS sockets the write is a callback the hub runs once the queuing
    greenlets have yielded (`_write_in_hub`): a non-blocking send, no greenlet switch.
    What the kernel does not take, and every write on other transports (KCP) or before
    the version is known, goes on from a writer greenlet that may block; it ends once
    everything is written, so an idle session holds none.
    """

    def __init__(self, transport, max_frame_size: int, version: int | None,
                 on_error: Callable[[Exception], None]) -> None:
        self._sendall = transport.sendall
        capabilities = capabilities_of(transport)
        # One plain send() first where it is a single system call: it usually writes everything,
        # and skips the getsockopt and extra Python frames gevent's sendall() spends on every call.
        self._send = transport.send if capabilities.plain_send else None
        # A plain socket can write header and payload slices in one gathered system call;
        # TLS and other transports get one joined buffer instead.
        self._sendmsg = transport.sendmsg if capabilities.gathered_writes else None
        # A keepalive is written straight from the shared timer (no greenlet) on transports whose
        # send() with timeout 0 never waits: sockets and TLS sockets (see send_keepalive).
        self._transport = transport if capabilities.plain_send and hasattr(transport, "gettimeout") else None
        self.writes = 0  # transport writes so far: the keepalive is skipped when this moved since the last tick
        self._max_frame_size = max_frame_size
        self._on_error = on_error
        self._control: deque[tuple] = deque()
        self._data: deque[WriteRequest] = deque()
        self._version_known = Event()
        self._in_flight: list[WriteRequest] = []  # taken into the batch being sent
        self.queued_bytes = 0  # payload bytes queued and not yet taken into a batch
        self.version = None
        self.closed = False
        self._greenlet: gevent.Greenlet | None = None
        self._loop = gevent.get_hub().loop
        self._scheduled = False  # a _write_in_hub callback is due
        self._drained = Event()  # set whenever nothing is queued or being written
        self._drained.set()
        if version is not None:
            self.set_version(version)

    @property
    def greenlet(self) -> gevent.Greenlet | None:
        """The writer greenlet while there is one (None when idle; dead or None once closed)."""
        return self._greenlet

    def set_version(self, version: int) -> None:
        """Fix the version byte; the writer starts sending what it has queued."""
        self.version = version
        self._version_known.set()

    def send_control(self, cmd: int, sid: int, value=None) -> None:
        """Queue SYN, NOP or UPD (value = (consumed, window)) ahead of data."""
        if self.closed:
            return
        if cmd == NOP:
            if any(queued[0] == NOP for queued in self._control):
                return  # a keepalive already waits; Go drops the extra one too
        self._control.append((cmd, sid, value))
        self._start()

    def send_keepalive(self) -> None:
        """Write one NOP now, without blocking or spawning a greenlet when the writer is idle.

        Called from the shared timer: on a socket or TLS socket with nothing queued the
        NOP goes out in one non-blocking send(); what the kernel did not take (or, on TLS,
        the record OpenSSL keeps pending, which must be retried with the same bytes first)
        is queued ahead of everything for the writer greenlet. Otherwise it is queued.
        """
        if self.closed or self.version is None:
            return
        if not self._write_now(_pack_header(self.version, NOP, 0, 0)):
            self.send_control(NOP, 0)

    def send_data_now(self, sid: int, payload: bytes) -> None:
        """send_data for one small payload from a caller that must not wait (the liveness ping):
        written at once like send_keepalive when the writer is idle, else queued."""
        if self.closed or self.version is None or len(payload) > self._max_frame_size or \
                not self._write_now(_pack_header(self.version, PSH, len(payload), sid) + payload):
            self.send_data(sid, payload)

    def _write_now(self, frame: bytes) -> bool:
        """One non-blocking send() of a whole frame when nothing is queued; False (nothing done) otherwise."""
        if self._transport is None or self._greenlet is not None or self._control or self._data or self.closed:
            return False
        self._write_without_waiting([frame], ())
        return True

    def _write_in_hub(self) -> None:
        """The hub's callback: write every queued batch without waiting; a writer greenlet takes the rest."""
        self._scheduled = False
        if self._greenlet is not None or self.closed:
            return
        while self._control or self._data:
            parts = self._take_batch()
            if parts and not self._write_without_waiting(parts, self._in_flight):
                return
        self._drained.set()

    def _write_without_waiting(self, parts: list, taken) -> bool:
        """Send ``parts`` in one non-blocking write and finish ``taken``. What the kernel did not
        take (on TLS: the record OpenSSL keeps pending, to be retried with the same bytes first)
        goes first to a writer greenlet, which finishes ``taken`` after it; False then."""
        try:
            sent = self._send_without_waiting(parts)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except Exception as exc:  # the transport failed; the session decides what that means
            self._on_error(exc)
            return False
        self.writes += 1
        if sent < sum(map(len, parts)):
            self._control.appendleft((None, 0, b"".join(parts)[sent:]))  # raw bytes, first in the next batch
            self._in_flight = list(taken)
            self._greenlet = gevent.spawn(self._run)
            return False
        self._in_flight = []
        for request in taken:
            request.finish()
        return True

    def _send_without_waiting(self, parts: list) -> int:
        """One send of ``parts`` that never waits: a gathered MSG_DONTWAIT write on a plain
        socket, else a send() with the timeout at 0 (TLS); the bytes written."""
        if self._sendmsg is not None and len(parts) <= MAX_GATHER_PARTS:
            try:
                return self._sendmsg(parts, (), socket.MSG_DONTWAIT)
            except NotImplementedError:  # a TLS-like wrapper that refuses sendmsg before writing
                self._sendmsg = None
        transport = self._transport
        previous = transport.gettimeout()
        transport.settimeout(0.0)
        try:
            return transport.send(parts[0] if len(parts) == 1 else b"".join(parts))
        finally:
            if not self.closed:
                transport.settimeout(previous)

    def send_data(self, sid: int, payload) -> WriteRequest:
        """Queue payload bytes (or, with payload None, a FIN) behind earlier data."""
        request = WriteRequest(sid, payload)
        if self.closed:
            request.finish(failed=True)
            return request
        if payload is not None:
            self.queued_bytes += len(payload)
        self._data.append(request)
        self._start()
        return request

    def cancel(self, request: WriteRequest) -> bool:
        """Withdraw a request the writer has not taken yet; True if that worked."""
        if request.taken or request.finished:
            return False
        request.cancelled = True
        if request.payload is not None:
            self.queued_bytes -= len(request.payload)
        return True

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything queued is written (or the writer stopped); False on timeout."""
        return self._drained.wait(timeout)

    def close(self) -> None:
        """Stop writing and release every waiting sender (their requests fail)."""
        if self.closed:
            return
        self.closed = True
        if self._greenlet is not None and self._greenlet is not gevent.getcurrent():
            self._greenlet.kill(block=False)
        for request in (*self._in_flight, *self._data):
            request.finish(failed=True)
        self._in_flight = []
        self._data.clear()
        self._control.clear()
        self.queued_bytes = 0
        self._drained.set()

    def _start(self) -> None:
        self._drained.clear()
        if self._greenlet is not None or self._scheduled:
            return  # the writer at work picks the new frames up
        if self._transport is not None and self.version is not None:
            self._scheduled = True
            self._loop.run_callback(self._write_in_hub)
        else:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self._version_known.wait()
            while self._control or self._data:
                self._write_batch()
            self._drained.set()
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # the transport failed; the session decides what that means
            self._on_error(exc)
        finally:
            if self._greenlet is gevent.getcurrent():
                self._greenlet = None

    def _write_batch(self) -> None:
        parts = self._take_batch()
        self.writes += 1
        if len(parts) == 1:
            self._write(parts[0])
        elif self._sendmsg is not None and len(parts) <= MAX_GATHER_PARTS:
            try:
                self._gather_all(parts)
            except NotImplementedError:  # a TLS-like wrapper that refuses sendmsg before writing
                self._sendmsg = None
                self._write(b"".join(parts))
        elif parts:
            self._write(b"".join(parts))
        taken, self._in_flight = self._in_flight, []
        for request in taken:
            request.finish()

    def _take_batch(self) -> list:
        """The encoded frames of the next write: every control frame, then data up to BATCH_BYTES
        (its requests join ``_in_flight``, to be finished once written)."""
        version = self.version
        parts: list = []
        control, data = self._control, self._data
        while control:
            cmd, sid, value = control.popleft()
            if cmd is None:  # the unsent rest of a keepalive written directly (send_keepalive)
                parts.append(value)
            elif cmd == UPD:
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
            if length <= frame_size:
                parts.append(_pack_header(version, PSH, length, request.sid))
                parts.append(payload)
                continue
            for offset in range(0, length, frame_size):
                piece = payload[offset:offset + frame_size]
                parts.append(_pack_header(version, PSH, len(piece), request.sid))
                parts.append(piece)
        self.queued_bytes -= size
        return parts

    def _write(self, data) -> None:
        if self._send is not None:
            sent = self._send(data)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._sendall(data)

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
