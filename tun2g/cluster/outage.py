"""Redis trouble, handled calmly: a breaker that fails fast while Redis is down, and one log line per interval."""

from __future__ import annotations

import time
from typing import Callable

from tun2g.log import get_logger

log = get_logger(__name__)

# While Redis is down, callers fail fast for this long after each failed
# attempt instead of each waiting for a connect timeout of its own.
RETRY_AFTER = 1.0
# A still-failing Redis is reported at most this often (never once per request).
LOG_INTERVAL = 30.0


class Outage:
    """Tracks whether Redis is reachable; `failed()` and `succeeded()` are called around each use."""

    def __init__(self, what: str, retry_after: float = RETRY_AFTER, log_interval: float = LOG_INTERVAL,
                 clock=time.monotonic, on_failure: Callable[[str], None] | None = None):
        """`on_failure(what)` is told of every failed call (the Redis error counter)."""
        self.what = what
        self._on_failure = on_failure
        self.retry_after = retry_after
        self.log_interval = log_interval
        self._clock = clock
        self.down_since: float | None = None
        self.recovered_at = float("-inf")
        self.last_error = ""
        self._retry_at = 0.0
        self._logged_at = 0.0
        self._failures = 0

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def should_try(self) -> bool:
        """False while a recent failure says Redis is down and the retry time has not come."""
        return self.down_since is None or self._clock() >= self._retry_at

    def failed(self, error: BaseException) -> None:
        """Record a failed Redis call; logs at the first failure and then once per log interval."""
        now = self._clock()
        self.last_error = str(error) or type(error).__name__
        self._retry_at = now + self.retry_after
        self._failures += 1
        if self._on_failure is not None:
            self._on_failure(self.what)
        if self.down_since is None:
            self.down_since = now
            self._logged_at = now
            log.warning("redis_unavailable", what=self.what, error=self.last_error,
                        effect="local backends keep working; requests for other nodes' domains get 503")
        elif now - self._logged_at >= self.log_interval:
            self._logged_at = now
            log.warning("redis_still_unavailable", what=self.what, error=self.last_error,
                        down_for=round(now - self.down_since, 1), failures=self._failures)

    def succeeded(self) -> None:
        """Record a working Redis call; logs the recovery once."""
        if self.down_since is not None:
            log.info("redis_recovered", what=self.what, down_for=round(self._clock() - self.down_since, 1),
                     failures=self._failures)
            self.down_since = None
            self.recovered_at = self._clock()
            self._failures = 0

    def recovered_within(self, seconds: float) -> bool:
        """Whether Redis came back from an outage less than `seconds` ago."""
        return self._clock() - self.recovered_at < seconds
