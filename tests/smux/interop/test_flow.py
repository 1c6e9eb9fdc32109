"""Data a Go peer sends early or fast: nothing lost right after SYN, and v2 windows against a slow reader."""

import json
import socket
import subprocess
import time

import gevent
import pytest

from tests.smux.interop.harness import EchoServer, digest, link, read_exactly
from tun2g.smux import Config, Session

VERSIONS = [1, 2]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("parallel, streams", [(1, 1000), (64, 3000)])
def test_go_data_right_after_syn_is_never_lost(go_peer, version, parallel, streams):
    # Go writes its first PSH immediately after OpenStream's SYN, every cycle.
    link_ = link(go_peer, "server", version, "check", "--streams", streams, "--parallel", parallel,
                 "--sizes", "1,100,5000")
    echo = EchoServer(link_.session)
    try:
        check = link_.go.wait_for(r"CHECK ok=(\d+) failed=(\d+)", timeout=30)
        assert check.group(1, 2) == (str(streams), "0"), link_.go.lines[-5:]
        assert len(echo.accepted_ids) == streams
    finally:
        echo.stop()


def test_a_go_tun2_client_auth_sent_right_after_our_syn_always_arrives(go_binary):
    """The Go original sometimes drops this first PSH (docs/protocol.md#differences); we must not."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]
        for attempt in range(30):
            client = subprocess.Popen(
                [go_binary("tun2client"), "--server", f"127.0.0.1:{port}", "--token", f"tok{attempt}",
                 "--domain", "a.test", "--backend", "http://127.0.0.1:9"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                sock, _ = listener.accept()
                session = Session(sock, client=False, config=Config.tun2_server())
                control = session.open_stream()
                control.settimeout(5)
                expected = json.dumps({"token": f"tok{attempt}", "domain": "a.test"}, separators=(",", ":"))
                received = control.recv(1000)
                assert (control.id, received) == (2, expected.encode())
                session.close()
            finally:
                client.kill()
                client.wait()


def pattern(size: int) -> bytes:
    """What smuxpeer's source mode writes per call: byte i is i % 251."""
    return bytes(i % 251 for i in range(size))


GO_INITIAL_WINDOW = 262144


def test_v2_slow_python_reader_blocks_the_go_writer_and_loses_nothing(go_peer):
    total, chunk = 2 << 20, 65536
    link_ = link(go_peer, "server", 2, "source", "--streams", 1, "--bytes", total, "--write-chunk", chunk)
    stream = link_.session.accept_stream(timeout=5)

    # Unread, the stream holds at most Go's initial window: the writer must be stuck.
    with pytest.raises(TimeoutError):
        link_.go.wait_for(r"RESULT", timeout=0.5)

    received, go_finished_at = bytearray(), None
    while data := stream.recv(16384):
        received += data
        if go_finished_at is None:
            try:
                link_.go.wait_for(r"RESULT", timeout=0)
                go_finished_at = len(received)
            except TimeoutError:
                gevent.sleep(0.002)  # a slow consumer, not synchronisation
    if go_finished_at is None:
        link_.go.wait_for(r"RESULT")
        go_finished_at = len(received)
    assert digest(bytes(received)) == digest(pattern(chunk) * (total // chunk))
    # Go can have finished writing only once at most one window was still unread.
    assert go_finished_at is None or go_finished_at >= total - GO_INITIAL_WINDOW


def _count_until(stream, size: int) -> int:
    received = 0
    while received < size and (data := stream.recv(1 << 18)):
        received += len(data)
    return received


@pytest.mark.parametrize("version", VERSIONS)
def test_small_exchanges_stay_prompt_while_another_stream_moves_bulk(go_peer, version):
    # tun2 pings (1 s deadline) share the session with downloads; neither our
    # writer nor our reader may park one stream behind another's bulk.
    link_ = link(go_peer, "client", version, "echo")
    bulk, small = link_.session.open_stream(), link_.session.open_stream()
    bulk.settimeout(20)
    small.settimeout(5)
    size = 64 << 20
    writer = gevent.spawn(bulk.sendall, bytes(size))
    reader = gevent.spawn(_count_until, bulk, size)
    worst, exchanges = 0.0, 0
    while not reader.ready():
        started = time.monotonic()
        small.sendall(b"p" * 64)
        assert read_exactly(small, 64) == b"p" * 64
        worst, exchanges = max(worst, time.monotonic() - started), exchanges + 1
    writer.get()
    assert reader.get() == size
    assert exchanges > 1 and worst < 1.0
