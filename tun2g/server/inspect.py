"""Server-side capture of exchanges for the operator's inspector (`GET /inspect`, `tun2g inspect`).

Opt-in per route (`tun2g route inspect DOMAIN on`): the pipeline asks
`Inspector.enabled(domain)` (a set lookup, refreshed from the store when its
revision changes) and, for an inspected domain, wraps the request's meter in
a `Capture` that keeps the first `body_cap` bytes of each body as they stream
by: nothing is ever buffered beyond that, and the request is never slowed.
The finished record goes into a bounded queue (`offer` never blocks: when it
is full the capture is dropped and counted); a background greenlet writes it
to the store:

* standalone, `MemoryCaptures`: a ring of the newest records per domain;
* with Redis, `RedisCaptures`: one capped stream per domain
  (``XADD P inspect:<domain> MAXLEN ~ N``), read by every node, so the
  inspector shows the whole cluster.

Secrets are redacted before a record is queued: Authorization, Cookie,
Set-Cookie, Proxy-Authorization, the cluster's hop header and every X-Tun2g-*.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import gevent
from gevent.queue import Full, Queue

from tun2g.cluster.hop import HOP_HEADER
from tun2g.http.relay import Meter
from tun2g.log import get_logger
from tun2g.storage import Storage, StorageError

log = get_logger(__name__)

BODY_CAP = 16 * 1024         # bytes of each body kept in a capture
QUEUE_SIZE = 1024            # captures waiting for the writer; beyond, new ones are dropped
RING_SIZE = 200              # records kept per domain in memory
MAX_DOMAINS = 1000           # domains kept in memory (the least recently written go first)
STREAM_MAXLEN = 1000         # records kept per domain in Redis (approximately: MAXLEN ~)
REFRESH_INTERVAL = 1.0       # s between reads of the store's revision for the inspected routes
MAX_READ = 1000              # records one read returns at most
REDACTED = "[redacted]"
_SECRET_NAMES = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", HOP_HEADER.lower()})

Record = dict[str, Any]


def redact(headers) -> list[list[str]]:
    """Headers as [name, value] pairs, secret values replaced by "[redacted]"."""
    out = []
    for name, value in headers:
        lowered = name.lower()
        secret = lowered in _SECRET_NAMES or lowered.startswith("x-tun2g-")
        out.append([name, REDACTED if secret else value])
    return out


def _body(data: bytearray, size: int) -> dict:
    raw = bytes(data)
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return {"size": size, "kept": len(raw), "truncated": size > len(raw), "encoding": encoding, "data": text}


class Capture:
    """A relay meter that forwards to `inner` (the live counters) and keeps the head of each body."""

    __slots__ = ("_inner", "_cap", "request_body", "response_body", "request_body_size", "response_body_size",
                 "bytes_in", "bytes_out")

    def __init__(self, inner: Meter | None, cap: int = BODY_CAP) -> None:
        self._inner = inner
        self._cap = cap
        self.request_body = bytearray()
        self.response_body = bytearray()
        self.request_body_size = self.response_body_size = self.bytes_in = self.bytes_out = 0

    def up(self, size: int, body: bytes) -> None:
        if self._inner is not None:
            self._inner.up(size, body)
        self.bytes_in += size
        if body:
            self.request_body_size += len(body)
            room = self._cap - len(self.request_body)
            if room > 0:
                self.request_body += body[:room]

    def down(self, size: int, body: bytes) -> None:
        if self._inner is not None:
            self._inner.down(size, body)
        self.bytes_out += size
        if body:
            self.response_body_size += len(body)
            room = self._cap - len(self.response_body)
            if room > 0:
                self.response_body += body[:room]

    def record(self, *, domain: str, node: str, method: str, path: str, status: int, seconds: float,
               client_ip: str, request_id: str, request_headers, response_headers, backend: str) -> Captured:
        """The finished exchange, as cheap to make as can be: redaction and encoding wait for the writer."""
        return Captured(time.time(), node, domain, method, path, status, seconds, client_ip, request_id, backend,
                        self, request_headers, response_headers)


@dataclass(slots=True)
class Captured:
    """A finished exchange waiting in the queue; `as_record()` (in the writer) makes the stored record."""

    time: float
    node: str
    domain: str
    method: str
    path: str
    status: int
    seconds: float
    client_ip: str
    request_id: str
    backend: str
    capture: Capture
    request_headers: Any
    response_headers: Any

    def as_record(self) -> Record:
        c = self.capture
        return {"time": round(self.time, 3), "node": self.node, "domain": self.domain, "method": self.method,
                "path": self.path, "status": self.status, "ms": round(self.seconds * 1000, 2),
                "client_ip": self.client_ip, "request_id": self.request_id, "backend": self.backend,
                "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
                "request_headers": redact(self.request_headers),
                "response_headers": redact(self.response_headers or ()),
                "request_body": _body(c.request_body, c.request_body_size),
                "response_body": _body(c.response_body, c.response_body_size)}


class CaptureStore(Protocol):
    """Where captured records go, and are read back newest first."""

    def append(self, domain: str, record: Record) -> None: ...

    def read(self, domain: str, limit: int, after: str | None = None) -> list[Record]:
        """Up to `limit` records of `domain`, newest first (only those newer than the id `after`)."""
        ...

    def close(self) -> None: ...


class MemoryCaptures:
    """This process's captures: a ring of the newest `ring_size` per domain, `max_domains` domains at most."""

    def __init__(self, ring_size: int = RING_SIZE, max_domains: int = MAX_DOMAINS) -> None:
        self._rings: OrderedDict[str, deque[Record]] = OrderedDict()
        self._ring_size = ring_size
        self._max_domains = max_domains
        self._ids = itertools.count(1)

    def append(self, domain: str, record: Record) -> None:
        ring = self._rings.get(domain)
        if ring is None:
            if len(self._rings) >= self._max_domains:
                self._rings.popitem(last=False)
            ring = self._rings[domain] = deque(maxlen=self._ring_size)
        else:
            self._rings.move_to_end(domain)
        ring.append({"id": str(next(self._ids)), **record})

    def read(self, domain: str, limit: int, after: str | None = None) -> list[Record]:
        ring = self._rings.get(domain, ())
        floor = int(after) if after and after.isdigit() else 0
        newest = [record for record in reversed(ring) if int(record["id"]) > floor]
        return newest[:limit]

    def close(self) -> None:
        self._rings.clear()


