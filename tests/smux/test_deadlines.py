"""Deadlines: the timeouts of blocked stream calls, one libev timer for all, never early, nothing left behind."""

import socket
import time

import gevent
import pytest
from gevent.event import Event

from tests.fixtures.tunnel import wait_until
from tun2g.smux.timer import Deadlines

RESOLUTION = Deadlines.RESOLUTION


def _wait_until_set(event: Event, deadlines: Deadlines, deadline: float) -> float:
    """How late after `deadline` the Deadlines woke `event` (negative: early)."""
    watch = deadlines.wake_at(deadline, event)
    try:
        assert event.wait(5), "never woken"
    finally:
        deadlines.cancel(watch)
    return time.monotonic() - deadline


def test_a_wait_is_woken_after_its_deadline_never_before_it():
    deadlines = Deadlines()
    lateness = [_wait_until_set(Event(), deadlines, time.monotonic() + delay) for delay in (0.0, 0.01, 0.07, 0.12)]
    assert all(0 <= late for late in lateness), lateness
    assert max(lateness) < 2 * RESOLUTION + 0.5, lateness  # a tick, and loop turns on a busy machine
    assert len(deadlines) == 0


def test_two_waits_on_one_event_keep_their_own_deadlines():
    deadlines, event = Deadlines(), Event()
    now = time.monotonic()
    early, late = deadlines.wake_at(now + 0.05, event), deadlines.wake_at(now + 0.05, event)  # the same tick
    later = deadlines.wake_at(now + 0.3, Event())
    deadlines.cancel(early)  # cancelling one leaves the other filed
    assert len(deadlines) == 2
    assert event.wait(5)
    assert time.monotonic() >= now + 0.05
    deadlines.cancel(late)  # after it fired: nothing happens
    assert len(deadlines) == 1
    deadlines.cancel(later)
    assert len(deadlines) == 0


def test_waits_that_end_early_leave_nothing_filed_and_the_timer_stops():
    deadlines = Deadlines()
    for _ in range(10_000):
        deadlines.cancel(deadlines.wake_at(time.monotonic() + 120, Event()))
    assert len(deadlines) == 0
    wait_until(lambda: not deadlines._timer.active, timeout=5, message="the timer stopping at its next tick")
    assert deadlines._ticks == {} and deadlines._due == []  # the empty ticks are forgotten


def test_ten_thousand_blocked_waits_all_time_out_in_one_sweep():
    deadlines = Deadlines()
    events = [Event() for _ in range(10_000)]
    deadline = time.monotonic() + 0.1
    watches = [deadlines.wake_at(deadline, event) for event in events]
    assert events[-1].wait(5) and all(event.is_set() for event in events)
    assert time.monotonic() >= deadline
    for watch in watches:
        deadlines.cancel(watch)
    assert len(deadlines) == 0


@pytest.mark.parametrize("timeout", [0.05, 0.2])
def test_a_stream_read_with_a_timeout_raises_after_it_not_before(pair, timeout):
    filed = len(pair.client._deadlines)  # one per hub: other waits of the process count too
    stream = pair.client.open_stream()
    stream.settimeout(timeout)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        stream.recv(10)
    waited = time.monotonic() - started
    assert timeout <= waited < timeout + 2 * RESOLUTION + 0.5, waited
    assert len(pair.client._deadlines) == filed  # the read's wait is no longer filed


def test_data_before_the_deadline_ends_the_wait_and_unfiles_it(pair):
    stream = pair.client.open_stream()
    stream.sendall(b"ping")
    accepted = pair.server.accept_stream(timeout=5)
    accepted.settimeout(30)
    assert accepted.recv(4) == b"ping"
    filed = len(pair.server._deadlines)
    reader = gevent.spawn(accepted.recv, 4)
    wait_until(lambda: len(pair.server._deadlines) == filed + 1, message="the read filed under its 30 s deadline")
    stream.sendall(b"pong")
    assert reader.get(timeout=5) == b"pong"
    assert len(pair.server._deadlines) == filed
