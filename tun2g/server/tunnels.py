"""Tunnels: the tunnel clients connected to this process, by id and by route key, and the choice among them."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Collection, Iterator

from tun2g.backend import Backend
from tun2g.errors import CantRemoveWhatDoesntExist, NoSuchBackend
from tun2g.server.tunnel import Tunnel


class Tunnels:
    """This process's tunnels; the cluster's shared registry (tun2g.cluster) publishes them."""

    def __init__(self) -> None:
        self._by_id: dict[str, Tunnel] = {}
        self._by_domain: defaultdict[str, list[Tunnel]] = defaultdict(list)

    def add(self, tunnel: Tunnel) -> None:
        self._by_id[tunnel.id] = tunnel
        for route in tunnel.routes:
            self._by_domain[route].append(tunnel)

    def remove(self, tunnel: Tunnel) -> None:
        """Forget a tunnel; raises CantRemoveWhatDoesntExist if unknown."""
        if self._by_id.pop(tunnel.id, None) is None:
            raise CantRemoveWhatDoesntExist(tunnel.id)
        for route in tunnel.routes:
            peers = self._by_domain[route]
            peers.remove(tunnel)
            if not peers:
                del self._by_domain[route]

    def discard(self, tunnel: Tunnel) -> bool:
        """Forget a tunnel if known; True when it was."""
        try:
            self.remove(tunnel)
        except CantRemoveWhatDoesntExist:
            return False
        return True

    def get(self, tunnel_id: str) -> Tunnel:
        try:
            return self._by_id[tunnel_id]
        except KeyError:
            raise NoSuchBackend(tunnel_id) from None

    def pick(self, domain: str, exclude: Collection[Tunnel] = ()) -> Tunnel | None:
        """The usable tunnel for route key `domain` with the fewest requests in flight (ties at random)."""
        best, best_load, ties = None, 0, 0
        for tunnel in self._by_domain.get(domain, ()):
            if not tunnel.usable or tunnel in exclude:
                continue
            load = tunnel.in_flight
            if best is None or load < best_load:
                best, best_load, ties = tunnel, load, 1
            elif load == best_load:
                # Reservoir sampling keeps the tie-break uniform without a list.
                ties += 1
                if random.randrange(ties) == 0:
                    best = tunnel
        return best

    def close_one(self, tunnel_id: str) -> None:
        """Close one tunnel (its session's close callback deregisters it) when another node asks (a kill or a
        takeover); raises NoSuchBackend if unknown. A tunnel told to move is left to its drain (LEAVING)."""
        tunnel = self.get(tunnel_id)
        if not tunnel.moving:
            tunnel.close()

    def same_instance(self, tunnel: Tunnel) -> list[Tunnel]:
        """The other tunnels of `tunnel`'s client instance and user (none when it gave no instance id)."""
        if not tunnel.instance:
            return []
        return [t for t in self._by_id.values()
                if t is not tunnel and t.instance == tunnel.instance and t.user == tunnel.user]

    def records(self) -> list[Backend]:
        """The public record of every tunnel here."""
        return [tunnel.backend() for tunnel in self._by_id.values()]

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
