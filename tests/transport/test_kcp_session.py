"""KCP connections between tun2g peers on loopback: stream semantics, framing on the wire, lifecycle."""

import gc
import hashlib
import os
import socket
import struct
import time

import gevent
import psutil
import pytest

from tests.fixtures.net import echo_forever, recv_exactly
from tun2g.transport import kcp_wire
from tun2g.transport.kcp import KCPListener, KCPOptions, kcp_dial


@pytest.fixture
def listener():
    listeners = []

    def start(options=KCPOptions(), host="127.0.0.1", **kwargs):
        listeners.append(KCPListener(host, 0, options, **kwargs))
        return listeners[-1]

    yield start
    for item in listeners:
        item.close()


@pytest.mark.parametrize("options", [KCPOptions(), KCPOptions.fast(), KCPOptions(crypt_header=True)],
                         ids=["defaults", "fast", "crypt-header"])
def test_echo_round_trip(listener, options):
    server = listener(options)
    client = kcp_dial("127.0.0.1", server.address[1], options)
    client.sendall(b"hello kcp")
    accepted = server.accept(timeout=5)
    echo = gevent.spawn(echo_forever, accepted)
    assert recv_exactly(client, 9) == b"hello kcp"
    assert accepted.getpeername() == ("127.0.0.1", client.getsockname()[1])
    assert client.getpeername() == ("127.0.0.1", server.address[1])
    assert accepted.conv == client.conv
    client.close()
    echo.kill()


def test_bulk_transfer_is_intact_and_fast_preset_is_fast(listener):
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    server = listener(KCPOptions.fast())
    client = kcp_dial("127.0.0.1", server.address[1], KCPOptions.fast())
    started = time.monotonic()
    sender = gevent.spawn(client.sendall, payload)
    accepted = server.accept(timeout=5)
    received = recv_exactly(accepted, size)
    elapsed = time.monotonic() - started
    sender.get(timeout=5)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert size / elapsed > 10e6, f"fast preset moved only {size / elapsed / 1e6:.1f} MB/s"


@pytest.mark.parametrize("options", [KCPOptions(), KCPOptions(crypt_header=True, mtu=1350)],
                         ids=["message-mode", "crypt-header"])
def test_wire_layout_matches_kcp_go(listener, udp_relay, options):
    server = listener(options)
    relay = udp_relay(server.address, record=True)
    client = kcp_dial(*relay.address, options)
    payload = os.urandom(200_000)
    sender = gevent.spawn(client.sendall, payload)
    accepted = server.accept(timeout=5)
    assert recv_exactly(accepted, len(payload)) == payload
    sender.get(timeout=5)
    sizes_seen = set()
    for _direction, datagram in relay.datagrams:
        assert len(datagram) <= options.mtu
        inbound = kcp_wire.parse_datagram(datagram, options.crypt_header)
        assert inbound is not None and inbound.conv == client.conv
        for header in kcp_wire.parse_segments(inbound.kcp):
            assert header.frg == 0  # every write cut at mss, like kcp-go
            sizes_seen.add(header.length)
    assert max(sizes_seen) == options.mtu - options.overhead - kcp_wire.SEGMENT_HEADER_SIZE


def test_recv_is_a_byte_stream_not_one_frame_per_segment(listener):
    server = listener()
    client = kcp_dial("127.0.0.1", server.address[1])
    for piece in (b"ab", b"cd", b"ef"):
        client.sendall(piece)
    accepted = server.accept(timeout=5)
    assert recv_exactly(accepted, 6) == b"abcdef"
    client.sendall(b"x" * 3000)
    assert accepted.recv(1) == b"x"
    buffer = bytearray(5000)
    total = 1
    while total < 3000:
        total += accepted.recv_into(buffer, 3000 - total)
    assert total == 3000


def test_timeouts_and_shutdown(listener):
    server = listener()
    client = kcp_dial("127.0.0.1", server.address[1])
    client.settimeout(0.2)
    assert client.gettimeout() == 0.2
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.recv(10)
    assert 0.15 < time.monotonic() - started < 1.0
    client.settimeout(0)
    with pytest.raises(BlockingIOError):
        client.recv(10)
    client.shutdown(socket.SHUT_RD)
    assert client.recv(10) == b""
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        client.sendall(b"late")
    client.close()
    with pytest.raises(OSError, match="closed"):
        client.sendall(b"after close")
    with pytest.raises(OSError, match="closed"):
        client.recv(10)


def test_idle_session_is_reaped(listener):
    options = KCPOptions(idle_timeout=0.5)
    server = listener(options)
    client = kcp_dial("127.0.0.1", server.address[1], options)
    client.sendall(b"ping")
    accepted = server.accept(timeout=5)
    assert recv_exactly(accepted, 4) == b"ping"
    assert server.session_count == 1
    client.close()  # KCP sends nothing on close: the server only sees silence
    started = time.monotonic()
    with pytest.raises(ConnectionResetError, match="sent nothing"):
        accepted.recv(10)
    assert 0.3 < time.monotonic() - started < 2.0
    assert server.session_count == 0


def raw_push(conv, sn, data=b"x"):
    return struct.pack("<IBBHIIII", conv, kcp_wire.CMD_PUSH, 0, 32, 0, sn, 0, len(data)) + data


