"""One stream nobody reads must not stall the others: the max_stream_backlog reset."""

import gc
import os
import socket
import time

import gevent
import pytest
from greenlet import greenlet as raw_greenlet

from tests.smux.conftest import read_to_eof, serve_echo, sha256
from tun2g.smux import Config, StreamResetError


def _echo_through(stream, payload: bytes) -> bytes:
    writer = gevent.spawn(lambda: (stream.sendall(payload), stream.shutdown(socket.SHUT_WR)))
    echoed = read_to_eof(stream)
    writer.get()
    return echoed


@pytest.mark.parametrize("backlog", [256 * 1024, None])  # None: the v1 default, max_receive_buffer // 4
def test_a_never_read_stream_is_reset_and_the_others_flow(make_pair, backlog):
    server_config = Config(max_stream_backlog=backlog)
    limit = server_config.stream_backlog(1)
    pair = make_pair(Config(), server_config)
    ignored = pair.client.open_stream()
    ignored_on_server = pair.server.accept_stream(timeout=5)
    serve_echo(pair.server)
    flood = gevent.spawn(ignored.sendall, b"f" * (3 * limit))

    lowest_budget = [pair.server._state.budget]
    busy = pair.client.open_stream()
    payload = os.urandom(2 << 20)

    def watch_budget():
        while True:
            lowest_budget[0] = min(lowest_budget[0], pair.server._state.budget)
            gevent.idle()

    watcher = gevent.spawn(watch_budget)
    with gevent.Timeout(10, AssertionError("the busy stream stalled behind the ignored one")):
        assert sha256(_echo_through(busy, payload)) == sha256(payload)
        flood.get()
    watcher.kill()

    # Memory stayed bounded: the ignored stream never held more than its backlog.
    assert pair.server.config.max_receive_buffer - lowest_budget[0] <= limit + 2 * 65536 + (2 << 20)
    with pytest.raises(StreamResetError, match=f"stream {ignored.id} reset: its reader fell more than {limit} bytes"):
        ignored_on_server.recv(10)
    with pytest.raises(StreamResetError):
        ignored_on_server.send(b"x")
    assert ignored_on_server._state.buffered == 0
    # The reset stream's FIN reached the writer's side, and no budget leaked.
    with gevent.Timeout(5):
        assert read_to_eof(ignored) == b""
    assert pair.server._state.budget == pair.server.config.max_receive_buffer


def test_a_fast_reader_is_never_reset(make_pair):
    pair = make_pair(Config(), Config(max_stream_backlog=128 * 1024))
    serve_echo(pair.server)
    payload = os.urandom(16 << 20)
    assert sha256(_echo_through(pair.client.open_stream(), payload)) == sha256(payload)


def _live_greenlets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, raw_greenlet) and not obj.dead)


def test_sessions_leave_no_greenlets_behind(make_pair):
    before = _live_greenlets()
    for _ in range(10):
        pair = make_pair()
        serve_echo(pair.server)
        streams = [pair.client.open_stream() for _ in range(5)]
        for stream in streams:
            stream.sendall(b"ping")
            assert stream.recv(10) == b"ping"
        blocked = gevent.spawn(streams[0].recv, 10)
        pair.server.close()
        blocked.join(timeout=5)
        pair.close()
    gevent.idle()
    assert _live_greenlets() <= before


def test_a_stuck_stream_delays_the_others_only_once_and_briefly(make_pair):
    pair = make_pair()  # v1 defaults: backlog 1 MiB, the reader waits for a stuck stream once
    stuck = pair.client.open_stream()
    stuck_on_server = pair.server.accept_stream(timeout=5)
    serve_echo(pair.server)
    pinger = pair.client.open_stream()
    flood = gevent.spawn(stuck.sendall, b"f" * (8 << 20))
    slowest = 0.0
    with gevent.Timeout(10):
        while not flood.ready() or stuck_on_server._state.reset_message is None:
            started = time.monotonic()
            pinger.sendall(b"ping")
            assert pinger.recv(10) == b"ping"
            slowest = max(slowest, time.monotonic() - started)
    assert stuck_on_server._state.reset_message is not None
    assert slowest < 0.6, f"a round trip took {slowest:.2f} s while another stream was stuck"
