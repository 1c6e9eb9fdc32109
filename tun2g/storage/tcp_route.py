"""TCP routes: which user's tunnel clients may serve a public TCP port, with its edge policy.

Kept apart from the HTTP routes (their own SQLite table and Redis keys), so a
store's HTTP schema can change without touching them. `TCPRouteStore` is what
the server and `tun2g route add tcp:...` need; both stores implement it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tun2g.storage.base import StorageError, validate_user

PREFIX = "tcp:"
MAX_POLICY_ENTRIES = 64


@dataclass(frozen=True)
class TCPRoute:
    """Public TCP `port` on `host` (the bind address), owned by `user`.

    `allow`/`deny`: CIDR blocks (deny wins; an allow list admits only its blocks);
    `max_connections`: open at once through this port on one node (None: the server's default).
    """

    port: int
    user: str
    host: str = "0.0.0.0"
    created: float = 0.0
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_connections: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def as_json(self) -> dict:
        """A JSON-ready dict."""
        return {"route": f"{PREFIX}{self.address}", "port": self.port, "host": self.host, "user": self.user,
                "created": self.created, "allow": list(self.allow), "deny": list(self.deny),
                "max_connections": self.max_connections}

    def policy_json(self) -> str:
        """allow, deny and max_connections as stored (one JSON column / hash field)."""
        return json.dumps({"allow": list(self.allow), "deny": list(self.deny),
                           "max_connections": self.max_connections}, separators=(",", ":"))


def tcp_route_from_stored(port: int, user: str, host: str, created: float, policy: str) -> TCPRoute:
    """A TCPRoute from its stored columns (policy: the JSON of `TCPRoute.policy_json`)."""
    fields = json.loads(policy or "{}")
    return TCPRoute(int(port), user, host, float(created), tuple(fields.get("allow", ())),
                    tuple(fields.get("deny", ())), fields.get("max_connections"))


def is_tcp_route(text: str) -> bool:
    """True for a route argument that names a TCP port (``tcp:...``) rather than a domain."""
    return text.lower().startswith(PREFIX)


def parse_tcp_route(text: str) -> tuple[str, int]:
    """``tcp:HOST:PORT``, ``tcp::PORT`` or ``tcp:PORT`` -> (bind host, port); raises StorageError."""
    rest = text[len(PREFIX):] if is_tcp_route(text) else text
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise StorageError(f"{text!r} is not a TCP route; write tcp:HOST:PORT, e.g. tcp:0.0.0.0:2222")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StorageError(f"{text!r}: the bind address {host!r} must be an IP address, e.g. 0.0.0.0") from None
    return host, int(port_text)


def new_tcp_route(text: str, user: str, created: float, *, allow=(), deny=(),
                  max_connections: int | None = None) -> TCPRoute:
    """A validated TCPRoute from the command line's pieces; raises StorageError saying what to fix."""
    host, port = parse_tcp_route(text)
    if len(allow) > MAX_POLICY_ENTRIES or len(deny) > MAX_POLICY_ENTRIES:
        raise StorageError(f"at most {MAX_POLICY_ENTRIES} --allow and {MAX_POLICY_ENTRIES} --deny entries per route")
    for entry in (*allow, *deny):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise StorageError(f"--allow/--deny: {entry!r} is not an IP address or CIDR block") from None
    if max_connections is not None and max_connections < 1:
        raise StorageError("--max-connections must be at least 1")
    return TCPRoute(port, validate_user(user), host, created, tuple(allow), tuple(deny), max_connections)


def tcp_route_taken_error(port: int, owner: str) -> StorageError:
    return StorageError(f"TCP port {port} is already routed to user {owner!r}; remove it first with "
                        f"`tun2g route rm tcp:{port}`")


@runtime_checkable
class TCPRouteStore(Protocol):
    """The TCP routes of a store."""

    def add_tcp_route(self, route: TCPRoute) -> TCPRoute:
        """Store `route` (the existing one when the same user holds the port); raises StorageError if taken."""

    def remove_tcp_route(self, port: int) -> None:
        """Forget the route of `port`; raises NoSuchRoute."""

    def list_tcp_routes(self, user: str | None = None) -> list[TCPRoute]:
        """Every TCP route (of `user`), by port."""

    def tcp_route(self, port: int) -> TCPRoute:
        """The route of `port`; raises NoSuchRoute."""