class RedisCaptures:
    """A capped Redis stream per domain, ``P inspect:<domain>``, shared by every node of the cluster."""

    def __init__(self, url: str, key_prefix: str, maxlen: int = STREAM_MAXLEN, timeout: float = 2.0) -> None:
        from tun2g.storage.redis_connect import open_redis

        self._client = open_redis(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                  decode_responses=True)
        self._prefix = key_prefix
        self._maxlen = maxlen

    def key(self, domain: str) -> str:
        return f"{self._prefix}inspect:{domain}"

    def append(self, domain: str, record: Record) -> None:
        self._client.xadd(self.key(domain), {"record": json.dumps(record)}, maxlen=self._maxlen, approximate=True)

    def read(self, domain: str, limit: int, after: str | None = None) -> list[Record]:
        entries: Any
        if after:  # the oldest newer ones, so a follower never skips any; shown newest first
            entries = list(reversed(self._client.xrange(self.key(domain), min=f"({after}", max="+", count=limit)
                                    or []))
        else:
            entries = self._client.xrevrange(self.key(domain), max="+", min="-", count=limit) or []
        return [{"id": entry_id, **json.loads(fields["record"])} for entry_id, fields in entries]

    def close(self) -> None:
        self._client.close()


class Inspector:
    """Which domains are captured, the bounded queue of captures, and the greenlets that serve them."""

    def __init__(self, store: CaptureStore, *, node: str = "", queue_size: int = QUEUE_SIZE,
                 body_cap: int = BODY_CAP, on_outcome: Callable[[str], None] | None = None,
                 on_store_error: Callable[[], None] | None = None) -> None:
        self.store = store
        self.node = node
        self.body_cap = body_cap
        self._queue: Queue = Queue(maxsize=max(1, queue_size))
        self._domains: frozenset[str] = frozenset()
        self._count = on_outcome or (lambda outcome: None)
        self._store_error = on_store_error or (lambda: None)
        self._greenlets: list[gevent.Greenlet] = []
        self.dropped = 0
        self._revision: str | None = None

    # -- the request path -------------------------------------------------------------

    def enabled(self, domain: str) -> bool:
        return domain in self._domains

    def capture(self, inner: Meter | None) -> Capture:
        return Capture(inner, self.body_cap)

    def offer(self, domain: str, record: Record | Captured) -> bool:
        """Queue a record for the writer; never blocks: False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((domain, record))
        except Full:
            self.dropped += 1
            self._count("dropped")
            return False
        self._count("queued")
        return True

    # -- reading ----------------------------------------------------------------------

    def read(self, domain: str, limit: int = 50, after: str | None = None) -> list[Record]:
        return self.store.read(domain, max(1, min(limit, MAX_READ)), after)

    # -- background -------------------------------------------------------------------

    def start(self, storage: Storage | None = None, interval: float = REFRESH_INTERVAL) -> None:
        """Run the writer, and (given the route store) keep the set of inspected domains current."""
        self._greenlets.append(gevent.spawn(self._write_loop))
        if storage is not None:
            self.refresh(storage)
            self._greenlets.append(gevent.spawn(self._refresh_loop, storage, interval))

    def set_domains(self, domains) -> None:
        self._domains = frozenset(domains)

    def refresh(self, storage: Storage) -> None:
        """Re-read the inspected routes if the store's revision moved (one cheap read when it did not)."""
        try:
            revision = storage.revision()
            if revision == self._revision:
                return
            domains = {route.domain for route in storage.list_routes() if route.inspect}
        except StorageError as exc:
            log.debug("inspect_refresh_failed", error=str(exc))
            return
        self._revision = revision
        if domains != self._domains:
            log.info("inspected_domains", domains=",".join(sorted(domains)) or "-")
        self.set_domains(domains)

    def _refresh_loop(self, storage: Storage, interval: float) -> None:
        while True:
            gevent.sleep(interval)  # the polling cadence, not synchronisation
            self.refresh(storage)

    def _write_loop(self) -> None:
        while True:
            domain, item = self._queue.get()
            try:
                self.store.append(domain, item.as_record() if isinstance(item, Captured) else item)
            except Exception as exc:  # Redis down: the capture is lost, the request path never knows
                self._count("failed")
                self._store_error()
                log.debug("inspect_store_failed", domain=domain, error=str(exc) or type(exc).__name__)
            else:
                self._count("stored")

    def close(self) -> None:
        gevent.killall(self._greenlets, block=False)
        self._greenlets.clear()
        try:
            self.store.close()
        except Exception:
            pass

    @property
    def queued(self) -> int:
        return self._queue.qsize()


__all__ = ["BODY_CAP", "Capture", "Captured", "CaptureStore", "Inspector", "MemoryCaptures", "REDACTED",
           "RedisCaptures", "redact"]
