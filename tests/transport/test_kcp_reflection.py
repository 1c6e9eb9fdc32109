"""KCP must not be a UDP reflector (issue 9, item 8; docs/protocol.md#unproven-peers).

A raw UDP socket plays the spoofer: it sends the datagram(s) a client would
open a session with and counts what comes back. Until a peer ACKs something
we sent, a session sends at most AMPLIFICATION x the bytes it received and is
dropped soon; real clients prove themselves in their first round trip.
"""

import gc
import socket
import ssl
import struct
import time
import weakref

import gevent
import pytest

from tests.fixtures.net import recv_exactly
from tests.fixtures.tunnel import DOMAIN, Deployment, RunningClient, wait_until
from tun2g.server.process import ServerSetup
from tun2g.transport import kcp_wire, tls_bio
from tun2g.transport.kcp import DEFAULT_PROOF_TIMEOUT, KCPListener, KCPOptions, kcp_dial

AMPLIFICATION = kcp_wire.DEFAULT_AMPLIFICATION_FACTOR
SMUX_NOP = bytes([1, 3, 0, 0, 0, 0, 0, 0])  # version 1, NOP, length 0, stream 0
CONV = 0x5EED0001


def segment(cmd, sn=0, data=b"", conv=CONV, ts=1234, una=0, wnd=1024):
    return struct.pack("<IBBHIIII", conv, cmd, 0, wnd, ts, sn, una, len(data)) + data


def client_hello() -> bytes:
    """The bytes a TLS client sends first (what tun2g's kcp+tls client's first datagram carries)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Spoofer:
    """A raw UDP socket that sends datagrams and counts every byte sent back to it."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sent = self.received = 0
        self.replies: list[bytes] = []

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.target)
        self.sent += len(datagram)

    def listen(self, seconds: float) -> None:
        """Read replies until the deadline (socket timeouts, no sleeping)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                reply = self.sock.recv(65536)
            except socket.timeout:
                return
            self.received += len(reply)
            self.replies.append(reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["plain", "tls"])
def kcp_server(request, tmp_path, data_dir, dev_cert):
    """A whole tun2g server with a KCP port (plain and TLS over KCP)."""
    plain = request.param == "plain"
    setup = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0", kcp_addr="127.0.0.1:0",
                        admin_addr=None, plain_tunnel=plain, storage_url=f"sqlite:///{tmp_path / 'r.db'}",
                        access_log=False, log_level="warning")
    deployment = Deployment(running=setup.start(), storage_url="", cert=None if plain else dev_cert[0], plain=plain)
    yield deployment
    deployment.running.stop()


@pytest.fixture
def listener():
    listeners = []

    def start(options=KCPOptions.fast(), **kwargs):
        listeners.append(KCPListener("127.0.0.1", 0, options, **kwargs))
        return listeners[-1]

    yield start
    for item in listeners:
        item.close()


def serve(listener, reply_size: int):
    """An app that answers every session's first bytes with reply_size bytes (more than any budget)."""
    def handle(conn):
        try:
            conn.recv(65536)
            conn.sendall(b"r" * reply_size)
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def run():
        while True:
            gevent.spawn(handle, listener.accept())

    return gevent.spawn(run)


@pytest.mark.parametrize("copies", [1, 3], ids=["one-datagram", "with-retransmissions"])
def test_forged_opening_gets_at_most_the_factor_back_from_the_server(kcp_server, copies):
    listener = kcp_server.running.kcp_listener
    first = segment(kcp_wire.CMD_PUSH, 0, SMUX_NOP if kcp_server.plain else client_hello())
    spoofer = Spoofer(("127.0.0.1", kcp_server.running.kcp_address[1]))
    try:
        for _ in range(copies):
            spoofer.send(first)  # a client retransmitting sn 0 sends the same bytes again
        started = time.monotonic()
        spoofer.listen(DEFAULT_PROOF_TIMEOUT + 0.5)  # before the fix: 70x (plain) / 14x (TLS) over 10 s
        assert spoofer.received <= AMPLIFICATION * spoofer.sent, (spoofer.received, spoofer.sent)
        assert spoofer.received > 0  # it did answer (an ACK at least): the peer may be real
        wait_until(lambda: listener.session_count == 0, timeout=DEFAULT_PROOF_TIMEOUT + 1.5 - (
            time.monotonic() - started), message="the unproven session to be forgotten")
        assert listener.unproven_count == 0
    finally:
        spoofer.close()


@pytest.mark.parametrize("crypt_header", [False, True], ids=["plain", "crypt-header"])
def test_an_app_writing_a_lot_to_a_forged_peer_is_held_to_the_budget(listener, crypt_header):
    options = KCPOptions.fast(crypt_header=crypt_header)
    server = listener(options, proof_timeout=1.0)
    app = serve(server, 256 * 1024)
    spoofer = Spoofer(server.address)
    try:
        spoofer.send(kcp_wire.encode_datagram(segment(kcp_wire.CMD_PUSH, 0, b"GET / please"), crypt_header))
        spoofer.listen(2.0)
        assert 0 < spoofer.received <= AMPLIFICATION * spoofer.sent
        assert server.session_count == 0  # gone one proof_timeout after the first unacknowledged data
    finally:
        app.kill()
        spoofer.close()


