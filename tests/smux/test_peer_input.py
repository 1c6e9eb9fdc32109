"""A Session facing hand-made bytes from a raw socket: every case of docs/protocol.md#receiving and #protocol-errors."""

import socket
import time

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.smux.conftest import PSH, UPD, assert_session_finished, quiet_config
from tun2g.smux import Config, ProtocolError, Session, SessionClosedError, StreamResetError
from tun2g.smux.frame import FIN, NOP, SYN, encode_frame, encode_header, encode_update


def server_for(peer, **config):
    return Session(peer.session_end, client=False, config=quiet_config(**config))


def test_unknown_streams_known_syns_and_stray_fins_are_tolerated(raw_peer):
    peer = raw_peer()
    session = server_for(peer)
    peer.send(encode_frame(1, PSH, 99, b"for nobody")  # dropped
              + encode_frame(1, FIN, 77)  # ignored
              + encode_frame(1, NOP, 0)
              + encode_frame(1, SYN, 4)  # any id, any parity
              + encode_frame(1, PSH, 4, b"a")
              + encode_frame(1, SYN, 4)  # already known: no second accept
              + encode_frame(1, PSH, 4, b"b" * 65535))  # the longest PSH there is
    stream = session.accept_stream(timeout=5)
    assert stream.id == 4
    received = b""
    while len(received) < 65536:
        received += stream.recv(1 << 20)
    assert received == b"a" + b"b" * 65535
    with pytest.raises(socket.timeout):
        session.accept_stream(timeout=0.05)
    assert session.num_streams == 1 and not session.is_closed


@pytest.mark.parametrize("version, wire, message", [
    (1, encode_frame(2, NOP, 0), "version byte 2 where 1 was expected"),
    (2, encode_frame(1, NOP, 0), "version byte 1 where 2 was expected"),
    (1, encode_header(1, 9, 0, 3), "unknown command 9"),
    (1, encode_update(1, 3, 10, 10), "UPD frame on a version-1 session"),
    (1, encode_header(1, SYN, 3, 5) + b"abc", "SYN frame with length 3"),
    (1, encode_header(1, FIN, 1, 3) + b"a", "FIN frame with length 1"),
    (1, encode_header(1, NOP, 8, 0) + b"\0" * 8, "NOP frame with length 8"),
    (2, encode_header(2, UPD, 12, 3) + b"\0" * 12, "UPD frame with length 12"),
])
def test_malformed_input_closes_the_session_and_wakes_everyone(raw_peer, version, wire, message):
    peer = raw_peer(version)
    session = server_for(peer, version=version)
    peer.send(encode_frame(version, SYN, 3))
    stream = session.accept_stream(timeout=5)
    blocked_recv = gevent.spawn(stream.recv, 10)
    blocked_accept = gevent.spawn(session.accept_stream)
    gevent.idle()  # both calls are now waiting on the session
    peer.send(wire)
    assert session.wait_closed(5)
    assert isinstance(session.close_reason, ProtocolError)
    assert message in str(session.close_reason)
    for greenlet in (blocked_recv, blocked_accept):
        greenlet.join(timeout=5)
        assert isinstance(greenlet.exception, SessionClosedError)
        assert message in str(greenlet.exception)
    assert_session_finished(session)
    assert peer.sock.recv(100) == b""  # the transport was closed


@pytest.mark.parametrize("wire, where", [
    (b"", ""),
    (encode_header(1, PSH, 100, 3) + b"only part", " in the middle of a frame"),
    (encode_frame(1, NOP, 0)[:5], " in the middle of a frame"),
])
def test_transport_eof_ends_the_session_with_a_reason(raw_peer, wire, where):
    peer = raw_peer()
    session = server_for(peer)
    peer.send(encode_frame(1, SYN, 3) + wire)
    stream = session.accept_stream(timeout=5)
    peer.sock.shutdown(socket.SHUT_WR)
    assert session.wait_closed(5)
    assert str(session.close_reason) == f"the peer closed the smux connection{where}"
    if wire.endswith(b"only part"):
        assert stream.recv(200) == b"only part"  # payload is streamed, so a cut frame's start arrives
    if where:
        with pytest.raises(SessionClosedError, match="middle of a frame"):
            stream.recv(200)  # ... but never a clean EOF
    assert_session_finished(session)


def test_buffered_data_is_still_readable_after_the_peer_left(raw_peer):
    peer = raw_peer()
    session = server_for(peer)
    peer.send(encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"last words"))
    stream = session.accept_stream(timeout=5)
    peer.sock.close()
    assert session.wait_closed(5)
    assert stream.recv(100) == b"last words"
    with pytest.raises(SessionClosedError):
        stream.recv(100)


