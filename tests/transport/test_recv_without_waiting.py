"""`recv_without_waiting`: the read smux's hub callback makes, which must never wait and never lose bytes."""

from __future__ import annotations

import socket
import ssl

import gevent
import pytest
from gevent.socket import wait_read

from tests.smux.conftest import quiet_config, tcp_pair
from tun2g.smux import Session
from tun2g.transport.base import recv_without_waiting


def test_a_plain_socket_is_read_directly_and_a_short_read_says_it_is_drained():
    left, right = tcp_pair()
    with left, right:
        left.settimeout(7.0)
        recv, drains = recv_without_waiting(left)
        assert drains
        with pytest.raises(BlockingIOError):
            recv(100)
        right.sendall(b"abc")
        wait_read(left.fileno(), 5)
        assert recv(100) == b"abc"
        with pytest.raises(BlockingIOError):  # the short read was everything there was
            recv(100)
        assert left.gettimeout() == 7.0  # the socket's own timeout is untouched
        right.close()
        wait_read(left.fileno(), 5)
        assert recv(100) == b""  # the peer's FIN


def test_tls_reads_with_its_timeout_at_zero_and_is_never_taken_for_drained(kcp_certs):
    client_end, server_end = tcp_pair()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kcp_certs.cert_file, kcp_certs.key_file)
    handshake = gevent.spawn(server_context.wrap_socket, server_end, server_side=True)
    client = ssl.create_default_context(cafile=kcp_certs.ca_file).wrap_socket(client_end, server_hostname="localhost")
    server = handshake.get(timeout=5)
    with client, server:
        server.settimeout(3.0)
        recv, drains = recv_without_waiting(server)
        assert not drains
        with pytest.raises((ssl.SSLWantReadError, BlockingIOError)):
            recv(100)
        assert server.gettimeout() == 3.0
        client.sendall(b"hello")
        wait_read(server.fileno(), 5)
        assert recv(100) == b"hello"
        assert server.gettimeout() == 3.0
        assert server.pending() == 0  # nothing decrypted is left, and still not taken for drained (above)
        client.sendall(b"x" * 1000)  # one record; read 10 bytes of it: the rest waits in OpenSSL, not in the fd
        wait_read(server.fileno(), 5)
        assert recv(10) == b"x" * 10
        assert server.pending() == 990
        assert recv(2000) == b"x" * 990


def test_frames_written_one_by_one_each_reach_the_stream_after_short_reads():
    """Each write arrives alone, so each hub read is short and ends there: the fd watcher must bring the next."""
    client_end, server_end = tcp_pair()
    client = Session(client_end, client=True, config=quiet_config(version=2))
    server = Session(server_end, client=False, config=quiet_config(version=2))
    try:
        stream = client.open_stream()
        stream.sendall(b"0")
        accepted = server.accept_stream(timeout=5)
        assert accepted.recv(10) == b"0"
        accepted.settimeout(5)
        for number in range(1, 200):
            stream.sendall(str(number).encode())
            assert accepted.recv(10) == str(number).encode()  # each piece waited for, read alone
        stream.shutdown(socket.SHUT_WR)
        assert accepted.recv(10) == b""
    finally:
        client.close()
        server.close()
