"""The forwarder cuts hops in flight only to a node that stopped answering, not to one that only refuses
new connections.

A draining node closes its listener (new connections are refused) and still
answers the hops it has: cutting them would fail a POST that cannot be sent
again. A frozen node accepts connections in its kernel and answers nothing: its
hops are cut once a health check goes unanswered.
"""

from __future__ import annotations

import socket
import time

import gevent
import gevent.event
import pytest

from tests.fixtures.backends import read_until_suffix
from tests.fixtures.tunnel import wait_until
from tun2g.cluster.forward import Forwarder


class CountingForwarder(Forwarder):
    """A forwarder that counts the health checks it makes."""

    probes = 0

    def probe(self, url):
        self.probes += 1
        return super().probe(url)


REQUEST = b"POST /sink HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_a_node_refusing_new_connections_still_answers_its_hop_in_flight():
    received, answer_now = gevent.event.Event(), gevent.event.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve_one() -> None:
        conn, _address = listener.accept()
        with conn:
            read_until_suffix(conn, b"body")
            received.set()
            answer_now.wait(timeout=10)
            conn.sendall(ANSWER)

    node = gevent.spawn(serve_one)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    forwarder = CountingForwarder("n1", b"s" * 32, probe_after=0.05, probe_interval=0.05, probe_timeout=0.5)
    try:
        sock, _reader = forwarder.connect(url)
        sock.sendall(REQUEST)
        assert received.wait(timeout=5)
        listener.close()  # stop listening, as a draining node does; the accepted connection goes on
        with pytest.raises(ConnectionRefusedError):
            forwarder.connect(url, fresh=True)
        assert not forwarder.available(url)
        wait_until(lambda: forwarder.probes >= 3, timeout=5, message="health checks of the refusing node")
        answer_now.set()
        assert read_until_suffix(sock, b"ok") == ANSWER
    finally:
        forwarder.close()
        listener.close()
        node.kill()


def test_a_node_that_accepts_and_never_answers_has_its_hop_cut():
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)  # the kernel accepts; the "process" never does, as with SIGSTOP
    url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
    forwarder = Forwarder("n1", b"s" * 32, probe_after=0.1, probe_interval=0.1, probe_timeout=0.3)
    try:
        sock, _reader = forwarder.connect(url)
        sock.sendall(REQUEST)
        started = time.monotonic()
        with pytest.raises(OSError):
            read_until_suffix(sock, b"ok")  # the read timeout is 75 s; the health check cuts it first
        assert time.monotonic() - started < 5
        assert not forwarder.available(url)
    finally:
        forwarder.close()
        frozen.close()