def test_frames_we_send_have_the_right_shape(raw_peer):
    peer = raw_peer(2)
    session = Session(peer.session_end, client=True, config=quiet_config(version=2, max_frame_size=1000))
    stream = session.open_stream()
    stream.sendall(b"z" * 2500)
    stream.shutdown(socket.SHUT_WR)
    frames = peer.read_frames(lambda frames: frames and frames[-1][0] == FIN)
    assert frames == [(SYN, 3, None), (PSH, 3, b"z" * 1000), (PSH, 3, b"z" * 1000), (PSH, 3, b"z" * 500),
                      (FIN, 3, None)]
    session.close()


def test_v2_reader_sends_window_updates_like_go(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2, max_stream_buffer=65536)
    peer.send(encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"q" * 22))
    stream = session.accept_stream(timeout=5)
    assert stream.recv(100) == b"q" * 22
    # First read: UPD(consumed=22, window=own max_stream_buffer), as captured from kcptun.
    assert peer.read_frames(lambda frames: frames) == [(UPD, 3, (22, 65536))]
    peer.send(encode_frame(2, PSH, 3, b"r" * 40000))
    received = 0
    while received < 40000:
        received += len(stream.recv(10000))
    # The next UPD comes once half of max_stream_buffer has been read since the last one.
    assert peer.read_frames(lambda frames: len(frames) == 2)[1] == (UPD, 3, (40022, 65536))


def test_v2_writer_blocks_on_the_peer_window_and_resumes_on_updates(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2)
    peer.send(encode_frame(2, SYN, 3))
    stream = session.accept_stream(timeout=5)
    writer = gevent.spawn(stream.sendall, b"w" * 400000)
    peer.read_frames(lambda frames: peer.psh_bytes(3) >= 262144)
    assert not writer.join(timeout=0.2) and peer.psh_bytes(3) == 262144  # the initial window, exactly
    peer.send(encode_update(2, 3, 100000, 262144))  # consumed 100000: 100000 more may go
    peer.read_frames(lambda frames: peer.psh_bytes(3) >= 362144)
    assert not writer.join(timeout=0.2) and peer.psh_bytes(3) == 362144
    peer.send(encode_update(2, 3, 362144, 65536))
    writer.get(timeout=5)
    peer.read_frames(lambda frames: peer.psh_bytes(3) == 400000)


def test_v2_window_arithmetic_wraps_around_uint32(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2)
    peer.send(encode_frame(2, SYN, 3))
    stream = session.accept_stream(timeout=5)
    stream._state.num_written = stream._state.peer_consumed = 0xFFFFFFFF - 10
    stream.sendall(b"k" * 100)  # counters wrap past 2**32 without blocking or erroring
    assert stream._state.num_written == 89
    peer.read_frames(lambda frames: peer.psh_bytes(3) == 100)


def test_v2_writer_gets_broken_pipe_when_the_peer_finishes(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2)
    peer.send(encode_frame(2, SYN, 3))
    stream = session.accept_stream(timeout=5)
    writer = gevent.spawn(stream.sendall, b"w" * 300000)
    peer.read_frames(lambda frames: peer.psh_bytes(3) >= 262144)
    peer.send(encode_frame(2, FIN, 3))
    writer.join(timeout=5)
    assert isinstance(writer.exception, BrokenPipeError)


def test_keepalive_sends_nops_and_expires_a_silent_peer(raw_peer):
    peer = raw_peer()
    session = Session(peer.session_end, client=False,
                      config=Config(keepalive_interval=0.1, keepalive_timeout=0.3))
    started = time.monotonic()
    peer.send(encode_frame(1, SYN, 3))  # one header, then silence
    peer.read_frames(lambda frames: len(frames) >= 2)
    assert peer.frames[:2] == [(NOP, 0, None), (NOP, 0, None)]
    assert session.wait_closed(5)
    elapsed = time.monotonic() - started
    assert str(session.close_reason) == "keepalive timeout: nothing received in 0.3 s"
    assert 0.3 <= elapsed < 2.0  # Go semantics: between 1x and 2x the timeout (+ slack for a busy host)
    assert_session_finished(session)


def test_keepalive_keeps_talking_sessions_open(make_pair):
    config = Config(keepalive_interval=0.05, keepalive_timeout=0.15)
    pair = make_pair(config, config)
    assert not pair.client.wait_closed(0.6)
    assert not pair.server.is_closed