def test_a_guessed_ack_is_no_proof(listener):
    server = listener(proof_timeout=1.0)
    app = serve(server, 64 * 1024)
    spoofer = Spoofer(server.address)
    try:
        spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"hello"))
        wait_until(lambda: server.session_count == 1, timeout=2, message="the session")
        # A blind spoofer knows our first sn is 0 but not our clock: it guesses ts (and says una 1).
        for guess in (0, 1234, int(time.monotonic() * 1000) & 0xFFFFFFFF):
            spoofer.send(segment(kcp_wire.CMD_ACK, 0, ts=guess, una=1))
        spoofer.send(segment(kcp_wire.CMD_PUSH, 1, b"more", una=1))
        spoofer.listen(0.3)
        assert server.unproven_count == 1
        spoofer.listen(1.5)
        assert spoofer.received <= AMPLIFICATION * spoofer.sent
        assert server.session_count == 0
    finally:
        app.kill()
        spoofer.close()


def test_the_real_ack_proves_the_peer_and_lifts_the_limit(listener):
    server = listener()
    app = serve(server, 256 * 1024)
    client = kcp_dial("127.0.0.1", server.address[1], KCPOptions.fast())
    try:
        started = time.monotonic()
        client.sendall(b"hi")
        assert len(recv_exactly(client, 256 * 1024)) == 256 * 1024  # well past the 3x budget
        elapsed = time.monotonic() - started
        [session] = server._sessions.values()
        assert session.proven and server.unproven_count == 0 and server.session_count == 1
        # The held reply went out when the ACK came back, not after a retransmission timeout (200 ms).
        assert session.datagrams_withheld == 0
        assert elapsed < 0.15, f"256 KiB took {elapsed * 1000:.0f} ms"
    finally:
        client.close()
        app.kill()


def test_a_silent_receiver_is_kept_without_proof(listener):
    """A client whose server never writes cannot prove anything; it only gets ACKs, so it may stay."""
    server = listener(proof_timeout=0.3)
    client = kcp_dial("127.0.0.1", server.address[1], KCPOptions.fast())
    try:
        for _ in range(5):
            client.sendall(b"x" * 10_000)
        accepted = server.accept(timeout=2)
        assert len(recv_exactly(accepted, 50_000)) == 50_000
        # It outlives several proof_timeouts (an observation window, not synchronisation).
        accepted._updater.join(timeout=1.0)
        assert not accepted._updater.dead and server.session_count == 1
        assert not accepted.proven
        client.sendall(b"still here")
        assert recv_exactly(accepted, 10) == b"still here"
    finally:
        client.close()


def test_tls_over_kcp_handshake_is_not_slowed_by_the_limit(listener, kcp_certs):
    server = listener()
    context = tls_bio.server_context(kcp_certs.cert_file, kcp_certs.key_file)

    def handle():
        conn = tls_bio.wrap(server.accept(timeout=5), context, server_side=True)
        conn.sendall(conn.recv(100))
        return conn

    task = gevent.spawn(handle)
    started = time.monotonic()
    client = tls_bio.wrap(kcp_dial("127.0.0.1", server.address[1], KCPOptions.fast()),
                          tls_bio.client_context(ca_file=kcp_certs.ca_file), server_side=False,
                          server_hostname="localhost")
    try:
        client.sendall(b"first request")
        assert recv_exactly(client, 13) == b"first request"
        elapsed = time.monotonic() - started
        accepted = task.get(timeout=5)
        assert accepted.transport.proven and accepted.transport.datagrams_withheld == 0
        assert elapsed < 0.3, f"handshake and first echo took {elapsed * 1000:.0f} ms"
    finally:
        client.close()


@pytest.mark.parametrize("seed", range(4))
def test_tls_over_kcp_handshake_survives_loss_while_unproven(listener, kcp_certs, udp_relay, seed):
    server = listener()
    relay = udp_relay(server.address, loss=0.1, seed=seed)
    context = tls_bio.server_context(kcp_certs.cert_file, kcp_certs.key_file)
    task = gevent.spawn(lambda: tls_bio.wrap(server.accept(timeout=5), context, server_side=True))
    client = tls_bio.wrap(kcp_dial(*relay.address, KCPOptions.fast()),
                          tls_bio.client_context(ca_file=kcp_certs.ca_file), server_side=False,
                          server_hostname="localhost", handshake_timeout=10)
    try:
        accepted = task.get(timeout=10)
        client.sendall(b"ping")
        assert recv_exactly(accepted, 4) == b"ping"
        assert accepted.transport.proven
    finally:
        client.close()


