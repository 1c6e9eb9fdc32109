"""Interop with real kcp-go peers: kcptun (crypt none, stream mode, FEC) and our Go kcppeer (tun2's layout)."""

import os
import socket as stdsocket
import struct

import gevent
import pytest

from tests.fixtures.net import free_port, recv_exactly
from tun2g.smux import Config, Session
from tun2g.transport import kcp_wire, tls_bio
from tun2g.transport.kcp import KCPListener, KCPOptions, kcp_dial

KCPTUN_FAST = KCPOptions.fast(crypt_header=True, mtu=1350)
FEC = ("--datashard", "10", "--parityshard", "3")


def echo(stream):
    with stream:
        while data := stream.recv(65536):
            stream.sendall(data)


def serve_streams(session):
    while True:
        gevent.spawn(echo, session.accept_stream())


def fec_shards_seen(relay, direction):
    """How many datagrams in that direction were FEC shards (flag 0xF1/0xF2 after the crypt header)."""
    offset = kcp_wire.CRYPT_HEADER_SIZE + 4
    return sum(1 for way, datagram in relay.datagrams if way == direction
               and struct.unpack_from("<H", datagram, offset)[0] in (kcp_wire.FEC_TYPE_DATA, kcp_wire.FEC_TYPE_PARITY))


def check_echo(stream, size, seed):
    payload = os.urandom(size) if seed is None else bytes((i * seed) & 0xFF for i in range(size))
    writer = gevent.spawn(stream.sendall, payload)
    assert recv_exactly(stream, size) == payload
    writer.get(timeout=5)


# ---- kcptun: Python KCP + smux as client and as server ---------------------------------------

@pytest.mark.parametrize("smux_version, extra, options", [
    (1, (), KCPTUN_FAST),
    (1, (), KCPOptions(crypt_header=True)),
    (1, FEC, KCPTUN_FAST),
    (2, (), KCPTUN_FAST),
], ids=["v1-fast", "v1-defaults", "v1-fec-10-3", "v2"])
def test_python_client_through_kcptun_server(kcptun, tcp_echo_port, udp_relay, smux_version, extra, options):
    port = free_port(stdsocket.SOCK_DGRAM)
    kcptun.server(port, tcp_echo_port, "--smuxver", str(smux_version), *extra)
    relay = udp_relay(("127.0.0.1", port), record=True)  # a lossless observer
    session = Session(kcp_dial(*relay.address, options), client=True, config=Config(version=smux_version))
    try:
        first, second = session.open_stream(), session.open_stream()
        assert (first.id, second.id) == (3, 5)
        check_echo(first, 300_000 if options.nodelay else 20_000, 7)
        check_echo(second, 1000, 3)
        first.close()
        second.close()
    finally:
        session.close()
    assert (fec_shards_seen(relay, "s2c") > 0) == bool(extra)  # FEC really was on (and tolerated)


@pytest.mark.parametrize("smux_version, extra", [(1, ()), (1, FEC), (2, ())], ids=["v1", "v1-fec-10-3", "v2"])
def test_kcptun_client_into_python_listener(kcptun, udp_relay, smux_version, extra):
    listener = KCPListener("127.0.0.1", 0, KCPTUN_FAST)
    relay = udp_relay(listener.address, record=True)
    sessions = []

    def serve():
        while True:
            session = Session(listener.accept(), client=False, config=Config(version=smux_version))
            sessions.append(session)
            gevent.spawn(serve_streams, session)

    server = gevent.spawn(serve)
    try:
        tcp_port = kcptun.client(relay.address[1], "--smuxver", str(smux_version), *extra)
        with stdsocket.create_connection(("127.0.0.1", tcp_port), timeout=10) as tcp:
            check_echo(tcp, 300_000, 5)
        assert len(sessions) == 1 and sessions[0].version == smux_version
        assert (fec_shards_seen(relay, "c2s") > 0) == bool(extra)
    finally:
        server.kill()
        for session in sessions:
            session.close()
        listener.close()


# ---- Go kcp-go peer in tun2's layout: kcp.Dial / ListenWithOptions(nil), TLS inside, smux inside --

@pytest.mark.parametrize("use_tls, crypt, options", [
    (True, "off", KCPOptions()),
    (False, "off", KCPOptions()),
    (True, "none", KCPOptions(crypt_header=True)),
    (True, "off", KCPOptions.fast()),  # the fast preset against kcp-go left on its defaults
], ids=["tls", "raw-smux", "tls-crypt-header", "tls-fast-preset"])
def test_python_client_to_go_server(go_peer, kcp_certs, use_tls, crypt, options):
    args = ["-mode", "server", "-crypt", crypt, "-payload", '{"token":"t","domain":"d"}']
    if use_tls:
        args += ["-tls", "-cert", kcp_certs.cert_file, "-key", kcp_certs.key_file]
    peer = go_peer("kcppeer", *args)
    port = int(peer.wait_for(r"READY port=(\d+)").group(1))
    transport = kcp_dial("127.0.0.1", port, options)
    if use_tls:  # the ClientHello is the first datagram, as in tun2
        transport = tls_bio.wrap(transport, tls_bio.client_context(ca_file=kcp_certs.ca_file),
                                server_side=False, server_hostname="localhost")
    session = Session(transport, client=True, config=Config())
    try:
        own = session.open_stream()  # in raw mode this SYN is what lets the server learn of us
        control = session.accept_stream(timeout=10)
        assert control.id == 2
        payload = recv_exactly(control, len(b'{"token":"t","domain":"d"}'))
        assert payload == b'{"token":"t","domain":"d"}'
        control.sendall(payload)
        peer.wait_for("CONTROL-ECHO ok")
        check_echo(own, 100_000, 11)
        if f"STREAM id={own.id}" not in peer.lines:  # it may print before or after CONTROL-ECHO
            peer.wait_for(f"STREAM id={own.id}")
    finally:
        session.close()


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "raw-smux"])
def test_go_client_to_python_listener(go_peer, kcp_certs, use_tls):
    listener = KCPListener("127.0.0.1", 0, KCPOptions())
    context = tls_bio.server_context(kcp_certs.cert_file, kcp_certs.key_file)
    args = ["-mode", "client", "-addr", f"127.0.0.1:{listener.address[1]}", "-bytes", "100000"]
    if use_tls:
        args += ["-tls", "-ca", kcp_certs.ca_file, "-servername", "localhost"]
    peer = go_peer("kcppeer", *args)
    conn = listener.accept(timeout=10)
    session = Session(tls_bio.wrap(conn, context, server_side=True) if use_tls else conn,
                      client=False, config=Config.tun2_server())
    server = gevent.spawn(serve_streams, session)
    try:
        control = session.open_stream()
        assert control.id == 2
        control.sendall(b'{"token":"t","domain":"d"}')
        assert recv_exactly(control, 26) == b'{"token":"t","domain":"d"}'
        peer.wait_for("CLIENT-CHECK ok bytes=100000", timeout=30)
    finally:
        server.kill()
        session.close()
        listener.close()
