"""Multi-homed clients: one tunnel client holding sessions on K nodes of a cluster at once.

A tun2g server in a cluster lists the live nodes' tunnel addresses (and its own
node id) in its auth reply. The supervisor here dials the address it was given
(a node, or a balancer in front of them: whichever node answers), learns the
others from that reply and runs one of today's single-session `Client` loops
per extra node, never two on one node, until K are held. Each loop reconnects
on its own; the servers push a new list when a node joins, drains, leaves or is
evicted (the "nodes" control message), and the supervisor re-reads the freshest list every DISCOVER_INTERVAL, drops
sessions to nodes that left the cluster's list (a dead node's entry expires
with the registry TTL) and opens new ones to take their place. Requests for
the domain are then served by whichever session is on the node they land on
(the router prefers a local session), and by the others if one node dies.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

import gevent
from gevent.event import Event
from gevent.pool import Group

from tun2g.client.client import Client, ClientConfig
from tun2g.client.telemetry import Served
from tun2g.log import get_logger

log = get_logger(__name__)

DISCOVER_INTERVAL = 0.5  # seconds between looks at the sessions and the cluster's node list
DEFAULT_CLUSTER_SESSIONS = 2  # sessions held when the cluster offers more than one node and K is not given
# A node whose port refuses our dials this long is taken for dead: its session moves to another node,
# and the node is not tried again for AVOID_FOR (the node lists we hold are only as fresh as our logins).
NODE_DOWN_AFTER = 1.0
AVOID_FOR = 30.0
# ... unless a list heard this long after we found it down still names it: a dead node leaves the servers'
# lists within the heartbeat eviction (2 s), so that node is back (restarted).
BACK_AFTER = 3.0
DROP_GRACE = 10.0  # a surplus session's requests in flight get this long to finish after it says LEAVING


class MultiClient:
    """Runs the entry Client plus one Client per extra node (see the module docstring)."""

    def __init__(self, config: ClientConfig, sessions: int | None = None, **client_options) -> None:
        """`sessions`: K, the sessions to hold (None: DEFAULT_CLUSTER_SESSIONS when the cluster has more
        than one node, else 1); `client_options` go to every Client (on_status, metrics, ...)."""
        if sessions is not None and sessions < 1:
            raise ValueError("--sessions must be at least 1")
        self.config = config
        self.wanted = sessions
        self._options = client_options
        self.entry = Client(config, **client_options)
        self.entry.sibling_up = lambda: self._sibling_up(self.entry)
        self.extra: dict[str, Client] = {}  # node id -> the Client dialling that node's tunnel address
        self._greenlets: dict[Client, gevent.Greenlet] = {}
        self._unreachable_since: dict[str, float] = {}
        self._avoid: dict[str, tuple[float, float]] = {}  # node id -> (not tried until, found down at), monotonic
        self._closed = Event()
        self._draining, self._drained = Event(), Event()
        self._leaving = Group()  # sessions dropped gracefully, finishing their requests

    @property
    def clients(self) -> list[Client]:
        return [self.entry, *self.extra.values()]

    @property
    def requests_served(self) -> int:
        return sum(client.requests_served for client in self.clients)

    def connected_nodes(self) -> list[str]:
        """Node ids this client has a live session on now."""
        return sorted({c.node_id for c in self.clients if c.state == "connected" and c.node_id})

    def run(self) -> None:
        """Serve until close(); raises what the entry Client raises (a refused token, ...)."""
        entry = self._greenlets[self.entry] = gevent.spawn(_outcome_of, self.entry.run)
        try:
            while not self._closed.is_set():
                if entry.ready():
                    if self._draining.is_set():
                        self._drained.wait()  # the other sessions finish their requests too
                    error = entry.get()
                    if error is not None:
                        raise error  # a refused token, --no-reconnect ending, ...: the caller says it in one line
                    return  # close() or drain()
                if not self._draining.is_set():
                    self._rebalance()
                self._closed.wait(DISCOVER_INTERVAL)
        finally:
            self.close()

    def use_backend(self, url: str) -> None:
        """Send the next requests of every session to `url` (a config reload)."""
        self.config.backend_url = url  # sessions added later start with it
        for client in self.clients:
            client.use_backend(url)

    def set_on_request(self, on_request: Callable[[Served], None] | None) -> None:
        """Every session's exchanges are heard by `on_request` from now on (None: no longer)."""
        self._options["on_request"] = on_request
        for client in self.clients:
            client.set_on_request(on_request)

    def drain(self, grace: float) -> None:
        """SIGTERM: every session takes no new requests and finishes those in flight (Client.drain, at
        most ``grace`` s, all at once), then everything closes."""
        if self._draining.is_set():
            return
        self._draining.set()  # no session is added or replaced meanwhile
        drains = [gevent.spawn(client.drain, grace) for client in self.clients]
        gevent.joinall(drains, timeout=grace + 1)
        self.close()
        self._drained.set()

    def close(self) -> None:
        """Close every session and stop reconnecting."""
        self._closed.set()
        self._leaving.kill(block=False)
        for client in self.clients:
            client.close()
        gevent.joinall(list(self._greenlets.values()), timeout=5)

    def _view(self) -> dict[str, str]:
        """The cluster's nodes as a connected session last heard them (the freshest list, from an auth reply
        or a "nodes" event): {node id: tunnel address}."""
        connected = [client for client in self.clients if client.state == "connected"]
        if not connected:
            return {}
        freshest = max(connected, key=lambda client: client.nodes_heard)
        now = time.monotonic()
        return {node: address for node, address in freshest.cluster_nodes.items()
                if self._avoid.get(node, (0.0, 0.0))[0] <= now
                or freshest.nodes_heard > self._avoid[node][1] + BACK_AFTER}

    def _unreachable(self, node_id: str, client: Client) -> bool:
        """True once `client` has failed to even dial its node for NODE_DOWN_AFTER seconds."""
        if client.state == "connected" or client.reached_server or client.connections == 0 and \
                client.state in ("idle", "connecting"):
            self._unreachable_since.pop(node_id, None)
            return False
        since = self._unreachable_since.setdefault(node_id, time.monotonic())
        if time.monotonic() - since < NODE_DOWN_AFTER:
            return False
        self._avoid[node_id] = (time.monotonic() + AVOID_FOR, time.monotonic())
        return True

    def _sibling_up(self, client: Client) -> bool:
        """Whether a session other than `client`'s, on another node, is connected (it serves our routes)."""
        return any(other is not client and other.state == "connected" and other.node_id != client.node_id
                   for other in self.clients)

    def _rebalance(self) -> None:
        view = self._view()
        if not view:
            return  # not connected yet, or a server that offers no other node
        wanted = min(self.wanted or (DEFAULT_CLUSTER_SESSIONS if len(view) > 1 else 1), len(view))
        for node_id, client in list(self.extra.items()):
            greenlet = self._greenlets[client]
            duplicate = self.entry.state == "connected" and self.entry.node_id == node_id
            if self._unreachable(node_id, client):
                self._drop(node_id, "unreachable")
            elif greenlet.ready() or node_id not in view or duplicate or len(self.clients) > wanted:
                # Refused, gone from the cluster, or the entry address (a balancer) landed on that node.
                self._drop(node_id, "duplicate" if duplicate else "gone" if node_id not in view else "surplus")
        view = self._view()
        taken = set(self.extra) | ({self.entry.node_id} if self.entry.node_id else set())
        for node_id in sorted(view):
            if len(self.clients) >= wanted:
                break
            if node_id not in taken:
                self._add(node_id, view[node_id])

    def _add(self, node_id: str, address: str) -> None:
        config = dataclasses.replace(self.config, server_addr=address, instance_id=_session_instance(
            self.config.instance_id, node_id), smux_config=dataclasses.replace(self.config.smux_config))
        client = Client(config, **self._options)
        client.sibling_up = lambda: self._sibling_up(client)
        self.extra[node_id] = client
        self._greenlets[client] = gevent.spawn(self._run_extra, client)
        log.info("session_added", node=node_id, server=address, sessions=len(self.clients))

    def _run_extra(self, client: Client) -> None:
        try:
            client.run()
        except Exception as exc:  # refused there (a cap, a token revoked): the supervisor picks again
            log.warning("session_refused", server=client.config.server_addr, error=str(exc))

    def _drop(self, node_id: str, reason: str) -> None:
        """Stop holding the session on `node_id`: gracefully (it says LEAVING, and the server closes it once the
        requests in flight on it are answered, within DROP_GRACE), or at once when it serves nothing (also a
        session told to move whose node left the list: it still finishes the requests on its old session)."""
        client = self.extra.pop(node_id)
        greenlet = self._greenlets.pop(client)
        log.info("session_dropped", node=node_id, reason=reason, sessions=len(self.clients))
        if client.state != "connected" and not client.streams_in_flight:
            client.close()
            greenlet.join(timeout=5)
            return

        def leave() -> None:
            try:
                client.drain(DROP_GRACE)
                greenlet.join(timeout=5)
            finally:
                client.close()  # also when close() cuts the wait short

        self._leaving.spawn(leave)


def _outcome_of(run: Callable[[], None]) -> Exception | None:
    """Run the entry session; its error is returned, not raised (a greenlet's uncaught error is printed
    as a traceback, and the CLI turns these into one line)."""
    try:
        run()
    except Exception as exc:
        return exc
    return None


def _session_instance(instance_id: str, node_id: str) -> str:
    """The instance id of the extra session on `node_id`: its own, so that takeover (a new session of an
    instance closes the older ones, docs/routing.md#takeover) replaces only that node's earlier session,
    never the sibling sessions this client holds on other nodes."""
    node = re.sub(r"[^A-Za-z0-9._-]", "", node_id)[:31] or "node"
    return f"{instance_id[:32]}:{node}"