def test_new_conv_with_sn_zero_replaces_the_session(listener):
    server = listener()
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.sendto(raw_push(0xDEADBEEF, 0, b"first"), server.address)
    first = server.accept(timeout=5)
    assert first.conv == 0xDEADBEEF and recv_exactly(first, 5) == b"first"
    raw.sendto(raw_push(0x11111111, 3, b"late"), server.address)  # new conv, sn != 0: dropped
    raw.sendto(raw_push(0x22222222, 0, b"again"), server.address)
    second = server.accept(timeout=5)
    assert second.conv == 0x22222222 and recv_exactly(second, 5) == b"again"
    with pytest.raises(ConnectionResetError, match="new conversation"):
        first.recv(10)
    assert server.session_count == 1
    raw.close()


def test_accept_backlog_is_bounded(listener):
    server = listener(backlog=2)
    socks = []
    for conv in range(5):
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.sendto(raw_push(conv + 1, 0), server.address)
        socks.append(raw)
    # Nothing yielded yet: the listener sees all five at once and queues only two.
    accepted = [server.accept(timeout=5), server.accept(timeout=5)]
    assert {conn.conv for conn in accepted} == {1, 2}
    assert server.session_count == 2
    socks[4].sendto(raw_push(5, 0), server.address)  # a retransmission finds room now
    assert server.accept(timeout=5).conv == 5
    for raw in socks:
        raw.close()


def live_greenlets():
    return sum(1 for item in gc.get_objects() if isinstance(item, gevent.Greenlet) and not item.dead)


def test_close_releases_sockets_and_greenlets(listener):
    process = psutil.Process()
    server = listener()
    fds, greenlets = process.num_fds(), live_greenlets()
    for _ in range(20):
        client = kcp_dial("127.0.0.1", server.address[1])
        client.sendall(b"hi")
        accepted = server.accept(timeout=5)
        assert recv_exactly(accepted, 2) == b"hi"
        accepted.close()
        client.close()
    assert server.session_count == 0
    assert process.num_fds() == fds
    assert live_greenlets() == greenlets
    server.close()
    assert process.num_fds() == fds - 1


def test_client_ignores_strangers_once_locked_onto_its_server(listener):
    server = listener()
    client = kcp_dial("127.0.0.1", server.address[1])
    client.sendall(b"hi")
    accepted = server.accept(timeout=5)
    accepted.sendall(b"a")  # server's sn 0: the client locks onto the listener's address
    assert recv_exactly(client, 1) == b"a"
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.sendto(raw_push(client.conv, 1, b"evil"), ("127.0.0.1", client.getsockname()[1]))
    accepted.sendall(b"good")  # the server's real sn 1
    assert recv_exactly(client, 4) == b"good"
    stranger.close()


@pytest.mark.parametrize("options, size", [(KCPOptions(), 200_000), (KCPOptions.fast(), 4 * 1024 * 1024)],
                         ids=["defaults", "fast"])
def test_a_reader_that_stops_reading_stops_the_sender(listener, options, size):
    server = listener(options)
    client = kcp_dial("127.0.0.1", server.address[1], options)
    payload = os.urandom(size)  # several receive windows' worth
    sender = gevent.spawn(client.sendall, payload)
    accepted = server.accept(timeout=5)
    sender.join(timeout=1.0)  # an observation window, not synchronisation
    assert not sender.ready(), "the sender was never held back by the receive window"
    core = accepted._ikcp
    assert core.nrcv_que <= options.rcv_wnd and core.nrcv_buf <= options.rcv_wnd  # memory stays bounded
    started = time.monotonic()
    assert recv_exactly(accepted, len(payload)) == payload
    sender.get(timeout=5)
    if options.nodelay:  # the reopened window is announced at once, not after a 7 s probe
        assert time.monotonic() - started < 3


def test_idle_connections_cost_no_cpu(listener):
    options = KCPOptions.fast()  # 10 ms ticks: 400 ticking ends would burn ~15 % of a core
    server = listener(options)
    clients = [kcp_dial("127.0.0.1", server.address[1], options) for _ in range(200)]
    for client in clients:
        client.sendall(b"x")
    for _ in clients:
        assert server.accept(timeout=5).recv(1) == b"x"
    process = psutil.Process()
    before, started = process.cpu_times(), time.monotonic()
    gevent.sleep(1.0)  # an observation window: nothing to wait for, we measure what idling costs
    after, elapsed = process.cpu_times(), time.monotonic() - started
    used = (after.user + after.system - before.user - before.system) / elapsed
    assert used < 0.08, f"400 idle KCP ends used {used:.0%} of a core"  # ticking: ~15 %; idle: 1-5 % under load
    for client in clients:
        client.close()


def test_ipv6_loopback(listener):
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        server = listener(host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    client = kcp_dial("::1", server.address[1])
    client.sendall(b"six")
    accepted = server.accept(timeout=5)
    assert recv_exactly(accepted, 3) == b"six"
    assert accepted.getpeername()[:2] == ("::1", client.getsockname()[1])


def test_options_default_to_kcp_go_and_refuse_nonsense():
    defaults = KCPOptions()
    assert (defaults.snd_wnd, defaults.rcv_wnd, defaults.mtu, defaults.interval) == (32, 32, 1400, 100)
    assert not (defaults.nodelay or defaults.resend or defaults.nc or defaults.stream_mode or defaults.crypt_header)
    assert KCPOptions.fast(mtu=1350).mtu == 1350 and KCPOptions.fast().stream_mode
    with pytest.raises(ValueError, match=r"use 70\.\.1500"):
        KCPOptions(mtu=1600, crypt_header=True)
    with pytest.raises(ValueError, match="interval"):
        KCPOptions(interval=1)
    with pytest.raises(ValueError, match="idle_timeout"):
        KCPOptions(idle_timeout=0)
