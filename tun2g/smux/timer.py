"""One timer greenlet for the periodic work of many sessions (keepalives, liveness pings), and one
libev timer for the deadlines of every blocked stream call (``deadlines()``).

A tunnel server holds thousands of idle sessions; giving each its own timers and a
greenlet per tick costs memory and CPU for nothing. ``shared_timer()`` returns the
process's (the hub's) ``SharedTimer``: a heap of due times served by one greenlet,
which sleeps until ``SLACK`` after the earliest entry and then runs every entry
due by then (never one before its time). A callback returns the delay until it should run again (None: done);
it must not block (it runs in the timer's greenlet, for everyone).
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Protocol

import gevent
from gevent.event import Event

from tun2g.log import get_logger

log = get_logger(__name__)

# The timer oversleeps by this much, so entries due this close together run in one wake-up:
# 10,000 sessions ticking every 10 s would otherwise wake the greenlet every millisecond.
SLACK = 0.02
# After this many callbacks in a row the timer yields to the other greenlets once.
BATCH = 256

TimerCallback = Callable[[], "float | None"]


class Settable(Protocol):
    """What Deadlines wakes: an Event, or anything else with ``set()``."""

    def set(self) -> None: ...


class TimerHandle:
    """One scheduled callback; ``cancel()`` drops it (lazily: it is skipped when due)."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: TimerCallback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Never run the callback again."""
        self.cancelled = True


class SharedTimer:
    """Many callbacks on one greenlet, each run when due and again after the delay it returns."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._order = itertools.count()
        self._wakeup = Event()
        self._greenlet: gevent.Greenlet | None = None

    def __len__(self) -> int:
        """Entries scheduled and not cancelled."""
        return sum(1 for entry in self._heap if not entry[2].cancelled)

    @property
    def greenlet(self) -> gevent.Greenlet | None:
        """The timer's greenlet while it has entries (for leak checks)."""
        return self._greenlet

    def call_later(self, delay: float, callback: TimerCallback) -> TimerHandle:
        """Run ``callback()`` in ``delay`` seconds; it returns the next delay, or None to stop."""
        handle = TimerHandle(callback)
        self._push(handle, delay)
        return handle

    def _push(self, handle: TimerHandle, delay: float) -> None:
        heap = self._heap
        due = self._clock() + max(0.0, delay)
        earlier = not heap or due < heap[0][0]
        heapq.heappush(heap, (due, next(self._order), handle))
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
        elif earlier:
            self._wakeup.set()

    def _run(self) -> None:
        heap, clock = self._heap, self._clock
        try:
            while heap:
                now = clock()
                ran = 0
                while heap and heap[0][0] <= now and ran < BATCH:  # never early: a callback re-checks its time
                    handle = heapq.heappop(heap)[2]
                    if not handle.cancelled:
                        ran += 1
                        self._fire(handle)
                if ran >= BATCH:
                    gevent.sleep(0)  # a crowd due at once: let the others run between batches
                elif heap:
                    self._wakeup.clear()
                    self._wakeup.wait(max(0.0, heap[0][0] - clock()) + SLACK)  # late by SLACK at most: batches
        finally:
            if self._greenlet is gevent.getcurrent():
                self._greenlet = None

    def _fire(self, handle: TimerHandle) -> None:
        try:
            delay = handle.callback()
        except Exception as exc:  # noqa: BLE001 - one session's bug must not stop everyone's timers
            log.error("timer_callback_failed", callback=repr(handle.callback), error=repr(exc))
            delay = None
        if delay is not None and not handle.cancelled:
            self._push(handle, delay)
        else:
            handle.cancelled = True


class Deadlines:
    """Wakes waits whose deadline has passed, at most RESOLUTION late, with one repeating libev timer.

    A stream call blocked with a timeout used to wait with a gevent Timeout: an exception object
    and a libev timer made, started and closed per wait, 4-6% of a proxy's CPU. Here a wait costs
    a set insertion and removal: ``wake_at`` files the wait's Event under its deadline's tick, and
    the timer, running only while waits are filed, sets the Events of every tick that has passed.
    The waiter re-checks its own deadline (a wake-up is never early, and may be spurious), so a
    timed-out call still raises where it did.
    """

    RESOLUTION = 0.05

    def __init__(self, loop=None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ticks: dict[int, set[_Watch]] = {}  # tick -> the waits due by its end
        self._due: list[int] = []                  # heap of the keys of _ticks
        self._watching = 0
        loop = loop if loop is not None else gevent.get_hub().loop
        self._timer = loop.timer(self.RESOLUTION, self.RESOLUTION)
        self._running = False

    def __len__(self) -> int:
        """Waits filed and not yet woken or cancelled."""
        return self._watching

    def wake_at(self, deadline: float, event: Settable) -> "_Watch":
        """Set ``event`` once ``deadline`` (on the clock) has passed, unless cancelled first.

        ``event``: an Event, or any object whose ``set()`` may run from the timer's callback (it must
        not wait, nor cancel the watch that fired: that one is gone already)."""
        tick = -int(-deadline // self.RESOLUTION)  # the first tick that starts at or after the deadline
        waits = self._ticks.get(tick)
        if waits is None:
            waits = self._ticks[tick] = set()
            heapq.heappush(self._due, tick)
        watch = _Watch(event, waits)
        waits.add(watch)
        self._watching += 1
        if not self._running:
            self._running = True
            self._timer.start(self._tick)
        return watch

    def cancel(self, watch: "_Watch") -> None:
        """The wait ended before its deadline (or after it: then nothing happens)."""
        waits = watch.waits
        if watch in waits:
            waits.discard(watch)
            self._watching -= 1

    def _tick(self) -> None:
        if not self._watching:  # nothing filed: forget the empty ticks and let the loop sleep
            self._ticks.clear()
            self._due.clear()
            self._timer.stop()
            self._running = False
            return
        now_tick = int(self._clock() // self.RESOLUTION)
        due, ticks = self._due, self._ticks
        while due and due[0] <= now_tick:
            waits = ticks.pop(heapq.heappop(due))
            self._watching -= len(waits)
            for watch in waits:
                watch.event.set()
            waits.clear()


class _Watch:
    """One wait filed in Deadlines (its identity is the set member: two waits on one Event stay apart)."""

    __slots__ = ("event", "waits")

    def __init__(self, event: Settable, waits: set) -> None:
        self.event = event
        self.waits = waits


# Per hub (one per thread running gevent): (the hub, its object), the hub kept to tell a new hub
# that reuses a dead one's id from it.
_per_hub: dict[tuple[type, int], tuple[object, object]] = {}


def _of_this_hub(kind: type):
    """The current hub's instance of `kind` (made with no arguments on first use)."""
    hub = gevent.get_hub()
    found = _per_hub.get((kind, id(hub)))
    if found is None or found[0] is not hub:
        found = _per_hub[(kind, id(hub))] = (hub, kind())
    return found[1]


def shared_timer() -> SharedTimer:
    """The SharedTimer of the current thread's hub (made on first use)."""
    return _of_this_hub(SharedTimer)


def deadlines() -> Deadlines:
    """The Deadlines of the current thread's hub (made on first use), on that hub's loop."""
    return _of_this_hub(Deadlines)
