"""The Redis store: tokens and routes shared by every server process of a cluster.

Key schema (``P`` is ``key_prefix``, default ``tun2g:``)::

    P token:<sha256hex>   hash    id, user, scopes (JSON list), created (unix seconds), note
    P token-id:<id>       string  <sha256hex> of that token's secret (list/revoke by public id)
    P tokens              set     every token id
    P route:<route key>   hash    user, created, inspect ("1": captured for the inspector; absent: off),
                                  strip ("1": the path prefix is removed before the backend; absent: off)
                                  (key: host[/prefix] or *.host, normalized as tun2g.storage.routing does)
    P routes              set     every route key
    P route-parent:<parent> set   the route keys whose host sits one label under <parent> (the ownership
                                  rule's neighbours); built from P routes once, when P route-index is absent
    P route-index         string  "1" once P route-parent:* covers every route (older data lacks them)
    P claims:<base>:<user>  set   the self-service names <user> claimed under <base> (tun2g.storage.claims);
                                  a member whose P route:<name> is gone or another user's no longer counts
    P tcp-route:<port>    hash    user, host (bind address), created, policy (JSON: allow, deny, max_connections)
    P tcp-routes          set     every routed TCP port
    P revision            string  a counter bumped by every token revocation, route change and inspect switch
    P inspect:<domain>    stream  captured exchanges (tun2g.server.inspect), MAXLEN ~ 1000, written by the nodes
    P policy:<route>      string  a route's edge policy, JSON of tun2g.policy.Policy.as_mapping() (hashes only)
    P policies            set     every route with a policy
    P ratelimit:<route>[ <ip>]  hash, TTL  a shared token bucket (tun2g.server.rate_limit): tokens, ms
    P cert:<name>         hash    chain_pem, key_pem, issuer, not_before, not_after, source, updated
                                  (public HTTPS certificates; name a domain or *.domain; docs/https.md)
    P certs               set     every certificate name
    P cert-revision       string  a counter bumped by every certificate stored or removed (nodes poll it)
    P acme:<key>          string  ACME state: challenge:<token> (key authorization, TTL), account:<sha256 of directory>,
                                  order:<name> (the node ordering it: SET NX PX, released by compare-and-delete),
                                  backoff:<name> ("FAILURES NOT_BEFORE" after a failed order, for every node),
                                  alpn:<domain> (a TLS-ALPN-01 key authorization, TTL; tun2g.server.tls_alpn)

A server's token check is one HGETALL and its route check one HGET. Writes
that touch several keys run in one MULTI/EXEC transaction; read-then-write
(the duplicate-secret and route-owner checks) WATCHes the key it read.

gevent: redis-py is pure Python on sockets, so under gevent's monkey-patching
every call is cooperative. Timeouts bound every call; a connection failure
becomes StorageUnavailable naming the URL, never a redis traceback.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tun2g.storage.base import (
    DEFAULT_SCOPES, NoSuchPolicy, NoSuchRoute, NoSuchToken, Route, SecretMinting, StorageError,
    StorageUnavailable, TokenInfo, hash_secret, new_token_record, normalize_token_id,
    ownership_conflict, policy_json, route_parent, validate_user,
)
from tun2g.storage.routing import normalize_route_key
from tun2g.storage.claims import check_claim_base, check_claim_limit, held_or_refuse, pick_claim
from tun2g.storage.redis_connect import RedisURLError, open_redis
from tun2g.storage.certificates import CertificateInfo, StoredCertificate, normalize_cert_name
from tun2g.storage.tcp_route import TCPRoute, tcp_route_from_stored, tcp_route_taken_error

DEFAULT_KEY_PREFIX = "tun2g:"
CONNECT_TIMEOUT = 2.0  # seconds; a Redis that doesn't accept within this is treated as down
COMMAND_TIMEOUT = 5.0  # seconds per command
# Drop a lock only while it is still ours: a lock that expired and was taken by another node stays theirs.
_RELEASE_IF_OWNER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
# SSCAN batch: a claim looks for path routes on its fresh name among the base's names in a few round trips.
SCAN_COUNT = 4096
# One quick retry re-dials a pooled connection that a Redis restart broke; more would
# only delay the StorageUnavailable a caller needs to see.
_RETRY = Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)


class RedisStorage(SecretMinting):
    """Tokens and routes in Redis (see the module docstring for the key schema)."""

    def __init__(self, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.url = url
        self.key_prefix = key_prefix
        try:
            self._client = open_redis(
                url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT, retry=_RETRY, health_check_interval=30)
        except RedisURLError as err:
            raise StorageError(f"invalid Redis URL {self.describe()}: {err}") from None

    @property
    def client(self) -> redis.Redis:
        """The store's redis-py client (a Sentinel-managed one for redis+sentinel:// URLs), for other
        shared-state users that should follow the same server and failovers."""
        return self._client

    # -- the Storage protocol -------------------------------------------------------

    def has_token(self, token: str) -> tuple[str, list[str]]:
        if not isinstance(token, str) or not token:
            raise NoSuchToken("no token given")
        with self._errors():
            fields = self._client.hgetall(self._token_key(hash_secret(token)))
        if not fields:
            raise NoSuchToken("unknown or revoked token")
        return fields["user"], json.loads(fields["scopes"])

    def has_route(self, domain: str) -> str:
        domain = normalize_route_key(domain)
        with self._errors():
            user = self._client.hget(self._route_key(domain), "user")
        if user is None:
            raise NoSuchRoute(f"no route for {domain}")
        return user

    def import_token(self, user: str, secret: str, scopes: Iterable[str] = DEFAULT_SCOPES,
                     note: str = "") -> TokenInfo:
        info, digest = new_token_record(user, secret, scopes, note)
        token_key = self._token_key(digest)

        def insert(pipe: redis.client.Pipeline) -> None:
            existing = pipe.hget(token_key, "id")
            if existing is not None:
                raise StorageError(f"this secret is already registered as token {existing}")
            pipe.multi()
            pipe.hset(token_key, mapping={"id": info.id, "user": info.user, "scopes": json.dumps(info.scopes),
                                          "created": repr(info.created), "note": info.note})
            pipe.set(self._key("token-id:", info.id), digest)
            pipe.sadd(self._key("tokens"), info.id)

        with self._errors():
            self._client.transaction(insert, token_key)
        return info

    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        wanted = None if user is None else validate_user(user)
        with self._errors():
            ids = sorted(self._client.smembers(self._key("tokens")))
            digests = self._client.mget([self._key("token-id:", token_id) for token_id in ids]) if ids else []
            with self._client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hgetall(self._token_key(digest or "-"))
                records = pipe.execute()
        tokens = [_token_info(fields) for fields in records if fields]
        return sorted((t for t in tokens if wanted in (None, t.user)), key=lambda t: (t.created, t.id))

    def revoke_token(self, token_id: str) -> None:
        token_id = normalize_token_id(token_id)
        id_key = self._key("token-id:", token_id)
        with self._errors():
            digest = self._client.get(id_key)
            if digest is None:
                raise NoSuchToken(f"no token with id {token_id!r} (see `tun2g token list`)")
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._token_key(digest), id_key)
                pipe.srem(self._key("tokens"), token_id)
                pipe.incr(self._key("revision"))
                pipe.execute()

    def add_route(self, domain: str, user: str, strip: bool = False) -> Route:
        route = Route(normalize_route_key(domain), validate_user(user), time.time(), strip=bool(strip))
        route_key = self._route_key(route.domain)
        parent_key = self._key("route-parent:", route_parent(route.domain))

        def insert(pipe: redis.client.Pipeline) -> Route:
            keys = sorted(pipe.smembers(parent_key) | {route.domain})
            pipe.watch(*[self._route_key(key) for key in keys])
            neighbours = [_route(key, fields) for key, fields in zip(keys, [pipe.hgetall(self._route_key(key))
                                                                              for key in keys]) if fields]
            conflict = ownership_conflict(route.domain, route.user, neighbours)
            if conflict is not None:
                raise conflict
            existing = next((r for r in neighbours if r.domain == route.domain), None)
            pipe.multi()
            if route.strip:
                pipe.hset(route_key, "strip", "1")
            else:
                pipe.hdel(route_key, "strip")
            if existing is None:
                pipe.hset(route_key, mapping={"user": route.user, "created": repr(route.created)})
                pipe.sadd(self._key("routes"), route.domain)
                pipe.sadd(parent_key, route.domain)
            pipe.incr(self._key("revision"))  # every node reloads its routing table
            if existing is None:
                return route
            return Route(existing.domain, existing.user, existing.created, existing.inspect, route.strip)

        with self._errors():
            self._ensure_route_index()
            return self._client.transaction(insert, parent_key, value_from_callable=True)

    def remove_route(self, domain: str) -> None:
        domain = normalize_route_key(domain)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._route_key(domain))
            pipe.srem(self._key("routes"), domain)
            pipe.srem(self._key("route-parent:", route_parent(domain)), domain)
            pipe.incr(self._key("revision"))
            deleted, _, _, _ = pipe.execute()
        if not deleted:
            raise NoSuchRoute(f"no route for {domain} (see `tun2g route list`)")

    def list_routes(self, user: str | None = None) -> list[Route]:
        wanted = None if user is None else validate_user(user)
        with self._errors():
            domains = sorted(self._client.smembers(self._key("routes")))
            with self._client.pipeline(transaction=False) as pipe:
                for domain in domains:
                    pipe.hgetall(self._route_key(domain))
                records = pipe.execute()
        routes = [_route(domain, fields) for domain, fields in zip(domains, records) if fields]
        return [route for route in routes if wanted in (None, route.user)]

    def set_route_inspect(self, domain: str, inspect: bool) -> Route:
        domain = normalize_route_key(domain)
        route_key = self._route_key(domain)

        def update(pipe: redis.client.Pipeline) -> Route | None:
            fields = pipe.hgetall(route_key)
            if not fields:
                return None
            pipe.multi()
            pipe.hset(route_key, "inspect", "1" if inspect else "0")
            pipe.incr(self._key("revision"))
            return Route(domain, fields["user"], float(fields["created"]), bool(inspect), fields.get("strip") == "1")

        with self._errors():
            route = self._client.transaction(update, route_key, value_from_callable=True)
        if route is None:
            raise NoSuchRoute(f"no route for {domain} (see `tun2g route list`)")
        return route

    def set_policy(self, route: str, policy: dict) -> None:
        route, text = normalize_route_key(route), policy_json(policy)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key("policy:", route), text)
            pipe.sadd(self._key("policies"), route)
            pipe.incr(self._key("revision"))
            pipe.execute()

    def get_policy(self, route: str) -> dict:
        route = normalize_route_key(route)
        with self._errors():
            text = self._client.get(self._key("policy:", route))
        if text is None:
            raise NoSuchPolicy(f"no policy for {route} (see `tun2g policy show`)")
        return json.loads(text)

    def remove_policy(self, route: str) -> None:
        route = normalize_route_key(route)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("policy:", route))
            pipe.srem(self._key("policies"), route)
            pipe.incr(self._key("revision"))
            deleted, _, _ = pipe.execute()
        if not deleted:
            raise NoSuchPolicy(f"no policy for {route} (see `tun2g policy show`)")

    def list_policies(self) -> dict[str, dict]:
        with self._errors():
            routes = sorted(self._client.smembers(self._key("policies")))
            texts = self._client.mget([self._key("policy:", route) for route in routes]) if routes else []
        return {route: json.loads(text) for route, text in zip(routes, texts) if text is not None}

    # -- self-service names (tun2g.storage.claims): the P claims:<base>:<user> sets --------

    def claim_route(self, base: str, user: str, limit: int) -> Route:
        """WATCH the user's claims and the base's route-parent set (every route under base, ``*.base``
        included, is added to it), count the live claims, draw a free label, then MULTI: the route (as
        add_route writes it) and the claim; a concurrent claim or route added under the base makes EXEC
        fail and the whole check run again."""
        base, user, limit = check_claim_base(base), validate_user(user), check_claim_limit(limit)
        claims_key = self._key("claims:", base, ":", user)
        parent_key = self._key("route-parent:", base)

        def claim(pipe: redis.client.Pipeline) -> Route:
            members = sorted(pipe.smembers(claims_key))
            owners = [pipe.hget(self._route_key(name), "user") for name in members]
            live = [name for name, owner in zip(members, owners) if owner == user]
            held_or_refuse(base, live, limit)

            def neighbours_of(key: str) -> list[Route]:
                keys = [key, *pipe.sscan_iter(parent_key, match=key + "/*", count=SCAN_COUNT), "*." + base]
                found = [(k, pipe.hgetall(self._route_key(k))) for k in keys]
                return [_route(k, fields) for k, fields in found if fields]

            route = Route(pick_claim(base, user, neighbours_of), user, time.time())
            pipe.multi()
            pipe.hset(self._route_key(route.domain), mapping={"user": user, "created": repr(route.created)})
            pipe.sadd(self._key("routes"), route.domain)
            pipe.sadd(parent_key, route.domain)
            stale = set(members) - set(live)
            if stale:
                pipe.srem(claims_key, *stale)
            pipe.sadd(claims_key, route.domain)
            pipe.incr(self._key("revision"))  # every node reloads its routing table
            return route

        with self._errors():
            self._ensure_route_index()
            return self._client.transaction(claim, claims_key, parent_key, value_from_callable=True)

    def claimed_routes(self, base: str, user: str) -> list[str]:
        base, user = check_claim_base(base), validate_user(user)
        with self._errors():
            members = sorted(self._client.smembers(self._key("claims:", base, ":", user)))
            with self._client.pipeline(transaction=False) as pipe:
                for name in members:
                    pipe.hmget(self._route_key(name), ["user", "created"])
                records = pipe.execute()
        live = [(float(created), name) for name, (owner, created) in zip(members, records) if owner == user]
        return [name for _created, name in sorted(live)]

    # -- TCP routes (tun2g.storage.tcp_route): P tcp-route:<port> hashes, the P tcp-routes set --

    def add_tcp_route(self, route: TCPRoute) -> TCPRoute:
        key = self._key("tcp-route:", str(route.port))

        def insert(pipe: redis.client.Pipeline) -> TCPRoute:
            fields = pipe.hgetall(key)
            if fields:
                if fields["user"] != route.user:
                    raise tcp_route_taken_error(route.port, fields["user"])
                return _tcp_route(route.port, fields)
            pipe.multi()
            pipe.hset(key, mapping={"user": route.user, "host": route.host, "created": repr(route.created),
                                    "policy": route.policy_json()})
            pipe.sadd(self._key("tcp-routes"), str(route.port))
            pipe.incr(self._key("revision"))
            return route

        with self._errors():
            return self._client.transaction(insert, key, value_from_callable=True)

    def remove_tcp_route(self, port: int) -> None:
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("tcp-route:", str(port)))
            pipe.srem(self._key("tcp-routes"), str(port))
            pipe.incr(self._key("revision"))
            deleted, _, _ = pipe.execute()
        if not deleted:
            raise NoSuchRoute(f"no TCP route for port {port} (see `tun2g route list`)")

    def list_tcp_routes(self, user: str | None = None) -> list[TCPRoute]:
        wanted = None if user is None else validate_user(user)
        with self._errors():
            ports = sorted(int(port) for port in self._client.smembers(self._key("tcp-routes")))
            with self._client.pipeline(transaction=False) as pipe:
                for port in ports:
                    pipe.hgetall(self._key("tcp-route:", str(port)))
                records = pipe.execute()
        routes = [_tcp_route(port, fields) for port, fields in zip(ports, records) if fields]
        return [route for route in routes if wanted in (None, route.user)]

    def tcp_route(self, port: int) -> TCPRoute:
        with self._errors():
            fields = self._client.hgetall(self._key("tcp-route:", str(port)))
        if not fields:
            raise NoSuchRoute(f"no TCP route for port {port}")
        return _tcp_route(port, fields)

    def revision(self) -> str:
        """The ``P revision`` counter (one GET): every node polls it to drop revoked tunnels."""
        with self._errors():
            return str(self._client.get(self._key("revision")) or "0")

    def ping(self) -> None:
        with self._errors():
            self._client.ping()

    # -- the CertificateStore protocol ----------------------------------------------

    def put_certificate(self, certificate: StoredCertificate) -> None:
        info = certificate.info
        fields = {"chain_pem": certificate.chain_pem, "key_pem": certificate.key_pem, "issuer": info.issuer,
                  "not_before": repr(info.not_before), "not_after": repr(info.not_after), "source": info.source,
                  "updated": repr(info.updated)}
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("cert:", info.name))
            pipe.hset(self._key("cert:", info.name), mapping=fields)
            pipe.sadd(self._key("certs"), info.name)
            pipe.incr(self._key("cert-revision"))
            pipe.execute()

    def load_certificates(self) -> list[StoredCertificate]:
        return [StoredCertificate(_certificate_info(name, fields), fields["chain_pem"], fields["key_pem"])
                for name, fields in self._certificate_records()]

    def list_certificates(self) -> list[CertificateInfo]:
        return [_certificate_info(name, fields) for name, fields in self._certificate_records()]

    def remove_certificate(self, name: str) -> bool:
        name = normalize_cert_name(name)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("cert:", name))
            pipe.srem(self._key("certs"), name)
            pipe.incr(self._key("cert-revision"))
            deleted, _, _ = pipe.execute()
        return bool(deleted)

    def certificate_revision(self) -> str:
        with self._errors():
            return str(self._client.get(self._key("cert-revision")) or "0")

    def put_acme_value(self, key: str, value: str, ttl: float | None) -> None:
        with self._errors():
            self._client.set(self._key("acme:", key), value, px=None if ttl is None else int(ttl * 1000))

    def acme_value(self, key: str) -> str | None:
        with self._errors():
            return self._client.get(self._key("acme:", key))

    def remove_acme_value(self, key: str) -> None:
        with self._errors():
            self._client.delete(self._key("acme:", key))

    def acquire_acme_lock(self, key: str, owner: str, ttl: float) -> bool:
        with self._errors():
            return bool(self._client.set(self._key("acme:", key), owner, nx=True, px=max(1, int(ttl * 1000))))

    def release_acme_lock(self, key: str, owner: str) -> bool:
        with self._errors():
            return bool(self._client.eval(_RELEASE_IF_OWNER, 1, self._key("acme:", key), owner))

    def _certificate_records(self) -> list[tuple[str, dict[str, str]]]:
        with self._errors():
            names = sorted(self._client.smembers(self._key("certs")))
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key("cert:", name))
                records = pipe.execute()
        return [(name, fields) for name, fields in zip(names, records) if fields]

    def close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"<RedisStorage {self.describe()} prefix={self.key_prefix!r}>"

    # -- helpers ---------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.key_prefix + "".join(parts)

    def _token_key(self, digest: str) -> str:
        return self._key("token:", digest)

    def _route_key(self, domain: str) -> str:
        return self._key("route:", domain)

    def _ensure_route_index(self) -> None:
        """Build P route-parent:* from P routes once (data written before route keys lacks it)."""
        marker = self._key("route-index")
        if self._client.get(marker):
            return
        keys = self._client.smembers(self._key("routes"))
        with self._client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.sadd(self._key("route-parent:", route_parent(key)), key)
            pipe.set(marker, "1")
            pipe.execute()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn redis-py's exceptions into StorageUnavailable / StorageError with a next step."""
        try:
            yield
        except redis.AuthenticationError as err:
            raise StorageUnavailable(
                f"Redis at {self.describe()} rejected the credentials ({err}); check the user "
                f"and password in REDIS_URL / --storage") from None
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                raise StorageUnavailable(
                    f"Redis at {self.describe()} has a certificate we cannot verify ({err}); for a "
                    f"provider's self-signed Redis (e.g. Heroku) add ?ssl_cert_reqs=none to the URL") from None
            raise StorageUnavailable(
                f"cannot reach Redis at {self.describe()} ({err}); check that redis-server is "
                f"running there and that REDIS_URL / --storage names it") from None
        except redis.RedisError as err:
            raise StorageError(f"Redis at {self.describe()} refused the command: {err}") from None


def _route(key: str, fields: dict[str, str]) -> Route:
    return Route(key, fields["user"], float(fields["created"]), fields.get("inspect") == "1",
                 fields.get("strip") == "1")


def _certificate_info(name: str, fields: dict[str, str]) -> CertificateInfo:
    return CertificateInfo(name, fields["issuer"], float(fields["not_before"]), float(fields["not_after"]),
                           fields["source"], float(fields["updated"]))


def _tcp_route(port: int, fields: dict[str, str]) -> TCPRoute:
    return tcp_route_from_stored(port, fields["user"], fields["host"], float(fields["created"]),
                                 fields.get("policy", "{}"))


def _token_info(fields: dict[str, str]) -> TokenInfo:
    return TokenInfo(fields["id"], fields["user"], tuple(json.loads(fields["scopes"])),
                     float(fields["created"]), fields.get("note", ""))


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))