def test_tun2g_client_over_kcp_proves_itself(kcp_server, backend):
    import requests

    url, _app = backend
    config = kcp_server.client_config(kcp_server.grant(), url, conn_type="kcp",
                                      server_addr=f"localhost:{kcp_server.running.kcp_address[1]}")
    started = time.monotonic()
    client = RunningClient(config)
    try:
        client.wait_connected(timeout=5)
        connected = time.monotonic() - started
        assert requests.get(kcp_server.http_url + "/", headers={"Host": DOMAIN}, timeout=5).status_code == 200
        listener = kcp_server.running.kcp_listener
        assert listener.session_count == 1 and listener.unproven_count == 0
        [session] = listener._sessions.values()
        assert session.datagrams_withheld == 0
        assert connected < 1.0, f"connecting took {connected:.2f} s"
    finally:
        client.close()


def test_unproven_sessions_per_source_are_capped(listener):
    server = listener(max_unproven_per_source=4, proof_timeout=0.5)
    app = serve(server, 10)
    spoofers = [Spoofer(server.address) for _ in range(10)]
    client = None
    try:
        for index, spoofer in enumerate(spoofers[:6]):
            spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"x", conv=index + 1))
        spoofers[5].listen(0.2)
        assert spoofers[5].received == 0 and server.session_count == 4 and server.unproven_count == 4
        # They never ACK the app's reply: dropped after proof_timeout, then a real client gets in
        # (its sn 0 retransmission finds room) and proves itself with its first ACK.
        wait_until(lambda: server.unproven_count == 0, timeout=2, message="unproven sessions dropped")
        client = kcp_dial("127.0.0.1", server.address[1], KCPOptions.fast())
        client.sendall(b"hi")
        assert len(recv_exactly(client, 10)) == 10
        wait_until(lambda: server.unproven_count == 0, timeout=2, message="the client proven")
        # A proven session no longer counts: four new unproven ones from the same IP fit again.
        for index, spoofer in enumerate(spoofers[6:]):
            spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"x", conv=index + 100))
        wait_until(lambda: server.session_count == 5, timeout=2, message="four more sessions")
        assert server.unproven_count == 4
    finally:
        app.kill()
        if client is not None:
            client.close()
        for spoofer in spoofers:
            spoofer.close()


def test_unproven_sessions_in_total_are_capped_oldest_first(listener):
    server = listener(max_unproven=3, max_unproven_per_source=100)
    spoofers = [Spoofer(server.address) for _ in range(5)]
    try:
        for index, spoofer in enumerate(spoofers):
            spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"x", conv=index + 1))
        wait_until(lambda: server._backlog.qsize() == 3 and server.unproven_count == 3
                   and {s.conv for s in server._sessions.values()} == {3, 4, 5}, timeout=2,
                   message="the newest three unproven sessions")
        # The evicted ones are released too (nobody had accepted them).
        assert {s.conv for s in server._backlog.queue} == {3, 4, 5}
    finally:
        for spoofer in spoofers:
            spoofer.close()


def test_sessions_in_total_are_capped(listener):
    server = listener(max_sessions=2)
    spoofers = [Spoofer(server.address) for _ in range(3)]
    try:
        for index, spoofer in enumerate(spoofers):
            spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"x", conv=index + 1))
        wait_until(lambda: server.session_count == 2, timeout=2, message="two sessions")
        spoofers[2].send(segment(kcp_wire.CMD_PUSH, 0, b"x", conv=3))  # the third still finds no room
        spoofers[2].listen(0.2)
        assert spoofers[2].received == 0 and server.session_count == 2
    finally:
        for spoofer in spoofers:
            spoofer.close()


def test_a_forgotten_session_is_released(listener):
    server = listener(proof_timeout=0.3)
    spoofer = Spoofer(server.address)
    try:
        spoofer.send(segment(kcp_wire.CMD_PUSH, 0, b"x"))
        accepted = server.accept(timeout=2)
        ref = weakref.ref(accepted)
        accepted.settimeout(2)
        first = accepted.recv(10)
        assert first == b"x"
        try:
            accepted.recv(10)
        except ConnectionResetError as exc:
            assert "spoofed" in str(exc)
        else:
            raise AssertionError("the unproven session was not dropped")
        del accepted
        gc.collect()
        assert ref() is None and server.session_count == 0 and server.unproven_count == 0
    finally:
        spoofer.close()


def test_limit_bookkeeping_is_in_bytes():
    limit = kcp_wire.AmplificationLimit(3)
    ours = segment(kcp_wire.CMD_PUSH, 0, b"y" * 100, ts=777)
    assert limit.on_receive(50, segment(kcp_wire.CMD_PUSH, 0, b"x" * 26)) is False
    assert limit.may_send(150) and not limit.may_send(151)
    assert limit.admissible(24) == 26
    limit.admit(26, 24)
    limit.on_sent(124, ours)
    assert not limit.may_send(27)
    assert limit.on_receive(24, segment(kcp_wire.CMD_ACK, 0, ts=778)) is False  # wrong ts
    assert limit.on_receive(24, segment(kcp_wire.CMD_ACK, 0, ts=777)) is True
    assert limit.proven and limit.may_send(10**9) and limit.admissible(24) is None
