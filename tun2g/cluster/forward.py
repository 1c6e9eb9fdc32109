"""Connections to the other nodes of a cluster, for requests forwarded there once.

The hop is plain HTTP/1.1 to the other node's advertised URL (its public
front), over kept-alive connections. The X-Tun2g-Hop signature tells the
receiving node the request is already forwarded and comes from the cluster
(docs/protocol.md#cluster-hop). The exchange itself is the server's request
pipeline, the same one a tunnel stream gets.

No wait on another node is unbounded:

* connecting gives up after HOP_CONNECT_TIMEOUT, and every read or write on a
  hop connection after `read_timeout` (HOP_READ_TIMEOUT) without progress;
* a node is a process that may freeze (SIGSTOP, a stuck VM) while its kernel
  still accepts connections. While a hop to a node has gone unanswered for
  PROBE_AFTER seconds, that node is asked ``GET /_tun2g/health`` on a new
  connection every PROBE_INTERVAL; when it does not answer within
  PROBE_TIMEOUT its hops in flight are cut (the client gets a fast 502, or a
  replayable request goes to another node) and the node is skipped (a circuit
  breaker, open) until a probe is answered again. A slow backend behind a live
  node is never cut: the node itself still answers its health check;
* a node that refuses new connections (a draining node has closed its
  listener; a dead one's kernel resets its connections) is skipped, but its
  hops in flight go on: a draining node still answers them.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import gevent

from tun2g.cluster.hop import HOP_HEADER, framing_of, sign
from tun2g.http import BackendPool, MessageReader, RequestHead
from tun2g.log import get_logger
from tun2g.transport.base import ByteStream

log = get_logger(__name__)

HOP_CONNECT_TIMEOUT = 2.0
# Seconds a hop connection may wait for the other node (its response head, or the
# next piece of a body) before the exchange fails. Above a backend's own response-head
# timeout, so the node holding the tunnel answers its 504 first.
HOP_READ_TIMEOUT = 75.0
# Nodes come and go (each restart may advertise a new port): when a new node
# appears, pools not used for this long are closed, so dead nodes keep no sockets.
POOL_IDLE_LIFETIME = 60.0
HEALTH_PATH = "/_tun2g/health"
PROBE_AFTER = 0.5     # a hop unanswered this long has its node's health checked
PROBE_INTERVAL = 0.5  # then (and while the node is skipped) every this often
PROBE_TIMEOUT = 1.0   # a health check unanswered this long means the node is frozen or gone
_PROBE_REQUEST = (f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: tun2g-node\r\nConnection: close\r\n"
                  f"User-Agent: tun2g-probe\r\n\r\n").encode()


class ProbeFailure(NamedTuple):
    """Why a node's health check failed; `refused` when the node's kernel said no one listens."""

    reason: str
    refused: bool


def cuts_in_flight(error: OSError) -> bool:
    """Whether a failure to reach a node should cut its hops in flight: not when it only refused a connection."""
    return not isinstance(error, ConnectionRefusedError)


class Forwarder:
    """Keep-alive connections to other nodes, one pool per node URL, the hop signature and each node's health."""

    def __init__(self, node_id: str, secret: bytes, *, read_timeout: float = HOP_READ_TIMEOUT,
                 probe_after: float = PROBE_AFTER, probe_interval: float = PROBE_INTERVAL,
                 probe_timeout: float = PROBE_TIMEOUT) -> None:
        if read_timeout <= 0:
            raise ValueError("the hop read timeout must be positive")
        self.node_id = node_id
        self.secret = secret
        self.read_timeout = read_timeout
        self.probe_after = probe_after
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._pools: dict[str, BackendPool] = {}
        self._last_used: dict[str, float] = {}
        self._busy: dict[str, dict[ByteStream, float]] = {}  # url -> {connection in use: since (monotonic)}
        self._down: dict[str, str] = {}  # url -> why it is skipped (until a health check is answered)
        self._down_since: dict[str, float] = {}  # url -> when it was first skipped (monotonic)
        self._watchers: dict[str, gevent.Greenlet] = {}
        self._closed = False

    def _pool(self, url: str) -> BackendPool:
        now = time.monotonic()
        pool = self._pools.get(url)
        if pool is None:
            for old_url in [u for u, used in self._last_used.items() if now - used > POOL_IDLE_LIFETIME]:
                self.drop(old_url)
            pool = self._pools[url] = BackendPool(url, connect_timeout=HOP_CONNECT_TIMEOUT)
        self._last_used[url] = now
        return pool

    # -- the circuit breaker -------------------------------------------------------------

    def available(self, url: str) -> bool:
        """False while the node at `url` is skipped (it failed a health check or a connect)."""
        if url in self._down:
            self._last_used[url] = time.monotonic()  # still wanted: keep checking it
            return False
        return True

    def failed(self, url: str, reason: str, cut_in_flight: bool = True) -> None:
        """The node at `url` did not answer: skip it until its health check is answered again.

        Its kept connections are closed and, with `cut_in_flight`, so are those in use.
        """
        if self._closed:
            return
        if url not in self._down:
            log.warning("node_skipped", url=url, reason=reason,
                        effect="requests for its domains go to other nodes or get a 502 at once")
        self._down[url] = reason
        self._down_since.setdefault(url, time.monotonic())
        pool = self._pools.pop(url, None)
        if pool is not None:
            pool.close()
        if cut_in_flight:
            for sock in list(self._busy.get(url, {})):
                _close_quietly(sock)  # wakes the exchanges waiting on it
        self._watch(url)

    def down_since(self, url: str) -> float | None:
        """When the node at `url` began to be skipped (monotonic), None when it is not."""
        return self._down_since.get(url) if url in self._down else None

    def revive(self, url: str, why: str) -> None:
        """The node at `url` is back (its health check answered, or it beats again): stop skipping it."""
        was = self._down.pop(url, None)
        self._down_since.pop(url, None)
        if was is not None:
            log.info("node_answering", url=url, was=was, why=why)

    def _watch(self, url: str) -> None:
        watcher = self._watchers.get(url)
        if watcher is None or watcher.dead:
            self._watchers[url] = gevent.spawn(self._watch_loop, url)

    def _watch_loop(self, url: str) -> None:
        """Health-check the node at `url` while a hop to it waits long, or while it is skipped."""
        try:
            while not self._closed:
                gevent.sleep(self.probe_interval)  # the probe cadence, not synchronisation
                down = url in self._down
                busy = self._busy.get(url)
                now = time.monotonic()
                if down and now - self._last_used.get(url, 0.0) > POOL_IDLE_LIFETIME:
                    self._down.pop(url, None)  # nobody asked for it in a minute: forget it
                    self._down_since.pop(url, None)
                    return
                waiting = busy is not None and bool(busy) and now - min(busy.values()) >= self.probe_after
                if not down and not busy:
                    return
                if not down and not waiting:
                    continue
                failure = self.probe(url)
                if failure is None and down:
                    self.revive(url, "health check answered")
                elif failure is not None:
                    self.failed(url, f"health check: {failure.reason}", cut_in_flight=not failure.refused)
        finally:
            if self._watchers.get(url) is gevent.getcurrent():
                del self._watchers[url]

    def probe(self, url: str) -> ProbeFailure | None:
        """None when the node at `url` answers its health check in time (any HTTP status), else why not."""
        try:
            sock, _reader = BackendPool(url, connect_timeout=self.probe_timeout).dial()
        except OSError as exc:
            return ProbeFailure(f"cannot connect: {exc}", refused=not cuts_in_flight(exc))
        try:
            sock.settimeout(self.probe_timeout)
            sock.sendall(_PROBE_REQUEST)
            answer = sock.recv(16)
        except OSError as exc:
            return ProbeFailure(f"no answer within {self.probe_timeout:g} s ({exc or type(exc).__name__})", False)
        finally:
            sock.close()
        return None if answer.startswith(b"HTTP/") else ProbeFailure(f"not an HTTP answer: {answer[:16]!r}", False)

    # -- connections ------------------------------------------------------------------------

    def connect(self, url: str, fresh: bool = False) -> tuple[ByteStream, MessageReader]:
        """A connection to the node at `url`: a kept one, or (``fresh``) a new one. Raises OSError.

        Every read and write on it times out after `read_timeout`; while it is in
        use, the node's health is watched (see the module docstring).
        """
        pool = self._pool(url)
        try:
            sock, reader = pool.dial() if fresh else pool.acquire()
        except OSError as exc:
            self.failed(url, f"cannot connect: {exc}", cut_in_flight=cuts_in_flight(exc))
            raise
        sock.settimeout(self.read_timeout)
        self._busy.setdefault(url, {})[sock] = time.monotonic()
        self._watch(url)
        return sock, reader

    def release(self, url: str, sock: ByteStream, reader: MessageReader, reusable: bool) -> None:
        """Give a connection back to its node's pool (closed unless reusable)."""
        busy = self._busy.get(url)
        if busy is not None:
            busy.pop(sock, None)
            if not busy:
                del self._busy[url]
        pool = self._pools.get(url)
        if pool is None:
            sock.close()
        else:
            pool.release(sock, reader, reusable)

    def drop(self, url: str) -> None:
        """Close the kept connections to a node (it is gone, or unused for long)."""
        pool = self._pools.pop(url, None)
        self._last_used.pop(url, None)
        if pool is not None:
            pool.close()

    def sign(self, head: RequestHead, request_id: str, to: str) -> None:
        """Add this node's hop signature, for node `to`, to a request it forwards (a new nonce each time)."""
        head.set(HOP_HEADER, sign(self.secret, origin=self.node_id, to=to, timestamp=int(time.time() * 1000),
                                  method=head.method, host=head.host or "", target=head.target,
                                  request_id=request_id, forwarded_for=head.get("X-Forwarded-For") or "",
                                  framing=framing_of(head.content_length, head.chunked)))

    def close(self) -> None:
        self._closed = True
        gevent.killall(list(self._watchers.values()), block=False)
        for url in list(self._pools):
            self.drop(url)


def _close_quietly(sock: ByteStream) -> None:
    try:
        sock.close()
    except OSError:
        pass
