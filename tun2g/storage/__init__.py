"""Where tokens and routes live: the Storage protocol, an embedded SQLite store, a Redis store.

`open_storage()` with no argument picks, in order: ``$TUN2G_STORAGE``, then
``$REDIS_URL`` (Redis, as a Heroku-style add-on sets it), else the SQLite file
at `default_sqlite_path()`, so `tun2g server` and `tun2g token create` find the
same data with no flags.
"""

from __future__ import annotations

import os
from pathlib import Path

from tun2g.storage.base import (
    CONNECT_SCOPE, DEFAULT_SCOPES, NoSuchRoute, NoSuchToken, Route, Storage, StorageError,
    StorageUnavailable, TokenInfo, hash_secret, normalize_domain,
)
from tun2g.storage.redis_store import DEFAULT_KEY_PREFIX, RedisStorage, redact_url
from tun2g.storage.sqlite_store import SQLiteStorage

__all__ = [
    "CONNECT_SCOPE", "DEFAULT_KEY_PREFIX", "DEFAULT_SCOPES", "NoSuchRoute", "NoSuchToken", "RedisStorage",
    "Route", "SQLiteStorage", "Storage", "StorageError", "StorageUnavailable", "TokenInfo",
    "default_sqlite_path", "hash_secret", "normalize_domain", "open_storage", "redact_url",
    "resolve_storage_url",
]

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


def open_storage(url: str | None = None, key_prefix: str = DEFAULT_KEY_PREFIX) -> Storage:
    """Open the store a URL names (see resolve_storage_url for the defaults).

    Forms: sqlite:///abs/path.db, sqlite:relative.db, sqlite: (default file),
    sqlite::memory:, redis://..., rediss://... . key_prefix applies to Redis only.
    """
    url = resolve_storage_url(url)
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if colon and scheme == "sqlite":
        return SQLiteStorage(_sqlite_path(rest))
    if colon and scheme in ("redis", "rediss", "unix"):
        return RedisStorage(url, key_prefix=key_prefix)
    raise StorageError(f"unknown storage URL {redact_url(url)!r}; use one of: {URL_FORMS}")


def _sqlite_path(rest: str) -> str:
    """The file a sqlite: URL names; "//" introduces an absolute path, as in sqlite:///abs.db."""
    if rest.startswith("//"):
        rest = rest[2:]
    if rest == ":memory:":
        return rest
    if not rest:
        return str(default_sqlite_path())
    return str(Path(rest).expanduser())
