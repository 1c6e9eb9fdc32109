"""The Router: where a request goes (a local tunnel, another node, or a page), for every front alike.

It is the only holder of the cluster and of the routing table (the stored
routes, tun2g.storage.routing): `Router.route()` first resolves the Host and
path to a route key (`Routing.route`), then walks its candidates: the local
tunnels for that route, least loaded first,
retiring those that cannot open a stream; then, for a public request with no
usable local tunnel, the other nodes that hold one. The request pipeline
(`tun2g.server.pipeline`) runs the exchange over each candidate it is given
and asks for the next one when a replayable request meets a dead upstream.
"""

from __future__ import annotations

import functools
import random

import gevent
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tun2g import pages
from tun2g.backend import Backend
from tun2g.cluster import ClusterNode, ClusterUnavailable, HopRefused, NodeRef
from tun2g.cluster.hop import Hop
from tun2g.control import ROUTE_HEADER
from tun2g.errors import CantOpenSessionStream, NoSuchBackend
from tun2g.http import MessageReader, RequestHead
from tun2g.log import get_logger
from tun2g.server.tunnel import Tunnel
from tun2g.server.tunnels import Tunnels
from tun2g.smux import Stream
from tun2g.storage import Route, StorageError, normalize_domain
from tun2g.storage.routing import AmbiguousPath, RoutingTable, parse_route_key
from tun2g.transport.base import ByteStream

log = get_logger(__name__)

# A stored route with no backend here nor in the registry is looked up again this many times, this far
# apart, before the 502: a client moving between nodes (drain, rolling restart) is registered on its
# new node a few milliseconds after it left the old one.
MISS_RETRIES = 3
MISS_WAIT = 0.1
# Route keys known to have had a backend (here, or found in the registry): looked up again on a miss even
# before the routing table loads them. Bounded: public requests choose the Host.
MAX_SEEN_ROUTES = 10_000


@functools.lru_cache(maxsize=4096)
def routing_key(host: str) -> str | None:
    """The domain a Host header routes to (cached: hosts repeat, validation is not free)."""
    try:
        return normalize_domain(host)
    except StorageError:
        return None


class TunnelUpstream:
    """One stream of a local tunnel, for one exchange: a kept-alive one (``reused``) or a new one."""

    def __init__(self, router: Router, tunnel: Tunnel, stream: Stream, reader: MessageReader | None) -> None:
        self._router = router
        self.tunnel = tunnel
        # A stream the tunnel does not keep carries one exchange: Connection: close lets the client FIN
        # with its response. A kept one goes back to the tunnel at a clean message boundary.
        self.single_use = not tunnel.keeps_streams
        self.stream = stream
        self.reused = reader is not None
        self.reader = reader if reader is not None else MessageReader(stream)
        self.label = tunnel.id
        tunnel.in_flight += 1

    def release(self, reusable: bool) -> None:
        if reusable:
            self.tunnel.keep_stream(self.stream, self.reader)  # closed there unless the tunnel keeps it
        else:
            self.stream.close()
        self.tunnel.in_flight -= 1
        self.tunnel.served += 1

    def failed(self, reason: str) -> bool:
        """The exchange failed; True when another upstream may serve a replayable request: the tunnel is
        gone, or this was a kept stream (which the client may have closed just now)."""
        if self.tunnel.is_closed:
            self._router.retire(self.tunnel, reason)
            return True
        return self.reused

    def failure_page(self, detail: str, request_id: str) -> pages.Page:
        log.warning("tunnel_failed", error=detail, request_id=request_id, **self.tunnel.log_fields())
        return pages.tunnel_failed(request_id)


