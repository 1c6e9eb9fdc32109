"""Edge policy of a TCP route, sans-I/O: which public addresses may connect, and how many at once.

The allow/deny verdict is the HTTP edge policy's own (tun2g.policy.access); this module adds the
stored form of a TCP route's lists and the per-route connection cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from tun2g.policy.access import AccessError, AddressRules, Network, parse_network


class PolicyError(ValueError):
    """An allow/deny entry that is not an address or a CIDR block."""


def parse_networks(entries: Iterable[str], what: str = "--allow/--deny") -> tuple[Network, ...]:
    """CIDR blocks (a bare address is a /32 or /128); raises PolicyError naming the bad entry."""
    try:
        return tuple(parse_network(entry) for entry in entries)
    except AccessError as exc:
        raise PolicyError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class AddressPolicy:
    """Deny wins over allow; with an allow list, only listed addresses get in (AddressRules decides)."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    _rules: AddressRules = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rules", AddressRules(self.allow, self.deny))

    @classmethod
    def from_strings(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AddressPolicy:
        return cls(parse_networks(allow, "allow"), parse_networks(deny, "deny"))

    def admits(self, address: str) -> bool:
        """True when `address` (an IP literal; IPv4-mapped IPv6 counts as IPv4, an IPv6 zone is ignored) may connect."""
        return self._rules.admits(address)


class ConnectionCap:
    """Connections open per key (a route), refused past `limit` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise PolicyError("a connection cap must be at least 1")
        self.limit = limit
        self._open: dict[object, int] = {}

    def acquire(self, key: object, limit: int | None = None) -> bool:
        """Count one more connection for `key` unless that passes its limit (`limit` overrides the default)."""
        limit = self.limit if limit is None else limit
        count = self._open.get(key, 0)
        if limit is not None and count >= limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: object) -> None:
        count = self._open.get(key, 0) - 1
        if count <= 0:
            self._open.pop(key, None)
        else:
            self._open[key] = count

    def open(self, key: object) -> int:
        return self._open.get(key, 0)
