"""The client's status lines: in order, formatted, escaped, and never a stall when stdout is not read."""

from __future__ import annotations

import threading
import time

from tests.fixtures.tunnel import wait_until
from tun2g.cli import status
from tun2g.cli.status import StatusPrinter
from tun2g.client.telemetry import Served


class Stdout:
    """A stdout the test reads back; with `stuck`, a write blocks its thread until released (a full pipe)."""

    def __init__(self, stuck: bool = False) -> None:
        self.text = ""
        self.writes = 0
        self.entered = 0  # writes begun (a stuck one is still inside)
        self.release = threading.Event()
        if not stuck:
            self.release.set()

    def write(self, text: str) -> None:
        self.entered += 1
        if not self.release.wait(10):
            raise OSError("the test never released the stuck stdout")
        self.text += text
        self.writes += 1

    def flush(self) -> None:
        pass


def test_lines_and_requests_come_out_in_order_in_one_write():
    stdout = Stdout()
    printer = StatusPrinter(stream=stdout)
    printer.line("tun2g: connected")
    printer.request(Served("GET", "/a", 200, 0.0123, 10, 20))
    printer.request(Served("POST", "/b?x=1", 0, 1.5, 10, 0))
    printer.flush()
    assert stdout.text == "tun2g: connected\nGET /a 200 12.3 ms\nPOST /b?x=1 --- 1500.0 ms\n"
    assert stdout.writes == 1


def test_a_terminal_escape_in_a_path_is_shown_escaped():
    stdout = Stdout()
    printer = StatusPrinter(stream=stdout)
    printer.request(Served("GET", "/\x1b[2Jgone", 404, 0.001, 0, 0))
    printer.flush()
    assert "\x1b" not in stdout.text and "/\\x1b[2Jgone 404" in stdout.text


def test_a_stdout_nobody_reads_drops_lines_counts_them_and_stalls_nothing():
    stdout = Stdout(stuck=True)
    printer = StatusPrinter(stream=stdout)
    printer.line("first")
    wait_until(lambda: stdout.entered == 1, 5, message="the writer inside its stuck write")
    started = time.monotonic()
    for number in range(status.QUEUE_SIZE + 50):
        printer.request(Served("GET", f"/{number}", 200, 0.001, 0, 0))
    assert time.monotonic() - started < 1.0, "queueing a line must never wait for stdout"
    assert printer.dropped == 50
    started = time.monotonic()
    printer.flush(timeout=0.2)
    assert time.monotonic() - started < 2.0, "flush waits at most its timeout"
    stdout.release.set()  # the reader came back: what was queued goes out, then the next line says what was lost
    printer.flush(timeout=5)
    printer.line("after")
    printer.flush(timeout=5)
    lines = stdout.text.splitlines()
    assert lines[0] == "first" and lines[1] == "GET /0 200 1.0 ms"
    assert f"GET /{status.QUEUE_SIZE - 1} 200 1.0 ms" in lines
    assert lines[-2:] == ["tun2g: (50 status lines dropped: stdout is not being read)", "after"]