class NodeUpstream:
    """A kept-alive connection to another node of the cluster, for one forwarded exchange."""

    single_use = False

    def __init__(self, cluster: ClusterNode, node: NodeRef, stream: ByteStream, reader: MessageReader) -> None:
        self._cluster = cluster
        self.node = node
        self.stream = stream
        self.reader = reader
        self.label = node.node_id
        self.reused = reader.messages_read > 0

    def release(self, reusable: bool) -> None:
        self._cluster.forwarder.release(self.node.url, self.stream, self.reader, reusable)

    def failed(self, reason: str) -> bool:
        log.warning("hop_failed", node=self.node.node_id, url=self.node.url, error=reason)
        return True

    def failure_page(self, detail: str, request_id: str) -> pages.Page:
        log.warning("hop_failed_page", node=self.node.node_id, error=detail, request_id=request_id)
        return pages.node_failed(request_id)


Upstream = TunnelUpstream | NodeUpstream


@dataclass
class Routing:
    """One request's walk through its candidate upstreams; `page` answers it when none served it.

    `route`: the route key the Host and path resolved to (the normalized Host when no stored
    route matches; None for a Host that is no host name); `prefix` and `target`: the path prefix
    to strip and the target the backend gets, when the route strips (else "" and None);
    `refused`: why the path cannot be routed (tun2g.storage.routing.AmbiguousPath), else None;
    `hop_origin`: the node that forwarded this request to a draining node, which may forward it once
    more (to a node neither draining nor the origin), else None.
    """

    router: Router
    head: RequestHead
    request_id: str
    local_only: bool
    route: str | None = None
    prefix: str = ""
    target: str | None = None
    refused: str | None = None
    broken_tunnels: list[Tunnel] = field(default_factory=list)
    unreachable_nodes: list[str] = field(default_factory=list)
    registry_error: str | None = None
    hop_origin: str | None = None
    _prepared: bool = False
    _route_header: bool = False

    @property
    def host(self) -> str:
        return self.head.host or ""

    def __iter__(self) -> Iterator[Upstream]:
        domain = self.route
        if domain is None:
            return
        yield from self._local(domain)
        cluster = self.router.cluster
        if cluster is None or self.local_only:
            return  # (a local tunnel that broke under a replayable request, or opened no stream: on to the others)
        for attempt in range(MISS_RETRIES + 1):
            if attempt:
                gevent.sleep(MISS_WAIT)  # bounded: MISS_RETRIES x MISS_WAIT per request at most
                yield from self._local(domain)  # the client may have come here
                cluster.forget(domain)
            try:
                nodes = cluster.nodes_for(domain)
            except ClusterUnavailable as exc:
                self.registry_error = cluster.last_error or str(exc)
                log.debug("lookup_unavailable", host=self.host, error=str(exc))
                return
            draining = cluster.registry.peers.draining
            if self.hop_origin is not None:  # forwarded to us as we drain: once more, never back nor to a draining node
                nodes = [node for node in nodes if node.node_id != self.hop_origin and node.node_id not in draining]
            elif draining and len(nodes) > 1:  # a draining node serves only until its sessions have moved
                nodes = [node for node in nodes if node.node_id not in draining] or nodes
            if nodes:
                self.router.saw(domain)
                if attempt:
                    log.info("lookup_retried", host=self.host, attempts=attempt, request_id=self.request_id)
            elif not self.router.knows(domain) and domain not in self.router.seen:
                return  # a Host no stored route names, nor ever had a backend: no second look (Hosts are anyone's)
            # Resumed past a node only when nothing reached it or the request is replayable: then, after all of
            # them, a second look (a node that was just restarting, a client that just moved) is safe too.
            for node in nodes if len(nodes) == 1 else random.sample(nodes, len(nodes)):
                yield from self._node(cluster, domain, node)

    def _local(self, route: str) -> Iterator[Upstream]:
        while (tunnel := self.router.tunnels.pick(route, self.broken_tunnels)) is not None:
            fresh = False
            while True:
                try:
                    stream, reader = (tunnel.open_stream(), None) if fresh else tunnel.take_stream()
                except CantOpenSessionStream as exc:
                    self.router.retire(tunnel, str(exc))
                    break
                self._prepare(route, tunnel)
                upstream = TunnelUpstream(self.router, tunnel, stream, reader)
                yield upstream  # resumed only when it failed under a replayable request
                if not upstream.reused or tunnel.is_closed:
                    break
                fresh = True  # a kept stream the client closed meanwhile: once more, on a new one
            self.broken_tunnels.append(tunnel)

    def _prepare(self, route: str, tunnel: Tunnel) -> None:
        """The head as this node's tunnel gets it: the prefix stripped (once: a retry reuses the head),
        and for a client serving several routes, which one this stream is for."""
        head = self.head
        if not self._prepared:
            self._prepared = True
            if self.target is not None:
                head.set("X-Forwarded-Prefix", self.prefix)
                head.target = self.target
        if len(tunnel.routes) > 1:
            head.set(ROUTE_HEADER, route)
            self._route_header = True
        elif self._route_header:  # set for a tunnel that broke; this one is a plain (maybe Go) client
            head.remove(ROUTE_HEADER)
            self._route_header = False

    def _node(self, cluster: ClusterNode, domain: str, node: NodeRef) -> Iterator[Upstream]:
        fresh = False
        while True:
            if not cluster.available(node):
                self.unreachable_nodes.append(f"{node.node_id}: not answering its health check")
                return
            # Signed for this node, with a new nonce for each attempt: the receiving node serves it, never
            # forwards it, and accepts it once.
            cluster.forwarder.sign(self.head, self.request_id, to=node.node_id)
            try:
                stream, reader = cluster.forwarder.connect(node.url, fresh=fresh)
            except OSError as exc:
                self.unreachable_nodes.append(f"{node.node_id}: {exc}")
                cluster.unreachable(domain, node, exc)
                return
            upstream = NodeUpstream(cluster, node, stream, reader)
            yield upstream
            if not upstream.reused or fresh:
                return  # a fresh connection failed: the node itself is in trouble, try the next one
            fresh = True  # a kept-alive connection may have been closed by the node just now: once more, anew

    @property
    def page(self) -> pages.Page:
        if self.refused is not None:
            return pages.malformed_request(400, f"this path cannot be routed: {self.refused}", self.request_id)
        if self.registry_error is not None:
            log.warning("registry_unavailable", error=self.registry_error, request_id=self.request_id)
            return pages.registry_unavailable(self.request_id)
        if self.broken_tunnels:
            return pages.tunnel_broke(self.request_id)
        if self.unreachable_nodes:
            log.warning("hop_unreachable", nodes="; ".join(self.unreachable_nodes), request_id=self.request_id)
            return pages.no_node_reachable(self.request_id)
        return pages.no_backends(self.host, self.request_id)


