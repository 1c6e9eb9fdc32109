"""One way to open a Redis client from a URL: plain Redis, or the master that Redis Sentinel names.

Every tun2g user of Redis (the store, the cluster registry and its pub/sub,
the inspector's streams, and anything sharing the store's connection) opens
its client here, so a Sentinel URL works for all of them alike.

URL forms::

    redis://[user:password@]host:port/db        one Redis (also rediss:// for TLS, unix:///path.sock)
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]

With ``redis+sentinel://`` the hosts are Sentinels; the client asks them which
server is the master of ``service_name`` and asks again whenever a connection
breaks or the server it reaches has become a replica (a failover), so writes
follow the new master within one retry. The user and password are the
master's (Sentinels themselves are asked without them unless the query says
``sentinel_password=...``). Redis Cluster (sharded) is not supported: tun2g's
registry writes several keys in one MULTI/EXEC, which Cluster refuses across
slots.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]"


class RedisURLError(ValueError):
    """A Redis URL that names no usable server; the message says what to write instead."""


def is_redis_url(url: str) -> bool:
    """True for the URL schemes open_redis() understands."""
    scheme = url.partition(":")[0].lower()
    return scheme in ("redis", "rediss", "unix", SENTINEL_SCHEME)


def open_redis(url: str, **options: Any) -> redis.Redis:
    """A redis-py client for `url` (any form above); `options` are redis.Redis keyword arguments
    (timeouts, retry, decode_responses, ...), applied to the master's connections and, for
    Sentinel, the timeouts to the Sentinels' too. Raises RedisURLError for a malformed URL."""
    if url.partition(":")[0].lower() != SENTINEL_SCHEME:
        try:
            return redis.Redis.from_url(url, **options)
        except ValueError as err:
            raise RedisURLError(str(err)) from None
    sentinels, service, db, username, password, sentinel_password = parse_sentinel_url(url)
    sentinel_options = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout")
                        if key in options}
    if sentinel_password:
        sentinel_options["password"] = sentinel_password
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options, **sentinel_options)
    return sentinel.master_for(service, db=db, username=username, password=password, **options)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None, str | None, str | None]:
    """(sentinel addresses, service name, db, user, password, sentinel password) of a
    ``redis+sentinel://`` URL; RedisURLError names what is wrong."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    addresses = []
    for item in filter(None, hosts.split(",")):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisURLError(f"Sentinel address {item!r} is not host:port; use {SENTINEL_FORM}")
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        raise RedisURLError(f"no Sentinel address in the URL; use {SENTINEL_FORM}")
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise RedisURLError(f"the URL must name the Sentinel service (and maybe a db) as its path; use {SENTINEL_FORM}")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise RedisURLError(f"the db {path[1]!r} is not a number; use {SENTINEL_FORM}")
        db = int(path[1])
    userinfo = parts.netloc.rpartition("@")[0]
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) or None)
    sentinel_password = parse_qs(parts.query).get("sentinel_password", [None])[0]
    return addresses, path[0], db, username, password, sentinel_password
