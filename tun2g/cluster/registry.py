"""The shared backend registry: which node of a cluster holds which backend, in Redis.

Key schema (``P`` is the key prefix, default ``tun2g:``, shared with the Redis
storage's ``P token:*`` and ``P route:*`` keys)::

    P nodes                    zset    member <node id>, score = expiry (unix seconds)
    P node:<node id>           hash    url (where other nodes reach it), started, pid, host;  TTL
    P node-backends:<node id>  hash    <backend id> -> JSON Backend record (domain, user, ...);  TTL
    P domain:<route key>       zset    member "<node id> <url>", score = expiry (unix seconds);  TTL
                               (also "tcp:<port>" and "tls:<name>" for the TCP services a node serves)
    P tls-names                zset    member <TLS passthrough name> some node serves, score = expiry
    P cluster-secret           string  the hop secret when no --cluster-secret is given (created once)
    P hop-nonce:<nonce>        string  <receiving node id>: that hop nonce was used (hops signed around the
                                       receiver's start only: NonceMemory.may_predate);  TTL 2 x hop window
    channel P kill             "<node id> <backend id>": that node disconnects that backend
    channel P invalidate       "<domain> <domain> ...": drop cached lookups for these domains
    channel P heartbeat        signed beats of every node, and "evict" / "leave" notices (tun2g.cluster.heartbeat)

Each node rewrites its own records from its local registry every TTL/3
seconds and at once after a change, in one MULTI/EXEC; the zset scores and
key TTLs make a node that dies, or loses Redis, vanish within the TTL with
nobody cleaning up. Sooner than that, a node that stops beating on ``P heartbeat``
(a crash, a freeze, a partition) has its records removed by the nodes that still
hear each other (`_evict`), within EVICT_SILENCE, or SUSPECT_SILENCE when a hop
found its port closed. Because every write is a full snapshot, a Redis that
restarts empty is repopulated by the next refresh without operator help.
Scores are unix times from each node's clock: keep nodes NTP-synchronised.

A lookup is one ZRANGEBYSCORE, cached for `cache_ttl` and shared by
concurrent requests for the same domain; past `cache_ttl` the cached answer
is still served (up to the registry TTL) while a background call refreshes
it, so a slow Redis never holds a request that has an answer. The local path
never asks Redis.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterable

import gevent
import redis
from gevent.event import AsyncResult, Event
from redis.backoff import NoBackoff
from redis.retry import Retry

from tun2g.backend import Backend
from tun2g.cluster import heartbeat
from tun2g.cluster.outage import Outage
from tun2g.errors import NoSuchBackend
from tun2g.log import get_logger
from tun2g.storage.redis_connect import open_redis

log = get_logger(__name__)

DEFAULT_TTL = 10.0
DEFAULT_CACHE_TTL = 1.0
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
# Public requests choose the Host, so the lookup cache is bounded: past this many
# domains, entries no longer usable are dropped (all of them if that is not enough).
MAX_CACHED_DOMAINS = 10_000
# A cached answer that pub/sub invalidated waits this long for Redis before it is served anyway.
INVALIDATED_WAIT = 0.2
# While this node's subscription is not confirmed (starting, resubscribing), no invalidation can
# reach it: an answer is trusted at most this long (the default cache TTL), whatever the cache TTL.
UNHEARD_CACHE_TTL = 1.0
# The live nodes' tunnel addresses, told to every client that logs in, are read at most this often.
TUNNEL_NODES_CACHE = 1.0
# Hop nonces are claimed in Redis (SET NX) with these timeouts: a slow Redis must not hold requests.
NONCE_TIMEOUT = 0.25
# The cluster's TLS passthrough names are read at most this often (in the background: never on a handshake).
TLS_NAMES_CACHE = 1.0
# At most this many passthrough names are read (each client announces at most 64).
MAX_TLS_NAMES = 100_000
TLS_PREFIX = "tls:"
_BACKEND_FIELDS = {f.name for f in fields(Backend)}
# Removes a silent node's records in one step, unless it refreshed them after it went silent (ARGV[3], unix s:
# the latest expiry score it may have): then it is alive and only its beats do not reach us.
# ARGV: key prefix, node id, latest score, the "evict" message to publish. Returns -1 (spared) or the domains.
_EVICT = """
local prefix, node, latest, notice = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local score = redis.call('ZSCORE', prefix .. 'nodes', node)
if score and tonumber(score) > latest then return -1 end
local info = redis.call('HMGET', prefix .. 'node:' .. node, 'url', 'domains')
local member = node .. ' ' .. (info[1] or '')
local domains = {}
if info[2] then
  for domain in string.gmatch(info[2], '%S+') do
    table.insert(domains, domain)
    redis.call('ZREM', prefix .. 'domain:' .. domain, member)
  end
