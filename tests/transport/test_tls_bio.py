"""TLS over KCP with memory BIOs: handshakes, verification, cooperative behaviour."""

import hashlib
import os
import time

import gevent
import gevent.queue
import pytest
from OpenSSL import SSL

from tests.fixtures.net import recv_exactly
from tun2g.transport import tls_bio
from tun2g.transport.kcp import KCPListener, KCPOptions, kcp_dial

FAST = KCPOptions.fast()


@pytest.fixture
def tls_server(kcp_certs):
    """A KCP listener whose sessions get a TLS handshake each in its own greenlet (like tun2g's server).

    Yields (port, outcomes): outcomes is a queue of (TLSBioStream or exception).
    """
    listener = KCPListener("127.0.0.1", 0, FAST)
    context = tls_bio.server_context(kcp_certs.cert_file, kcp_certs.key_file)
    outcomes = gevent.queue.Queue()

    def handshake(conn):
        try:
            outcomes.put(tls_bio.wrap(conn, context, server_side=True, handshake_timeout=1.0))
        except OSError as exc:
            outcomes.put(exc)

    def accept_loop():
        while True:
            gevent.spawn(handshake, listener.accept())

    acceptor = gevent.spawn(accept_loop)
    yield listener.address[1], outcomes
    acceptor.kill()
    listener.close()


def dial_tls(port, kcp_certs, hostname="localhost", **context_args):
    context = tls_bio.client_context(**(context_args or {"ca_file": kcp_certs.ca_file}))
    return tls_bio.wrap(kcp_dial("127.0.0.1", port, FAST), context, server_side=False, server_hostname=hostname)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_full_duplex_transfer_over_tls_over_kcp(tls_server, kcp_certs, hostname):
    port, outcomes = tls_server
    client = dial_tls(port, kcp_certs, hostname)
    server = outcomes.get(timeout=5)
    assert client.version() == server.version() == "TLSv1.3"
    up, down = os.urandom(2_000_000), os.urandom(2_000_000)
    # Both sides write and read at once: the reader's and writer's output must not interleave.
    writers = [gevent.spawn(client.sendall, up), gevent.spawn(server.sendall, down)]
    readers = [gevent.spawn(recv_exactly, server, len(up)), gevent.spawn(recv_exactly, client, len(down))]
    gevent.joinall(writers + readers, timeout=20, raise_error=True)
    assert hashlib.sha256(readers[0].value).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(readers[1].value).digest() == hashlib.sha256(down).digest()
    client.close()  # close_notify reaches the server as EOF
    assert server.recv(10) == b""


def test_wrong_hostname_is_refused(tls_server, kcp_certs):
    port, _ = tls_server
    with pytest.raises(tls_bio.TLSError, match="not valid for 'wrong.example'"):
        dial_tls(port, kcp_certs, "wrong.example")


def test_unknown_ca_is_refused_unless_insecure(tls_server, kcp_certs):
    port, _ = tls_server
    with pytest.raises(tls_bio.TLSError, match="certificate verify failed"):
        dial_tls(port, kcp_certs, ca_file=None, insecure=False)
    insecure = dial_tls(port, kcp_certs, "anything", insecure=True)
    assert insecure.version() == "TLSv1.3"


def test_verification_needs_a_hostname(kcp_certs):
    context = tls_bio.client_context(ca_file=kcp_certs.ca_file)
    with pytest.raises(ValueError, match="server_hostname is required"):
        tls_bio.wrap(object(), context, server_side=False)


def first_client_hello() -> bytes:
    tls = SSL.Connection(tls_bio.client_context(insecure=True), None)
    tls.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        tls.do_handshake()
    return tls.bio_read(65536)


def test_stalled_handshake_does_not_hold_up_other_clients(tls_server, kcp_certs):
    port, outcomes = tls_server
    staller = kcp_dial("127.0.0.1", port, FAST)
    hello = first_client_hello()
    staller.sendall(hello[: len(hello) // 2])  # then never another byte
    started = time.monotonic()
    good = dial_tls(port, kcp_certs)
    assert time.monotonic() - started < 0.9  # done well before the staller's 1 s deadline
    good.sendall(b"still served")
    results = [outcomes.get(timeout=5), outcomes.get(timeout=5)]
    served = next(item for item in results if isinstance(item, tls_bio.TLSBioStream))
    assert recv_exactly(served, 12) == b"still served"
    stalled = next(item for item in results if isinstance(item, Exception))
    assert isinstance(stalled, TimeoutError) and "within 1 s" in str(stalled)
    assert 0.9 < time.monotonic() - started < 3


def test_garbage_instead_of_a_client_hello_fails_cleanly(tls_server):
    port, outcomes = tls_server
    junk = kcp_dial("127.0.0.1", port, FAST)
    junk.sendall(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")
    failure = outcomes.get(timeout=5)
    assert isinstance(failure, tls_bio.TLSError) and "handshake failed" in str(failure)


def test_close_does_not_wait_for_a_writer_stuck_on_a_silent_peer(tls_server, kcp_certs):
    port, outcomes = tls_server
    client = dial_tls(port, kcp_certs)
    server = outcomes.get(timeout=5)  # it never reads: its receive window fills up
    writer = gevent.spawn(client.sendall, b"x" * 20_000_000)
    writer.join(timeout=0.5)  # an observation window: the writer must be stuck by now
    assert not writer.ready()
    closer = gevent.spawn(client.close)
    closer.get(timeout=2)
    with pytest.raises(OSError):
        writer.get(timeout=2)
    server.close()
