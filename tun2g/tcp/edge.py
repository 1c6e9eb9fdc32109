"""Edge policy of a TCP route, sans-I/O: which public addresses may connect, and how many at once.

A minimal CIDR matcher over the standard library's ipaddress (the per-route
HTTP policy package may later offer the same; this one has no other needs).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """An allow/deny entry that is not an address or a CIDR block."""


def parse_networks(entries: Iterable[str], what: str = "--allow/--deny") -> tuple[Network, ...]:
    """CIDR blocks (a bare address is a /32 or /128); raises PolicyError naming the bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise PolicyError(f"{what}: {entry!r} is not an IP address or CIDR block "
                              f"(e.g. 10.0.0.0/8 or 2001:db8::/32)") from None
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Deny wins over allow; with an allow list, only listed addresses get in."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_strings(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AddressPolicy:
        return cls(parse_networks(allow, "allow"), parse_networks(deny, "deny"))

    def admits(self, address: str) -> bool:
        """True when `address` (an IP literal; IPv4-mapped IPv6 counts as IPv4) may connect."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)


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
