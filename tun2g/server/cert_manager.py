"""The in-server ACME manager (`tun2g server --acme`): order on first use, renew, one node per name.

First use: the `CertificateBook` calls `want(name)` from the TLS SNI callback
when a handshake asks for a name it has no certificate for. `want` only
queues the name (deduplicated, at most `QUEUE_CAP` waiting; more are dropped
and asked for again by the next handshake), so a visitor's SNI costs no
storage or network call in the handshake, which fails at once with
``unrecognized_name``. One greenlet (`run`) takes names off the queue and,
for each: skips it while it is backing off after a failure; checks the name
is an exact routed name (never a wildcard, never an arbitrary SNI: the
store's `has_route`, so a visitor cannot make us order for a name nobody
routes); takes the cluster lock ``order:<name>`` (Redis SET NX PX, released
by compare-and-delete; SQLite a row with an expiry written inside BEGIN
IMMEDIATE), so exactly one node orders a name; checks again under the lock
that no node stored one meanwhile; and orders with `tun2g.server.acme.issue`,
the certificate stored with source ``acme:<node id>``. Every node then serves
it by the book's revision poll (about a second), without a restart.

Renewal: every `SCAN_INTERVAL` seconds each node reads the certificate
listing and queues every ACME-issued one (source ``acme:...`` or ``cli``,
never a static ``cert add``) past `RENEW_FRACTION` of its lifetime; the lock
and the re-check make one node renew it. Failures back off (`backoff_delay`:
60 s doubling to 6 h, ±25 % jitter) and honour the directory's Retry-After
and rateLimited errors; the backoff is shared through the store
(``backoff:<name>``), so the other nodes wait too. While the store is unreachable a scan is skipped (one
warning), and the certificates already loaded keep being served.
"""

from __future__ import annotations

import datetime
import email.utils
import random
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import gevent
from gevent.queue import Full, Queue

from tun2g.log import get_logger
from tun2g.metrics import AcmeMetrics
from tun2g.server.acme import LETS_ENCRYPT, ORDER_TIMEOUT, IssuanceFailed, issue
from tun2g.storage import NoSuchRoute, Storage, StorageError, normalize_domain
from tun2g.storage.certificates import CertificateInfo, CertificateStore

log = get_logger(__name__)

QUEUE_CAP = 64               # names waiting for an order; past it a first use is dropped (asked again later)
SCAN_INTERVAL = 60.0         # seconds between renewal scans
RENEW_FRACTION = 2 / 3       # renew once this share of a certificate's lifetime has passed (Let's Encrypt's advice)
BACKOFF_MIN = 60.0           # seconds before the first retry of a failed order
BACKOFF_MAX = 6 * 3600.0     # the longest wait between retries
JITTER = 0.25                # ± share of a backoff, so the nodes' retries spread out
RATE_LIMITED_WAIT = 3600.0   # a rateLimited refusal without a Retry-After waits at least this long
RETRY_AFTER_MAX = 7 * 86400.0  # a Retry-After further than this is taken as this (a week: LE's longest window)
ORDER_DEADLINE = ORDER_TIMEOUT + 60.0  # seconds for one whole order, network calls included
LOCK_TTL = ORDER_DEADLINE + 60.0       # the order lock outlives the order; a node that dies frees it then
ACME_SOURCES = ("acme:", "cli")        # the sources of ACME-issued certificates (renewed); "static" never is


# -- the pure rules -------------------------------------------------------------------------------


def renewal_due(info: CertificateInfo, now: float, fraction: float = RENEW_FRACTION) -> bool:
    """True once `fraction` of the certificate's lifetime has passed (or it has expired)."""
    return now >= info.not_before + fraction * (info.not_after - info.not_before)


def is_acme_issued(info: CertificateInfo) -> bool:
    """True for a certificate an ACME order stored (the server's or `tun2g cert issue`'s)."""
    return info.source.startswith(ACME_SOURCES[0]) or info.source == ACME_SOURCES[1]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date, RFC 9110 10.2.3), capped at
    `RETRY_AFTER_MAX`; None when absent or unparsable."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(max(0.0, when.timestamp() - now), RETRY_AFTER_MAX)


