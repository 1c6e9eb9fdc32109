"""Structured key=value logging (structlog), one line per event.

Every module logs through `get_logger(__name__)`; `configure()` is called once
by the command line. Values that contain spaces are quoted, so lines stay
greppable: `event=registered domain=app.example backend=3f2a... user=alice`.

The access log (`AccessLog`, one line per request) skips structlog: its
lines are formatted directly, with the timestamp's seconds cached, and
buffered; the buffer is written out within `FLUSH_SECONDS`, when it holds
`FLUSH_BYTES`, before any other log line (so lines stay in order) and at
exit (`flush()`, also registered with atexit).
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import time
from typing import IO, Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


FLUSH_SECONDS = 0.5   # the longest a buffered access line waits
FLUSH_BYTES = 32768   # and the most the buffer holds before it is written


class _Sink:
    """One stream's writer: other lines at once, access lines buffered (see the module docstring)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.pending: list[str] = []
        self.size = 0
        self.timer: Any = None

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr  # stderr as it is now (tests swap it)

    def write(self, line: str) -> None:
        out = self._out()
        if self.pending:
            self.pending.append(line)
            line = "\n".join(self.pending)
            self._clear()
        out.write(line + "\n")
        out.flush()

    def buffer(self, line: str) -> None:
        self.pending.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            self._arm()

    def flush(self) -> None:
        if not self.pending:
            return
        lines = self.pending
        self._clear()
        out = self._out()
        try:
            out.write("\n".join(lines) + "\n")
            out.flush()
        except (OSError, ValueError):  # the stream was closed (exit, a test's buffer): nothing to write to
            pass

    def _clear(self) -> None:
        self.pending = []
        self.size = 0
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def _arm(self) -> None:
        import gevent  # every tun2g process runs a gevent hub; a timer on it needs no greenlet

        timer = self.timer = gevent.get_hub().loop.timer(FLUSH_SECONDS)
        timer.start(self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None  # a one-shot timer: flush() must not close it while it runs
        self.flush()


_sink = _Sink(None)
_info_enabled = True  # the configured level lets info lines through (the access log is info)
_debug_enabled = False


def debugging() -> bool:
    """Whether debug lines are written: a debug line per request is built only then (~2 µs otherwise)."""
    return _debug_enabled


class _LineLogger:
    """structlog's logger: hands each rendered line to the sink."""

    def __init__(self, *_args: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        _sink.write(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def flush() -> None:
    """Write out buffered access lines now (shutdown, or a test reading the log)."""
    _sink.flush()


atexit.register(flush)


def configure(level: str = "info", stream=None) -> None:
    """Send key=value lines at `level` and above to `stream` (stderr by default)."""
    global _sink, _info_enabled, _debug_enabled, _generation
    _generation += 1
    _sink.flush()  # lines buffered for the previous stream go there
    _sink = _Sink(stream)
    _info_enabled = _LEVELS.get(level, logging.INFO) <= logging.INFO
    _debug_enabled = _LEVELS.get(level, logging.INFO) <= logging.DEBUG
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            _render_logfmt,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=_LineLogger,
        cache_logger_on_first_use=False,  # configure() may run again (tests, embedders)
    )


_FIRST_KEYS = ("ts", "level", "component", "event")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _render_logfmt(_logger, _method, event: dict) -> str:
    """logfmt, leading keys first. structlog's own LogfmtRenderer spent ~8 µs a line
    scanning every value character by character; an access line per request felt it."""
    parts = []
    for key in _FIRST_KEYS:
        if key in event:
            parts.append(_pair(key, event.pop(key)))
    parts.extend(_pair(key, value) for key, value in event.items())
    return " ".join(parts)


def _pair(key: str, value) -> str:
    if value is None:
        return f"{key}="
    if value is True:
        return key
    text = str(value)
    if _NEEDS_QUOTES.search(text):
        text = _quoted(text)
    return f"{key}={text}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_generation = 0  # bumped by configure(): loggers rebuild their structlog logger once after it


class _Logger:
    """What get_logger returns: structlog's logger for a component, built once per configure().

    structlog's lazy proxy (with cache_logger_on_first_use off, so that configure() may run
    again) rebuilt the bound logger on every call, ~5 µs even for a filtered-out debug line:
    four of those per request in a client. This keeps the built one until the next configure().
    """

    __slots__ = ("_component", "_bound", "_built")

    def __init__(self, component: str) -> None:
        self._component = component
        self._bound: Any = None
        self._built = -1

    def _logger(self) -> Any:
        if self._built != _generation:
            self._bound = structlog.get_logger(component=self._component).bind()
            self._built = _generation
        return self._bound

    def debug(self, event: str, **fields: Any) -> Any:
        """Log at debug level (a no-op call below the configured level)."""
        bound = self._bound if self._built == _generation else self._logger()
        return bound.debug(event, **fields)

    def info(self, event: str, **fields: Any) -> Any:
        """Log at info level."""
        bound = self._bound if self._built == _generation else self._logger()
        return bound.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> Any:
        """Log at warning level."""
        return self._logger().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> Any:
        """Log at error level."""
        return self._logger().error(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger(), name)  # exception, critical, bind, ...


def get_logger(name: str) -> Any:
    """A logger bound to the module name."""
    return _Logger(name.rpartition(".")[2])


class _Clock:
    """The ISO timestamp of now, as structlog's TimeStamper writes it; the date and time of day are
    formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        micros = time.time_ns() // 1000
        second = micros // 1_000_000
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return "%s.%06dZ" % (self.prefix, micros % 1_000_000)


_clock = _Clock()


class AccessLog:
    """One buffered `event=request` line per request, in the same logfmt as the other lines (~2 µs)."""

    def __init__(self, name: str) -> None:
        self.lead = f"level=info component={name.rpartition('.')[2]} event=request"

    def request(self, method: str, host: str, path: str, status: int, ms: float, client_ip: str,
                bytes_in: int | str, bytes_out: int | str, request_id: str, backend: str) -> None:
        """Log one finished request (dropped when the configured level is above info)."""
        if not _info_enabled:
            return
        if _NEEDS_QUOTES.search(path):  # a query's `=`
            path = _quoted(path)
        if _NEEDS_QUOTES.search(f"{method}{host}{client_ip}{request_id}{backend}"):  # rare: check each
            method, host, client_ip, request_id, backend = (
                _quoted(value) if _NEEDS_QUOTES.search(value) else value
                for value in (method, host, client_ip, request_id, backend))
        _sink.buffer(f"ts={_clock.now()} {self.lead} method={method} host={host} path={path} status={status} "
                     f"ms={ms} client_ip={client_ip} bytes_in={bytes_in} bytes_out={bytes_out} "
                     f"request_id={request_id} backend={backend}")
