"""TCP routes and TLS passthrough on the server: public ports and SNI names spliced to tunnel streams.

Each public connection becomes one smux stream of a tunnel that announced the
port (or TLS name) in its Auth and owns it (docs/tcp.md): the stream starts
with the tun2g preamble (tun2g.tcp.wire), the client answers with one status
byte once it has dialled its local service, then bytes flow both ways with
half-close honoured. A refused local dial resets the public connection (RST),
as a direct connection to a closed port would end. The edge policy (allow /
deny, a per-route cap) is checked before any stream is opened.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer

from tun2g.cluster import ClusterNode, ClusterUnavailable, HopRefused
from tun2g.cluster.hop import sign
from tun2g.errors import AuthMismatch, CantOpenSessionStream
from tun2g.http import BackendPool, RequestHead
from tun2g.requestid import new_request_id
from tun2g.transport.upgrade import UpgradedStream
from tun2g.log import get_logger
from tun2g.metrics import Metrics, TCPRouteMetrics
from tun2g.policy import AddressRules
from tun2g.server.policy_step import PolicyBook
from tun2g.server.tunnel import Tunnel
from tun2g.smux import SessionClosedError, StreamResetError
from tun2g.storage import NoSuchRoute, Storage, StorageError, normalize_domain
from tun2g.storage.tcp_route import TCPRoute, TCPRouteStore
from tun2g.tcp.edge import AddressPolicy, ConnectionCap
from tun2g.tcp.sni import MAX_RECORDS_SIZE, ClientHelloError, peek_server_name
from tun2g.tcp.splice import Splice, reset
from tun2g.tcp.wire import (HOP_PATH, HOP_SWITCHED, HOP_UPGRADE, KIND_TCP, KIND_TLS, STATUS_CONNECTED, STATUS_NAMES,
                            MAX_NAME, Announcement, Preamble, registry_name)
from tun2g.transport.base import ByteStream
from tun2g.transport.tcp import tune

log = get_logger(__name__)

_ADMIT_ALL = AddressRules()


@dataclass
class TCPSettings:
    """How the server serves TCP routes (the `tun2g server --tcp-*` flags)."""

    port_range: tuple[int, int] | None = None  # ports a client asking for port 0 gets one of (None: none)
    bind_host: str | None = None               # bind every TCP route here instead of its stored address
    connect_timeout: float = 10.0              # the client's answer (its local dial) must come within this
    idle_timeout: float | None = 3600.0        # no byte either way for this long closes the connection
    hello_timeout: float = 10.0                # a passthrough visitor's ClientHello must arrive within this
    max_connections_per_route: int = 4096      # open at once per port / name, unless the route says less
    refresh_interval: float = 2.0              # how often the stored TCP routes are re-read


@dataclass
class Grant:
    """The TCP services one tunnel was granted: public port -> its route (None: allocated), TLS names."""

    ports: dict[int, TCPRoute | None] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {"ports": sorted(self.ports), "names": list(self.names)}


class TCPRoutes:
    """Listeners for the stored TCP routes and allocated ports, and the tunnels serving each port and name."""

    def __init__(self, storage: Storage, settings: TCPSettings | None = None, metrics: Metrics | None = None,
                 cluster: ClusterNode | None = None, policies: PolicyBook | None = None) -> None:
        """`storage` holds the HTTP routes (passthrough names) and, as a TCPRouteStore, the TCP routes;
        `cluster`: this node's membership, to publish the services served here and reach other nodes';
        `policies`: the edge policies, whose allow/deny lists apply to a passthrough name's connections."""
        if not isinstance(storage, TCPRouteStore):
            raise TypeError(f"{storage!r} cannot hold TCP routes")
        self.storage = storage
        self.tcp_store: TCPRouteStore = storage
        self.settings = settings or TCPSettings()
        self.metrics = metrics
        self._routes: dict[int, TCPRoute] = {}
        self._listeners: dict[int, StreamServer] = {}
        self._allocated: dict[int, Tunnel] = {}
        self._by_port: dict[int, list[Tunnel]] = {}
        self._by_name: dict[str, list[Tunnel]] = {}
        self._grants: dict[Tunnel, Grant] = {}
        self._policies: dict[TCPRoute, AddressPolicy] = {}
        self.cap = ConnectionCap(self.settings.max_connections_per_route)
        self.cluster = cluster
        self.policies = policies
        self.forwarding = 0  # connections spliced to another node now (the drain waits for them too)
        self._servers: list[StreamServer] = []  # the passthrough listeners
        self._accepting = True
        self._names_version = 0  # bumped whenever the local passthrough names change
        self._names_cache: tuple = (None, set(), frozenset())  # (key, the union, the remote set it was built from)
        if cluster is not None:
            cluster.local_names = self.served_names
        self._closed = False
        self._watcher = gevent.spawn(self._watch_routes)

    # -- the tunnel side -----------------------------------------------------------------

    def admit(self, announcement: Announcement, user: str) -> Grant:
        """Check that `user` owns every announced port and name, allocate port 0s; raises AuthMismatch."""
        grant = Grant()
        try:
            for port in announcement.ports:
                if port:
                    grant.ports[port] = self._owned_port(port, user)
            names = []
            for name in announcement.names:
                names.append(self._owned_name(name, user))
            grant.names = tuple(names)
            for port in announcement.ports:
                if not port:
                    grant.ports[self._allocate()] = None
        except BaseException:
            self.release(grant)
            raise
        return grant

    def _owned_port(self, port: int, user: str) -> TCPRoute:
        try:
            route = self.tcp_store.tcp_route(port)
        except NoSuchRoute:
            raise AuthMismatch(f"no TCP route for port {port}; add one with "
                               f"`tun2g route add tcp:0.0.0.0:{port} --user USER`") from None
        if route.user != user:
            raise AuthMismatch(f"TCP port {port} does not belong to the token's user")
        return route

    def _owned_name(self, name: str, user: str) -> str:
        try:
            name = normalize_domain(name)
            owner = self.storage.has_route(name)
        except LookupError:
            raise AuthMismatch(f"no route for TLS name {name!r}; add one with "
                               f"`tun2g route add {name} --user USER`") from None
        except (StorageError, ValueError) as exc:
            raise AuthMismatch(f"TLS name {name!r}: {exc}") from None
        if owner != user:
            raise AuthMismatch(f"TLS name {name!r} does not belong to the token's user")
        return name

    def _allocate(self) -> int:
        port_range = self.settings.port_range
        if port_range is None:
            raise AuthMismatch("this server allocates no TCP ports (its operator starts it with --tcp-ports A-B); "
                               "ask for a routed port instead")
        for port in range(port_range[0], port_range[1] + 1):
            if port in self._routes or port in self._allocated or port in self._listeners:
                continue
            if self._open_listener(port, self.settings.bind_host or "0.0.0.0"):
                self._allocated[port] = None  # type: ignore[assignment]  # claimed; the tunnel is set in register
                return port
        raise AuthMismatch(f"every port of {port_range[0]}-{port_range[1]} is taken; try again later")

    def register(self, tunnel: Tunnel, grant: Grant) -> None:
        """`tunnel` serves `grant` from now on."""
        self._grants[tunnel] = grant
        for port, route in grant.ports.items():
            if route is None:
                self._allocated[port] = tunnel
            self._by_port.setdefault(port, []).append(tunnel)
        for name in grant.names:
            self._by_name.setdefault(name, []).append(tunnel)
        self._changed()
        log.info("tcp_registered", ports=",".join(map(str, sorted(grant.ports))) or "-",
                 names=",".join(grant.names) or "-", **tunnel.log_fields())

    def deregister(self, tunnel: Tunnel) -> None:
        """`tunnel` is gone: it serves nothing any more, and its allocated ports close."""
        grant = self._grants.pop(tunnel, None)
        if grant is None:
            return
        for port in grant.ports:
            _discard(self._by_port, port, tunnel)
        for name in grant.names:
            _discard(self._by_name, name, tunnel)
        self.release(grant)
        self._changed()

    def recheck(self, routes) -> None:
        """The stored HTTP routes changed (`routes`: every Route): a TLS name whose route is gone or now
        belongs to another user is no longer served by the tunnels that announced it."""
        owners = {route.domain: route.user for route in routes}
        dropped = []
        for tunnel, grant in self._grants.items():
            kept = tuple(name for name in grant.names if owners.get(name) == tunnel.user)
            for name in set(grant.names) - set(kept):
                _discard(self._by_name, name, tunnel)
                dropped.append(name)
                log.info("tls_name_revoked", name=name, reason="its route was removed or given to another user",
                         **tunnel.log_fields())
            grant.names = kept
        if dropped:
            self._changed()

    def served_names(self) -> list[str]:
        """The registry names of the services local tunnels serve (published for the other nodes)."""
        return [registry_name(KIND_TCP, port=port) for port in self._by_port] + \
               [registry_name(KIND_TLS, name=name) for name in self._by_name]

    def _changed(self) -> None:
        self._names_version += 1
        if self.cluster is not None:
            self.cluster.changed()

    def release(self, grant: Grant) -> None:
        """Close the ports allocated for `grant`."""
        for port, route in grant.ports.items():
            if route is None and port in self._allocated:
                del self._allocated[port]
                self._close_listener(port)

    # -- listeners ----------------------------------------------------------------------

    def _watch_routes(self) -> None:
        """Listen on every stored TCP route (re-read every refresh_interval), stop for removed ones."""
        while not self._closed:
            if not self._accepting:
                return
            try:
                routes = {route.port: route for route in self.tcp_store.list_tcp_routes()}
            except StorageError as exc:
                log.warning("tcp_routes_unreadable", error=str(exc))
            else:
                for port in set(self._routes) - set(routes):
                    self._close_listener(port)
                    for tunnel in list(self._by_port.get(port, ())):
                        _discard(self._by_port, port, tunnel)  # the route was removed: no longer served
                for port, route in routes.items():
                    for tunnel in list(self._by_port.get(port, ())):
                        if tunnel.user != route.user:  # given to another user: not this tunnel's any more
                            _discard(self._by_port, port, tunnel)
                            log.info("tcp_port_revoked", port=port, **tunnel.log_fields())
                self._routes = routes
                for port, route in routes.items():
                    if port not in self._listeners and port not in self._allocated:
                        self._open_listener(port, self.settings.bind_host or route.host)
            gevent.sleep(self.settings.refresh_interval)  # the refresh cadence, not synchronisation

    def _open_listener(self, port: int, host: str) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            log.warning("tcp_listen_failed", port=port, host=host, error=str(exc))
            return False
        if not self._accepting:
            sock.close()
            return False
        server = StreamServer(sock, lambda conn, address: self._serve_port(port, conn, address))
        server.start()
        self._listeners[port] = server
        log.info("tcp_listening", port=port, host=host)
        return True

    def _close_listener(self, port: int) -> None:
        server = self._listeners.pop(port, None)
        if server is not None:
            server.close()

    def listening_ports(self) -> list[int]:
        return sorted(self._listeners)

    # -- public connections --------------------------------------------------------------

    def _serve_port(self, port: int, conn: socket.socket, address) -> None:
        route = self._routes.get(port)
        policy = self._policy(route) if route is not None else AddressPolicy()
        limit = route.max_connections if route is not None else None
        self._splice_to_tunnel(conn, address, key=port, preamble=Preamble(KIND_TCP, port=port,
                                                                          remote=_format(address)),
                               tunnels=self._by_port.get(port, ()), policy=policy, limit=limit)

    def serve_passthrough(self, listener) -> StreamServer:
        """Serve TLS passthrough on `listener` (a bound, listening socket); returns the started server."""
        server = StreamServer(listener, self._serve_tls)
        server.start()
        self._servers.append(server)
        return server

    def stop_accepting(self) -> None:
        """Draining: take no new public TCP or passthrough connections; the open ones carry on."""
        self._accepting = False
        for port in list(self._listeners):
            self._close_listener(port)
        for server in self._servers:
            server.close()

    def passthrough_names(self) -> set[str]:
        """The TLS names served by passthrough: by a local tunnel, or (in a cluster) another node's, as last
        read from the registry (for a front that terminates the rest)."""
        remote = self.cluster.passthrough_names() if self.cluster is not None else frozenset()
        key = (self._names_version, id(remote))
        if self._names_cache[0] != key:  # rebuilt when a name comes or goes, not on every handshake
            self._names_cache = (key, set(self._by_name).union(remote), remote)
        return self._names_cache[1]

    def _served_name(self, name: str) -> bool:
        return name in self._by_name or (self.cluster is not None and name in self.cluster.passthrough_names())

    def _serve_tls(self, conn: socket.socket, address) -> None:
        hello = bytearray()
        deadline = time.monotonic() + self.settings.hello_timeout
        try:
            while True:
                peek = peek_server_name(hello)
                if peek.complete:
                    break
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                data = conn.recv(min(MAX_RECORDS_SIZE, peek.needed) - len(hello))
                if not data:
                    conn.close()
                    return
                hello += data
        except (ClientHelloError, OSError) as exc:
            self._count("bad_hello", None)
            log.info("tls_passthrough_refused", remote=_format(address), reason=str(exc) or type(exc).__name__)
            reset(conn)
            return
        conn.settimeout(None)
        self.handle_passthrough(conn, address, bytes(hello), peek.server_name)

    def handle_passthrough(self, conn: socket.socket, address, hello: bytes, name: str | None) -> None:
        """Splice a TLS connection whose ClientHello (`hello`, already read) names `name` to its tunnel."""
        if name is None or not self._served_name(name):
            self._count("no_tunnel", None)
            log.info("tls_passthrough_refused", remote=_format(address), name=name or "-",
                     reason="no SNI" if name is None else "no tunnel serves this name")
            reset(conn)
            return
        self._splice_to_tunnel(conn, address, key=name, preamble=Preamble(KIND_TLS, name=name,
                                                                          remote=_format(address)),
                               tunnels=self._by_name.get(name, ()), policy=self._name_policy(name), limit=None,
                               first_bytes=hello)

    def _name_policy(self, name: str) -> AddressRules:
        """The allow/deny lists of the name's edge policy (the HTTP route's, by its key); raw TCP has no
        forwarding headers, so the peer address is the visitor and --trusted-proxy does not apply."""
        policy = self.policies.get(name) if self.policies is not None else None
        return policy.access if policy is not None else _ADMIT_ALL

    def _splice_to_tunnel(self, conn: ByteStream, address, *, key: int | str, preamble: Preamble, tunnels,
                          policy: AddressPolicy | AddressRules, limit: int | None, first_bytes: bytes = b"",
                          hop: bool = False) -> None:
        remote = _format(address)
        if not policy.admits(str(address[0])):
            self._finish(conn, key, remote, "refused_by_policy")
            return
        if not self.cap.acquire(key, limit):
            self._finish(conn, key, remote, "over_cap")
            return
        started = time.monotonic()
        try:
            tune(conn)
            tunnel = _least_loaded(tunnels)
            if tunnel is None:
                if not hop and self.cluster is not None and self._forward(conn, address, preamble, first_bytes, key):
                    return
                self._finish(conn, key, remote, "no_tunnel")
                return
            try:
                stream = tunnel.open_stream()
            except CantOpenSessionStream:
                self._finish(conn, key, remote, "no_tunnel")
                return
            tunnel.in_flight += 1
            try:
                outcome = self._relay(conn, stream, preamble, first_bytes, self._route_metrics(key))
            finally:
                tunnel.in_flight -= 1
                tunnel.served += 1
            if outcome[0] != "served":
                self._finish(conn, key, remote, outcome[0], backend=tunnel.id)
                return
            self._count("served", key)
            log.info("tcp_connection", key=key, remote=remote, backend=tunnel.id, end=outcome[1],
                     bytes_in=outcome[2], bytes_out=outcome[3], ms=round((time.monotonic() - started) * 1000))
        finally:
            self.cap.release(key)

    # -- the cluster: a connection for a service another node's tunnel serves ---------------

    def _forward(self, conn, address, preamble: Preamble, first_bytes: bytes, key: int | str) -> bool:
        """Splice `conn` to a node holding a tunnel for the service (a signed Upgrade); False when none can."""
        cluster = self.cluster
        assert cluster is not None
        name = registry_name(preamble.kind, preamble.port, preamble.name)
        try:
            nodes = cluster.nodes_for(name)
        except ClusterUnavailable:
            return False
        for node in nodes:
            started = time.monotonic()
            request_id, remote_ip = new_request_id(), str(address[0])
            signature = sign(cluster.secret, origin=cluster.node_id, to=node.node_id,
                             timestamp=int(time.time() * 1000), method="GET", host=name, target=HOP_PATH,
                             request_id=request_id, forwarded_for=remote_ip)
            head = (f"GET {HOP_PATH} HTTP/1.1\r\nHost: {name}\r\nUpgrade: {HOP_UPGRADE}\r\nConnection: Upgrade\r\n"
                    f"X-Request-Id: {request_id}\r\nX-Forwarded-For: {remote_ip}\r\nX-Tun2g-Hop: {signature}\r\n"
                    f"X-Tun2g-Remote: {_format(address)}\r\n\r\n").encode()
            try:
                sock, _reader = BackendPool(node.url, connect_timeout=2.0).dial()
                sock.settimeout(self.settings.connect_timeout)
                sock.sendall(head + first_bytes)
                answer = _read_head(sock)
            except OSError as exc:
                cluster.unreachable(name, node, exc)
                log.warning("tcp_hop_failed", service=name, node=node.node_id, error=str(exc) or type(exc).__name__)
                continue
            if not answer[0].startswith(b"HTTP/1.1 101"):
                sock.close()
                log.warning("tcp_hop_refused", service=name, node=node.node_id, answer=answer[0][:64])
                continue
            sock.settimeout(None)
            if answer[1]:
                conn.sendall(answer[1])
            route = self._route_metrics(key)
            splice = Splice(conn, sock, idle_timeout=self.settings.idle_timeout,
                            on_bytes=lambda direction, count: self._on_bytes(route, direction, count))
            if route is not None:
                route.bytes_in += len(first_bytes)
            self.forwarding += 1
            try:
                end = splice.run()
            finally:
                self.forwarding -= 1
            self._count("forwarded", key)
            log.info("tcp_connection", key=name, remote=_format(address), node=node.node_id, end=end,
                     bytes_in=splice.moved["right"] + len(first_bytes), bytes_out=splice.moved["left"],
                     ms=round((time.monotonic() - started) * 1000))
            return True
        return False

    def serve_hop(self, head: RequestHead, sock, buffered: bytes, accept_hop) -> None:
        """A TCP connection another node spliced here (GET /_tun2g/tcp, Upgrade): served by a local tunnel only.

        `accept_hop(head)` checks the hop signature (tun2g.server.router.Router.accept_hop)."""
        try:
            hop = accept_hop(head)
        except HopRefused as exc:
            log.warning("tcp_hop_refused", reason=str(exc))
            hop = None
        kind, _, value = (head.host or "").partition(":")
        remote = _hop_remote(head.get("X-Tun2g-Remote"), head.get("X-Forwarded-For"))
        if hop is None or kind not in ("tcp", "tls") or (kind == "tcp" and not (value.isdigit() and len(value) <= 5)) \
                or (kind == "tls" and not 0 < len(value) <= MAX_NAME):
            sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            sock.close()
            return
        if kind == "tcp":
            port = int(value)
            key: int | str = port
            tunnels = self._by_port.get(port, ())
            preamble = Preamble(KIND_TCP, port=port, remote=remote)
        else:
            key, tunnels = value, self._by_name.get(value, ())
            preamble = Preamble(KIND_TLS, name=value, remote=remote)
        if not tunnels:
            sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            sock.close()
            return
        sock.sendall(HOP_SWITCHED)
        # The origin node applied the route's edge policy; this node still counts its cap.
        host, _, port_text = remote.rpartition(":")
        self._splice_to_tunnel(UpgradedStream(sock, buffered), (host.strip("[]"), port_text), key=key,
                               preamble=preamble, tunnels=tunnels, policy=AddressPolicy(), limit=None, hop=True)

    def _relay(self, conn, stream, preamble: Preamble, first_bytes: bytes, route: TCPRouteMetrics | None) -> tuple:
        """(outcome, how it ended, bytes in, bytes out) of one spliced connection."""
        try:
            stream.sendall(preamble.encode())
            stream.settimeout(self.settings.connect_timeout)
            status = stream.recv(1)
        except (OSError, SessionClosedError, StreamResetError):
            stream.close()
            return ("failed", "", 0, 0)
        if status != bytes((STATUS_CONNECTED,)):
            stream.close()
            name = STATUS_NAMES.get(status[0], "failed") if status else "failed"
            return ("local_" + name if name in ("refused", "unreachable") else "failed", "", 0, 0)
        if first_bytes:
            try:
                stream.sendall(first_bytes)
            except (OSError, SessionClosedError, StreamResetError):
                stream.close()
                return ("failed", "", 0, 0)
        if route is not None:
            route.bytes_in += len(first_bytes)
        splice = Splice(conn, stream, idle_timeout=self.settings.idle_timeout,
                        on_bytes=lambda direction, count: self._on_bytes(route, direction, count))
        if self.metrics is not None:
            self.metrics.tcp_open.value += 1
        try:
            end = splice.run()
        finally:
            if self.metrics is not None:
                self.metrics.tcp_open.value -= 1
        return ("served", end, splice.moved["right"] + len(first_bytes), splice.moved["left"])

    def _on_bytes(self, route: TCPRouteMetrics | None, direction: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.tcp_bytes["in" if direction == "right" else "out"].value += count
        if route is not None:
            if direction == "right":
                route.bytes_in += count
            else:
                route.bytes_out += count

    def _finish(self, conn, key, remote: str, outcome: str, **fields) -> None:
        """A public connection that will not be served: reset at once, counted and logged."""
        self._count(outcome, key)
        log.info("tcp_refused", key=key, remote=remote, outcome=outcome, **fields)
        reset(conn)

    def _count(self, outcome: str, key: int | str | None) -> None:
        if self.metrics is not None:
            self.metrics.tcp_connections[outcome].value += 1
            route = self._route_metrics(key)
            (route or self.metrics.tcp_unrouted).connections[outcome] += 1

    def _route_metrics(self, key: int | str | None) -> TCPRouteMetrics | None:
        """The per-route figures of `key` (a port, or a passthrough name served somewhere); None: no route."""
        if self.metrics is None or key is None:
            return None
        if isinstance(key, int):
            if key not in self._routes and key not in self._allocated:
                return None
            return self.metrics.tcp_route(registry_name(KIND_TCP, port=key))
        return self.metrics.tcp_route(registry_name(KIND_TLS, name=key)) if self._served_name(key) else None

    def _policy(self, route: TCPRoute) -> AddressPolicy:
        policy = self._policies.get(route)
        if policy is None:
            if len(self._policies) > 4 * len(self._routes) + 64:
                self._policies.clear()  # routes changed many times: forget the old ones
            policy = self._policies[route] = AddressPolicy.from_strings(route.allow, route.deny)
        return policy

    def close(self) -> None:
        self._closed = True
        self._watcher.kill(block=False)
        for port in list(self._listeners):
            self._close_listener(port)
        for server in self._servers:
            server.close()


def _hop_remote(remote: str | None, forwarded_for: str | None) -> str:
    """The public peer's address a hop names ("host:port"), bounded: anything else is its signed IP, or unknown."""
    if remote and len(remote) <= 64:
        host, _, port = remote.rpartition(":")
        if port.isdigit() and host and all(c in "0123456789abcdefABCDEF.:[]%" for c in host):
            return remote
    if forwarded_for and len(forwarded_for) <= 45 and all(c in "0123456789abcdefABCDEF.:" for c in forwarded_for):
        return f"[{forwarded_for}]:0" if ":" in forwarded_for else f"{forwarded_for}:0"
    return "unknown:0"


def _read_head(sock, limit: int = 8192) -> tuple[bytes, bytes]:
    """(the response head, the bytes read after it) from a hop connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        if not piece or len(data) > limit:
            raise ConnectionError("the node closed the hop before answering")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _least_loaded(tunnels) -> Tunnel | None:
    usable = [tunnel for tunnel in tunnels if tunnel.usable and not tunnel.is_closed]
    return min(usable, key=lambda tunnel: tunnel.in_flight) if usable else None


def _discard(table: dict, key, tunnel: Tunnel) -> None:
    peers = table.get(key)
    if peers is not None and tunnel in peers:
        peers.remove(tunnel)
        if not peers:
            del table[key]


def _format(address) -> str:
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
