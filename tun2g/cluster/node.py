"""One server process as a node of a cluster: shared registry, signed hops, forwarding, cluster-wide admin.

`Cluster(server, ClusterConfig(...))` sets `server.cluster`; the Server and
its HTTP front consult it only when the local registry has no answer, so a
request for a local backend never touches Redis.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from tun2g.cluster.forward import HTML, Forwarder, Outcome, send_quietly
from tun2g.cluster.hop import HOP_HEADER, Hop, HopRefused, verify
from tun2g.cluster.registry import DEFAULT_CACHE_TTL, DEFAULT_TTL, ClusterUnavailable, RedisRegistry
from tun2g.errors import ConfigurationError, NoSuchBackend
from tun2g.http import simple_response
from tun2g.log import get_logger
from tun2g.pages import gateway_error_body
from tun2g.storage import StorageError, normalize_domain, redact_url

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


class Cluster:
    """The cluster side of a Server: attach with `Cluster(server, config).start()`."""

    def __init__(self, server, config: ClusterConfig):
        _check_advertise_url(config.advertise_url)
        self.server = server
        self.config = config
        self.node_id = server.config.node_id
        self.registry = RedisRegistry(config.redis_url, self.node_id, config.advertise_url,
                                      snapshot=self._local_backends, on_kill=self._kill_local, ttl=config.ttl,
                                      cache_ttl=config.cache_ttl, key_prefix=config.key_prefix)
        self.secret = self._resolve_secret(config)
        self.forwarder = Forwarder(self.node_id, self.secret)
        self._closed = False
        server.cluster = self

    def start(self) -> "Cluster":
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

    # -- hooks the Server calls --------------------------------------------------------

    def changed(self) -> None:
        """A local backend came or went."""
        self.registry.changed()

    def remote_backends(self) -> list:
        """Other nodes' backends; only this node's are listed (and Redis logged) when Redis is down."""
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

    def _local_backends(self) -> list:
        return [connection.backend() for connection in self.server.registry]

    def _kill_local(self, backend_id: str) -> None:
        connection = self.server.registry.get(backend_id)
        log.info("killed", by="cluster", **connection.log_fields())
        connection.close()

    # -- hooks the HTTP front calls ----------------------------------------------------

    def accept_hop(self, head) -> Hop | None:
        """None for a public request; the Hop for a valid node-to-node one (its header removed).

        Raises HopRefused for a hop header that is not a fresh signature of this cluster.
        """
        value = head.get(HOP_HEADER)
        if value is None:
            return None
        hop = verify(self.secret, value, now=time.time(), method=head.method, host=head.host or "",
                     target=head.target, request_id=head.get("X-Request-Id") or "",
                     forwarded_for=head.get("X-Forwarded-For") or "")
        head.remove(HOP_HEADER)
        return hop

    def refuse_hop(self, sock, head, peer_ip: str, error: HopRefused) -> Outcome:
        """Answer a forged or stale node-to-node request with 403 and close."""
        log.warning("hop_refused", remote=peer_ip, host=head.host, reason=str(error))
        body = f"tun2g: node-to-node request refused: {error}\n".encode()
        send_quietly(sock, simple_response(403, body, version=head.version, close=True))
        return Outcome(403, False)

    def forward(self, head, reader, sock, host: str, request_id: str) -> Outcome | None:
        """Serve a request no local backend can take from another node; None when no node has one."""
        try:
            domain = normalize_domain(host)
        except StorageError:
            return None
        try:
            nodes = self.registry.lookup(domain)
        except ClusterUnavailable as exc:
            body = gateway_error_body(503, "Service Unavailable",
                                      f"This site's tunnel is not on this server, and the cluster registry cannot "
                                      f"be reached to find it ({self.registry.outage.last_error}). Retry shortly.",
                                      request_id)
            keep = head.keep_alive and not (head.chunked or head.content_length)
            send_quietly(sock, simple_response(503, body, content_type=HTML, version=head.version,
                                               headers=[("X-Request-Id", request_id), ("Retry-After", "1")],
                                               close=not keep))
            log.debug("lookup_unavailable", host=host, error=str(exc))
            return Outcome(503, keep)
        if not nodes:
            return None
        return self.forwarder.forward(head, reader, sock, nodes, request_id,
                                      on_unreachable=lambda node: self.registry.forget(domain))

    def round_trip(self, head, body, request_id: str):
        """`forward` for Server.round_trip callers: a TunnelResponse, or None when no node has a backend."""
        from tun2g.http import ResponseHead
        from tun2g.roundtrip import TunnelResponse

        try:
            domain = normalize_domain(head.host or "")
            nodes = self.registry.lookup(domain)
        except StorageError:
            return None
        except ClusterUnavailable:
            page = gateway_error_body(503, "Service Unavailable", "This site's tunnel is not on this server, and the "
                                      "cluster registry cannot be reached to find it. Retry shortly.", request_id)
            return TunnelResponse(ResponseHead(503, "Service Unavailable", headers=[
                ("Content-Type", HTML), ("Content-Length", str(len(page))), ("Retry-After", "1"),
                ("X-Request-Id", request_id)]), body=page)
        if not nodes:
            return None
        return self.forwarder.round_trip(head, body, nodes, request_id,
                                         on_unreachable=lambda node: self.registry.forget(domain))

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
