"""Phi accrual failure detector (Hayashibara et al., 2004), as Akka implements it.

Instead of a yes/no timeout, the detector reports phi, a suspicion level on a
log scale: phi = -log10(P(a heartbeat arrives later than now)), where the
inter-arrival times of recent heartbeats (health-ping replies) are modelled
as a normal distribution. phi 1 means a 10 % chance the peer is merely slow,
phi 3 a 0.1 % chance, phi 8 (the default threshold) one in 10^8.

Like Akka's PhiAccrualDetector, we use the logistic approximation of
the normal CDF (Bowling et al., 2009), F(y) ~ 1 / (1 + exp(-y (1.5976 + 0.070566 y^2))),
so P(later) = 1 - F(y) and phi = log10(1 + exp(z)) with z = y (1.5976 + 0.070566 y^2),
y = (elapsed - mean) / std_dev. We evaluate it as a numerically stable
softplus, so phi is finite and never NaN for any input (the Go original
reported +Inf and NaN, which JSON cannot encode), and clamp it to PHI_CEILING.

Also as in Akka: the history is seeded at the first heartbeat from
first_heartbeat_estimate (mean) and a quarter of it (std dev); std_dev is at
least min_std_dev, since pings on a fixed ticker have almost none and phi
would jump from 0 to "dead" on the first late millisecond; acceptable_pause
is added to the mean to tolerate known pauses; an interval is only recorded
while the peer is considered available, so an outage doesn't teach the
detector that outages are normal. Times are in seconds; every method takes
`now` so the detector is pure and testable (default: time.monotonic()).
"""

from __future__ import annotations

import math
import time
from collections import deque

PHI_CEILING = 1000.0  # far beyond any useful threshold; keeps values finite and readable
_LN10 = math.log(10.0)


class PhiAccrualDetector:
    """Suspicion that a peer has failed, from the arrival times of its heartbeats."""

    def __init__(self, threshold: float = 8.0, max_samples: int = 100, min_std_dev: float = 0.5,
                 acceptable_pause: float = 0.0, first_heartbeat_estimate: float = 5.0) -> None:
        _require(0 < threshold <= PHI_CEILING, f"threshold must be in (0, {PHI_CEILING}], got {threshold}")
        _require(max_samples >= 1, f"max_samples must be at least 1, got {max_samples}")
        _require(min_std_dev > 0, f"min_std_dev must be positive (seconds), got {min_std_dev}")
        _require(acceptable_pause >= 0, f"acceptable_pause must be >= 0 (seconds), got {acceptable_pause}")
        _require(first_heartbeat_estimate > 0,
                 f"first_heartbeat_estimate must be positive (seconds), got {first_heartbeat_estimate}")
        self.threshold = threshold
        self.min_std_dev = min_std_dev
        self.acceptable_pause = acceptable_pause
        self.first_heartbeat_estimate = first_heartbeat_estimate
        self._intervals: deque[float] = deque(maxlen=max_samples)
        self._last_heartbeat: float | None = None

    @property
    def last_heartbeat(self) -> float | None:
        """When the last heartbeat arrived (None before the first)."""
        return self._last_heartbeat

    def heartbeat(self, now: float | None = None) -> None:
        """Record that a heartbeat arrived at `now`."""
        now = time.monotonic() if now is None else now
        if self._last_heartbeat is None:
            estimate = self.first_heartbeat_estimate
            self._intervals.extend((estimate - estimate / 4, estimate + estimate / 4))
        elif self.is_available(now):
            self._intervals.append(max(0.0, now - self._last_heartbeat))
        self._last_heartbeat = now

    def phi(self, now: float | None = None) -> float:
        """The suspicion level at `now`: 0.0 before the first heartbeat, always finite and >= 0."""
        if self._last_heartbeat is None:
            return 0.0
        now = time.monotonic() if now is None else now
        elapsed = max(0.0, now - self._last_heartbeat)
        mean, std_dev = self._interval_stats()
        return phi_of(elapsed, mean + self.acceptable_pause, max(std_dev, self.min_std_dev))

    def is_available(self, now: float | None = None) -> bool:
        """True while phi stays below the threshold."""
        return self.phi(now) < self.threshold

    def _interval_stats(self) -> tuple[float, float]:
        count = len(self._intervals)
        mean = math.fsum(self._intervals) / count
        variance = math.fsum((interval - mean) ** 2 for interval in self._intervals) / count
        return mean, math.sqrt(variance)


def phi_of(elapsed: float, mean: float, std_dev: float) -> float:
    """phi for `elapsed` seconds since the last heartbeat, given the interval distribution."""
    y = (elapsed - mean) / std_dev
    if math.isnan(y):
        return PHI_CEILING  # only with non-finite inputs; treat as "no sign of life"
    y = max(-1e6, min(1e6, y))  # beyond this phi is 0 or the ceiling anyway; avoids y**3 overflow
    z = y * (1.5976 + 0.070566 * y * y)
    # softplus(z) = log(1 + e^z), computed without overflow or loss of precision
    softplus = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    return min(PHI_CEILING, max(0.0, softplus / _LN10))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