end
redis.call('ZREM', prefix .. 'nodes', node)
redis.call('DEL', prefix .. 'node:' .. node, prefix .. 'node-backends:' .. node)
if #domains > 0 then redis.call('PUBLISH', prefix .. 'invalidate', table.concat(domains, ' ')) end
redis.call('PUBLISH', prefix .. 'heartbeat', notice)
return #domains
"""


class ClusterUnavailable(ConnectionError):
    """Redis cannot be asked right now, so other nodes' backends cannot be found."""


@dataclass(frozen=True)
class NodeRef:
    """Another node, as a lookup names it."""

    node_id: str
    url: str


@dataclass
class _CacheEntry:
    fetched: float  # monotonic time of the answer; -inf once invalidated
    usable_until: float  # while Redis is down, the answer still serves until then
    nodes: list


class RedisRegistry:
    """This node's view of the cluster: publishes its backends, looks up other nodes'.

    `snapshot()` returns this node's Backend records; `on_kill(backend_id)`
    disconnects a local backend when another node asks over pub/sub.
    """

    def __init__(self, url: str, node_id: str, advertise_url: str, *, snapshot: Callable[[], list],
                 on_kill: Callable[[str], None], ttl: float = DEFAULT_TTL, cache_ttl: float = DEFAULT_CACHE_TTL,
                 key_prefix: str = "tun2g:", on_redis_error: Callable[[str], None] | None = None,
                 published_names: Callable[[], Iterable[str]] | None = None):
        """`published_names()`: more names this node serves, published like domains (e.g. "tcp:2222")."""
        if " " in node_id or not node_id:
            raise ValueError(f"node id {node_id!r} must be non-empty and contain no spaces")
        if ttl <= 0 or cache_ttl < 0:
            raise ValueError("the registry TTL must be positive and the cache TTL not negative")
        self.node_id = node_id
        self.advertise_url = advertise_url
        self.ttl = ttl
        self.cache_ttl = cache_ttl
        self.prefix = key_prefix
        self._snapshot = snapshot
        self._published_names = published_names
        self._on_kill = on_kill
        self._redis = open_redis(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT,
                                 socket_timeout=COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 1),
                                 health_check_interval=max(1, int(ttl)))
        self._nonce_redis = open_redis(url, decode_responses=True, socket_connect_timeout=NONCE_TIMEOUT,
                                       socket_timeout=NONCE_TIMEOUT, retry=Retry(NoBackoff(), 0))
        self.outage = Outage("cluster registry", on_failure=on_redis_error)
        self._member = f"{node_id} {advertise_url}"
        # Where tunnel clients reach this node ("host:port"), told to clients so they can hold
        # sessions on several nodes (docs/cluster.md#multi-homed-clients); "" : not offered.
        self.advertise_tunnel = ""
        self._tunnel_nodes: tuple[float, list[tuple[str, str]]] = (float("-inf"), [])
        self._published: set[str] = set()
        self._tls_names: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
        self._tls_refresh: gevent.Greenlet | None = None
        self._cache: dict[str, _CacheEntry] = {}
        self._pending: dict[str, AsyncResult] = {}
        # An answer is cached for the cache TTL only if invalidations could reach it: the subscription
        # is confirmed by Redis (else UNHEARD_CACHE_TTL), and none arrived while its query was in
        # flight (it may predate the change: then it is not cached as fresh at all).
        self.listening = False
        self._invalidations = 0
        self._changed = Event()
        self._closed = Event()
        self._tasks: list = []
        self.started = time.time()
        # Heartbeats (tun2g.cluster.heartbeat): signed with the cluster secret, which the ClusterNode sets
        # (no beats, hence no evictions, without one); `on_nodes_changed()` hears a node join or go.
        self.secret: bytes | None = None
        self.peers = heartbeat.PeerTable(node_id)
        self.on_nodes_changed: Callable[[], None] = lambda: None
        self._published_once = Event()
        self.draining = False  # published: a draining node is listed to no client (tunnel_nodes)

    # -- keys ----------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Publish this node and keep it published; listen for kills and invalidations."""
        self._tasks = [gevent.spawn(self._sync_loop), gevent.spawn(self._listen_loop), gevent.spawn(self._beat_loop)]

    def changed(self) -> None:
        """The local backends changed: publish them now rather than at the next refresh."""
        self._changed.set()

    def close(self) -> None:
        """Stop refreshing and remove this node's records (best effort: they expire anyway)."""
        self._closed.set()
        gevent.killall(self._tasks, block=True, timeout=1)
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                for domain in self._published:
                    pipe.zrem(self._key("domain:", domain), self._member)
                pipe.zrem(self._key("nodes"), self.node_id)
                pipe.delete(self._key("node:", self.node_id), self._key("node-backends:", self.node_id))
                if self._published:
                    pipe.publish(self._key("invalidate"), " ".join(sorted(self._published)))
                if self.secret is not None:
                    pipe.publish(self._key("heartbeat"), heartbeat.encode(self.secret, "leave", self.node_id,
                                                                          int(time.time() * 1000)))
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.info("deregister_skipped", reason=str(exc), note="this node's records expire within the TTL")
        self._redis.close()
        self._nonce_redis.close()

    # -- publishing ------------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._closed.is_set():
            self._changed.clear()
            try:
                self.publish_now()
            except Exception as exc:  # a bug must not silently end this node's membership
                log.error("registry_refresh_failed", error=repr(exc))
            self._changed.wait(self.ttl / 3)  # the refresh cadence, or sooner on a change

    def publish_now(self) -> bool:
        """Write this node's full snapshot; False (logged once per interval) when Redis is unreachable."""
        backends = [b for b in self._snapshot() if b.usable]
        domains = {route for b in backends for route in (b.routes or (b.domain,))}
        if self._published_names is not None:
            domains.update(self._published_names())
        now = time.time()
        expires = now + self.ttl
        ttl_ms = int(self.ttl * 1000)
        node_key, backends_key = self._key("node:", self.node_id), self._key("node-backends:", self.node_id)
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(self._key("nodes"), {self.node_id: expires})
                pipe.zremrangebyscore(self._key("nodes"), "-inf", now)
                pipe.hset(node_key, mapping={"url": self.advertise_url, "started": repr(self.started),
                                             "pid": os.getpid(), "host": socket.gethostname(),
                                             "tunnel": self.advertise_tunnel,
                                             "domains": " ".join(sorted(domains)),
                                             "draining": "1" if self.draining else ""})
                pipe.pexpire(node_key, ttl_ms)
                pipe.delete(backends_key)
                if backends:
                    pipe.hset(backends_key, mapping={b.id: json.dumps(b.to_dict()) for b in backends})
                    pipe.pexpire(backends_key, ttl_ms)
                for domain in domains:
                    domain_key = self._key("domain:", domain)
                    pipe.zadd(domain_key, {self._member: expires})
                    pipe.zremrangebyscore(domain_key, "-inf", now)
                    pipe.pexpire(domain_key, ttl_ms)
                tls_names = {domain[len(TLS_PREFIX):] for domain in domains if domain.startswith(TLS_PREFIX)}
                if tls_names:
                    pipe.zadd(self._key("tls-names"), {name: expires for name in tls_names})
                    pipe.zremrangebyscore(self._key("tls-names"), "-inf", now)
                    pipe.pexpire(self._key("tls-names"), ttl_ms)
                for domain in self._published - domains:
                    pipe.zrem(self._key("domain:", domain), self._member)
                changed = domains ^ self._published
                if changed:
                    pipe.publish(self._key("invalidate"), " ".join(sorted(changed)))
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            return False
        self.outage.succeeded()
        self._published = domains
        self._published_once.set()
        return True

    def shared_secret(self) -> str:
        """The cluster's hop secret kept in Redis, created by whichever node asks first."""
        key = self._key("cluster-secret")
        self._redis.set(key, secrets.token_hex(32), nx=True)
        return str(self._redis.get(key))

    def claim_nonce(self, nonce: str, keep_for: float) -> bool | None:
        """Record a hop nonce cluster-wide (SET NX PX): True the first time, False for a replay,
        None when Redis cannot say right now (the caller's own memory decides)."""
        if not self.outage.should_try():
            return None
        try:
            claimed = self._nonce_redis.set(self._key("hop-nonce:", nonce), self.node_id, nx=True,
                                            px=int(keep_for * 1000))
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            return None
        return bool(claimed)

    # -- heartbeats -------------------------------------------------------------------

    def _beat_loop(self) -> None:
        """Beat every BEAT_INTERVAL once this node is published; evict the peers gone silent."""
        self._published_once.wait()
        while not self._closed.is_set() and self.secret is not None:
            try:
                self._redis.publish(self._key("heartbeat"), heartbeat.encode(
                    self.secret, "drain" if self.draining else "beat", self.node_id, int(time.time() * 1000)))
                for node_id, silence in self.peers.to_evict(time.monotonic()):
                    self._evict(node_id, silence)
            except (redis.RedisError, OSError) as exc:
                self.outage.failed(exc)
            except Exception as exc:  # a bug must not end this node's beats
                log.error("heartbeat_failed", error=repr(exc))
            self._closed.wait(heartbeat.BEAT_INTERVAL)

    def beat_now(self) -> None:
        """Publish a beat (or a drain beat) now, not at the next tick (in the background; best effort)."""
        if self.secret is None:
            return
        secret = self.secret

        def beat() -> None:
            try:
                self._redis.publish(self._key("heartbeat"), heartbeat.encode(
                    secret, "drain" if self.draining else "beat", self.node_id, int(time.time() * 1000)))
            except (redis.RedisError, OSError) as exc:
                self.outage.failed(exc)

        gevent.spawn(beat)

    def _evict(self, node_id: str, silence: float) -> None:
        """Remove a silent node's records now rather than at the TTL (spared when it refreshed them since)."""
        assert self.secret is not None
        now = time.time()
        latest = now - silence + 2 * heartbeat.BEAT_INTERVAL + self.ttl  # its expiry score had it published since
        notice = heartbeat.encode(self.secret, "evict", node_id, int(now * 1000), by=self.node_id)
        removed = self._redis.eval(_EVICT, 0, self.prefix, node_id, repr(latest), notice)
        if removed == -1:
            self.peers.spare(node_id, time.monotonic())
            log.info("node_spared", node=node_id, silent_for=round(silence, 2), reason="it refreshed its records")
            return
        self._tunnel_nodes = (float("-inf"), self._tunnel_nodes[1])
        log.warning("node_evicted", node=node_id, silent_for=round(silence, 2), domains=removed)
        self.on_nodes_changed()

    def suspect(self, node_id: str) -> None:
        """A hop could not connect to `node_id`: evict it if it also stays silent SUSPECT_SILENCE."""
        self.peers.suspect(node_id, time.monotonic())

    def _on_heartbeat(self, data: str) -> None:
        if self.secret is None:
            return
        message = heartbeat.decode(self.secret, data, time.time())
        if message is None:
            log.debug("heartbeat_ignored", data=data[:80])
            return
        if message.kind == "evict" and message.node == self.node_id and message.by != self.node_id:
            log.warning("evicted_while_alive", by=message.by, effect="republishing this node's records now")
            self.changed()
        if self.peers.hear(message, time.monotonic()):
            self._tunnel_nodes = (float("-inf"), self._tunnel_nodes[1])
            if message.kind in ("beat", "drain"):
                log.info("node_draining" if message.kind == "drain" else "node_joined", node=message.node)
            self.on_nodes_changed()

    # -- lookups -----------------------------------------------------------------

    def lookup(self, domain: str) -> list[NodeRef]:
        """Other nodes holding a backend for `domain` (maybe none); raises ClusterUnavailable.

        Fresh answers come from the cache; concurrent misses share one Redis call.
        An answer older than the cache TTL but younger than the registry TTL is
        served at once while a background call refreshes it (a slow or frozen
        Redis delays no request that has an answer); one that pub/sub invalidated
        waits up to INVALIDATED_WAIT for the refresh, then is served as it is.
        Only a domain with no usable answer waits for Redis (bounded by its timeouts).
        """
        entry = self._cache.get(domain)
        now = time.monotonic()
        if entry is not None and now - entry.fetched < self.cache_ttl:
            return entry.nodes
        usable = entry is not None and now < entry.usable_until
        pending = self._pending.get(domain)
        if pending is None:
            if not self.outage.should_try():
                return self._stale(entry, now)
            pending = self._refresh(domain)
        if entry is not None and usable:
            if entry.fetched == float("-inf"):
                pending.wait(INVALIDATED_WAIT)
            if not pending.ready() or not pending.successful():
                return entry.nodes
        return pending.get()

    def _refresh(self, domain: str) -> AsyncResult:
        """Ask Redis about `domain` in the background; the AsyncResult gets the answer (or the error)."""
        pending = self._pending[domain] = AsyncResult()

        def run() -> None:
            try:
                pending.set(self._ask_redis(domain, self._cache.get(domain), time.monotonic()))
            except Exception as exc:
                pending.set_exception(exc)
            except BaseException:  # killed (the registry closes): whoever waits must not hang
                pending.set_exception(ClusterUnavailable("the registry lookup was interrupted"))
                raise
            finally:
                if self._pending.get(domain) is pending:
                    del self._pending[domain]

        gevent.spawn(run)
        return pending

    def _ask_redis(self, domain: str, entry: _CacheEntry | None, now: float) -> list[NodeRef]:
        invalidations = self._invalidations
        try:
            nodes = self._fetch(domain)
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            return self._stale(entry, now)
        self.outage.succeeded()
        if not nodes and entry is not None and self.outage.recovered_within(self.ttl / 2):
            # Redis came back (maybe empty) and the nodes republish within TTL/3:
            # until then an empty answer means "not yet known", so keep the last one.
            nodes = entry.nodes
        if invalidations != self._invalidations:
            fetched = float("-inf")  # a change was heard while the query was in flight: ask again next time
        elif self.listening:
            fetched = now
        else:  # no invalidation can reach this node yet: trust the answer briefly only
            fetched = now - max(0.0, self.cache_ttl - UNHEARD_CACHE_TTL)
        self._remember(domain, _CacheEntry(fetched, now + self.ttl, nodes))
        return nodes

    def _remember(self, domain: str, entry: _CacheEntry) -> None:
        cache = self._cache
        if len(cache) >= MAX_CACHED_DOMAINS and domain not in cache:
            for old in [d for d, e in cache.items() if e.usable_until <= entry.fetched]:
                del cache[old]
            if len(cache) >= MAX_CACHED_DOMAINS:
                cache.clear()
        cache[domain] = entry

    def _fetch(self, domain: str) -> list[NodeRef]:
        members = self._redis.zrangebyscore(self._key("domain:", domain), time.time(), "+inf")
        nodes = []
        for member in members:
            node_id, _, url = str(member).partition(" ")
            if node_id != self.node_id and url:
                nodes.append(NodeRef(node_id, url))
        return nodes

    def _stale(self, entry: _CacheEntry | None, now: float) -> list[NodeRef]:
        if entry is not None and now < entry.usable_until:
            return entry.nodes
        raise ClusterUnavailable(f"the cluster registry (Redis) is unreachable: {self.outage.last_error}")

    def forget(self, domain: str) -> None:
        """Drop the cached answer for `domain`: its node could not be reached."""
        self._cache.pop(domain, None)

    def _invalidate(self, domain: str) -> None:
        """The answer for `domain` changed: ask Redis next time, but keep it for an outage."""
        self._invalidations += 1
        entry = self._cache.get(domain)
        if entry is not None:
            entry.fetched = float("-inf")

    # -- the whole cluster -----------------------------------------------------------

    def tls_names(self) -> frozenset[str]:
        """The TLS passthrough names some live node serves (this one's included), as last read: never waits
        for Redis; a read older than TLS_NAMES_CACHE s starts one in the background. Empty until the first."""
        fetched, names = self._tls_names
        if time.monotonic() - fetched >= TLS_NAMES_CACHE and self._tls_refresh is None and \
                not self._closed.is_set() and self.outage.should_try():
            self._tls_refresh = gevent.spawn(self._read_tls_names)
        return names

    def read_tls_names(self) -> frozenset[str]:
        """Read the cluster's passthrough names from Redis now (what `tls_names` answers from then on)."""
        self._read_tls_names()
        return self._tls_names[1]

    def _read_tls_names(self) -> None:
        try:
            names = self._redis.zrangebyscore(self._key("tls-names"), time.time(), "+inf", start=0,
                                              num=MAX_TLS_NAMES)
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
        else:
            self._tls_names = (time.monotonic(), frozenset(str(name) for name in names))
        finally:
            self._tls_refresh = None

    def tunnel_nodes(self) -> list[tuple[str, str]]:
        """(node id, tunnel address) of every live node that offers one, this one included; cached for
        TUNNEL_NODES_CACHE s. While Redis cannot say, the last answer (or this node alone).

        Live: in ``P nodes``, not draining, and (with a cluster secret) beating on the heartbeat
        channel, so a record written into Redis by someone without the secret is listed to no client."""
        fetched, nodes = self._tunnel_nodes
        now = time.monotonic()
        if now - fetched < TUNNEL_NODES_CACHE or not self.outage.should_try():
            return nodes or self._own_tunnel()
        try:
            # With a secret, the nodes heard beating are the candidates (and the only ones listed).
            node_ids = sorted(self.peers.heard) if self.secret is not None else \
                [str(n) for n in self._redis.zrangebyscore(self._key("nodes"), time.time(), "+inf")]
            with self._redis.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hmget(self._key("node:", node_id), "tunnel", "draining")
                records = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            return nodes or self._own_tunnel()
        nodes = sorted((node_id, str(address)) for node_id, (address, draining) in zip(node_ids, records)
                       if address and not draining and node_id != self.node_id and node_id not in self.peers.draining
                       and (self.secret is None or node_id in self.peers.heard))
        if not self.draining:
            nodes = sorted([*nodes, *self._own_tunnel()])
        self._tunnel_nodes = (now, nodes)
        return nodes

    def _own_tunnel(self) -> list[tuple[str, str]]:
        return [(self.node_id, self.advertise_tunnel)] if self.advertise_tunnel else []

    def remote_backends(self) -> list[Backend]:
        """Every other live node's backends; raises ClusterUnavailable when Redis is down."""
        try:
            node_ids = [str(n) for n in self._redis.zrangebyscore(self._key("nodes"), time.time(), "+inf")
                        if n != self.node_id]
            with self._redis.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hvals(self._key("node-backends:", node_id))
                records = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            raise ClusterUnavailable(f"cannot list other nodes' backends: Redis is unreachable ({exc})") from None
        backends = []
        for values in records:
            for value in values:
                record = json.loads(value)
                fields_ = {k: v for k, v in record.items() if k in _BACKEND_FIELDS}
                fields_["routes"] = tuple(fields_.get("routes") or ())
                backends.append(Backend(**fields_))
        return backends

    def kill(self, backend_id: str) -> str:
        """Ask the node holding `backend_id` to disconnect it; returns that node's id.

        Raises NoSuchBackend when no live node holds it, ClusterUnavailable when Redis is down.
        """
        for backend in self.remote_backends():
            if backend.id == backend_id:
                try:
                    self._redis.publish(self._key("kill"), f"{backend.node} {backend_id}")
                except (redis.RedisError, OSError) as exc:
                    raise ClusterUnavailable(f"cannot reach Redis to ask node {backend.node}: {exc}") from None
                return backend.node
        raise NoSuchBackend(backend_id)

    def kill_instance(self, instance: str, user: str) -> list[str]:
        """Ask the nodes holding backends of this client instance and user to disconnect them (takeover);
        returns their ids. Raises ClusterUnavailable when Redis is down."""
        killed = []
        for backend in self.remote_backends():
            if backend.instance == instance and backend.user == user:
                try:
                    self._redis.publish(self._key("kill"), f"{backend.node} {backend.id}")
                except (redis.RedisError, OSError) as exc:
                    raise ClusterUnavailable(f"cannot reach Redis to ask node {backend.node}: {exc}") from None
                killed.append(backend.id)
        return killed

    # -- pub/sub -------------------------------------------------------------------

    def _listen_loop(self) -> None:
        delay = 0.1
        channels = (self._key("kill"), self._key("invalidate"), self._key("heartbeat"))
        while not self._closed.is_set():
            pubsub = self._redis.pubsub()
            try:
                pubsub.subscribe(*channels)
                confirmed = 0
                delay = 0.1
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=self.ttl)
                    kind = message and message["type"]
                    if kind == "message":
                        self._on_message(message["channel"], message["data"])
                    elif kind == "subscribe":
                        confirmed += 1
                        if confirmed == len(channels):
                            self._subscribed()
            except (redis.RedisError, OSError) as exc:
                self.outage.failed(exc)
                self._closed.wait(delay)  # reconnect backoff
                delay = min(self.ttl / 3, delay * 2)
            except Exception as exc:  # a bad message or a bug: log it, resubscribe
                log.error("registry_listener_failed", error=repr(exc))
                self._closed.wait(delay)
                delay = min(self.ttl / 3, delay * 2)
            finally:
                self.listening = False
                pubsub.close()

    def _subscribed(self) -> None:
        """Redis confirmed the subscription: from now on invalidations reach this node."""
        self.outage.succeeded()
        # Redis may have restarted empty, and invalidations sent before now were missed.
        for domain in list(self._cache):
            self._invalidate(domain)
        self._invalidations += 1  # a query in flight may predate a missed change
        self.listening = True
        self.changed()

    def _on_message(self, channel: str, data: str) -> None:
        if channel == self._key("heartbeat"):
            self._on_heartbeat(data)
        elif channel == self._key("invalidate"):
            for domain in data.split():
                self._invalidate(domain)
                if domain.startswith(TLS_PREFIX):
                    self._tls_names = (float("-inf"), self._tls_names[1])  # read again at the next handshake
        elif channel == self._key("kill"):
            node_id, _, backend_id = data.partition(" ")
            if node_id == self.node_id:
                try:
                    self._on_kill(backend_id)
                except NoSuchBackend:
                    pass  # it left on its own meanwhile
