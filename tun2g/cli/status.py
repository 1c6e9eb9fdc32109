"""Human status lines on stdout: the tunnel's state changes, its public URL, one line per request.

Lines wait in a bounded list for a writer greenlet, which hands them to a thread in one
write, so a stdout nobody reads (a full pipe) never stalls the greenlets that serve
requests: when the list is full, lines are dropped and the count is said on the next line.
The writer takes every line queued so far in one write, then pauses COALESCE_SECONDS, so
a busy tunnel costs one thread hand-off per batch, not per request. A request's line is
queued as its record and formatted by the writer: serving it costs an append.
"""

from __future__ import annotations

import sys
from collections import deque

import gevent
from gevent.event import Event

QUEUE_SIZE = 1024
COALESCE_SECONDS = 0.05  # the longest a line waits behind the previous batch


class StatusPrinter:
    """``status`` for Client(on_status=...), ``request`` for Client(on_request=...), ``line`` for anything."""

    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream
        self.dropped = 0  # lines dropped since the last one queued (said on the next line)
        self._pending: deque = deque()  # texts, and requests' records (`Served`) to format
        self._work = Event()   # set while lines wait for the writer
        self._idle = Event()   # set while nothing waits and nothing is being written
        self._idle.set()
        self._writer: gevent.Greenlet | None = None

    def line(self, text: str) -> None:
        """Print ``text`` (even when quiet: failures of the inspector and the like)."""
        self._queue(text)

    def status(self, tunnel) -> None:
        """One line per state change; on connecting, the public URL(s)."""
        if self.quiet:
            return
        state, config = tunnel.state, tunnel.config
        if state == "connected":
            urls = ", ".join(tunnel.public_urls) or f"http://{config.domain}"
            self.line(f"tun2g: connected as {config.domain} via {config.server_addr} -> {config.backend_url}"
                      f" (requests served so far: {tunnel.requests_served}); serving {urls}")
        elif state == "connecting":
            self.line(f"tun2g: connecting to {config.server_addr} ...")
        elif state == "waiting":
            why = f" ({tunnel.last_error})" if tunnel.last_error else ""
            if tunnel.was_connected:
                self.line(f"tun2g: disconnected from {config.server_addr}{why}; retrying in {tunnel.retry_in:g} s "
                          f"(requests served so far: {tunnel.requests_served})")
            else:
                self.line(f"tun2g: cannot reach {config.server_addr}{why}; retrying in {tunnel.retry_in:g} s")

    def request(self, served) -> None:
        """``GET /path 200 12.3 ms`` (formatted by the writer, see `_format`)."""
        self._queue(served)

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the queued lines to be written."""
        self._idle.wait(timeout)

    def _queue(self, entry) -> None:
        pending = self._pending
        if len(pending) >= QUEUE_SIZE:
            self.dropped += 1
            return
        if self.dropped:
            pending.append(f"tun2g: ({self.dropped} status lines dropped: stdout is not being read)")
            self.dropped = 0
        pending.append(entry)
        if not self._work.is_set():
            self._idle.clear()
            self._work.set()
            if self._writer is None:
                self._writer = gevent.spawn(self._write_loop)

    def _write_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        pending = self._pending
        while True:
            self._work.wait()
            self._work.clear()
            lines = []
            while pending:
                entry = pending.popleft()
                lines.append(entry if type(entry) is str else _format(entry))
            try:
                pool.apply(self._write, ("\n".join(lines) + "\n",))
            except Exception:
                pass  # stdout closed: nothing to tell anyone
            if not pending:
                self._idle.set()
            gevent.sleep(COALESCE_SECONDS)  # pacing: lines queued meanwhile go out in the next write

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text)
        stream.flush()


def _format(served) -> str:
    status = served.status or "---"
    return f"{served.method} {_printable(served.path)} {status} {served.seconds * 1000:.1f} ms"


def _printable(text: str) -> str:
    """Control characters (a terminal escape in an attacker's path) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
