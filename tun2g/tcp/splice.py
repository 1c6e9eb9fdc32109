"""Splice two byte streams together: bytes both ways, half-close honoured, an idle timeout, byte counts.

The one loop every TCP tunnel uses, on the server (public socket <-> smux
stream) and on the client (smux stream <-> local socket). When one side ends
its direction (EOF), the other side's write direction is shut (a FIN on TCP,
a smux FIN on a stream) and the other direction goes on, so protocols that
half-close (``shutdown(SHUT_WR)``, rsync, some RPC) work through the tunnel.
A side that cannot half-close (TLS) is closed once both directions are done.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable

import gevent

from tun2g.smux import SessionClosedError, StreamResetError
from tun2g.transport.base import ByteStream, capabilities_of

# recv() this much at a time: a smux frame's worth, a fresh bytes object each time, so the
# stream can keep it without a copy and an idle connection holds no buffer.
CHUNK = 64 * 1024
_ERRORS = (OSError, SessionClosedError, StreamResetError)


class Splice:
    """Both directions between `left` and `right` (`run` blocks until both are done or one fails).

    ``on_bytes(direction, count)`` hears of every piece moved ("right" is left -> right);
    ``idle_timeout``: with no byte either way for this long, both sides are closed.
    """

    def __init__(self, left: ByteStream, right: ByteStream, *, idle_timeout: float | None = None,
                 on_bytes: Callable[[str, int], None] | None = None) -> None:
        self.left = left
        self.right = right
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.moved = {"right": 0, "left": 0}
        self.outcome = "closed"  # closed, idle, or the error that ended it
        self._last_activity = time.monotonic()

    def run(self) -> str:
        """Move bytes until both directions end; returns the outcome ("closed", "idle" or an error)."""
        other = gevent.spawn(self._pump, self.left, self.right, "right")
        try:
            self._pump(self.right, self.left, "left")
            other.join()
        finally:
            other.kill()
            _close(self.left)
            _close(self.right)
        return self.outcome

    def _pump(self, source: ByteStream, target: ByteStream, direction: str) -> None:
        idle = self.idle_timeout
        try:
            source.settimeout(idle)
            while True:
                try:
                    data = source.recv(CHUNK)
                except socket.timeout:
                    if time.monotonic() - self._last_activity < idle:  # type: ignore[operator]
                        continue  # the other direction is busy: not idle
                    self._fail("idle")
                    return
                if not data:
                    break
                self._last_activity = time.monotonic()
                target.sendall(data)
                self.moved[direction] += len(data)
                if self.on_bytes is not None:
                    self.on_bytes(direction, len(data))
        except _ERRORS as exc:
            self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        self._end_direction(target)

    def _end_direction(self, target: ByteStream) -> None:
        if capabilities_of(target).half_close:
            try:
                target.shutdown(socket.SHUT_WR)
            except _ERRORS:
                pass

    def _fail(self, outcome: str) -> None:
        """One direction failed or went idle: end both (closing wakes the other pump)."""
        if self.outcome == "closed":
            self.outcome = outcome
        _close(self.left)
        _close(self.right)


def _close(stream: ByteStream) -> None:
    try:
        stream.close()
    except _ERRORS:
        pass


def reset(sock: ByteStream) -> None:
    """Close a TCP socket with an RST (SO_LINGER 0), as a refused direct connection would end."""
    try:
        linger = struct.pack("ii", 1, 0)  # on, 0 s: close() sends an RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)  # type: ignore[attr-defined]
    except (OSError, AttributeError):  # not a TCP socket: a plain close
        pass
    _close(sock)