def backoff_delay(failures: int, jitter: float, retry_after: float | None = None, rate_limited: bool = False) -> float:
    """Seconds before retrying after the `failures`-th failure in a row.

    `BACKOFF_MIN` doubling per failure up to `BACKOFF_MAX`, times 1 ± `JITTER` (`jitter` in [0, 1] picks
    where: 0.5 is none); never sooner than the server's `retry_after`, nor than `RATE_LIMITED_WAIT` when it
    said rateLimited without one.
    """
    base = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(max(failures, 1) - 1, 30))
    delay = base * (1 + JITTER * (2 * min(max(jitter, 0.0), 1.0) - 1))
    if rate_limited and retry_after is None:
        retry_after = RATE_LIMITED_WAIT
    return max(delay, retry_after or 0.0)


@dataclass
class Backoff:
    """A name's failures in a row and when it may be ordered again."""

    failures: int = 0
    not_before: float = 0.0


def shared_backoff(value: str | None) -> Backoff:
    """A backoff as the store keeps it for the cluster (``backoff:<name>``: "FAILURES NOT_BEFORE"); a value
    that is absent or not of that form is no backoff."""
    failures, _, not_before = (value or "").partition(" ")
    try:
        return Backoff(min(max(int(failures), 0), 1000), float(not_before))
    except ValueError:
        return Backoff()


class OrderingStore(CertificateStore, Storage, Protocol):
    """A store that keeps routes and certificates (both of ours)."""


# -- the driver -----------------------------------------------------------------------------------


@dataclass
class AcmeSettings:
    """Where and how the manager orders (the `tun2g server --acme-*` flags)."""

    directory_url: str = LETS_ENCRYPT
    email: str | None = None
    ca_bundle: str | None = None
    challenge: str = "http-01"  # or "tls-alpn-01" (on the HTTPS port: behind a TCP balancer, with --http none)
    scan_interval: float = SCAN_INTERVAL
    renew_fraction: float = RENEW_FRACTION


