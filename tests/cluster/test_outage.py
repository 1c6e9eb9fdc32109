"""Redis trouble is logged once, then once per interval, and its end once; callers fail fast meanwhile."""

import io

import pytest
import structlog

from tun2g.cluster.outage import Outage
from tun2g.log import configure

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def log_lines():
    """The key=value log lines written during the test (logging restored afterwards)."""
    buffer = io.StringIO()
    configure("info", stream=buffer)
    yield lambda: buffer.getvalue().splitlines()
    structlog.reset_defaults()


def test_one_line_per_interval_and_fast_failure(log_lines):
    clock = Clock()
    outage = Outage("registry", retry_after=1.0, log_interval=30.0, clock=clock)
    assert outage.should_try() and not outage.is_down
    for _ in range(600):  # ten minutes of a failing call every second
        outage.failed(ConnectionError("refused"))
        assert not outage.should_try()
        clock.now += 1.0
        assert outage.should_try()
    outage.succeeded()
    assert outage.recovered_within(1.0) and not outage.is_down
    lines = log_lines()
    assert sum("redis_unavailable" in line for line in lines) == 1
    assert sum("redis_still_unavailable" in line for line in lines) == 19  # 600 s / 30 s, less the first
    assert sum("redis_recovered" in line for line in lines) == 1
