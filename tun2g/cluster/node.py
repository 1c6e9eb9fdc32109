"""This server process as one node of a cluster: shared registry, signed hops, connections to other nodes.

`ClusterNode` holds no Server: it is given two callbacks (this node's
backend records, and how to disconnect one of them when another node asks)
and is consulted only by the server's Router, and only where the local
tunnels have no answer, so a request for a local tunnel never touches Redis.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

import redis

from tun2g.backend import Backend
from tun2g.cluster.forward import HOP_READ_TIMEOUT, Forwarder, cuts_in_flight
from tun2g.cluster.hop import HOP_HEADER, WINDOW, Hop, HopRefused, NonceMemory, framing_of, verify
from tun2g.cluster.registry import DEFAULT_CACHE_TTL, DEFAULT_TTL, ClusterUnavailable, NodeRef, RedisRegistry
from tun2g.errors import ConfigurationError, NoSuchBackend
from tun2g.http import RequestHead
from tun2g.log import get_logger
from tun2g.storage import redact_url

log = get_logger(__name__)


@dataclass
class ClusterConfig:
    """How this node joins the cluster. Without `secret`, the nodes share one kept in Redis."""

    redis_url: str
    advertise_url: str
    secret: str | None = None
    ttl: float = DEFAULT_TTL
    cache_ttl: float = DEFAULT_CACHE_TTL
    key_prefix: str = "tun2g:"
    hop_timeout: float = HOP_READ_TIMEOUT
    on_redis_error: Callable[[str], None] | None = None  # told of every failed registry call (metrics)


class ClusterNode:
    """This node's membership: publishes its backends, finds other nodes', signs and checks hops.

    `local_backends()` lists this node's Backend records (published to Redis);
    `kill_local(backend_id)` disconnects one when another node asks.
    """

    def __init__(self, config: ClusterConfig, node_id: str, *, local_backends: Callable[[], list[Backend]],
                 kill_local: Callable[[str], None], started: float | None = None) -> None:
        """`local_names` (settable before `start`): more names this node serves, e.g. its TCP routes.
        `started`: when this node's process began (unix seconds; default now), for the hop nonces."""
        _check_advertise_url(config.advertise_url)
        self.config = config
        self.node_id = node_id
        self._kill_local = kill_local
        self.registry = RedisRegistry(config.redis_url, node_id, config.advertise_url,
                                      snapshot=local_backends, on_kill=self._on_kill, ttl=config.ttl,
                                      cache_ttl=config.cache_ttl, key_prefix=config.key_prefix,
                                      on_redis_error=config.on_redis_error,
                                      published_names=lambda: self.local_names())
        self.secret = self._resolve_secret(config)
        self.registry.secret = self.secret  # heartbeats are signed as hops are
        self.forwarder = Forwarder(node_id, self.secret, read_timeout=config.hop_timeout)
        self.nonces = NonceMemory(WINDOW, started=time.time() if started is None else started)
        self._closed = False
        self.local_names: Callable[[], Iterable[str]] = lambda: ()

    def start(self) -> ClusterNode:
        self.registry.start()
        log.info("cluster_joined", node=self.node_id, advertise=self.config.advertise_url,
                 redis=redact_url(self.config.redis_url), ttl=self.config.ttl)
        return self

    def _resolve_secret(self, config: ClusterConfig) -> bytes:
        if config.secret:
            return config.secret.encode()
        try:
            return self.registry.shared_secret().encode()
        except (redis.RedisError, OSError) as exc:
            raise ClusterUnavailable(f"cannot read the shared cluster secret from Redis at "
                                     f"{redact_url(config.redis_url)} ({exc}); start Redis, or give every node "
                                     f"the same --cluster-secret / TUN2G_CLUSTER_SECRET") from None

    # -- backends ------------------------------------------------------------------------

    def changed(self) -> None:
        """A local backend came or went."""
        self.registry.changed()

    def drain(self) -> None:
        """This node is stopping: list it to no client from now on (its own clients are told to move)."""
        self.registry.draining = True
        self.registry.changed()
        self.registry.beat_now()  # the other nodes stop forwarding here (Routing prefers nodes not draining)

    def remote_backends(self) -> list[Backend]:
        """Other nodes' backends; none (and Redis logged) when Redis is down."""
        try:
            return self.registry.remote_backends()
        except ClusterUnavailable:
            return []

    def kill(self, backend_id: str) -> str:
        """Have the node holding `backend_id` disconnect it; returns that node's id."""
        try:
            return self.registry.kill(backend_id)
        except ClusterUnavailable as exc:
            raise NoSuchBackend(f"{backend_id} is not on this node, and the others cannot be asked: {exc}") from None

    def take_over(self, instance: str, user: str) -> None:
        """Have the other nodes close this client instance's sessions (a newer one connected here)."""
        try:
            killed = self.registry.kill_instance(instance, user)
        except ClusterUnavailable as exc:
            log.warning("takeover_unavailable", instance=instance, user=user, error=str(exc),
                        effect="older sessions on other nodes stay until their health check fails")
            return
        if killed:
            log.info("takeover_requested", instance=instance, user=user, backends=" ".join(killed))

    def _on_kill(self, backend_id: str) -> None:
        log.info("killed", by="cluster", backend=backend_id)
        self._kill_local(backend_id)

    # -- requests ------------------------------------------------------------------------

    def accept_hop(self, head: RequestHead) -> Hop | None:
        """None for a public request; the Hop for a valid node-to-node one (its header removed).

        Raises HopRefused for a hop header that is not a fresh, first-seen
        signature of this cluster addressed to this node. This process remembers
        every nonce it accepted for 2 x WINDOW (enough, as a hop names its
        receiver). A hop signed before this process started, or less than two
        windows after, may have been accepted by an earlier process of this node
        id: its nonce is also claimed in Redis (SET NX), which remembers it across
        a restart; when Redis cannot answer at once, this process's memory alone
        decides. Later hops cost no Redis call.
        """
        value = head.get(HOP_HEADER)
        if value is None:
            return None
        hop = verify(self.secret, value, receiver=self.node_id, now=time.time(), method=head.method,
                     host=head.host or "", target=head.target, request_id=head.get("X-Request-Id") or "",
                     forwarded_for=head.get("X-Forwarded-For") or "",
                     framing=framing_of(head.content_length, head.chunked))
        if not self.nonces.first_use(hop.nonce, time.monotonic()) or (
                self.nonces.may_predate(hop.timestamp)
                and self.registry.claim_nonce(hop.nonce, self.nonces.keep_for) is False):
            raise HopRefused(f"hop nonce already used (a replayed request from node {hop.origin!r})")
        head.remove(HOP_HEADER)
        return hop

    def nodes_for(self, domain: str) -> list[NodeRef]:
        """The other nodes holding a backend for `domain`; raises ClusterUnavailable when Redis cannot say."""
        return self.registry.lookup(domain)

    def passthrough_names(self) -> frozenset[str]:
        """The TLS passthrough names some live node's tunnels serve, as last read (never waits for Redis)."""
        return self.registry.tls_names()

    def available(self, node: NodeRef) -> bool:
        """Whether to try `node`: not skipped by the forwarder, or heard beating again since it was."""
        if self.forwarder.available(node.url):
            return True
        since = self.forwarder.down_since(node.url)
        if since is None:
            return True
        joined = self.registry.peers.joined.get(node.node_id)
        if joined is not None and joined > since and node.node_id in self.registry.peers.heard:
            self.forwarder.revive(node.url, "its heartbeats are back")
            return True
        return False

    def forget(self, domain: str) -> None:
        """Look `domain` up afresh in Redis next time (the cached answer may predate a move)."""
        self.registry.forget(domain)

    def unreachable(self, domain: str, node: NodeRef, error: OSError) -> None:
        """`node` could not be reached for `domain`: skip it for a while, look `domain` up afresh next time."""
        self.forwarder.failed(node.url, f"unreachable: {error}", cut_in_flight=cuts_in_flight(error))
        self.registry.forget(domain)
        self.registry.suspect(node.node_id)  # evicted soon unless its heartbeats say it lives

    @property
    def last_error(self) -> str:
        """What the registry last failed with (for the 503 page)."""
        return self.registry.outage.last_error

    def close(self) -> None:
        """Leave the cluster: this node's records are removed at once (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.registry.close()
        self.forwarder.close()


def _check_advertise_url(url: str) -> None:
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in url:
        raise ConfigurationError(f"the advertised URL must look like http://10.0.0.2:8080 (where the other nodes "
                                 f"reach this node's HTTP front), got {url!r}; check --advertise / TUN2G_ADVERTISE")
    if parts.hostname in ("0.0.0.0", "::"):
        raise ConfigurationError(f"the advertised URL {url!r} names no reachable host; give this node's address "
                                 f"with --advertise")


def default_advertise_url(http_address: tuple, scheme: str = "http") -> str:
    """Where other nodes reach this node's HTTP front: its bound address, or this host's own IP."""
    host, port = http_address[0], http_address[1]
    if host in ("0.0.0.0", "::", ""):
        host = os.environ.get("HEROKU_PRIVATE_IP") or _primary_ip()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _primary_ip() -> str:
    """The address this host uses for outgoing traffic (no packet is sent), else loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()
