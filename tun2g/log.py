"""Structured key=value logging (structlog), one line per event.

Every module logs through `get_logger(__name__)`; `configure()` is called once
by the command line. Values that contain spaces are quoted, so lines stay
greppable: `event=registered domain=app.example backend=3f2a... user=alice`.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream=None) -> None:
    """Send key=value lines at `level` and above to `stream` (stderr by default)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.LogfmtRenderer(key_order=["ts", "level", "component", "event"], drop_missing=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str):
    """A logger bound to the module name."""
    return structlog.get_logger(component=name.rpartition(".")[2])
