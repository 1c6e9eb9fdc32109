"""Connections to the other nodes of a cluster, for requests forwarded there once.

The hop is plain HTTP/1.1 to the other node's advertised URL (its public
front), over kept-alive connections. The X-Tun2g-Hop signature tells the
receiving node the request is already forwarded and comes from the cluster
(docs/protocol.md#cluster-hop). The exchange itself is the server's request
pipeline, the same one a tunnel stream gets.
"""

from __future__ import annotations

import time

from tun2g.cluster.hop import HOP_HEADER, sign
from tun2g.http import BackendPool, MessageReader, RequestHead
from tun2g.transport.base import ByteStream

HOP_CONNECT_TIMEOUT = 2.0
# Nodes come and go (each restart may advertise a new port): when a new node
# appears, pools not used for this long are closed, so dead nodes keep no sockets.
POOL_IDLE_LIFETIME = 60.0


class Forwarder:
    """Keep-alive connections to other nodes, one pool per node URL, and the hop signature."""

    def __init__(self, node_id: str, secret: bytes) -> None:
        self.node_id = node_id
        self.secret = secret
        self._pools: dict[str, BackendPool] = {}
        self._last_used: dict[str, float] = {}

    def _pool(self, url: str) -> BackendPool:
        now = time.monotonic()
        pool = self._pools.get(url)
        if pool is None:
            for old_url in [u for u, used in self._last_used.items() if now - used > POOL_IDLE_LIFETIME]:
                self.drop(old_url)
            pool = self._pools[url] = BackendPool(url, connect_timeout=HOP_CONNECT_TIMEOUT)
        self._last_used[url] = now
        return pool

    def connect(self, url: str, fresh: bool = False) -> tuple[ByteStream, MessageReader]:
        """A connection to the node at `url`: a kept one, or (``fresh``) a new one. Raises OSError."""
        pool = self._pool(url)
        return pool.dial() if fresh else pool.acquire()

    def release(self, url: str, sock: ByteStream, reader: MessageReader, reusable: bool) -> None:
        """Give a connection back to its node's pool (closed unless reusable)."""
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

    def sign(self, head: RequestHead, request_id: str) -> None:
        """Add this node's hop signature to a request it forwards."""
        head.set(HOP_HEADER, sign(self.secret, origin=self.node_id, timestamp=int(time.time()), method=head.method,
                                  host=head.host or "", target=head.target, request_id=request_id,
                                  forwarded_for=head.get("X-Forwarded-For") or ""))

    def close(self) -> None:
        for url in list(self._pools):
            self.drop(url)
