"""Rediscovery: this node tells its tun2g clients the cluster's live nodes whenever they change.

A multi-homed client (tun2g.client.multi) learns the nodes from its auth reply;
when a node joins, leaves or is evicted afterwards, every node sends each of its
tun2g clients a ``{"event":"nodes","nodes":[...]}`` control message
(docs/protocol.md#control-messages) with the same list, so the client opens a
session on a new node within about a second and drops one on a node gone.
A Go client is never sent one. The list comes from the registry (only nodes
whose signed heartbeats this node hears, tun2g.cluster.registry.tunnel_nodes),
never from a pub/sub message: those only wake this loop.
"""

from __future__ import annotations

from typing import Callable, Iterable

import gevent
from gevent.event import Event

from tun2g import smux
from tun2g.control import MAX_LISTED_NODES, NODES, TUN2G_LEVEL, encode_event
from tun2g.log import get_logger
from tun2g.server.tunnel import Tunnel

log = get_logger(__name__)

SEND_TIMEOUT = 1.0  # one client's control stream may hold the push this long at most
RECHECK = 2.0  # after a change, the list is looked at once more this much later


def node_entries(nodes: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """The wire form of (node id, tunnel address) pairs, as the auth reply and the event carry them (capped)."""
    return [{"node": node_id, "tunnel": address} for node_id, address in list(nodes)[:MAX_LISTED_NODES]]


class NodeListPush:
    """Sends the "nodes" event to this node's tun2g clients when the cluster's node list changes."""

    def __init__(self, tunnels: Callable[[], Iterable[Tunnel]], tunnel_nodes: Callable[[], list[tuple[str, str]]],
                 recheck: float = RECHECK) -> None:
        """`tunnels()`: this node's live tunnels; `tunnel_nodes()`: the registry's current list."""
        self._tunnels = tunnels
        self._tunnel_nodes = tunnel_nodes
        self._recheck = recheck
        self._wake = Event()
        self._last: list[tuple[str, str]] | None = None
        self.pushed = 0  # events sent (for tests and logs)

    def changed(self) -> None:
        """A node joined or left: look at the list now."""
        self._wake.set()

    def run(self) -> None:
        """Until killed: on each wake-up (or every `recheck` s), push the list if it changed."""
        again = False
        while True:
            # After a change, once more `recheck` s later (a record written late, Redis unreachable just
            # then); otherwise only when woken: an idle cluster costs Redis nothing here.
            woken = self._wake.wait(self._recheck if again else None)
            self._wake.clear()
            again = woken
            try:
                self.push_if_changed()
            except Exception as exc:  # a bug must not end rediscovery for this node's clients
                log.error("node_list_push_failed", error=repr(exc))

    def push_if_changed(self) -> None:
        """Send the list to every tun2g client when it differs from the one sent last."""
        nodes = self._tunnel_nodes()
        if nodes == self._last:
            return
        self._last = nodes
        event = encode_event(NODES, nodes=node_entries(nodes))
        told = 0
        for tunnel in list(self._tunnels()):
            if tunnel.auth.tun2g is None or tunnel.auth.tun2g < TUN2G_LEVEL or tunnel.leaving or tunnel.moving \
                    or tunnel.is_closed:
                continue
            with gevent.Timeout(SEND_TIMEOUT, False):  # a client that reads no control message holds us no longer
                try:
                    tunnel.control_stream.sendall(event)
                    told += 1
                except (OSError, smux.SessionClosedError):
                    pass  # that session is going anyway
            gevent.idle()  # many tunnels: let requests run between sends
        self.pushed += told
        log.info("node_list_pushed", nodes=" ".join(node_id for node_id, _ in nodes), clients=told)
