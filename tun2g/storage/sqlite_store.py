"""The embedded store: one SQLite file, so a newcomer needs no other service.

The server and the `tun2g token` / `tun2g route` commands open the same file
(see `default_sqlite_path`). WAL mode lets the server read while a command
writes; a change is visible to the other process at its next lookup, so a
revoked token stops authenticating at once.

gevent: sqlite3 calls never yield to the hub, so each is kept short (indexed
single-row statements). SQLite's own busy handler sleeps *inside* C, which
would freeze every greenlet, so it is off; when another process holds the
write lock we retry with a cooperative sleep instead.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import gevent

from tun2g.storage.base import (
    DEFAULT_SCOPES, NoSuchPolicy, NoSuchRoute, NoSuchToken, Route, SecretMinting, StorageError, TokenInfo,
    hash_secret, new_token_record, normalize_token_id, ownership_conflict, policy_json,
    route_parent, validate_user,
)
from tun2g.storage.claims import check_claim_base, check_claim_limit, held_or_refuse, pick_claim
from tun2g.storage.routing import normalize_route_key
from tun2g.storage.certificates import CertificateInfo, StoredCertificate, normalize_cert_name
from tun2g.storage.tcp_route import TCPRoute, tcp_route_from_stored, tcp_route_taken_error

SCHEMA_VERSION = 8
LOCK_WAIT_SECONDS = 5.0  # how long a write waits for another process's write lock

# Each entry upgrades the schema from version N-1 to N; append, never edit.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE tokens (
               id            TEXT PRIMARY KEY,
               secret_sha256 TEXT NOT NULL UNIQUE,
               user          TEXT NOT NULL,
               scopes        TEXT NOT NULL,  -- JSON list of strings
               created       REAL NOT NULL,  -- unix seconds
               note          TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX tokens_by_user ON tokens (user)",
        """CREATE TABLE routes (
               domain  TEXT PRIMARY KEY,     -- normalized: lowercase, no port, no trailing dot
               user    TEXT NOT NULL,
               created REAL NOT NULL)""",
        "CREATE INDEX routes_by_user ON routes (user)",
    ),
    2: ("ALTER TABLE routes ADD COLUMN inspect INTEGER NOT NULL DEFAULT 0",),  # capture for the inspector
    # Route keys (docs/routing.md): the domain column holds the key (host, *.wildcard or host/prefix);
    # parent indexes the ownership rule's neighbours; strip removes the prefix before the backend.
    3: (
        "ALTER TABLE routes ADD COLUMN parent TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE routes ADD COLUMN strip INTEGER NOT NULL DEFAULT 0",
        """UPDATE routes SET parent = CASE WHEN substr(domain, 1, 1) = '[' THEN ''
                                             WHEN instr(domain, '.') > 0 THEN substr(domain, instr(domain, '.') + 1)
                                             ELSE '' END""",
        "CREATE INDEX routes_by_parent ON routes (parent)",
    ),
    # Edge policies (tun2g.policy), their own table: IF NOT EXISTS keeps this step safe to renumber or repeat.
    4: ("""CREATE TABLE IF NOT EXISTS policies (
               route   TEXT PRIMARY KEY,     -- normalize_route_key: host, *.host or host/path
               policy  TEXT NOT NULL,        -- JSON of Policy.as_mapping() (hashes only, never a secret)
               updated REAL NOT NULL)""",),
    5: (  # public HTTPS certificates (tun2g.storage.certificates)
        """CREATE TABLE certificates (
               name       TEXT PRIMARY KEY,  -- a domain or *.domain, normalized
               chain_pem  TEXT NOT NULL,
               key_pem    TEXT NOT NULL,
               issuer     TEXT NOT NULL,
               not_before REAL NOT NULL,
               not_after  REAL NOT NULL,
               source     TEXT NOT NULL,     -- "static" or the node id that ordered it
               updated    REAL NOT NULL)""",
        "CREATE TABLE certificate_revision (counter INTEGER NOT NULL)",
        "INSERT INTO certificate_revision (counter) VALUES (0)",
    ),
    6: (  # ACME challenge tokens and account keys (tun2g.server.acme)
        "CREATE TABLE acme (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL)",  # expires: unix s or NULL
    ),
    # TCP routes, a table of their own (tun2g.storage.tcp_route): one step, no other table touched.
    7: ("""CREATE TABLE tcp_routes (
               port    INTEGER PRIMARY KEY,  -- the public TCP port
               host    TEXT NOT NULL,        -- the bind address
               user    TEXT NOT NULL,
               created REAL NOT NULL,
               policy  TEXT NOT NULL DEFAULT '{}')  -- JSON: allow, deny, max_connections""",),
    # Self-service names (tun2g.storage.claims): which routes were claimed, for the per-user limit.
    8: ("""CREATE TABLE IF NOT EXISTS claims (
               domain  TEXT PRIMARY KEY,     -- the claimed route key, <label>.<base>
               base    TEXT NOT NULL,
               user    TEXT NOT NULL,
               created REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS claims_by_user ON claims (user, base)"),
}
_ROUTE_COLUMNS = "domain, user, created, inspect, strip"