class Router:
    """Host -> local tunnel | other node | page, and the bookkeeping of this node's tunnels."""

    def __init__(self, tunnels: Tunnels, cluster: ClusterNode | None = None) -> None:
        self.tunnels = tunnels
        self.cluster = cluster
        self.routes: RoutingTable[Route] = RoutingTable()  # the stored routes (`load_routes`)
        self.seen: set[str] = set()  # route keys that had a backend somewhere (see MAX_SEEN_ROUTES)
        self.draining = False  # this node is stopping (Server.drain): see Routing.hop_origin

    # -- requests ------------------------------------------------------------------------

    def accept_hop(self, head: RequestHead) -> Hop | None:
        """The Hop of a request another node forwarded (served from local tunnels only), else None.

        Raises HopRefused for a hop header this cluster did not sign. Without a
        cluster a hop header is just a public header (the pipeline drops it).
        """
        return None if self.cluster is None else self.cluster.accept_hop(head)

    def route(self, head: RequestHead, request_id: str, hop: Hop | None) -> Routing:
        """The route for `head` and its candidates, tried in order by the pipeline."""
        # A hop is served from local tunnels only; a draining node whose tunnels just left forwards it once more.
        routing = Routing(self, head, request_id, local_only=hop is not None and not self.draining,
                          hop_origin=hop.origin if hop is not None and self.draining else None)
        host = routing_key(head.host or "")
        if host is None:
            return routing
        try:
            match = self.routes.match(host, head.target)
        except AmbiguousPath as exc:
            routing.refused = str(exc)
            return routing
        if match is None:
            routing.route = host  # no stored route (yet): the Host itself, as before route keys
        else:
            routing.route = match.key
            if match.strip and match.prefix:
                routing.prefix, routing.target = match.prefix, match.target
        return routing

    def load_routes(self, routes: Iterable[Route]) -> None:
        """Replace the routing table with these stored routes (a route key that does not parse is skipped)."""
        table: RoutingTable[Route] = RoutingTable()
        for route in routes:
            try:
                table.add(parse_route_key(route.domain), route, route.strip)
            except StorageError as exc:
                log.warning("route_skipped", route=route.domain, error=str(exc))
        self.routes = table

    def add_route(self, route: Route) -> None:
        """Add one route this process just stored (a self-service claim), sparing a reload of every route;
        the next reload (the store's revision moved) confirms it."""
        self.routes.add(parse_route_key(route.domain), route, route.strip)

    def knows(self, route: str) -> bool:
        """Whether the routing table holds this route key."""
        try:
            return self.routes.get(parse_route_key(route)) is not None
        except StorageError:
            return False

    # -- tunnels -------------------------------------------------------------------------

    def saw(self, route: str) -> None:
        """`route` has a backend somewhere: a miss for it is worth a second look."""
        if len(self.seen) >= MAX_SEEN_ROUTES:
            self.seen.clear()
        self.seen.add(route)

    def register(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        for route in tunnel.routes:
            self.saw(route)
        self._changed()

    def deregister(self, tunnel: Tunnel) -> bool:
        """Forget a tunnel (it is no longer usable); True when it was registered."""
        tunnel.usable = False
        if not self.tunnels.discard(tunnel):
            return False
        self._changed()
        return True

    def take_over(self, tunnel: Tunnel) -> list[str]:
        """Close the older sessions of `tunnel`'s client instance (same instance id, same user) here,
        and have the other nodes close theirs (docs/routing.md#takeover); returns the ids closed here."""
        replaced = []
        for old in self.tunnels.same_instance(tunnel):
            log.info("taken_over", by=tunnel.id, **old.log_fields())
            old.close()
            self.deregister(old)
            replaced.append(old.id)
        if self.cluster is not None and tunnel.instance:
            gevent.spawn(self.cluster.take_over, tunnel.instance, tunnel.user)
        return replaced

    def retire(self, tunnel: Tunnel, reason: str) -> None:
        """Close and forget a tunnel whose session failed under a request."""
        log.warning("backend_failed", reason=reason, **tunnel.log_fields())
        tunnel.close()
        self.deregister(tunnel)

    def _changed(self) -> None:
        if self.cluster is not None:
            self.cluster.changed()

    # -- admin ---------------------------------------------------------------------------

    def backends(self) -> list[Backend]:
        """This node's backends, and in a cluster every other live node's too (see Backend.node)."""
        local = self.tunnels.records()
        return local if self.cluster is None else local + self.cluster.remote_backends()

    def kill(self, backend_id: str) -> None:
        """Disconnect one backend, here or (through the cluster) on its node; raises NoSuchBackend if unknown."""
        try:
            tunnel = self.tunnels.get(backend_id)
        except NoSuchBackend:
            if self.cluster is None:
                raise
            self.cluster.kill(backend_id)
            return
        log.info("killed", **tunnel.log_fields())
        tunnel.close()
        self.deregister(tunnel)

    def close(self) -> None:
        """Leave the cluster (the other nodes stop forwarding here at once) and close every tunnel."""
        if self.cluster is not None:
            self.cluster.close()
        for tunnel in self.tunnels:
            tunnel.close()


__all__ = ["HopRefused", "NodeUpstream", "Router", "Routing", "TunnelUpstream", "Upstream", "routing_key"]