class CertManager:
    """Orders certificates for routed names on first use and renews them; one node per name by a lock."""

    def __init__(self, store: OrderingStore, node_id: str, settings: AcmeSettings, metrics: AcmeMetrics | None = None,
                 order: Callable[..., object] = issue, queue_cap: int = QUEUE_CAP) -> None:
        self.store = store
        self.node_id = node_id
        self.settings = settings
        self.metrics = metrics or AcmeMetrics()
        self._order = order
        self._queue: Queue = Queue(maxsize=queue_cap)
        self._waiting: set[str] = set()
        self._backoff: dict[str, Backoff] = {}
        self._random = random.Random()
        self.scans_skipped = 0  # renewal scans the store could not answer (Redis down): nothing renewed then

    def want(self, server_name: str) -> None:
        """Ask for a certificate for an SNI name (never blocks; the worker decides whether to order)."""
        try:
            name = normalize_domain(server_name)
        except StorageError:
            return
        self._enqueue(name, renewal=False)

    def waiting(self) -> int:
        """Names queued for an order now."""
        return len(self._waiting)

    def run(self) -> None:
        """Take names off the queue and order them, forever (a bug in one order never stops the next)."""
        while True:
            name, renewal = self._queue.get()
            try:
                self.order(name, renewal)
            except Exception as exc:
                log.error("acme_manager_failed", domain=name, error=repr(exc))
            finally:
                self._waiting.discard(name)

    def scan_forever(self) -> None:
        """Queue the certificates due for renewal every `scan_interval` seconds (the cadence is the design)."""
        while True:
            self.scan()
            gevent.sleep(self.settings.scan_interval)

    def scan(self, now: float | None = None) -> list[str]:
        """Queue every ACME-issued certificate past its renewal point; the names queued."""
        now = time.time() if now is None else now
        try:
            listing: Iterable[CertificateInfo] = self.store.list_certificates()
        except StorageError as exc:
            if not self.scans_skipped:
                log.warning("acme_renewal_scan_skipped", error=str(exc), effect="serving the certificates loaded")
            self.scans_skipped += 1
            return []
        self.scans_skipped = 0
        due = [info.name for info in listing
               if is_acme_issued(info) and not info.name.startswith("*.")
               and renewal_due(info, now, self.settings.renew_fraction)]
        return [name for name in due if self._enqueue(name, renewal=True)]

    def order(self, name: str, renewal: bool) -> bool:
        """Order (or renew) `name` now, if it is routed, not backing off and no other node is at it; True
        when this node stored a certificate."""
        now = time.time()
        backoff = self._backoff.get(name)
        if backoff is not None and now < backoff.not_before:
            return False
        try:
            self.store.has_route(name)  # exact: a wildcard route's names are never ordered one by one
        except NoSuchRoute:
            log.debug("acme_unrouted", domain=name[:256])
            return False
        except StorageError as exc:
            log.warning("acme_order_postponed", domain=name, error=str(exc))
            return False
        owner = f"{self.node_id}:{uuid.uuid4().hex}"
        try:
            if not self.store.acquire_acme_lock(f"order:{name}", owner, LOCK_TTL):
                log.info("acme_ordered_elsewhere", domain=name)
                return False
        except StorageError as exc:
            log.warning("acme_order_postponed", domain=name, error=str(exc))
            return False
        try:
            shared = shared_backoff(self.store.acme_value(f"backoff:{name}"))
            if now < shared.not_before:  # another node failed it recently: the whole cluster waits
                log.debug("acme_backing_off", domain=name, failures=shared.failures)
                return False
            if not self._still_needed(name, renewal, now):
                return False
            return self._issue(name, renewal, shared.failures)
        finally:
            try:
                self.store.release_acme_lock(f"order:{name}", owner)
            except StorageError as exc:  # it expires by itself after LOCK_TTL
                log.warning("acme_lock_not_released", domain=name, error=str(exc))

    def _share(self, name: str, backoff: Backoff | None, delay: float) -> None:
        """Tell the other nodes of a name's backoff (kept `BACKOFF_MAX` past its end, so the count goes on),
        or (None) that it is over."""
        try:
            if backoff is None:
                self.store.remove_acme_value(f"backoff:{name}")
            else:
                self.store.put_acme_value(f"backoff:{name}", f"{backoff.failures} {backoff.not_before:.3f}",
                                          delay + BACKOFF_MAX)
        except StorageError as exc:  # this node's own backoff still holds
            log.warning("acme_backoff_not_shared", domain=name, error=str(exc))

    def _enqueue(self, name: str, renewal: bool) -> bool:
        if name in self._waiting:
            return False
        try:
            self._queue.put_nowait((name, renewal))
        except Full:
            log.debug("acme_queue_full", domain=name[:256], waiting=len(self._waiting))
            return False
        self._waiting.add(name)
        return True

    def _still_needed(self, name: str, renewal: bool, now: float) -> bool:
        """Under the lock: False when a node stored a certificate meanwhile (or a static one is there)."""
        current = next((info for info in self.store.list_certificates() if info.name == name), None)
        if current is None:
            return True
        return renewal and is_acme_issued(current) and renewal_due(current, now, self.settings.renew_fraction)

    def _issue(self, name: str, renewal: bool, failed_before: int) -> bool:
        settings = self.settings
        self.metrics.started.inc()
        started = time.monotonic()
        log.info("acme_order_started", domain=name, renewal=renewal, directory=settings.directory_url)
        try:
            with gevent.Timeout(ORDER_DEADLINE, IssuanceFailed(f"no certificate within {ORDER_DEADLINE:g} s")):
                self._order(self.store, name, directory_url=settings.directory_url, email=settings.email,
                            ca_bundle=settings.ca_bundle, source=f"acme:{self.node_id}",
                            challenge=settings.challenge)
        except (IssuanceFailed, NoSuchRoute, StorageError) as exc:
            self.metrics.failed.inc()
            backoff = self._backoff.setdefault(name, Backoff())
            backoff.failures = max(backoff.failures, failed_before) + 1
            retry_after = getattr(exc, "retry_after", None)
            delay = backoff_delay(backoff.failures, self._random.random(),
                                  parse_retry_after(retry_after, time.time()), getattr(exc, "rate_limited", False))
            backoff.not_before = time.time() + delay
            self._share(name, backoff, delay)
            log.warning("acme_order_failed", domain=name, renewal=renewal, error=str(exc),
                        failures=backoff.failures, retry_in=round(delay))
            return False
        seconds = time.monotonic() - started
        if self._backoff.pop(name, None) is not None or failed_before:
            self._share(name, None, 0)
        self.metrics.issued(seconds)
        if renewal:
            self.metrics.renewals.inc()
        log.info("acme_certificate_stored", domain=name, renewal=renewal, seconds=round(seconds, 2))
        return True


__all__ = ["AcmeSettings", "Backoff", "shared_backoff", "CertManager", "backoff_delay", "is_acme_issued", "parse_retry_after",
           "renewal_due"]
