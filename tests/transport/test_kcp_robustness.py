"""KCP under loss, junk floods and dead peers."""

import hashlib
import os
import random
import socket
import struct
import time

import gevent
import gevent.event
import psutil
import pytest

from tests.fixtures.net import recv_exactly
from tun2g.smux import Config, Session
from tun2g.transport import kcp_wire
from tun2g.transport.kcp import KCPListener, KCPOptions, kcp_dial


@pytest.mark.parametrize("loss", [0.01, 0.05])
def test_ten_mib_survive_a_lossy_path(udp_relay, loss):
    options = KCPOptions.fast()
    listener = KCPListener("127.0.0.1", 0, options)
    relay = udp_relay(listener.address, loss=loss, seed=42)
    client = kcp_dial(*relay.address, options)
    payload = os.urandom(10 * 1024 * 1024)
    sender = gevent.spawn(client.sendall, payload)
    try:
        received = recv_exactly(listener.accept(timeout=5), len(payload))
        sender.get(timeout=5)
    finally:
        client.close()
        listener.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert relay.dropped > loss * relay.forwarded / 2  # the path really was lossy


def test_defaults_recover_from_loss_too(udp_relay):
    listener = KCPListener("127.0.0.1", 0)
    relay = udp_relay(listener.address, loss=0.05, seed=7)
    client = kcp_dial(*relay.address)
    payload = os.urandom(64 * 1024)
    sender = gevent.spawn(client.sendall, payload)
    try:
        assert recv_exactly(listener.accept(timeout=5), len(payload)) == payload
        sender.get(timeout=5)
    finally:
        client.close()
        listener.close()


def junk_datagrams(rng, conv):
    """Garbage, bad CRCs, wrong convs, late segments from strangers: nothing a listener should keep."""
    def push(conv, sn, data=b"j" * 16):
        return struct.pack("<IBBHIIII", conv, kcp_wire.CMD_PUSH, 0, 32, 0, sn, 0, len(data)) + data

    while True:
        kind = rng.randrange(4)
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 1400))
        elif kind == 1:  # a real segment behind a wrong CRC
            framed = bytearray(kcp_wire.encode_datagram(push(conv, 1), True))
            framed[-1] ^= 0xFF
            yield bytes(framed)
        elif kind == 2:  # a stranger's late segment (sn != 0): must not create a session
            yield kcp_wire.encode_datagram(push(rng.getrandbits(32), rng.randrange(1, 1000)), True)
        else:  # the active session's conv from a stranger, with sn != 0
            yield kcp_wire.encode_datagram(push(conv, rng.randrange(1, 1000)), True)


def test_junk_flood_neither_grows_memory_nor_stalls_a_session():
    options = KCPOptions.fast(crypt_header=True)
    listener = KCPListener("127.0.0.1", 0, options)
    client = kcp_dial("127.0.0.1", listener.address[1], options)
    client.sendall(b"hello")
    server = listener.accept(timeout=5)
    assert recv_exactly(server, 5) == b"hello"
    flooders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    rng = random.Random(3)
    junk = junk_datagrams(rng, client.conv)
    process = psutil.Process()

    sent = [0]

    def flood(count=None, until=None):
        while count is None or sent[0] < count:
            if until is not None and until.is_set():
                return
            flooders[sent[0] % len(flooders)].sendto(next(junk), listener.address)
            sent[0] += 1
            if sent[0] % 50 == 0:
                gevent.sleep(0)

    payload = os.urandom(4 * 1024 * 1024)
    done = gevent.event.Event()
    flooder = gevent.spawn(flood, until=done)
    started = time.monotonic()
    sender = gevent.spawn(client.sendall, payload)
    received = recv_exactly(server, len(payload))
    elapsed = time.monotonic() - started
    done.set()
    sender.get(timeout=5)
    flooder.get(timeout=5)
    assert received == payload
    assert sent[0] > 2000, "the flood did not overlap the transfer"
    assert elapsed < 8, f"the session stalled under the flood: 4 MiB took {elapsed:.1f} s"
    del payload, received
    # The first flood warmed every pool; a second one must not add memory.
    rss_before = process.memory_info().rss
    sent[0] = 0
    flood(count=40_000)
    client.sendall(b"still there")
    assert recv_exactly(server, 11) == b"still there"
    assert process.memory_info().rss - rss_before < 2 * 1024 * 1024
    assert listener.session_count == 1
    for sock in flooders:
        sock.close()
    client.close()
    listener.close()


def test_dead_go_peer_is_detected_by_smux_keepalive(go_peer, kcp_certs):
    from tun2g.transport import tls_bio

    peer = go_peer("kcppeer", "-mode", "server", "-tls", "-cert", kcp_certs.cert_file, "-key", kcp_certs.key_file)
    port = int(peer.wait_for(r"READY port=(\d+)").group(1))
    transport = tls_bio.wrap(kcp_dial("127.0.0.1", port), tls_bio.client_context(ca_file=kcp_certs.ca_file),
                            server_side=False, server_hostname="localhost")
    # The Go server sends a NOP every 1 s (tun2's setting), so 1.5 s windows always see a frame.
    session = Session(transport, client=True, config=Config(keepalive_interval=0.5, keepalive_timeout=1.5))
    control = session.accept_stream(timeout=10)
    control.sendall(recv_exactly(control, 26))
    peer.wait_for("CONTROL-ECHO ok")
    assert not session.wait_closed(timeout=2.0), "the session died while the peer was alive"
    peer.proc.kill()  # SIGKILL: no FIN, no close_notify, no KCP segment; only silence
    killed = time.monotonic()
    assert session.wait_closed(timeout=5), "smux keepalive did not notice the dead KCP peer"
    assert time.monotonic() - killed < 3.5  # detected within 1x..2x keepalive_timeout
