"""Human status lines on stdout: the tunnel's state changes, its public URL, one line per request.

Lines go through a bounded queue to a writer in a thread, so a stdout nobody
reads (a full pipe) never stalls the greenlets that serve requests: when the
queue is full, lines are dropped and the count is said on the next line.
The writer takes every line queued so far in one write, then pauses
COALESCE_SECONDS, so a busy tunnel costs one thread hand-off per batch, not
per request.
"""

from __future__ import annotations

import sys

import gevent
from gevent.queue import Full, Queue

QUEUE_SIZE = 1024
COALESCE_SECONDS = 0.05  # the longest a line waits behind the previous batch


class StatusPrinter:
    """``status`` for Client(on_status=...), ``request`` for Client(on_request=...), ``line`` for anything."""

    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream
        self.dropped = 0
        self._queue: Queue = Queue(maxsize=QUEUE_SIZE)
        self._writer: gevent.Greenlet | None = None

    def line(self, text: str) -> None:
        """Print ``text`` (even when quiet: failures of the inspector and the like)."""
        if self.dropped:
            text = f"tun2g: ({self.dropped} status lines dropped: stdout is not being read)\n{text}"
        try:
            self._queue.put_nowait(text + "\n")
            self.dropped = 0
        except Full:
            self.dropped += 1
            return
        if self._writer is None:
            self._writer = gevent.spawn(self._write_loop)

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
        """``GET /path 200 12.3 ms``."""
        status = served.status or "---"
        self.line(f"{served.method} {_printable(served.path)} {status} {served.seconds * 1000:.1f} ms")

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the queued lines to be written."""
        if self._writer is None:
            return
        with gevent.Timeout(timeout, False):
            self._queue.join()

    def _write_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        queue = self._queue
        while True:
            lines = [queue.get()]
            while not queue.empty():
                lines.append(queue.get_nowait())
            try:
                pool.apply(self._write, ("".join(lines),))
            except Exception:
                pass  # stdout closed: nothing to tell anyone
            finally:
                for _ in lines:
                    queue.task_done()
            gevent.sleep(COALESCE_SECONDS)  # pacing: lines queued meanwhile go out in the next write

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text)
        stream.flush()


def _printable(text: str) -> str:
    """Control characters (a terminal escape in an attacker's path) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
