"""Session liveness between Python and Go smux: keepalive expiry both ways, and session death waking callers."""

import time

import gevent
import pytest

from tests.smux.interop.harness import echo_check, digest, link, payload
from tun2g.smux import Config, SessionClosedError

VERSIONS = [1, 2]
TIMEOUT = 0.5  # keepalive timeout used on the side that should notice the silence


def fast_keepalive(version: int) -> Config:
    return Config(version=version, keepalive_interval=0.1, keepalive_timeout=TIMEOUT)


@pytest.mark.parametrize("version", VERSIONS)
def test_python_closes_the_session_when_the_go_peer_goes_silent(go_peer, version):
    link_ = link(go_peer, "client", version, "silent", config=fast_keepalive(version))
    data = payload(0, 1000)
    assert echo_check(link_.session.open_stream(), data) == digest(data)  # the peer is up
    waiting = gevent.spawn(link_.session.accept_stream)

    # Go checks once per period, so silence is noticed after 1x to 2x the timeout.
    assert link_.session.wait_closed(timeout=2 * TIMEOUT + 1.0)
    assert "keepalive" in str(link_.session.close_reason)
    with pytest.raises(SessionClosedError):
        waiting.get(timeout=1)
    link_.go.wait_for(r"SESSION-END")  # Go sees its connection closed


@pytest.mark.parametrize("version", VERSIONS)
def test_go_nops_keep_a_python_session_with_a_short_timeout_alive(go_peer, version):
    link_ = link(go_peer, "client", version, "echo", "--keepalive-interval", "100ms",
                 config=fast_keepalive(version))
    assert not link_.session.wait_closed(timeout=4 * TIMEOUT)
    data = payload(1, 5000)
    assert echo_check(link_.session.open_stream(), data) == digest(data)


@pytest.mark.parametrize("version", VERSIONS)
def test_go_closes_the_session_when_the_python_peer_goes_silent(go_peer, version):
    silent = Config(version=version, keepalive_disabled=True)
    link_ = link(go_peer, "server", version, "echo", "--keepalive-interval", "100ms",
                 "--keepalive-timeout", f"{int(TIMEOUT * 1000)}ms", config=silent)
    stream = link_.session.open_stream()
    data = payload(2, 1000)
    stream.sendall(data)  # one exchange proves the session is up, then Python says nothing
    reading = gevent.spawn(lambda: [stream.recv(len(data)), stream.recv(1)])
    started = time.monotonic()

    link_.go.wait_for(r"SESSION-END", timeout=2 * TIMEOUT + 1.0)
    assert link_.session.wait_closed(timeout=2)
    assert time.monotonic() - started < 2 * TIMEOUT + 1.0
    with pytest.raises(SessionClosedError):
        reading.get(timeout=1)


def _blocked_calls(link_, version: int) -> dict[str, gevent.Greenlet]:
    """Greenlets each stuck in one kind of blocking call on the link's session."""
    session = link_.session
    streams = [session.open_stream() for _ in range(4)]
    for _ in streams:
        link_.go.wait_for(r"STREAM id=")  # Go has the session, so "close" will reach it
    calls = {
        "accept_stream": gevent.spawn(session.accept_stream),
        "recv": gevent.spawn(streams[0].recv, 100),
        "recv_into": gevent.spawn(streams[1].recv_into, bytearray(100)),
        "makefile.read": gevent.spawn(streams[2].makefile("rb").read, 10),
    }
    if version == 2:
        # Nobody reads the echo, so Go stops granting window and this send blocks.
        calls["sendall past the window"] = gevent.spawn(streams[3].sendall, bytes(8 << 20))
    return calls


@pytest.mark.parametrize("version", VERSIONS)
def test_go_closing_the_session_wakes_every_blocked_python_call(go_peer, version):
    link_ = link(go_peer, "client", version, "echo")
    calls = _blocked_calls(link_, version)
    gevent.idle()  # every call has run up to the point where it waits
    assert not [name for name, call in calls.items() if call.ready()]

    link_.go.send_line("close")
    gevent.joinall(list(calls.values()), timeout=5)
    outcomes = {name: type(call.exception).__name__ for name, call in calls.items()}
    assert outcomes == {name: "SessionClosedError" for name in calls}
    with pytest.raises(SessionClosedError):
        link_.session.open_stream()
