"""Backend: the public record of one tunnel connection, as the admin API shows it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Backend:
    """Mirrors Go tun2's Backend; `node`, `routes`, `instance` and the counters are tun2g additions.

    `routes`: every route key the tunnel serves (`domain` first); `instance`: the client
    instance id it gave (docs/routing.md#takeover), "" when none.

    `phi` is always finite (the Go original reported +Inf and NaN, which JSON
    cannot encode).
    """

    id: str
    proto: str
    user: str
    domain: str
    phi: float
    host: str
    usable: bool
    node: str = ""
    connected_at: float = 0.0
    requests_in_flight: int = 0
    requests_served: int = 0
    routes: tuple[str, ...] = ()
    instance: str = ""

    def serves(self, route: str) -> bool:
        """Whether this tunnel serves `route` (a route key)."""
        return route == self.domain or route in self.routes

    def to_dict(self) -> dict:
        return asdict(self)
