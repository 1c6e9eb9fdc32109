"""Token buckets: the arithmetic only (the caller passes the clock), for local limits and cluster leases."""

from __future__ import annotations

import math
from collections import OrderedDict

MAX_KEYS = 100_000  # buckets kept per limiter (client addresses choose themselves: bounded, oldest dropped)


class TokenBucket:
    """`rate` tokens per second up to `burst`; a request takes one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, count: float = 1.0) -> bool:
        """Take `count` tokens if there are that many; False (nothing taken) if not."""
        self._refill(now)
        if self.tokens >= count:
            self.tokens -= count
            return True
        return False

    def wait(self, now: float, count: float = 1.0) -> float:
        """Seconds until `count` tokens will be there (0 when they are now)."""
        self._refill(now)
        return max(0.0, (count - self.tokens) / self.rate)


def retry_after(seconds: float) -> int:
    """The Retry-After value for a wait: whole seconds, at least 1 (RFC 9110 section 10.2.3)."""
    return max(1, math.ceil(seconds))


class KeyedBuckets:
    """One TokenBucket per key (a client address), at most `max_keys`: the least recently used go first."""

    __slots__ = ("rate", "burst", "max_keys", "_buckets")

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)  # a forgotten bucket comes back full: errs towards admitting
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def lease_size(rate: float, burst: float, share: float) -> int:
    """Tokens a node takes from a shared bucket at once: `share` seconds of the rate, 1 to burst."""
    return max(1, min(int(burst), int(rate * share)))
