"""The shared keepalive timer: one greenlet for every session, NOPs written directly, skipped when busy."""

import socket
import time

import gevent
from gevent.event import Event

from tun2g.smux import Config, Session
from tun2g.smux.frame import NOP, PSH, SYN, encode_frame
from tun2g.smux.timer import SharedTimer, shared_timer

from .conftest import assert_session_finished, tcp_pair

# Ticks never come on their own in the tests that drive them by hand.
NEVER = 3600.0


def test_one_timer_greenlet_runs_every_callback_until_it_stops_or_is_cancelled():
    timer = SharedTimer()
    counts = {"a": 0, "b": 0, "c": 0}
    done = Event()

    def every(name, times):
        def tick():
            counts[name] += 1
            if name == "a" and counts["a"] == 5:
                done.set()
            return 0.01 if counts[name] < times else None
        return tick

    timer.call_later(0, every("a", 5))
    timer.call_later(0, every("b", 2))
    cancelled = timer.call_later(0.01, every("c", 100))
    cancelled.cancel()
    assert done.wait(5)
    assert counts == {"a": 5, "b": 2, "c": 0}
    greenlet = timer.greenlet
    if greenlet is not None:
        greenlet.join(5)  # nothing left to run (the cancelled entry falls due): the greenlet ends
    assert timer.greenlet is None and len(timer) == 0


def test_a_failing_callback_is_dropped_and_the_others_go_on():
    timer = SharedTimer()
    ticks = []
    done = Event()

    def broken():
        raise RuntimeError("a bug in one session")

    def healthy():
        ticks.append(1)
        if len(ticks) == 3:
            done.set()
            return None
        return 0.01

    timer.call_later(0, broken)
    timer.call_later(0, healthy)
    assert done.wait(5)
    assert len(timer) == 0


def test_no_callback_runs_before_its_time_so_a_not_yet_answer_cannot_spin():
    timer = SharedTimer()
    calls = []
    done = Event()
    deadline = time.monotonic() + 0.2

    def wait_for_deadline():  # like a liveness tick: "not yet, come back in what is left"
        calls.append(time.monotonic())
        left = deadline - time.monotonic()
        if left <= 0:
            done.set()
            return None
        return left

    timer.call_later(0.1, wait_for_deadline)
    assert done.wait(5)
    assert calls[0] >= deadline - 0.1 - 0.001 and calls[-1] >= deadline
    assert len(calls) <= 3  # run when due, never early: no loop of tiny delays


def test_an_earlier_entry_wakes_a_timer_sleeping_until_a_later_one():
    timer = SharedTimer()
    fired = Event()
    timer.call_later(NEVER, lambda: None)
    gevent.sleep(0)  # the timer greenlet now sleeps for an hour
    started = time.monotonic()
    timer.call_later(0.01, fired.set)
    assert fired.wait(5)
    assert time.monotonic() - started < 4


def test_many_sessions_share_one_timer_greenlet_and_hold_no_other_idle_greenlet():
    pairs = [tcp_pair() for _ in range(20)]
    config = Config(keepalive_interval=0.05, keepalive_timeout=10)
    sessions = [Session(end, client=False, config=config) for _, end in pairs]
    try:
        for peer, _ in pairs:  # every session keeps sending NOPs
            peer.settimeout(5)
            assert peer.recv(16)[:8] == encode_frame(1, NOP, 0)
        assert shared_timer().greenlet is not None
        for session in sessions:
            assert session.greenlets == []  # reads from the hub, keepalives written directly: no greenlet
    finally:
        for session in sessions:
            session.close()
        for peer, _ in pairs:
            peer.close()
    for session in sessions:
        assert_session_finished(session)


class CountingStarts:
    """Wraps a writer's _start to count how often a writer greenlet was asked for."""

    def __init__(self, writer):
        self.calls = 0
        self._start = writer._start
        writer._start = self

    def __call__(self):
        self.calls += 1
        self._start()


def test_a_keepalive_is_written_directly_and_skipped_after_traffic(raw_peer):
    peer = raw_peer()
    session = Session(peer.session_end, client=False, config=Config(keepalive_interval=NEVER, keepalive_timeout=NEVER))
    try:
        starts = CountingStarts(session._writer)
        session._on_keepalive_tick()
        peer.read_frames(lambda frames: len(frames) == 1)
        assert peer.frames == [(NOP, 0, None)] and starts.calls == 0
        stream = session.open_stream()
        stream.sendall(b"traffic")
        peer.read_frames(lambda frames: (PSH, stream.id, b"traffic") in frames)
        count = len(peer.frames)
        session._on_keepalive_tick()  # the session wrote since the last tick: no NOP
        session._on_keepalive_tick()  # nothing since: a NOP
        peer.read_frames(lambda frames: len(frames) > count)
        assert peer.frames[count:] == [(NOP, 0, None)]
    finally:
        session.close()
    assert_session_finished(session)


