"""A stream says how its peer leaving can be watched: smux streams notify, plain sockets peek, TLS does not."""

from __future__ import annotations

import socket
import ssl

from gevent.event import Event

from tun2g.transport.base import CloseWatch, capabilities_of, close_watch_of


def test_each_kind_of_stream_declares_its_close_watch(pair, tmp_path):
    tcp = socket.socket()
    unix_a, unix_b = socket.socketpair()
    tls = ssl.create_default_context().wrap_socket(socket.socket(), do_handshake_on_connect=False,
                                                   server_hostname="x.test")
    stream = pair.client.open_stream()
    try:
        assert close_watch_of(tcp) is capabilities_of(tcp).close_watch is CloseWatch.PEEK
        assert close_watch_of(unix_a) is CloseWatch.PEEK and not capabilities_of(unix_a).tcp
        assert close_watch_of(tls) is CloseWatch.NONE  # peeking would see records, not the plaintext
        assert close_watch_of(stream) is CloseWatch.NOTIFY
        assert close_watch_of(object()) is CloseWatch.NONE
    finally:
        for sock in (tcp, unix_a, unix_b, tls):
            sock.close()
        stream.close()


def test_a_smux_stream_tells_of_its_peer_closing_not_of_data(pair):
    client_stream = pair.client.open_stream()
    client_stream.sendall(b"hello")
    server_stream = pair.server.accept_stream(timeout=5)
    server_stream.peer_fin_ends_writes = True  # as a tun2g client sets it
    told = Event()
    server_stream.on_peer_closed(told.set)
    assert server_stream.recv(5) == b"hello"
    client_stream.sendall(b"more")  # data is no close
    assert server_stream.recv(4) == b"more" and not told.is_set()
    client_stream.close()  # its FIN
    assert told.wait(5) and server_stream.peer_closed
    server_stream.close()


def test_a_late_registration_is_told_at_once_and_none_unregisters(pair):
    client_stream = pair.client.open_stream()
    client_stream.sendall(b"x")
    server_stream = pair.server.accept_stream(timeout=5)
    server_stream.peer_fin_ends_writes = True
    unregistered = Event()
    server_stream.on_peer_closed(unregistered.set)
    server_stream.on_peer_closed(None)
    client_stream.close()
    told = Event()
    assert server_stream.recv(1) == b"x" and server_stream.recv(1) == b""  # the FIN is in
    server_stream.on_peer_closed(told.set)
    assert told.wait(5) and not unregistered.is_set()
    server_stream.close()
