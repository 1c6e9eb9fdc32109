"""Forwarding a public request, once, to the node that holds its backend.

The hop is plain HTTP/1.1 to the other node's advertised URL (its public
front), over kept-alive connections, with the request streamed by the same
`forward_exchange` the tunnel path uses (via BackendPool, which retries a
bodyless request once when a kept-alive connection turns out closed). The
X-Tun2g-Hop signature tells the receiving node the request is already
forwarded and comes from the cluster.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tun2g.cluster.hop import HOP_HEADER, sign
from tun2g.errors import CantOpenSessionStream, CantReadResponse, Tun2Error
from tun2g.http import BackendPool, DownstreamError, HTTPError, UpstreamError, simple_response
from tun2g.log import get_logger
from tun2g.pages import gateway_error_body
from tun2g.roundtrip import TunnelResponse, send_request

log = get_logger(__name__)

HTML = "text/html; charset=utf-8"
HOP_CONNECT_TIMEOUT = 2.0
# Nodes come and go (each restart may advertise a new port): when a new node
# appears, pools not used for this long are closed, so dead nodes keep no sockets.
POOL_IDLE_LIFETIME = 60.0


@dataclass(frozen=True)
class Outcome:
    """How a forwarded (or refused) request ended, for the access log."""

    status: int
    keep_alive: bool
    node: str = "-"


class Forwarder:
    """Sends requests to other nodes; one keep-alive pool per node URL."""

    def __init__(self, node_id: str, secret: bytes):
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

    def drop(self, url: str) -> None:
        """Close the kept connections to a node (it is gone, or unused for long)."""
        pool = self._pools.pop(url, None)
        self._last_used.pop(url, None)
        if pool is not None:
            pool.close()

    def _sign(self, head, request_id: str) -> None:
        head.set(HOP_HEADER, sign(self.secret, origin=self.node_id, timestamp=int(time.time()), method=head.method,
                                  host=head.host or "", target=head.target, request_id=request_id,
                                  forwarded_for=head.get("X-Forwarded-For") or ""))

    def _unreachable(self, node, error: OSError, failures: list, on_unreachable) -> None:
        failures.append(f"{node.node_id}: {error}")
        self.drop(node.url)
        on_unreachable(node)

    def forward(self, head, reader, sock, nodes: list, request_id: str, on_unreachable) -> Outcome:
        """Send the request to one of `nodes` (tried in random order while they refuse connections).

        `on_unreachable(node)` is told about each node that cannot be reached.
        Failures before a response answer 502 like a broken tunnel does.
        """
        self._sign(head, request_id)
        failures = []
        for node in _random_order(nodes):
            try:
                result = self._pool(node.url).forward_exchange(head, reader, sock)
            except UpstreamError as exc:
                log.warning("hop_failed", node=node.node_id, url=node.url, error=str(exc), request_id=request_id)
                return _gateway_error(sock, head, request_id, f"The cluster node holding this site's tunnel "
                                                             f"({node.node_id}) failed: {exc}", node.node_id)
            except DownstreamError:
                return Outcome(499, False, node.node_id)  # the public client left
            except OSError as exc:  # nothing was sent: another node may take it
                self._unreachable(node, exc, failures, on_unreachable)
                continue
            return Outcome(result.status, result.keep_alive, node.node_id)
        log.warning("hop_unreachable", nodes="; ".join(failures), request_id=request_id)
        return _gateway_error(sock, head, request_id, "No cluster node holding this site's tunnel could be reached.",
                              "-")

    def round_trip(self, head, body, nodes: list, request_id: str, on_unreachable) -> TunnelResponse:
        """Like `forward`, for callers without sockets (WSGI, the requests adapter): a TunnelResponse.

        Raises CantReadResponse / CantOpenSessionStream as a tunnel round trip does.
        """
        self._sign(head, request_id)
        failures = []
        for node in _random_order(nodes):
            pool = self._pool(node.url)
            try:
                upstream, upstream_reader = pool.acquire()
                break
            except OSError as exc:
                self._unreachable(node, exc, failures, on_unreachable)
        else:
            raise CantOpenSessionStream(f"no cluster node holding this site's tunnel could be reached: "
                                        f"{'; '.join(failures)}")
        try:
            pump = send_request(upstream, head, body)
            response = upstream_reader.read_response_head(head.method)
            while 100 <= response.status < 200:
                response = upstream_reader.read_response_head(head.method)
        except (OSError, HTTPError, Tun2Error) as exc:
            pool.release(upstream, upstream_reader, False)
            raise CantReadResponse(f"cluster node {node.node_id}: {exc}") from exc

        def release():
            done = upstream_reader.body_complete and (pump is None or pump.successful())
            pool.release(upstream, upstream_reader, done and upstream_reader.keep_alive)

        return TunnelResponse(response, upstream_reader, on_close=release)

    def close(self) -> None:
        for url in list(self._pools):
            self.drop(url)


def _random_order(nodes: list) -> list:
    return nodes if len(nodes) == 1 else random.sample(nodes, len(nodes))


def _gateway_error(sock, head, request_id: str, detail: str, node: str) -> Outcome:
    body = gateway_error_body(502, "Bad Gateway", detail, request_id)
    send_quietly(sock, simple_response(502, body, content_type=HTML, version=head.version,
                                       headers=[("X-Request-Id", request_id)], close=True))
    return Outcome(502, False, node)


def send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
