"""Revoked tokens and removed routes end live tunnels too, on every node, within a second.

A tunnel's Auth is checked when it connects; afterwards the store may change
under it (`tun2g token revoke`, `tun2g route rm`, from another process, maybe
on another host). Rather than a message that a node could miss (a pub/sub
listener reconnecting, the CLI and the server on SQLite sharing nothing but
a file), every node polls one cheap marker of the store, `Storage.revision()`
(SQLite: ``PRAGMA data_version``, read from shared memory; Redis: one GET of
``P revision``, which every revocation and route removal increments), every
CHECK_INTERVAL seconds. When it changed, each live tunnel's Auth is checked
again, once per distinct (token, domain) pair, and a tunnel that no longer
passes is disconnected (its client then reconnects and is told why).

A tunnel remembers the revision seen before its own Auth check, so one that
authenticated while a revocation landed is checked again at the next tick.
Cost while nothing changes: one revision read per CHECK_INTERVAL per node; the
tunnels are scanned only when the revision moved, or when one registered with
an older revision than the last read (`registered`).
While the store cannot be read, tunnels stay up (the check resumes with it).
A store that comes back empty (Redis restarted without its data: the counter
went back) is not a revocation: live tunnels are kept, and logged.
"""

from __future__ import annotations

from typing import Callable, Iterable

import gevent

from tun2g.control import verify_auth
from tun2g.errors import AuthMismatch
from tun2g.log import get_logger
from tun2g.server.tunnel import Tunnel
from tun2g.storage import Storage, StorageError
from tun2g.storage.routing import normalize_route_key

log = get_logger(__name__)

CHECK_INTERVAL = 0.5  # seconds between revision reads: revoke-to-disconnect stays under a second
_YIELD_EVERY = 100  # Auth re-checks between yields to the hub (SQLite calls never yield on their own)


class RevocationWatch:
    """Polls the store's revision and disconnects tunnels whose Auth no longer holds."""

    def __init__(self, storage: Storage, tunnels: Callable[[], Iterable[Tunnel]],
                 disconnect: Callable[[Tunnel, str], None], interval: float = CHECK_INTERVAL,
                 on_revision: Callable[[], None] | None = None) -> None:
        """`on_revision`: called whenever the revision changed (the first read included), before the re-checks."""
        self.storage = storage
        self._on_revision = on_revision
        self._tunnels = tunnels
        self._disconnect = disconnect
        self.interval = interval
        self.revision: str | None = None  # the store's revision as last read
        self._failing = False
        self._behind = False  # a tunnel registered with an older revision than the last read

    def run(self) -> None:
        while True:
            try:
                self.check()
            except Exception as exc:  # a bug must not end revocation for the process's lifetime
                log.error("revocation_check_failed", error=repr(exc))
            gevent.sleep(self.interval)  # the polling cadence, not synchronisation

    def registered(self, tunnel: Tunnel) -> None:
        """A tunnel joined, with the revision it saw before its Auth check: if that is older than the
        last read (a revocation landed during its check), the next tick checks it again."""
        if tunnel.revision != self.revision:
            self._behind = True

    def check(self) -> int:
        """One tick: read the revision, re-check the tunnels that have not seen it; returns how many were cut."""
        try:
            revision = self.storage.revision()
        except StorageError as exc:
            if not self._failing:
                log.warning("revocation_check_unavailable", error=str(exc),
                            effect="live tunnels are re-checked once the store answers")
            self._failing = True
            return 0
        self._failing = False
        previous, self.revision = self.revision, revision
        if revision != previous and self._on_revision is not None:
            self._on_revision()
        if previous is None or _went_back(previous, revision):
            if previous is not None:
                log.warning("store_revision_reset", was=previous, now=revision,
                            effect="the store lost its data (Redis restarted empty?): live tunnels are kept")
            for tunnel in self._tunnels():  # the baseline: what connected so far stays, as it was checked then
                tunnel.revision = revision
            return 0
        if revision == previous and not self._behind:
            return 0  # every tunnel saw this revision: no scan (ten thousand tunnels, twice a second)
        self._behind = False
        stale = [t for t in self._tunnels() if t.revision != self.revision and not t.is_closed]
        verdicts: dict[tuple[str, tuple[str, ...]], str | None] = {}
        cut = 0
        for index, tunnel in enumerate(stale):
            key = (tunnel.auth.token, tunnel.auth.route_keys)
            if key not in verdicts:
                if index and index % _YIELD_EVERY == 0:
                    gevent.sleep(0)
                try:
                    verify_auth(self.storage, tunnel.auth, normalize_route_key)
                    verdicts[key] = None
                except AuthMismatch as exc:
                    verdicts[key] = exc.log_reason or exc.reason  # the full reason: this goes to the log
                except StorageError as exc:  # the store failed meanwhile: try again next tick
                    log.info("revocation_check_unavailable", error=str(exc))
                    return cut
            reason = verdicts[key]
            if reason is None:
                tunnel.revision = self.revision
            else:
                log.info("tunnel_revoked", reason=reason, token_sha256=tunnel.token_hash[:12], **tunnel.log_fields())
                self._disconnect(tunnel, reason)
                cut += 1
        return cut


def _went_back(previous: str, revision: str) -> bool:
    """A counter that decreased: the store was reset, not edited (nothing was revoked)."""
    return previous.isdigit() and revision.isdigit() and int(revision) < int(previous)
