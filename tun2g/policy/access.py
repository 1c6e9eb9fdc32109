"""IP allow and deny lists (CIDR, IPv4 and IPv6) and the verdict for one client address."""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NETWORKS = 1000  # per list; a longer list belongs in a firewall
MAX_CACHED = 4096    # client addresses whose verdict is remembered (public clients choose theirs: bounded)


class AccessError(ValueError):
    """A CIDR that does not parse; the message names it."""


def parse_network(text: object) -> Network:
    """An IPv4 or IPv6 network from "10.0.0.0/8", "2001:db8::/32" or a bare address (a /32 or /128)."""
    if not isinstance(text, str):
        raise AccessError(f"expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32, got {text!r}")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AccessError(f"{text!r} is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32") from None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `text`, its IPv6 zone (``fe80::1%eth0``) dropped: a zone names an interface, not a peer."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.1.2.3 is 10.1.2.3 (a dual-stack listener's view)
    return address


class AddressRules:
    """Deny beats allow; a non-empty allow list admits only its networks; an unparseable address is not allowed."""

    __slots__ = ("allow", "deny", "_known")

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def admits(self, client_ip: str) -> bool:
        """Whether a request from `client_ip` may pass (cached per address)."""
        known = self._known.get(client_ip)
        if known is None:
            known = self._decide(client_ip)
            if len(self._known) >= MAX_CACHED:
                self._known.clear()
            self._known[client_ip] = known
        return known

    def _decide(self, client_ip: str) -> bool:
        address = _address(client_ip)
        if address is None:
            return not self.allow  # nothing to match: only a deny-only list lets it through
        if any(address.version == net.version and address in net for net in self.deny):
            return False
        return not self.allow or any(address.version == net.version and address in net for net in self.allow)
