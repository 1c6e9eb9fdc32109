"""`read_watcher`: the fd watcher a callback exchange waits on, the socket's own when it is free."""

from __future__ import annotations

import gevent
from gevent.event import Event

from tests.fixtures.tunnel import wait_until
from tests.smux.conftest import tcp_pair
from tun2g.transport.base import read_watcher


def test_a_gevent_socket_lends_its_own_watcher_and_reads_normally_after_it_is_stopped():
    left, right = tcp_pair()
    with left, right:
        left.settimeout(5)
        watcher = read_watcher(left)
        assert watcher is left._read_event  # no new watcher (nor its fcntl) for each exchange
        fired = Event()
        watcher.start(fired.set)
        right.sendall(b"one")
        assert fired.wait(5)
        watcher.stop()
        assert left.recv(10) == b"one"
        reader = gevent.spawn(left.recv, 10)  # a greenlet waits on the same watcher again
        wait_until(lambda: left._read_event.active, timeout=5, message="the greenlet waiting")
        assert read_watcher(left) is not left._read_event  # busy: the caller gets a watcher of its own
        right.sendall(b"two")
        assert reader.get(timeout=5) == b"two"


def test_anything_else_gets_a_new_watcher_on_its_fd():
    left, right = tcp_pair()
    with left, right:
        class Wrapped:  # not a gevent socket: no watcher to lend
            def fileno(self):
                return left.fileno()
        watcher = read_watcher(Wrapped())
        assert watcher is not left._read_event and watcher.fd == left.fileno()
        fired = Event()
        watcher.start(fired.set)
        right.sendall(b"x")
        assert fired.wait(5)
        watcher.stop()
