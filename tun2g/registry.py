"""Which tunnel connections serve which domain, and the choice among them.

The in-process registry is all a single server needs; the Redis registry
(shared by many server processes) layers on top of it for remote lookups.
"""

from __future__ import annotations

import random
from collections import defaultdict

from tun2g.errors import CantRemoveWhatDoesntExist, NoSuchBackend


class LocalRegistry:
    """Connections of this process, by id and by domain."""

    def __init__(self):
        self._by_id = {}
        self._by_domain = defaultdict(list)

    def add(self, connection) -> None:
        self._by_id[connection.id] = connection
        self._by_domain[connection.domain].append(connection)

    def remove(self, connection) -> None:
        """Forget a connection; raises CantRemoveWhatDoesntExist if unknown."""
        if self._by_id.pop(connection.id, None) is None:
            raise CantRemoveWhatDoesntExist(connection.id)
        peers = self._by_domain[connection.domain]
        peers.remove(connection)
        if not peers:
            del self._by_domain[connection.domain]

    def discard(self, connection) -> bool:
        """Forget a connection if known; True when it was."""
        try:
            self.remove(connection)
        except CantRemoveWhatDoesntExist:
            return False
        return True

    def get(self, connection_id: str):
        try:
            return self._by_id[connection_id]
        except KeyError:
            raise NoSuchBackend(connection_id) from None

    def pick(self, domain: str, exclude=()):
        """The usable connection for `domain` with the fewest requests in flight (ties at random)."""
        best, best_load, ties = None, None, 0
        for connection in self._by_domain.get(domain, ()):
            if not connection.usable or connection in exclude:
                continue
            load = connection.in_flight
            if best is None or load < best_load:
                best, best_load, ties = connection, load, 1
            elif load == best_load:
                # Reservoir sampling keeps the tie-break uniform without a list.
                ties += 1
                if random.randrange(ties) == 0:
                    best = connection
        return best

    def has_domain(self, domain: str) -> bool:
        return domain in self._by_domain

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