T = TypeVar("T")
_CERT_INFO_COLUMNS = "name, issuer, not_before, not_after, source, updated"  # CertificateInfo's fields, in order
_TCP_SELECT = "SELECT port, user, host, created, policy FROM tcp_routes"


class SQLiteStorage(SecretMinting):
    """Tokens and routes in a SQLite file (or ":memory:" for one process's tests)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        # Patched to gevent's lock under monkey-patching; also correct with real threads.
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._closed = False
        self._own_writes = 0  # PRAGMA data_version counts only other connections' commits
        self._run(lambda db: None)  # open now, so a bad path fails at start-up, not at first use

    # -- the Storage protocol -------------------------------------------------------

    def has_token(self, token: str) -> tuple[str, list[str]]:
        if not isinstance(token, str) or not token:
            raise NoSuchToken("no token given")
        row = self._run(lambda db: db.execute(
            "SELECT user, scopes FROM tokens WHERE secret_sha256 = ?", (hash_secret(token),)).fetchone())
        if row is None:
            raise NoSuchToken("unknown or revoked token")
        return row[0], json.loads(row[1])

    def has_route(self, domain: str) -> str:
        domain = normalize_route_key(domain)
        row = self._run(lambda db: db.execute(
            "SELECT user FROM routes WHERE domain = ?", (domain,)).fetchone())
        if row is None:
            raise NoSuchRoute(f"no route for {domain}")
        return row[0]

    def import_token(self, user: str, secret: str, scopes: Iterable[str] = DEFAULT_SCOPES,
                     note: str = "") -> TokenInfo:
        info, digest = new_token_record(user, secret, scopes, note)

        def insert(db: sqlite3.Connection) -> None:
            with _write_transaction(db):
                existing = db.execute("SELECT id FROM tokens WHERE secret_sha256 = ?", (digest,)).fetchone()
                if existing is not None:
                    raise StorageError(f"this secret is already registered as token {existing[0]}")
                db.execute("INSERT INTO tokens (id, secret_sha256, user, scopes, created, note) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (info.id, digest, info.user, json.dumps(info.scopes), info.created, info.note))

        self._run(insert)
        return info

    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        query = "SELECT id, user, scopes, created, note FROM tokens"
        params: tuple = ()
        if user is not None:
            query, params = query + " WHERE user = ?", (validate_user(user),)
        rows = self._run(lambda db: db.execute(query + " ORDER BY created, id", params).fetchall())
        return [TokenInfo(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4]) for row in rows]

    def revoke_token(self, token_id: str) -> None:
        token_id = normalize_token_id(token_id)
        deleted = self._run(lambda db: db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount)
        self._own_writes += 1
        if not deleted:
            raise NoSuchToken(f"no token with id {token_id!r} (see `tun2g token list`)")

    def add_route(self, domain: str, user: str, strip: bool = False) -> Route:
        route = Route(normalize_route_key(domain), validate_user(user), time.time(), strip=bool(strip))
        parent = route_parent(route.domain)

        def insert(db: sqlite3.Connection) -> Route:
            with _write_transaction(db):
                rows = db.execute(f"SELECT {_ROUTE_COLUMNS} FROM routes WHERE parent = ?", (parent,)).fetchall()
                neighbours = [_route(row) for row in rows]
                conflict = ownership_conflict(route.domain, route.user, neighbours)
                if conflict is not None:
                    raise conflict
                existing = next((r for r in neighbours if r.domain == route.domain), None)
                if existing is None:
                    db.execute("INSERT INTO routes (domain, user, created, parent, strip) VALUES (?, ?, ?, ?, ?)",
                               (route.domain, route.user, route.created, parent, int(route.strip)))
                    return route
                if existing.strip != route.strip:
                    db.execute("UPDATE routes SET strip = ? WHERE domain = ?", (int(route.strip), route.domain))
                return Route(existing.domain, existing.user, existing.created, existing.inspect, route.strip)

        added = self._run(insert)
        self._own_writes += 1  # this handle's servers reload their routing table too
        return added

    def remove_route(self, domain: str) -> None:
        domain = normalize_route_key(domain)
        deleted = self._run(lambda db: db.execute("DELETE FROM routes WHERE domain = ?", (domain,)).rowcount)
        self._own_writes += 1
        if not deleted:
            raise NoSuchRoute(f"no route for {domain} (see `tun2g route list`)")

    def list_routes(self, user: str | None = None) -> list[Route]:
        query = f"SELECT {_ROUTE_COLUMNS} FROM routes"
        params: tuple = ()
        if user is not None:
            query, params = query + " WHERE user = ?", (validate_user(user),)
        rows = self._run(lambda db: db.execute(query + " ORDER BY domain", params).fetchall())
        return [_route(row) for row in rows]

    def set_route_inspect(self, domain: str, inspect: bool) -> Route:
        domain = normalize_route_key(domain)

        def update(db: sqlite3.Connection) -> tuple | None:
            with _write_transaction(db):
                db.execute("UPDATE routes SET inspect = ? WHERE domain = ?", (int(bool(inspect)), domain))
                return db.execute(f"SELECT {_ROUTE_COLUMNS} FROM routes WHERE domain = ?", (domain,)).fetchone()

        row = self._run(update)
        self._own_writes += 1  # this handle's servers notice too (data_version counts other connections only)
        if row is None:
            raise NoSuchRoute(f"no route for {domain} (see `tun2g route list`)")
        return _route(row)

    def set_policy(self, route: str, policy: dict) -> None:
        route, text = normalize_route_key(route), policy_json(policy)
        self._run(lambda db: db.execute(
            "INSERT INTO policies (route, policy, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (route) DO UPDATE SET policy = excluded.policy, updated = excluded.updated",
            (route, text, time.time())))
        self._own_writes += 1

    def get_policy(self, route: str) -> dict:
        route = normalize_route_key(route)
        row = self._run(lambda db: db.execute("SELECT policy FROM policies WHERE route = ?", (route,)).fetchone())
        if row is None:
            raise NoSuchPolicy(f"no policy for {route} (see `tun2g policy show`)")
        return json.loads(row[0])

    def remove_policy(self, route: str) -> None:
        route = normalize_route_key(route)
        deleted = self._run(lambda db: db.execute("DELETE FROM policies WHERE route = ?", (route,)).rowcount)
        self._own_writes += 1
        if not deleted:
            raise NoSuchPolicy(f"no policy for {route} (see `tun2g policy show`)")

    def list_policies(self) -> dict[str, dict]:
        rows = self._run(lambda db: db.execute("SELECT route, policy FROM policies ORDER BY route").fetchall())
        return {row[0]: json.loads(row[1]) for row in rows}

    # -- self-service names (tun2g.storage.claims) -----------------------------------

    def claim_route(self, base: str, user: str, limit: int) -> Route:
        """One transaction (BEGIN IMMEDIATE): forget claims no longer routed to `user`, check the limit,
        draw a free label and insert the route and its claim."""
        base, user, limit = check_claim_base(base), validate_user(user), check_claim_limit(limit)

        def claim(db: sqlite3.Connection) -> Route:
            with _write_transaction(db):
                names = self._live_claims(db, base, user, prune=True)
                held_or_refuse(base, names, limit)

                def neighbours_of(key: str) -> list[Route]:
                    rows = db.execute(f"SELECT {_ROUTE_COLUMNS} FROM routes WHERE parent = ? AND (domain = ? "
                                      f"OR substr(domain, 1, ?) = ? OR domain = ?)",
                                      (base, key, len(key) + 1, key + "/", "*." + base)).fetchall()
                    return [_route(row) for row in rows]

                route = Route(pick_claim(base, user, neighbours_of), user, time.time())
                db.execute("INSERT INTO routes (domain, user, created, parent) VALUES (?, ?, ?, ?)",
                           (route.domain, user, route.created, base))
                db.execute("INSERT OR REPLACE INTO claims (domain, base, user, created) VALUES (?, ?, ?, ?)",
                           (route.domain, base, user, route.created))
                return route

        claimed = self._run(claim)
        self._own_writes += 1  # this handle's servers reload their routing table too
        return claimed

    def claimed_routes(self, base: str, user: str) -> list[str]:
        base, user = check_claim_base(base), validate_user(user)
        return self._run(lambda db: self._live_claims(db, base, user, prune=False))

    @staticmethod
    def _live_claims(db: sqlite3.Connection, base: str, user: str, prune: bool) -> list[str]:
        """The user's claims under base whose route is still theirs (the others deleted when `prune`)."""
        if prune:
            db.execute("DELETE FROM claims WHERE user = ? AND base = ? AND NOT EXISTS "
                       "(SELECT 1 FROM routes WHERE routes.domain = claims.domain AND routes.user = claims.user)",
                       (user, base))
        rows = db.execute("SELECT claims.domain FROM claims JOIN routes ON routes.domain = claims.domain "
                          "AND routes.user = claims.user WHERE claims.user = ? AND claims.base = ? "
                          "ORDER BY claims.created, claims.domain", (user, base)).fetchall()
        return [row[0] for row in rows]

    # -- TCP routes (tun2g.storage.tcp_route) ----------------------------------------

    def add_tcp_route(self, route: TCPRoute) -> TCPRoute:
        def insert(db: sqlite3.Connection) -> TCPRoute:
            with _write_transaction(db):
                row = db.execute(_TCP_SELECT + " WHERE port = ?", (route.port,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO tcp_routes (port, host, user, created, policy) VALUES (?, ?, ?, ?, ?)",
                               (route.port, route.host, route.user, route.created, route.policy_json()))
                    return route
            if row[1] != route.user:
                raise tcp_route_taken_error(route.port, row[1])
            return tcp_route_from_stored(*row)

        return self._run(insert)

    def remove_tcp_route(self, port: int) -> None:
        deleted = self._run(lambda db: db.execute("DELETE FROM tcp_routes WHERE port = ?", (port,)).rowcount)
        self._own_writes += 1
        if not deleted:
            raise NoSuchRoute(f"no TCP route for port {port} (see `tun2g route list`)")

    def list_tcp_routes(self, user: str | None = None) -> list[TCPRoute]:
        query, params = _TCP_SELECT, ()
        if user is not None:
            query, params = query + " WHERE user = ?", (validate_user(user),)
        rows = self._run(lambda db: db.execute(query + " ORDER BY port", params).fetchall())
        return [tcp_route_from_stored(*row) for row in rows]

    def tcp_route(self, port: int) -> TCPRoute:
        row = self._run(lambda db: db.execute(_TCP_SELECT + " WHERE port = ?", (port,)).fetchone())
        if row is None:
            raise NoSuchRoute(f"no TCP route for port {port}")
        return tcp_route_from_stored(*row)

    def revision(self) -> str:
        """SQLite's data_version (bumped by every commit of another process) and this handle's own deletions.

        Costs no disk read: SQLite answers from the WAL index in shared memory.
        """
        version = self._run(lambda db: db.execute("PRAGMA data_version").fetchone()[0])
        return f"{self._pid}.{version}.{self._own_writes}"

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    # -- the CertificateStore protocol ----------------------------------------------

    def put_certificate(self, certificate: StoredCertificate) -> None:
        info = certificate.info

        def upsert(db: sqlite3.Connection) -> None:
            with _write_transaction(db):
                db.execute("INSERT OR REPLACE INTO certificates (name, chain_pem, key_pem, issuer, not_before, "
                           "not_after, source, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (info.name, certificate.chain_pem, certificate.key_pem, info.issuer, info.not_before,
                            info.not_after, info.source, info.updated))
                db.execute("UPDATE certificate_revision SET counter = counter + 1")

        self._run(upsert)

    def load_certificates(self) -> list[StoredCertificate]:
        rows = self._run(lambda db: db.execute(
            f"SELECT {_CERT_INFO_COLUMNS}, chain_pem, key_pem FROM certificates ORDER BY name").fetchall())
        return [StoredCertificate(CertificateInfo(*row[:6]), row[6], row[7]) for row in rows]

    def list_certificates(self) -> list[CertificateInfo]:
        rows = self._run(lambda db: db.execute(
            f"SELECT {_CERT_INFO_COLUMNS} FROM certificates ORDER BY name").fetchall())
        return [CertificateInfo(*row) for row in rows]

    def remove_certificate(self, name: str) -> bool:
        name = normalize_cert_name(name)

        def delete(db: sqlite3.Connection) -> int:
            with _write_transaction(db):
                deleted = db.execute("DELETE FROM certificates WHERE name = ?", (name,)).rowcount
                db.execute("UPDATE certificate_revision SET counter = counter + 1")
                return deleted

        return bool(self._run(delete))

    def certificate_revision(self) -> str:
        return str(self._run(lambda db: db.execute("SELECT counter FROM certificate_revision").fetchone()[0]))

    def put_acme_value(self, key: str, value: str, ttl: float | None) -> None:
        expires = None if ttl is None else time.time() + ttl

        def upsert(db: sqlite3.Connection) -> None:
            with _write_transaction(db):
                db.execute("DELETE FROM acme WHERE expires IS NOT NULL AND expires < ?", (time.time(),))
                db.execute("INSERT OR REPLACE INTO acme (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))

        self._run(upsert)

    def acme_value(self, key: str) -> str | None:
        row = self._run(lambda db: db.execute("SELECT value, expires FROM acme WHERE key = ?", (key,)).fetchone())
        if row is None or (row[1] is not None and row[1] < time.time()):
            return None
        return row[0]

    def remove_acme_value(self, key: str) -> None:
        self._run(lambda db: db.execute("DELETE FROM acme WHERE key = ?", (key,)))

    def acquire_acme_lock(self, key: str, owner: str, ttl: float) -> bool:
        def take(db: sqlite3.Connection) -> bool:
            now = time.time()
            with _write_transaction(db):  # BEGIN IMMEDIATE: the read and the write are one step
                row = db.execute("SELECT value, expires FROM acme WHERE key = ?", (key,)).fetchone()
                if row is not None and row[0] != owner and (row[1] is None or row[1] >= now):
                    return False
                db.execute("INSERT OR REPLACE INTO acme (key, value, expires) VALUES (?, ?, ?)", (key, owner, now + ttl))
                return True

        return self._run(take)

    def release_acme_lock(self, key: str, owner: str) -> bool:
        return bool(self._run(lambda db: db.execute("DELETE FROM acme WHERE key = ? AND value = ?",
                                                    (key, owner)).rowcount))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def __repr__(self) -> str:
        return f"<SQLiteStorage {self.describe()}>"

    # -- connection handling ---------------------------------------------------------

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run one short unit of work, retrying cooperatively while another process writes."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        delay = 0.001
        while True:
            try:
                with self._lock:
                    return work(self._connect())
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or time.monotonic() > deadline:
                    raise self._error(err) from None
            except (sqlite3.Error, OSError) as err:
                raise self._error(err) from None
            gevent.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError(f"{self.describe()} is closed")
        # A connection must not cross fork() (gunicorn workers): each process opens its own.
        if self._connection is None or self._pid != os.getpid():
            self._connection = self._open()
            self._pid = os.getpid()
        return self._connection

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not os.path.exists(self.path):
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The file holds token hashes: readable by its owner only.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
            _migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _error(self, err: sqlite3.Error | OSError) -> StorageError:
        hint = ""
        if isinstance(err, OSError) or "unable to open" in str(err) or "readonly" in str(err):
            hint = "; check that the directory exists and is writable (or set TUN2G_DATA_DIR)"
        elif _is_busy(err):
            hint = f"; another process kept the database locked for over {LOCK_WAIT_SECONDS:g} s"
        elif "not a database" in str(err):
            hint = "; the file is not a tun2g SQLite store"
        return StorageError(f"SQLite store {self.path}: {err}{hint}")


def _route(row: tuple) -> Route:
    return Route(row[0], row[1], row[2], bool(row[3]), bool(row[4]))


@contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit mode)."""
    # IMMEDIATE takes the write lock up front, so a read-then-write can't deadlock.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Create or upgrade the schema, recording the version in schema_version."""
    with _write_transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise StorageError(f"the database has schema version {current}, newer than this "
                               f"tun2g understands ({SCHEMA_VERSION}); upgrade tun2g")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _is_busy(err: sqlite3.Error) -> bool:
    text = str(err)
    return "locked" in text or "busy" in text
