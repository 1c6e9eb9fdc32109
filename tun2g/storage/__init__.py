"""Where tokens and routes live: the Storage protocol, an embedded SQLite store, a Redis store.

`open_storage()` with no argument picks, in order: ``$TUN2G_STORAGE``, then
``$REDIS_URL`` (Redis, as a Heroku-style add-on sets it), else the SQLite file
at `default_sqlite_path()`, so `tun2g server` and `tun2g token create` find the
same data with no flags.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from tun2g.storage.base import (
    CONNECT_SCOPE, DEFAULT_SCOPES, NoSuchPolicy, NoSuchRoute, NoSuchToken, Route, Storage, StorageError,
    StorageUnavailable, TokenInfo, hash_secret, normalize_domain, normalize_policy_route,
)
from tun2g.storage.sqlite_store import SQLiteStorage

__all__ = [
    "CONNECT_SCOPE", "DEFAULT_KEY_PREFIX", "DEFAULT_SCOPES", "NoSuchPolicy", "NoSuchRoute", "NoSuchToken", "RedisStorage",
    "Route", "SQLiteStorage", "Storage", "StorageError", "StorageUnavailable", "TokenInfo",
    "default_sqlite_path", "hash_secret", "normalize_domain", "normalize_policy_route", "open_storage", "redact_url",
    "resolve_storage_url",
]

# Imported on first use only: redis-py (and the cryptography it pulls) costs every
# command ~0.5 s and 9 MiB of start-up when the store is the default SQLite file.
_REDIS_NAMES = ("DEFAULT_KEY_PREFIX", "RedisStorage", "redact_url")


def __getattr__(name: str):
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module("tun2g.storage.redis_store"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SQLITE_FILE_NAME = "tun2g.sqlite3"
URL_FORMS = ("sqlite:///absolute/path.db, sqlite:relative/path.db, sqlite: (the default file), "
             "sqlite::memory:, redis://[:password@]host:port/db, rediss://... (Redis over TLS), unix:///path/redis.sock")


def default_sqlite_path() -> Path:
    """$TUN2G_DATA_DIR/tun2g.sqlite3, else $XDG_DATA_HOME (or ~/.local/share)/tun2g/tun2g.sqlite3.

    Creates the directory (private to its owner) if needed.
    """
    data_dir = os.environ.get("TUN2G_DATA_DIR")
    if data_dir:
        directory = Path(data_dir).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        directory = Path(base).expanduser() / "tun2g"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory / SQLITE_FILE_NAME


def resolve_storage_url(url: str | None = None) -> str:
    """The storage URL open_storage would use: url, $TUN2G_STORAGE, $REDIS_URL, else the default file."""
    for candidate in (url, os.environ.get("TUN2G_STORAGE"), os.environ.get("REDIS_URL")):
        if candidate and candidate.strip():
            return candidate.strip()
    return f"sqlite://{default_sqlite_path()}"


def open_storage(url: str | None = None, key_prefix: str | None = None) -> Storage:
    """Open the store a URL names (see resolve_storage_url for the defaults).

    Forms: sqlite:///abs/path.db, sqlite:relative.db, sqlite: (default file),
    sqlite::memory:, redis://..., rediss://... . key_prefix applies to Redis only
    (default: redis_store.DEFAULT_KEY_PREFIX).
    """
    url = resolve_storage_url(url)
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if colon and scheme == "sqlite":
        return SQLiteStorage(_sqlite_path(rest))
    redis_store = importlib.import_module("tun2g.storage.redis_store")
    if colon and scheme in ("redis", "rediss", "unix"):
        return redis_store.RedisStorage(url, key_prefix=key_prefix or redis_store.DEFAULT_KEY_PREFIX)
    raise StorageError(f"unknown storage URL {redis_store.redact_url(url)!r}; use one of: {URL_FORMS}")


def _sqlite_path(rest: str) -> str:
    """The file a sqlite: URL names; "//" introduces an absolute path, as in sqlite:///abs.db."""
    if rest.startswith("//"):
        rest = rest[2:]
    if rest == ":memory:":
        return rest
    if not rest:
        return str(default_sqlite_path())
    return str(Path(rest).expanduser())