def test_a_keepalive_never_blocks_the_timer_on_a_full_socket_and_still_arrives_whole():
    peer, end = tcp_pair()
    end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    session = Session(end, client=False, config=Config(keepalive_interval=NEVER, keepalive_timeout=NEVER))
    nop = encode_frame(1, NOP, 0)
    try:
        sent = 0
        with gevent.Timeout(10):
            while True:  # fill the kernel buffers with whole NOPs until the socket would block
                try:
                    count = end._sock.send(nop * 512)
                except BlockingIOError:
                    break
                sent += count
                while sent % len(nop):  # a partial frame: complete it byte by byte, or let the writer
                    try:
                        sent += end._sock.send(nop[sent % len(nop):])
                    except BlockingIOError:
                        session._writer._control.append((None, 0, nop[sent % len(nop):]))
                        sent += len(nop) - sent % len(nop)
                        break
                if session._writer._control:
                    break
        direct = not session._writer._control
        started = time.monotonic()
        session._on_keepalive_tick()  # must return at once although the socket is full
        assert time.monotonic() - started < 1
        if direct:  # the NOP went to send() itself, found no room, and left its bytes to a writer greenlet
            assert session._writer.greenlet is not None
        received = bytearray()
        expected = sent + len(nop)
        peer.settimeout(10)
        while len(received) < expected:
            data = peer.recv(1 << 20)
            assert data
            received += data
        assert received == nop * (expected // len(nop))
    finally:
        session.close()
        peer.close()
    assert_session_finished(session)


def test_a_silent_peer_is_still_cut_after_the_timeout(raw_peer):
    peer = raw_peer()
    session = Session(peer.session_end, client=False, config=Config(keepalive_interval=0.05, keepalive_timeout=0.2))
    started = time.monotonic()
    peer.send(encode_frame(1, SYN, 3))
    assert session.wait_closed(10)
    assert time.monotonic() - started >= 0.2
    assert str(session.close_reason) == "keepalive timeout: nothing received in 0.2 s"
    assert_session_finished(session)


def test_set_keepalive_changes_a_live_sessions_cadence(raw_peer):
    peer = raw_peer()
    session = Session(peer.session_end, client=False, config=Config(keepalive_interval=NEVER, keepalive_timeout=NEVER))
    try:
        session.set_keepalive(0.05, NEVER)
        peer.read_frames(lambda frames: frames.count((NOP, 0, None)) >= 2)
    finally:
        session.close()
    assert_session_finished(session)


def test_send_nowait_writes_a_small_message_directly_or_refuses_it_whole(raw_peer):
    peer = raw_peer(version=2)
    session = Session(peer.session_end, client=False,
                      config=Config(version=2, keepalive_interval=NEVER, keepalive_timeout=NEVER))
    try:
        stream = session.open_stream()
        peer.read_frames(lambda frames: (SYN, stream.id, None) in frames)
        assert session._writer.greenlet is None
        starts = CountingStarts(session._writer)
        assert stream.send_nowait(b'{"event":"ping","seq":1}\n')
        peer.read_frames(lambda frames: (PSH, stream.id, b'{"event":"ping","seq":1}\n') in frames)
        assert starts.calls == 0 and session._writer.greenlet is None
        assert not stream.send_nowait(b"x" * (256 * 1024 + 1))  # more than the peer's window: nothing sent
        stream.shutdown(socket.SHUT_WR)
        assert not stream.send_nowait(b"late")
    finally:
        session.close()
    assert_session_finished(session)


def test_queue_nowait_batches_what_streams_queue_in_one_turn_or_refuses_it_whole(raw_peer):
    peer = raw_peer(version=2)
    session = Session(peer.session_end, client=False,
                      config=Config(version=2, keepalive_interval=NEVER, keepalive_timeout=NEVER))
    try:
        first, second = session.open_stream(), session.open_stream()
        peer.read_frames(lambda frames: (SYN, second.id, None) in frames)
        writes = session._writer.writes
        assert first.queue_nowait(b"one") and second.queue_nowait(b"two")  # one turn of the loop: no yield
        peer.read_frames(lambda frames: (PSH, first.id, b"one") in frames and (PSH, second.id, b"two") in frames)
        assert session._writer.writes == writes + 1 and session._writer.greenlet is None  # one write, from the hub
        assert not first.queue_nowait(b"x" * (256 * 1024))  # more than the window left: nothing queued
        assert session._writer.queued_bytes == 0
        first.shutdown(socket.SHUT_WR)
        assert not first.queue_nowait(b"late")
    finally:
        session.close()
    assert_session_finished(session)
