"""The Redis store: tokens and routes shared by every server process of a cluster.

Key schema (``P`` is ``key_prefix``, default ``tun2g:``)::

    P token:<sha256hex>   hash    id, user, scopes (JSON list), created (unix seconds), note
    P token-id:<id>       string  <sha256hex> of that token's secret (list/revoke by public id)
    P tokens              set     every token id
    P route:<domain>      hash    user, created, inspect ("1": captured for the inspector; absent: off)
                                  (domain normalized: lowercase, no :port, no trailing dot)
    P routes              set     every routed domain
    P tcp-route:<port>    hash    user, host (bind address), created, policy (JSON: allow, deny, max_connections)
    P tcp-routes          set     every routed TCP port
    P revision            string  a counter bumped by every token revocation, route removal and inspect switch
    P inspect:<domain>    stream  captured exchanges (tun2g.server.inspect), MAXLEN ~ 1000, written by the nodes

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
    DEFAULT_SCOPES, NoSuchRoute, NoSuchToken, Route, SecretMinting, StorageError,
    StorageUnavailable, TokenInfo, hash_secret, new_token_record, normalize_domain,
    normalize_token_id, route_taken_error, validate_user,
)
from tun2g.storage.tcp_route import TCPRoute, tcp_route_from_stored, tcp_route_taken_error

DEFAULT_KEY_PREFIX = "tun2g:"
CONNECT_TIMEOUT = 2.0  # seconds; a Redis that doesn't accept within this is treated as down
COMMAND_TIMEOUT = 5.0  # seconds per command
# One quick retry re-dials a pooled connection that a Redis restart broke; more would
# only delay the StorageUnavailable a caller needs to see.
_RETRY = Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)


class RedisStorage(SecretMinting):
    """Tokens and routes in Redis (see the module docstring for the key schema)."""

    def __init__(self, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.url = url
        self.key_prefix = key_prefix
        try:
            self._client = redis.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT, retry=_RETRY, health_check_interval=30)
        except ValueError as err:
            raise StorageError(f"invalid Redis URL {self.describe()}: {err}") from None

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
        domain = normalize_domain(domain)
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

    def add_route(self, domain: str, user: str) -> Route:
        route = Route(normalize_domain(domain), validate_user(user), time.time())
        route_key = self._route_key(route.domain)

        def insert(pipe: redis.client.Pipeline) -> Route:
            fields = pipe.hgetall(route_key)
            if fields:
                if fields["user"] != route.user:
                    raise route_taken_error(route.domain, fields["user"])
                return Route(route.domain, fields["user"], float(fields["created"]), fields.get("inspect") == "1")
            pipe.multi()
            pipe.hset(route_key, mapping={"user": route.user, "created": repr(route.created)})
            pipe.sadd(self._key("routes"), route.domain)
            return route

        with self._errors():
            return self._client.transaction(insert, route_key, value_from_callable=True)

    def remove_route(self, domain: str) -> None:
        domain = normalize_domain(domain)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._route_key(domain))
            pipe.srem(self._key("routes"), domain)
            pipe.incr(self._key("revision"))
            deleted, _, _ = pipe.execute()
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
        routes = [Route(domain, fields["user"], float(fields["created"]), fields.get("inspect") == "1")
                  for domain, fields in zip(domains, records) if fields]
        return [route for route in routes if wanted in (None, route.user)]

    def set_route_inspect(self, domain: str, inspect: bool) -> Route:
        domain = normalize_domain(domain)
        route_key = self._route_key(domain)

        def update(pipe: redis.client.Pipeline) -> Route | None:
            fields = pipe.hgetall(route_key)
            if not fields:
                return None
            pipe.multi()
            pipe.hset(route_key, "inspect", "1" if inspect else "0")
            pipe.incr(self._key("revision"))
            return Route(domain, fields["user"], float(fields["created"]), bool(inspect))

        with self._errors():
            route = self._client.transaction(update, route_key, value_from_callable=True)
        if route is None:
            raise NoSuchRoute(f"no route for {domain} (see `tun2g route list`)")
        return route

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
