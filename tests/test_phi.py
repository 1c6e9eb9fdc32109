"""The phi accrual failure detector: values against the normal distribution, edge cases, properties."""

import json
import math
from statistics import NormalDist

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.phi import PHI_CEILING, PhiAccrualDetector, phi_of

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def detector_with_beats(interval: float, count: int, **options) -> PhiAccrualDetector:
    """A detector that saw `count` heartbeats `interval` seconds apart, the last at t=0."""
    options.setdefault("first_heartbeat_estimate", interval)
    detector = PhiAccrualDetector(**options)
    for beat in range(count):
        detector.heartbeat(now=(beat - count + 1) * interval)
    return detector


@pytest.mark.parametrize("sigmas", [0.0, 0.6, 1.5, 2.0, 2.5, 3.5, 4.0])
def test_phi_matches_the_normal_distribution(sigmas):
    # phi = -log10(1 - CDF), so 1 - 10^-phi must approximate the normal CDF (Akka's accuracy: 1e-3).
    phi = phi_of(elapsed=sigmas * 10, mean=0.0, std_dev=10.0)
    assert 1 - 10 ** -phi == pytest.approx(NormalDist().cdf(sigmas), abs=1e-3)


def test_no_heartbeat_yet_means_no_suspicion():
    detector = PhiAccrualDetector()
    assert detector.phi(now=1e9) == 0.0
    assert detector.is_available(now=1e9)
    assert detector.last_heartbeat is None


def test_first_heartbeat_uses_the_estimate():
    detector = PhiAccrualDetector(first_heartbeat_estimate=1.0)
    detector.heartbeat(now=100.0)
    assert detector.last_heartbeat == 100.0
    assert detector.phi(now=101.0) == pytest.approx(0.3, abs=0.2)  # on time: a coin flip
    assert detector.phi(now=104.0) > 4  # three estimates late
    assert not detector.is_available(now=110.0)


def test_regular_pings_stay_available_and_a_missing_peer_is_suspected():
    detector = detector_with_beats(5.0, 20)  # the server pings every 5 s
    assert detector.phi(now=5.0) < 1
    # min_std_dev keeps a perfectly regular ticker from being suspected one millisecond late
    assert detector.phi(now=5.1) < 1
    assert detector.is_available(now=6.0)
    assert not detector.is_available(now=9.0)
    assert detector.phi(now=1e6) == PHI_CEILING


def test_acceptable_pause_delays_suspicion():
    strict = detector_with_beats(1.0, 20)
    lenient = detector_with_beats(1.0, 20, acceptable_pause=3.0)
    assert not strict.is_available(now=4.0)
    assert lenient.is_available(now=4.0)


def test_an_outage_is_not_learned_as_a_normal_interval():
    detector = detector_with_beats(1.0, 20)
    detector.heartbeat(now=100.0)  # back after a 100-s outage
    assert not detector.is_available(now=104.0)  # still expects about 1-s intervals


def test_old_samples_are_forgotten():
    detector = detector_with_beats(10.0, 20, max_samples=3)
    for beat in range(1, 4):
        detector.heartbeat(now=float(beat))
    assert not detector.is_available(now=3.0 + 4.0)  # only the recent 1-s intervals count


def test_clock_going_backwards_is_not_an_error():
    detector = detector_with_beats(1.0, 5)
    detector.heartbeat(now=-10.0)
    assert detector.phi(now=-20.0) >= 0.0


def test_extreme_values_are_finite_and_json_encodable():
    detector = detector_with_beats(0.0, 50, min_std_dev=1e-9, first_heartbeat_estimate=1e-9)
    values = [detector.phi(now=t) for t in (0.0, 1e-12, 1.0, 1e300)]
    values += [phi_of(math.inf, 1.0, 1.0), phi_of(-math.inf, 1.0, 1.0), phi_of(math.inf, math.inf, 1.0)]
    assert all(math.isfinite(v) and 0.0 <= v <= PHI_CEILING for v in values)
    assert values[-1] == PHI_CEILING  # nonsense in, "no sign of life" out
    json.dumps(values, allow_nan=False)
    assert str(phi_of(-1e9, 0.0, 1.0)) == "0.0"  # never "-0.0"


@pytest.mark.parametrize("options, words", [
    ({"threshold": 0}, "threshold"), ({"max_samples": 0}, "max_samples"),
    ({"min_std_dev": 0}, "min_std_dev"), ({"acceptable_pause": -1}, "acceptable_pause"),
    ({"first_heartbeat_estimate": 0}, "first_heartbeat_estimate"),
])
def test_bad_options_say_which_one(options, words):
    with pytest.raises(ValueError, match=words):
        PhiAccrualDetector(**options)


intervals = st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=0, max_size=40)
elapsed = st.floats(min_value=0.0, max_value=1e7, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(intervals=intervals, first=elapsed, second=elapsed,
       min_std_dev=st.floats(min_value=1e-6, max_value=100.0),
       pause=st.floats(min_value=0.0, max_value=100.0))
def test_phi_never_decreases_as_time_passes(intervals, first, second, min_std_dev, pause):
    detector = PhiAccrualDetector(min_std_dev=min_std_dev, acceptable_pause=pause)
    now = 0.0
    for interval in [0.0, *intervals]:
        now += interval
        detector.heartbeat(now=now)
    earlier, later = sorted((first, second))
    phi_earlier, phi_later = detector.phi(now=now + earlier), detector.phi(now=now + later)
    assert 0.0 <= phi_earlier <= phi_later <= PHI_CEILING
    assert math.isfinite(phi_later)
    if detector.is_available(now=now + later):
        assert detector.is_available(now=now + earlier)


@settings(max_examples=300, deadline=None)
@given(mean=st.floats(min_value=-1e6, max_value=1e6), std_dev=st.floats(min_value=1e-9, max_value=1e6),
       first=st.floats(min_value=-1e12, max_value=1e12), second=st.floats(min_value=-1e12, max_value=1e12))
def test_phi_of_is_monotone_and_bounded(mean, std_dev, first, second):
    earlier, later = sorted((first, second))
    assert 0.0 <= phi_of(earlier, mean, std_dev) <= phi_of(later, mean, std_dev) <= PHI_CEILING
