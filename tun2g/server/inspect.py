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

from tun2g.http.heads import REDACTED, is_secret_header
from tun2g.http.relay import Meter
from tun2g.log import get_logger
from tun2g.storage import Storage, StorageError

log = get_logger(__name__)

BODY_CAP = 16 * 1024         # bytes of each body kept in a capture
QUEUE_SIZE = 1024            # captures waiting for the writer; beyond, new ones are dropped
RING_SIZE = 200              # records kept per domain in memory
MAX_DOMAINS = 1000           # domains kept in memory (the least recently written go first)
MAX_RECORDS = 2000           # records kept in memory over all domains: at most ~64 MiB of bodies
STREAM_MAXLEN = 1000         # records kept per domain in Redis (approximately: MAXLEN ~)
REFRESH_INTERVAL = 1.0       # s between reads of the store's revision for the inspected routes
MAX_READ = 1000              # records one read returns at most
WRITE_BATCH = 64             # queued captures the writer stores at once
WRITE_PAUSE = 0.05           # s the writer waits after a partial batch (a record shows this much later)

Record = dict[str, Any]


def redact(headers) -> list[list[str]]:
    """Headers as [name, value] pairs, secret values replaced by "[redacted]"."""
    return [[name, REDACTED if is_secret_header(name) else value] for name, value in headers]


def _body(data: bytearray, size: int) -> dict:
    try:
        text, encoding = data.decode("utf-8"), "utf-8"  # decoded in place: no copy of the bytes first
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {"size": size, "kept": len(data), "truncated": size > len(data), "encoding": encoding, "data": text}


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
            if room >= len(body):
                self.request_body += body
            elif room > 0:
                self.request_body += memoryview(body)[:room]  # a view: no copy of the part left out

    def down(self, size: int, body: bytes) -> None:
        if self._inner is not None:
            self._inner.down(size, body)
        self.bytes_out += size
        if body:
            self.response_body_size += len(body)
            room = self._cap - len(self.response_body)
            if room >= len(body):
                self.response_body += body
            elif room > 0:
                self.response_body += memoryview(body)[:room]  # a view: no copy of the part left out

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


def as_record(item: Record | Captured) -> Record:
    """A stored record: a queued capture is redacted and its bodies encoded now."""
    return item.as_record() if isinstance(item, Captured) else item


def encode_record(item: Record | Captured) -> str:
    """The JSON of a record (or of a queued capture)."""
    return json.dumps(as_record(item))


class CaptureStore(Protocol):
    """Where captured records go, and are read back newest first."""

    def append(self, domain: str, record: Record | Captured) -> None: ...

    def append_all(self, items: list[tuple[str, Record | Captured]]) -> None:
        """Store several (domain, record) at once (the writer hands over what queued meanwhile)."""
        ...

    def read(self, domain: str, limit: int, after: str | None = None) -> list[Record]:
        """Up to `limit` records of `domain`, newest first (only those newer than the id `after`)."""
        ...

    def close(self) -> None: ...


class MemoryCaptures:
    """This process's captures: a ring of the newest `ring_size` per domain, `max_domains` domains and
    `max_records` records (each up to two capped bodies) in all; past either, the least recently
    written domain gives up its oldest."""

    def __init__(self, ring_size: int = RING_SIZE, max_domains: int = MAX_DOMAINS,
                 max_records: int = MAX_RECORDS) -> None:
        self._rings: OrderedDict[str, deque[tuple[int, Record | Captured]]] = OrderedDict()
        self._ring_size = ring_size
        self._max_domains = max_domains
        self._max_records = max_records
        self._held = 0
        self._ids = itertools.count(1)

    @property
    def held(self) -> int:
        """Records kept, over every domain."""
        return self._held

    def append(self, domain: str, record: Record | Captured) -> None:
        """Keep ``record`` as it came: a queued capture becomes a record only when it is read (most never are)."""
        ring = self._rings.get(domain)
        if ring is None:
            if len(self._rings) >= self._max_domains:
                self._held -= len(self._rings.popitem(last=False)[1])
            ring = self._rings[domain] = deque(maxlen=self._ring_size)
        else:
            self._rings.move_to_end(domain)
        if len(ring) < self._ring_size:
            self._held += 1
        ring.append((next(self._ids), record))
        while self._held > self._max_records:  # the oldest of the least recently written domain goes
            oldest_domain, oldest = next(iter(self._rings.items()))
            oldest.popleft()
            self._held -= 1
            if not oldest:
                del self._rings[oldest_domain]

    def append_all(self, items: list[tuple[str, Record | Captured]]) -> None:
        for domain, record in items:
            self.append(domain, record)

    def read(self, domain: str, limit: int, after: str | None = None) -> list[Record]:
        ring = self._rings.get(domain, ())
        floor = int(after) if after and after.isdigit() else 0
        newest: list[Record] = []
        for record_id, record in reversed(ring):
            if record_id <= floor or len(newest) >= limit:
                break
            newest.append({"id": str(record_id), **as_record(record)})
        return newest

    def close(self) -> None:
        self._rings.clear()
        self._held = 0


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

    def append(self, domain: str, record: Record | Captured) -> None:
        self.append_all([(domain, record)])

    def append_all(self, items: list[tuple[str, Record | Captured]]) -> None:
        """One round trip for the lot (a pipeline, no transaction): a command costs far more than its JSON."""
        pipe = self._client.pipeline(transaction=False)
        for domain, record in items:
            pipe.xadd(self.key(domain), {"record": encode_record(record)}, maxlen=self._maxlen, approximate=True)
        pipe.execute()

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
        queue = self._queue
        while True:
            batch = [queue.get()]  # one wake-up (and with Redis one round trip) for what queued meanwhile
            while len(batch) < WRITE_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            self.write(batch)
            if len(batch) < WRITE_BATCH:
                # Not busy: let captures gather rather than wake per request (a full batch goes on at once).
                gevent.sleep(WRITE_PAUSE)

    def write(self, batch: list[tuple[str, Record | Captured]]) -> None:
        """Store queued captures (the writer greenlet's work, off the request path)."""
        try:
            self.store.append_all(batch)
        except Exception as exc:  # Redis down: the captures are lost, the request path never knows
            for _ in batch:
                self._count("failed")
            self._store_error()
            log.debug("inspect_store_failed", records=len(batch), error=str(exc) or type(exc).__name__)
        else:
            for _ in batch:
                self._count("stored")

    def drain(self) -> int:
        """Store everything queued now, in this greenlet (for benchmarks and embedders); how many were."""
        count = 0
        while not self._queue.empty():
            batch = [self._queue.get_nowait() for _ in range(min(WRITE_BATCH, self._queue.qsize()))]
            self.write(batch)
            count += len(batch)
        return count

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
           "RedisCaptures", "as_record", "encode_record", "redact"]
