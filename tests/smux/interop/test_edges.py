"""Edges between Python and Go smux: frame sizes, version mismatch and adoption, streams closed mid-transfer."""

import pytest

from tests.smux.interop.harness import EchoServer, digest, echo_check, echo_streams, link, payload
from tun2g.smux import Config, ProtocolError

VERSIONS = [1, 2]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("frame", [1, 65535])
def test_python_frame_size_extremes_are_accepted_by_go(go_peer, version, frame):
    link_ = link(go_peer, "client", version, "echo", config=Config(version=version, max_frame_size=frame))
    sizes = [0, 1, 3000, 70000] if frame == 1 else [65534, 65535, 65536, 200000]
    assert [ok for _, ok in echo_streams(link_.session, sizes)] == [True] * 4


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("frame", [1, 65535])
def test_go_frame_size_extremes_are_accepted_by_python(go_peer, version, frame):
    sizes = "0,1,3000" if frame == 1 else "65534,65535,65536,200000"
    link_ = link(go_peer, "server", version, "check", "--streams", 8, "--sizes", sizes, "--max-frame", frame)
    echo = EchoServer(link_.session)
    try:
        assert link_.go.wait_for(r"CHECK ok=(\d+) failed=(\d+)", timeout=20).group(1, 2) == ("8", "0")
    finally:
        echo.stop()


def test_a_v2_go_peer_is_a_protocol_error_for_a_v1_python_session(go_peer):
    link_ = link(go_peer, "server", 2, "check", "--streams", 1, config=Config(version=1))
    assert link_.session.wait_closed(timeout=5)
    assert isinstance(link_.session.close_reason, ProtocolError)
    link_.go.wait_for(r"CHECK ok=0 failed=1")


def test_a_v2_python_peer_is_a_protocol_error_for_a_v1_go_session(go_peer):
    link_ = link(go_peer, "client", 1, "echo", config=Config(version=2))
    link_.session.open_stream().sendall(b"hello")
    link_.go.wait_for(r"SESSION-END .*invalid protocol")
    assert link_.session.wait_closed(timeout=5)  # Go closes the connection, as kcptun does


@pytest.mark.parametrize("version", VERSIONS)
def test_a_python_client_without_a_version_adopts_the_go_servers(go_peer, version):
    link_ = link(go_peer, "client", version, "check", "--streams", 20, "--sizes", "1,70000",
                 config=Config(version=None))
    echo = EchoServer(link_.session)
    try:
        assert link_.go.wait_for(r"CHECK ok=(\d+) failed=(\d+)").group(1, 2) == ("20", "0")
        assert link_.session.version == version
    finally:
        echo.stop()


def test_v1_streams_closed_mid_transfer_give_their_budget_back(go_peer):
    # 16 x 4 MiB, one stream after the other, is far over the 4 MiB session budget:
    # if the unread bytes of a closed stream were not returned, the session would
    # stop reading and Go would never finish. Go 1.5.16 keeps writing after our
    # FIN (v1 has no window); those frames must be dropped without using budget.
    streams, per_stream = 16, 4 << 20
    # A backlog above what a stream can hold keeps tun2g's slow-stream reset out of the way.
    link_ = link(go_peer, "server", 1, "source", "--streams", streams, "--parallel", 1,
                 "--bytes", per_stream, config=Config(version=1, max_stream_backlog=2 * per_stream))
    for _ in range(streams):
        stream = link_.session.accept_stream(timeout=5)
        stream.settimeout(5)
        assert stream.recv(1000)
        stream.close()
    link_.go.wait_for(r"RESULT bytes=%d" % (streams * per_stream), timeout=20)
    data = payload(0, 100_000)
    assert echo_check(link_.session.open_stream(), data) == digest(data)  # still healthy


def test_v2_fin_unblocks_a_go_writer_waiting_for_window(go_peer):
    link_ = link(go_peer, "server", 2, "source", "--streams", 1, "--bytes", 8 << 20)
    stream = link_.session.accept_stream(timeout=5)
    stream.settimeout(5)
    assert stream.recv(1000)
    stream.close()
    assert link_.go.wait_exit(timeout=5) == 1
    assert "source stream failed: EOF" in link_.go.stderr


def test_a_tiny_python_receive_budget_still_carries_large_go_payloads(go_peer):
    # v1 only: in v2 an echo this small deadlocks between Go peers too (the UPD
    # a blocked writer needs waits behind data the spent budget will not read).
    config = Config(version=1, max_receive_buffer=65536, max_stream_buffer=65536)
    link_ = link(go_peer, "server", 1, "check", "--streams", 6, "--sizes", "1048576,70000,1", config=config)
    echo = EchoServer(link_.session)
    try:
        assert link_.go.wait_for(r"CHECK ok=(\d+) failed=(\d+)", timeout=20).group(1, 2) == ("6", "0")
    finally:
        echo.stop()


def test_keepalive_never_fires_while_python_stopped_reading_for_lack_of_budget(go_peer):
    # Go's rule: with the session budget spent the reader stops on purpose, so the
    # silence that follows is ours, not the peer's.
    total = 8 << 20
    config = Config(version=1, keepalive_interval=0.1, keepalive_timeout=0.3, max_stream_backlog=total)
    link_ = link(go_peer, "server", 1, "source", "--streams", 1, "--bytes", total, config=config)
    stream = link_.session.accept_stream(timeout=5)
    assert not link_.session.wait_closed(timeout=1.5)  # five timeout periods, nothing read
    stream.settimeout(10)
    received = 0
    while data := stream.recv(1 << 20):
        received += len(data)
    assert received == total
    assert not link_.session.is_closed