def test_frames_split_into_single_bytes_decode_the_same(raw_peer):
    peer = raw_peer()
    session = server_for(peer)
    wire = encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"byte by byte") + encode_frame(1, FIN, 3)
    for byte in wire:
        peer.send(bytes([byte]))
    stream = session.accept_stream(timeout=5)
    assert stream.recv(100) == b"byte by byte"
    assert stream.recv(100) == b""


def test_the_accept_backlog_pauses_the_reader_and_loses_nothing(raw_peer):
    peer = raw_peer()
    session = server_for(peer)
    count = 1100  # more than Go's accept backlog of 1024
    peer.send(b"".join(encode_frame(1, SYN, 2 * i + 3) + encode_frame(1, PSH, 2 * i + 3, b"%d" % i)
                       for i in range(count)))
    streams = [session.accept_stream(timeout=5) for _ in range(count)]
    assert [stream.id for stream in streams] == [2 * i + 3 for i in range(count)]
    assert [stream.recv(10) for stream in streams] == [b"%d" % i for i in range(count)]


def test_a_spent_budget_pauses_reading_until_the_application_reads(raw_peer):
    peer = raw_peer()
    session = server_for(peer, max_receive_buffer=65536, max_stream_buffer=65536, max_stream_backlog=8 << 20)
    payload = bytes(range(256)) * 4096  # 1 MiB, 16 times the budget
    peer.send(encode_frame(1, SYN, 3))
    stream = session.accept_stream(timeout=5)
    sender = gevent.spawn(lambda: [peer.send(encode_frame(1, PSH, 3, payload[i:i + 32768]))
                                   for i in range(0, len(payload), 32768)])
    with gevent.Timeout(5):
        while session._state.budget > 0:  # the reader fills the budget, then stops reading
            stream._readable.clear()
            stream._readable.wait()
    assert session._state.budget <= 0
    received = bytearray()
    with gevent.Timeout(10):
        while len(received) < len(payload):
            received += stream.recv(4096)
            assert stream._state.buffered <= 65536 + 1024  # the budget, plus at most one small read
    assert received == payload
    sender.get(timeout=5)


def test_v2_update_claiming_unsent_bytes_is_a_protocol_error(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2)
    peer.send(encode_frame(2, SYN, 3) + encode_update(2, 99, 5, 5)  # unknown stream: ignored
              + encode_update(2, 3, 1000, 262144))  # consumed 1000 of the 0 bytes we sent
    stream = session.accept_stream(timeout=5)
    with pytest.raises(SessionClosedError, match="reports 1000 bytes consumed but only 0 were sent"):
        stream.sendall(b"x")
    assert isinstance(session.close_reason, ProtocolError)


def test_v2_peer_ignoring_the_window_trips_the_backlog(raw_peer):
    peer = raw_peer(2)
    session = server_for(peer, version=2)  # default backlog in v2: 2 * 262144
    peer.send(encode_frame(2, SYN, 3) + encode_frame(2, SYN, 5))
    ignored, busy = session.accept_stream(timeout=5), session.accept_stream(timeout=5)
    flood = encode_frame(2, PSH, 3, b"f" * 65535)
    peer.send(flood * 9 + encode_frame(2, PSH, 5, b"still fine"))  # 589815 bytes > 524288
    assert busy.recv(100) == b"still fine"
    with pytest.raises(StreamResetError, match="stream 3 reset: its reader fell more than 524288 bytes behind"):
        ignored.recv(10)
    assert peer.read_frames(lambda frames: (FIN, 3, None) in frames)
    assert not session.is_closed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(
    st.binary(max_size=40),  # garbage
    st.builds(lambda sid, data: encode_frame(1, PSH, sid, data), st.sampled_from([3, 5, 7]), st.binary(max_size=300)),
    st.builds(lambda cmd, sid: encode_frame(1, cmd, sid), st.sampled_from([SYN, FIN, NOP]), st.sampled_from([3, 5, 7])),
), max_size=12))
def test_any_input_ends_cleanly_when_the_peer_leaves(raw_peer, pieces):
    peer = raw_peer()
    session = server_for(peer)
    readers = []

    def read_until_the_end(stream):
        try:
            while stream.recv(1000):
                pass
        except SessionClosedError:
            pass

    def accept_and_read():
        try:
            while True:
                readers.append(gevent.spawn(read_until_the_end, session.accept_stream()))
        except SessionClosedError:
            pass

    acceptor = gevent.spawn(accept_and_read)
    for piece in pieces:
        peer.send(piece)
    peer.sock.close()
    assert session.wait_closed(5)
    assert isinstance(session.close_reason, (ProtocolError, SessionClosedError))
    assert_session_finished(session)
    gevent.joinall([acceptor, *readers], timeout=5)
    assert all(greenlet.dead for greenlet in [acceptor, *readers])
