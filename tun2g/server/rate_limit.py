"""Rate limits for the edge policy: token buckets in this process, or shared by a cluster through Redis.

`LocalLimiter` keeps one bucket per key (a route, or a route and a client
address) in memory. `ClusterLimiter` shares each bucket through Redis
(``P ratelimit:<key>``, a hash with a TTL) with a local fast path: a node takes
tokens from the shared bucket in *leases* of LEASE_SHARE seconds of the rate
(at least 1, at most the burst) by one Lua script (EVALSHA), then admits
requests from its lease without asking Redis; a lease unused after LEASE_TTL
is dropped. A refusal is remembered until the shared bucket will have a token
again, so a flood past the limit costs no Redis call per request.

The error, with N nodes and a lease of L tokens (docs/policy.md): over any
interval T the cluster admits at most ``burst + rate*T + N*L`` (tokens leased
just before the interval, spent in it) and, while every node keeps asking, at
least ``rate*T - N*L`` (leases stranded on a node that no longer needs them).
When Redis cannot be reached each node falls back to its own local bucket
(the cluster then admits up to N times the rate) and logs it once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from tun2g.log import get_logger
from tun2g.policy.bucket import MAX_KEYS, TokenBucket, lease_size

log = get_logger(__name__)

LEASE_SHARE = 0.1  # seconds of a route's rate a node leases at once
LEASE_TTL = 1.0    # seconds a leased token may wait to be used

_TAKE_SCRIPT = """
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then tokens, stamp = burst, now end
if now > stamp then tokens, stamp = math.min(burst, tokens + (now - stamp) * rate / 1000), now end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ms', tostring(stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
local wait = 0
if granted < 1 then wait = math.ceil((1 - tokens) * 1000 / rate) end
return {granted, wait}
"""


class RateLimiter(Protocol):
    """Takes one token from the bucket named `key`; returns 0 when taken, else the seconds until one is there."""

    def take(self, key: str, rate: float, burst: int) -> float: ...

    def close(self) -> None: ...


class LocalLimiter:
    """This process's buckets, at most MAX_KEYS (the least recently used go first, coming back full)."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys

    def take(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:  # new, or its policy changed
            if bucket is None and len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
        else:
            self._buckets.move_to_end(key)
        return 0.0 if bucket.take(now) else bucket.wait(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def close(self) -> None:
        self._buckets.clear()


@dataclass(slots=True)
class _Lease:
    tokens: int
    expires: float       # monotonic: unused tokens are dropped after this
    refused_until: float = 0.0  # the shared bucket is empty until then: refuse without asking


class ClusterLimiter:
    """Buckets shared by every node through Redis, spent from local leases (see the module docstring)."""

    def __init__(self, redis_client, key_prefix: str, *, share: float = LEASE_SHARE, ttl: float = LEASE_TTL,
                 max_keys: int = MAX_KEYS, on_error=None) -> None:
        self._redis = redis_client
        self._prefix = key_prefix + "ratelimit:"
        self._script = redis_client.register_script(_TAKE_SCRIPT)
        self._share = share
        self._ttl = ttl
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._max_keys = max_keys
        self._fallback = LocalLimiter(max_keys)
        self._failing = False
        self._on_error = on_error or (lambda: None)
        self.shared_calls = 0  # Lua calls made (the cost the leases keep low)

    def take(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is not None:
            if lease.tokens > 0 and lease.expires > now:
                lease.tokens -= 1
                return 0.0
            if lease.refused_until > now:
                return lease.refused_until - now
        want = lease_size(rate, burst, self._share)
        try:
            self.shared_calls += 1
            granted, wait_ms = self._script(keys=[self._prefix + key], args=[repr(rate), burst, want])
        except Exception as exc:  # redis-py's errors, whatever the failure: the local bucket stands in
            if not self._failing:
                log.warning("rate_limit_shared_unavailable", error=str(exc) or type(exc).__name__,
                            effect="each node limits alone until Redis answers")
                self._failing = True
            self._on_error()
            return self._fallback.take(key, rate, burst)
        if self._failing:
            log.info("rate_limit_shared_back")
            self._failing = False
        if lease is None and len(self._leases) >= self._max_keys:
            self._leases.popitem(last=False)
        granted = int(granted)
        if granted < 1:
            wait = max(0.001, int(wait_ms) / 1000)
            self._leases[key] = _Lease(0, now, now + wait)
            return wait
        self._leases[key] = _Lease(granted - 1, now + self._ttl)
        self._leases.move_to_end(key)
        return 0.0

    def close(self) -> None:
        self._redis.close()
