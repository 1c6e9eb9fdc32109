"""Self-service names: a token's user claims ``<random>.BASE`` within a per-user limit (docs/routing.md#self-service).

The stores' `claim_route(base, user, limit)` creates the route atomically (SQLite
BEGIN IMMEDIATE, Redis WATCH/MULTI) and records it as claimed, so the limit
counts only names handed out this way, never routes an operator added. A claimed
name freed with `tun2g route rm` stops counting at the next claim. The label is
the server's choice alone: a client never names it.
"""

from __future__ import annotations

import base64
import secrets
from typing import Callable, Iterable, Protocol, runtime_checkable

from tun2g.storage.base import Route, StorageError, normalize_domain, ownership_conflict

# 50 random bits in 10 base32 letters (a-z, 2-7): DNS-safe, lowercase, never guessed or enumerated.
CLAIM_LABEL_CHARS = 10
# A fresh label colliding is ~2,000 in 2**50 with 2,000 names: one retry is already paranoia.
MAX_CLAIM_ATTEMPTS = 8
MAX_CLAIM_LIMIT = 1000  # names per user a server may allow (the limit is also a bound on each claim's work)


class ClaimRefused(StorageError):
    """A claim that retrying cannot fix (the user is at the limit, the base belongs to someone else)."""


class ClaimLimitReached(ClaimRefused):
    """The user already holds `limit` claimed names under the base; `names` lists them."""

    def __init__(self, base: str, names: list[str], limit: int) -> None:
        self.base, self.names, self.limit = base, names, limit
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        super().__init__(f"you hold {len(names)} self-service names under {base}, the limit of this server "
                         f"({limit}): {shown}; reuse one with --domain NAME, or free one "
                         f"(`tun2g route rm NAME` on the server)")


@runtime_checkable
class ClaimStore(Protocol):
    """A store that hands out self-service names (both tun2g stores are)."""

    def claim_route(self, base: str, user: str, limit: int) -> Route:
        """Route a fresh ``<random>.base`` to `user`, unless the user holds `limit` claimed names under base."""

    def claimed_routes(self, base: str, user: str) -> list[str]:
        """The names `user` claimed under `base` that are still routed to them, oldest first."""


def new_claim_label() -> str:
    """A random DNS label of CLAIM_LABEL_CHARS base32 letters (lowercase, digits 2-7)."""
    raw = secrets.token_bytes(CLAIM_LABEL_CHARS)  # 80 bits; the first 10 letters carry 50 of them
    return base64.b32encode(raw).decode("ascii").lower()[:CLAIM_LABEL_CHARS]


def check_claim_base(base: str) -> str:
    """The self-service base domain, normalized; StorageError unless a DNS name of two labels or more."""
    host = normalize_domain(base)
    if host.startswith("[") or "." not in host or host.replace(".", "").isdigit():
        raise StorageError(f"self-service domain {base!r}: expected a DNS name such as tunnels.example.com")
    return host


def check_claim_limit(limit: int) -> int:
    """The per-user limit; StorageError unless 1..MAX_CLAIM_LIMIT."""
    if type(limit) is not int or not 1 <= limit <= MAX_CLAIM_LIMIT:
        raise StorageError(f"self-service limit must be 1 to {MAX_CLAIM_LIMIT}, not {limit!r}")
    return limit


def pick_claim(base: str, user: str, neighbours_of: Callable[[str], Iterable[Route]]) -> str:
    """A fresh ``<label>.base`` that `user` may add (`ownership_conflict`), given `neighbours_of(key)`: the
    stored routes on host `key` and on ``*.base``. A label already in use is drawn again; ClaimRefused when
    the rule refuses every name there (``*.base`` belongs to another user)."""
    for _ in range(MAX_CLAIM_ATTEMPTS):
        key = f"{new_claim_label()}.{base}"
        neighbours = list(neighbours_of(key))
        if any(route.host == key for route in neighbours):
            continue  # taken: draw again
        if ownership_conflict(key, user, neighbours) is None:
            return key
        raise ClaimRefused(f"no self-service names under {base}: *.{base} belongs to another user")
    raise ClaimRefused(f"no free self-service name under {base} after {MAX_CLAIM_ATTEMPTS} tries")


def held_or_refuse(base: str, names: list[str], limit: int) -> None:
    """ClaimLimitReached when `names` (the user's live claims under base) already reach `limit`."""
    if len(names) >= limit:
        raise ClaimLimitReached(base, names, limit)
