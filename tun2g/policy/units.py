"""Sizes ("10M"), durations ("30s") and rates ("10/s") as people write them in flags and config files."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}  # K, M, G are binary (KiB, MiB, GiB)
_NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
_DURATION = re.compile(_NUMBER + r"\s*(ms|s|m|h)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(_NUMBER + r"\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)", re.IGNORECASE)
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}

MAX_SIZE = 1 << 50           # bytes; anything larger is a typo
MAX_DURATION = 24 * 3600.0   # seconds
MAX_RATE = 1_000_000.0       # requests per second


class UnitError(ValueError):
    """A size, duration or rate that does not parse; the message says what is expected."""


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512", "16K", "10M", "1G" (binary units), at least 1."""
    if isinstance(value, bool):
        raise UnitError(f"expected a size such as 16K or 10M, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise UnitError(f"expected a size such as 16K or 10M, got {value!r}")
    if not 1 <= size <= MAX_SIZE:
        raise UnitError(f"a size must be between 1 byte and {MAX_SIZE} bytes, got {value!r}")
    return size


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "30s", "500ms", "2m" (a bare number is seconds), above 0."""
    if isinstance(value, bool):
        raise UnitError(f"expected a duration such as 30s or 500ms, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    else:
        raise UnitError(f"expected a duration such as 30s or 500ms, got {value!r}")
    if not 0 < seconds <= MAX_DURATION:  # also refuses NaN
        raise UnitError(f"a duration must be above 0 and at most {MAX_DURATION:g} s, got {value!r}")
    return seconds


def parse_rate(value: object) -> float:
    """Requests per second from a string like "10/s", "600/m", "5/10s" or a number (per second), above 0."""
    if isinstance(value, bool):
        raise UnitError(f"expected a rate such as 10/s or 600/m, got {value!r}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        per = float(match.group(2) or 1) * _RATE_UNITS[match.group(3).lower()]
        if per <= 0:
            raise UnitError(f"a rate's period must be above 0, got {value!r}")
        rate = float(match.group(1)) / per
    else:
        raise UnitError(f"expected a rate such as 10/s or 600/m, got {value!r}")
    if not 0 < rate <= MAX_RATE:
        raise UnitError(f"a rate must be above 0 and at most {MAX_RATE:g}/s, got {value!r}")
    return rate


def format_size(size: int) -> str:
    """The shortest exact form parse_size reads back ("16K", "10M", "1000")."""
    for unit in ("G", "M", "K"):
        factor = _SIZE_UNITS[unit.lower()]
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_rate(rate: float) -> str:
    """A rate as "N/s" (or "N/m" when that is a whole number and N/s is not)."""
    if rate == int(rate):
        return f"{int(rate)}/s"
    if rate * 60 == int(rate * 60):
        return f"{int(rate * 60)}/m"
    return f"{rate!r}/s"


def format_duration(seconds: float) -> str:
    """Seconds as parse_duration reads them back exactly ("30s", "0.5s")."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds!r}s"
