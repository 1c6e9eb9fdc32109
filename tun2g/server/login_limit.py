"""Failed tunnel logins per source address: a token bucket each, in bounded memory.

Every rejected Auth spends one token of its source's bucket (BURST tokens,
refilled at REFILL_PER_SECOND); an address whose bucket is empty is refused at
once, before its Auth is read or checked, with a retryable reply, so guessing
tokens runs at about one try per second per address instead of over a thousand.
Successful logins spend nothing. IPv6 sources count per /64 (one host usually
holds the whole prefix). At most MAX_TRACKED sources are remembered; the least
recently seen is forgotten first (it then starts again with a full bucket).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from typing import Callable

from tun2g.log import get_logger

log = get_logger(__name__)

BURST = 10  # failures in a row before an address is held back
REFILL_PER_SECOND = 1.0
MAX_TRACKED = 10_000  # addresses remembered (LRU); about 100 bytes each
LOG_INTERVAL = 10.0  # seconds between "login_limited" lines for one address


class _Bucket:
    __slots__ = ("tokens", "stamp", "logged", "refused")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp
        self.logged = float("-inf")
        self.refused = 0


class LoginLimiter:
    """Per-source token buckets of failed logins."""

    def __init__(self, burst: int = BURST, refill_per_second: float = REFILL_PER_SECOND,
                 max_tracked: int = MAX_TRACKED, log_interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        if burst < 1 or refill_per_second <= 0 or max_tracked < 1:
            raise ValueError("LoginLimiter needs burst >= 1, refill_per_second > 0 and max_tracked >= 1")
        self.burst = burst
        self.refill = refill_per_second
        self.max_tracked = max_tracked
        self.log_interval = log_interval
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, remote: str) -> float:
        """0 when `remote` ("host:port") may try to log in now, else the seconds until it may (logged)."""
        key = source_key(remote)
        bucket = self._bucket(key)
        if bucket.tokens >= 1:
            return 0.0
        wait = (1 - bucket.tokens) / self.refill
        bucket.refused += 1
        now = self._clock()
        if now - bucket.logged >= self.log_interval:
            log.warning("login_limited", source=key, refused=bucket.refused, retry_in=round(wait, 1),
                        note=f"more than {self.burst} failed logins; refused at once for a while")
            bucket.logged, bucket.refused = now, 0
        return wait

    def failed(self, remote: str) -> None:
        """Spend one token of `remote`'s bucket."""
        bucket = self._bucket(source_key(remote))
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _bucket(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.refill)
            bucket.stamp = now
        return bucket


def source_key(remote: str) -> str:
    """The address a peer ("host:port", or a bare address) counts against: its IPv4 address, or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(remote.strip("[]"))  # a bare address (a trusted proxy's word)
    except ValueError:
        host, sep, port = remote.rpartition(":")  # the server's peers are "host:port", IPv6 hosts unbracketed
        if not sep or not port.isdigit():
            host = remote
        host = host.strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host  # "unknown" and the like: one bucket for all of them
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
