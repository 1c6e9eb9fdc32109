"""Server: accepts tunnel clients, authenticates them, keeps them healthy and lends them to the Router.

Tunnel connections arrive from listeners (TCP, TLS, KCP) or from a front that
switched a public connection to the tunnel protocol (HTTP Upgrade); either way
`serve_tunnel` runs smux, the Auth (docs/protocol.md#control-stream) and the
health pings. Requests reach tunnels only through the Router and the request
pipeline, which `Server.pipeline` holds for every front.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import gevent
from gevent.event import Event
from gevent.pool import Group

from tun2g import pages, smux
from tun2g.backend import Backend
from tun2g.errors import AuthMismatch, ConfigurationError, NoSuchBackend
from tun2g.log import get_logger
from tun2g.cluster import ClusterNode
from tun2g.control import (LEAVING, LIVENESS_KEEPALIVE, LIVENESS_LEVEL, MAX_AUTH_SIZE, MOVE, PONG, TUN2G_LEVEL, Auth, AuthFormatError,
                           EventReader, JSONObjectReader, encode_event, encode_reply, parse_auth, verify_auth)
from tun2g.http import ExchangeTimeouts, RequestHead
from tun2g.http.client import Body, StreamedResponse
from tun2g.server.login_limit import LoginLimiter
from tun2g.server.node_list import NodeListPush, node_entries
from tun2g.metrics import Metrics, SessionSample
from tun2g.server.inspect import Inspector
from tun2g.server.pipeline import HTTPSPolicy, Pipeline, TrustedProxies
from tun2g.server.policy_step import PolicyBook
from tun2g.server.revocation import RevocationWatch
from tun2g.server.router import Router
from tun2g.server.self_service import DEFAULT_LIMIT, RetryLater, claim_name, public_url_template, public_urls
from tun2g.server.tunnel import Tunnel
from tun2g.server.tunnels import Tunnels
from tun2g.server.tcp_routes import TCPRoutes
from tun2g.storage import Storage, StorageError
from tun2g.storage.claims import check_claim_base, check_claim_limit
from tun2g.storage.routing import normalize_route_key
from tun2g.transport.base import ByteStream
from tun2g.transport.tcp import tune

log = get_logger(__name__)

# After this many consecutive accept() failures, wait before retrying, so a
# broken listener does not spin the CPU (the Go original loops hot).
ACCEPT_BACKOFF_MAX = 1.0
# While draining, how often the server looks whether what it waits for is done (a cadence, bounded by the grace).
DRAIN_POLL = 0.05
# While draining in a cluster, how long the tun2g clients told to move get to re-register elsewhere:
# one takes well under a second when another node is in service; past this there is none (the
# whole service stopping), and the requests in flight alone are waited for.
MOVE_WAIT = 5.0
# In a cluster, a drained node stays up until it has served nothing for this long: the other nodes hear that it
# drains (its heartbeats say so) and stop forwarding to it, and a request already on its way over a kept-alive
# connection is answered rather than cut by the close.
DRAIN_QUIET = 0.5


class ControlReader:
    """Reads a tun2g client's control messages (docs/protocol.md#control-messages) from event-loop
    callbacks (`smux.Stream.on_readable`), never waiting: what is there, then back to the loop.
    It stops at the end of the stream or at the first malformed message (the pings then go
    unanswered, and the liveness check ends the tunnel)."""

    def __init__(self, tunnel: Tunnel, on_event: Callable[[Tunnel, dict], None]) -> None:
        self._tunnel = tunnel
        self._on_event = on_event
        self._events = EventReader()

    def __call__(self) -> None:
        control = self._tunnel.control_stream
        try:
            while control.readable_now:
                data = control.recv(4096)
                if not data:
                    control.on_readable(None)
                    return
                for event in self._events.feed(data):
                    self._on_event(self._tunnel, event)
        except (OSError, smux.SessionClosedError, AuthFormatError) as exc:
            control.on_readable(None)
            log.info("control_stream_ended", error=str(exc) or type(exc).__name__, **self._tunnel.log_fields())


@dataclass
class ServerConfig:
    """How a Server behaves. Only `storage` is required."""

    storage: Storage
    smux_config: smux.Config | None = None
    auth_timeout: float = 10.0
    ping_interval: float = 5.0
    ping_timeout: float = 3.0
    # Clients with the liveness check ("tun2g": 2) get a control-stream ping instead (docs/protocol.md#liveness).
    liveness_interval: float = 15.0
    liveness_timeout: float = 10.0
    phi_threshold: float = 8.0
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Live tunnels one token / one user may hold on this process (None: no limit);
    # one more is refused with a retryable auth reply (docs/protocol.md#auth-reply).
    max_sessions_per_token: int | None = 16
    max_sessions_per_user: int | None = 64
    # The whole smux receive budget of a session before its Auth is verified.
    pre_auth_receive_buffer: int = smux.config.PRE_AUTH_RECEIVE_BUFFER
    # The public URL a client's domain is served at, told in the auth reply: "https://{domain}"
    # (None: the reply names none, and the client shows http://DOMAIN).
    public_url: str | None = None
    # Self-service names (docs/routing.md#self-service): a token may claim "<random>.BASE" (None: it may
    # not), at most `self_service_limit` per user; a Go client never asks.
    self_service_domain: str | None = None
    self_service_limit: int = DEFAULT_LIMIT

    def __post_init__(self):
        if self.storage is None:
            raise ConfigurationError("ServerConfig needs a storage (e.g. tun2g.storage.open_storage())")
        if self.smux_config is None:
            self.smux_config = smux.Config.tun2_server()
        self.smux_config.validate()
        for name in ("auth_timeout", "ping_interval", "ping_timeout", "pre_auth_receive_buffer", "liveness_interval",
                     "liveness_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"ServerConfig.{name} must be positive")
        for name in ("max_sessions_per_token", "max_sessions_per_user"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"ServerConfig.{name} must be at least 1, or None for no limit")
        try:
            if self.public_url is not None:
                self.public_url = public_url_template(self.public_url)
            if self.self_service_domain is not None:
                self.self_service_domain = check_claim_base(self.self_service_domain)
            check_claim_limit(self.self_service_limit)
        except (ValueError, StorageError) as exc:
            raise ConfigurationError(f"ServerConfig: {exc}") from None


class Server:
    """Routes public HTTP traffic to tunnel clients (Go tun2's Server)."""

    def __init__(self, config: ServerConfig, *, tunnels: Tunnels | None = None, cluster: ClusterNode | None = None,
                 access_log: bool = True, trusted_proxies: Iterable[str] = (),
                 timeouts: ExchangeTimeouts | None = None, metrics: Metrics | None = None,
                 inspector: Inspector | None = None, policies: PolicyBook | None = None,
                 https: HTTPSPolicy | None = None, acme_challenge: Callable[[str], str | None] | None = None,
                 tcp: TCPRoutes | None = None):
        """`cluster`: this process's ClusterNode when it is one node of many (built over the same `tunnels`);
        `trusted_proxies`: CIDRs of balancers in front whose X-Forwarded-* headers are believed;
        `timeouts`: bounds on each exchange's waits (None: unbounded);
        `metrics`: what this node counts (None: nothing); `inspector`: captures of inspected routes (None: none);
        `policies`: the routes' edge policies (default: a book with local rate limits, following the store);
        `https`: the redirect to HTTPS and HSTS rules (None: neither);
        `acme_challenge`: pending ACME HTTP-01 answers by request target (None: none answered);
        `tcp`: TCP routes and TLS passthrough (None: a client announcing TCP services is refused)."""
        if not isinstance(config, ServerConfig):
            raise ConfigurationError("Server needs a ServerConfig, got %r" % (config,))
        self.config = config
        self.storage = config.storage
        self.tunnels = Tunnels() if tunnels is None else tunnels
        self.router = Router(self.tunnels, cluster)
        # The live nodes' tunnel addresses, listed in every auth reply for multi-homed clients.
        self._tunnel_nodes = None if cluster is None else cluster.registry.tunnel_nodes
        self.metrics = metrics
        self.inspector = inspector
        self.policies = PolicyBook() if policies is None else policies
        self.policies.start(self.storage)
        self.tcp = tcp
        self.pipeline = Pipeline(self.router, access_log=access_log, trusted_proxies=TrustedProxies(trusted_proxies),
                                 timeouts=timeouts, metrics=metrics, inspector=inspector, policies=self.policies,
                                 https=https, acme_challenge=acme_challenge)
        self.login_limiter = LoginLimiter()  # failed logins per source address (docs/protocol.md#auth-limits)
        if metrics is not None:
            metrics.watch(self._session_samples)
        self._tasks = Group()
        self._closed = Event()
        self.draining = False  # stopping: the health check says 503 so balancers send no more
        self._listeners: list = []
        self.revocations = RevocationWatch(self.storage, lambda: self.tunnels, self._revoked,
                                           on_revision=self.reload_routes)
        self._tasks.spawn(self.revocations.run)
        if cluster is not None:  # tell tun2g clients when nodes join or leave (tun2g.server.node_list)
            self.node_list = NodeListPush(lambda: self.tunnels, cluster.registry.tunnel_nodes)
            cluster.registry.on_nodes_changed = self.node_list.changed
            self._tasks.spawn(self.node_list.run)
        # Live tunnels per token and per user (the session caps); see _admit / _forget.
        self._per_token: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._counted: set[Tunnel] = set()
        # docs/protocol.md#memory-bounds: a tun2 client never opens streams, and until its
        # Auth is verified a session may hold only the pre-auth budget.
        smux_config = config.smux_config or smux.Config.tun2_server()
        self._session_config = smux_config.copy(
            accept_peer_streams=False,
            initial_receive_buffer=min(config.pre_auth_receive_buffer, smux_config.max_receive_buffer))

    # -- tunnel side -------------------------------------------------------

    def listen(self, listener, secure=None, proto: str = "tcp") -> None:
        """Accept tunnel clients on `listener` until the server closes (blocks).

        `secure(conn)` (for example a TLS handshake) runs in each connection's
        own greenlet, so a stalled handshake never holds up the others. The
        listener may return `(sock, address)` like a socket, or a connection.
        """
        self._listeners.append(listener)
        failures = 0
        while not self._closed.is_set():
            try:
                accepted = listener.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                failures += 1
                delay = min(ACCEPT_BACKOFF_MAX, 0.01 * 2 ** min(failures, 7))
                log.warning("accept_failed", error=str(exc), retry_in=delay)
                self._closed.wait(delay)
                continue
            failures = 0
            conn = accepted[0] if isinstance(accepted, tuple) else accepted
            tune(conn)
            self._tasks.spawn(self._secure_and_serve, conn, secure, proto)

    def _secure_and_serve(self, conn, secure, proto: str) -> None:
        if secure is not None:
            try:
                conn = secure(conn)
            except (OSError, socket.timeout, ValueError) as exc:
                log.info("tls_handshake_failed", remote=_peer(conn), proto=proto,
                         error=str(exc) or type(exc).__name__)
                conn.close()
                return
        self.serve_tunnel(conn, proto=proto, detach=True)

    def serve_tunnel(self, sock: ByteStream, proto: str = "tcp", remote: str | None = None,
                     detach: bool = False) -> None:
        """Run one tunnel connection: smux, auth, registration, pings; returns when it ends (or, with
        `detach`, once it runs without this greenlet).

        `remote`: the client's address when the peer is a proxy that said it (else the peer's).
        `detach`: for a connection this server owns (its tunnel listener), return once a tun2g client
        with the liveness check is registered: its control messages are read from event-loop
        callbacks and its clean-up runs when the session closes, so an idle tunnel holds no greenlet."""
        remote = remote or _peer(sock)
        try:
            session = smux.Session(sock, client=False, config=self._session_config)
        except Exception as exc:  # a transport that cannot even start a session
            log.warning("session_failed", remote=remote, error=str(exc))
            sock.close()
            return
        tunnel = None
        detached = False
        try:
            control = session.open_stream()
            tunnel = self._authenticate(session, control, remote, proto)
            if tunnel is None:
                return
            if tunnel.auth.tun2g is not None and tunnel.auth.tun2g >= LIVENESS_LEVEL:
                tunnel.start_liveness(self.config.liveness_interval, self.config.liveness_timeout, self._dead)
                if detach:  # its clean-up (_forget) runs when the session closes: registered by _authenticate
                    detached = True
                    return
                session.wait_closed()
            else:
                ping_task = gevent.spawn(self._health_loop, tunnel)
                session.wait_closed()
                ping_task.kill()
        finally:
            if not detached:
                session.close()
                if tunnel is not None:
                    self._forget(tunnel)

    def _authenticate(self, session: smux.Session, control: smux.Stream, remote: str, proto: str) -> Tunnel | None:
        """Read and verify the Auth within the deadline; register on success."""
        try:
            auth = self._read_auth(control)
            wait = self.login_limiter.allow(remote)
            if wait:  # too many failures from there: refused unchecked, so the reply reaches the client (logged)
                _try_send(control, encode_reply(False, error=f"too many failed logins from your address; retry in "
                                                             f"{max(1, round(wait))} s", retry=True))
                return None
            revision = self.revocations.revision  # before the check: a revocation during it is caught later
            if auth.claim:
                auth = self._claim(auth, remote, proto)
            user = verify_auth(self.storage, auth, normalize_route_key)
        except RetryLater as exc:
            log.warning("auth_rejected", remote=remote, proto=proto, reason=str(exc))
            _try_send(control, encode_reply(False, error=str(exc), retry=True))
            return None
        except (AuthMismatch, AuthFormatError) as exc:
            self.login_limiter.failed(remote)
            reason = getattr(exc, "reason", str(exc))
            self._count_auth("malformed" if isinstance(exc, AuthFormatError) else
                             "invalid_token" if reason == "invalid token" else "rejected")
            log.warning("auth_rejected", remote=remote, proto=proto, reason=getattr(exc, "log_reason", reason))
            _try_send(control, encode_reply(False, error=reason))
            return None
        except StorageError as exc:
            self._count_auth("storage_error")
            # The details name internal hosts: they go to the log, not to the client.
            log.error("auth_storage_failed", remote=remote, proto=proto, error=str(exc))
            _try_send(control, encode_reply(False, error="the server cannot check tokens right now; "
                                                         "try again later", retry=True))
            return None
        except (OSError, smux.SessionClosedError, socket.timeout) as exc:
            self._count_auth("aborted")
            log.info("auth_aborted", remote=remote, proto=proto, error=str(exc) or type(exc).__name__)
            return None
        if self.draining:  # a tunnel by Upgrade on a kept-alive public connection: it belongs elsewhere
            _try_send(control, encode_reply(False, error="this server is stopping; connect again", retry=True))
            return None
        refusal = self._session_cap_refusal(auth.token, user)
        if refusal is not None:
            log.warning("auth_rejected", remote=remote, proto=proto, reason=refusal, user=user)
            _try_send(control, encode_reply(False, error=refusal, retry=True))
            return None
        grant = None
        if auth.tcp:
            try:
                if self.tcp is None:
                    raise AuthMismatch("this server serves no TCP routes")
                grant = self.tcp.admit(auth.tcp, user)
            except AuthMismatch as exc:
                log.warning("auth_rejected", remote=remote, proto=proto, reason=exc.reason, user=user)
                self._count_auth("rejected")
                _try_send(control, encode_reply(False, error=exc.reason))
                return None
        extra: dict[str, object] = {}
        if grant is not None:
            extra["tcp"] = grant.as_json()
        if auth.tun2g is not None and auth.tun2g >= TUN2G_LEVEL and session.config.version is None \
                and session.version == 1:
            # docs/protocol.md#version-negotiation: a tun2g client follows us to v2. Before the
            # registration, so every request stream is opened in v2; the reply below is the
            # first v2 frame it sees (or a NOP / SYN queued earlier and written after this).
            session.upgrade()
        if session.version == 2:
            extra["smux"] = 2
        liveness = auth.tun2g is not None and auth.tun2g >= LIVENESS_LEVEL
        if liveness:
            extra["liveness"] = {"interval": self.config.liveness_interval, "timeout": self.config.liveness_timeout}
            if not session.config.keepalive_disabled:
                session.set_keepalive(*LIVENESS_KEEPALIVE)
        session.release_receive_buffer()  # the pre-auth budget (smux.Config.initial_receive_buffer) is over
        speaks_events = auth.tun2g is not None and auth.tun2g >= TUN2G_LEVEL
        if not speaks_events:
            # A Go client's control stream carries nothing after the Auth: drop whatever still arrives on it.
            control.shutdown(socket.SHUT_RD)
        domain = normalize_route_key(auth.domain)
        routes = tuple(key for key in dict.fromkeys(map(normalize_route_key, auth.routes)) if key != domain)
        auth = Auth(token=auth.token, domain=domain, tun2g=auth.tun2g, routes=routes, instance=auth.instance,
                    tcp=auth.tcp)
        tunnel = Tunnel(session, control, auth, user, proto=proto, host=remote, node=self.config.node_id,
                        phi_threshold=self.config.phi_threshold,
                        ping_interval=self.config.liveness_interval if liveness else self.config.ping_interval)
        tunnel.revision = revision
        self.revocations.registered(tunnel)
        self._per_token[auth.token] += 1
        self._per_user[user] += 1
        self._counted.add(tunnel)
        self._count_auth("ok")
        if not all(map(self.router.knows, tunnel.routes)):
            self.reload_routes()  # a route added since the last revision tick: route to it at once
        self.router.register(tunnel)
        self.router.take_over(tunnel)  # after: the new session serves before the old ones close
        if grant is not None and self.tcp is not None:
            self.tcp.register(tunnel, grant)
        session.add_close_callback(lambda _session: self._forget(tunnel))
        if routes:
            extra["routes"] = list(tunnel.routes)
        if self._tunnel_nodes is not None:  # multi-homed clients hold sessions on several of these
            extra["nodes"] = node_entries(self._tunnel_nodes())
        if self.config.public_url:
            extra["urls"] = public_urls(self.config.public_url, tunnel.routes)
        _try_send(control, encode_reply(True, backend=tunnel.id, domain=tunnel.domain, node=self.config.node_id,
                                        **extra))
        log.info("registered", smux=session.version, **tunnel.log_fields())
        if speaks_events:
            control.settimeout(0)  # read only what is there: see ControlReader
            control.on_readable(ControlReader(tunnel, self._on_control_event))
        return tunnel

    def _claim(self, auth: Auth, remote: str, proto: str) -> Auth:
        """The Auth for a fresh self-service name (docs/routing.md#self-service); see claim_name."""
        if self.draining:
            raise RetryLater("this server is stopping; connect again")
        claimed, route = claim_name(self.storage, auth, self.config.self_service_domain,
                                    self.config.self_service_limit, self._session_cap_refusal)
        self.router.add_route(route)  # known at once: no reload of every route for a new name
        log.info("name_claimed", remote=remote, proto=proto, domain=claimed.domain)
        return claimed

    def reload_routes(self) -> None:
        """Load the stored routes into the Router's table (on every store revision and for new routes)."""
        try:
            routes = self.storage.list_routes()
        except StorageError as exc:
            log.warning("routes_unavailable", error=str(exc), effect="the previous routing table stays in force")
            return
        self.router.load_routes(routes)
        if self.tcp is not None:
            self.tcp.recheck(routes)  # a passthrough name whose route went away is no longer served

    def _on_control_event(self, tunnel: Tunnel, event: dict) -> None:
        """One control message of a tun2g client, from an event-loop callback (ControlReader): never blocks."""
        if event["event"] == PONG:
            tunnel.pong(event)
        elif event["event"] == LEAVING and not tunnel.leaving:
            self._let_leave(tunnel)

    def _let_leave(self, tunnel: Tunnel) -> None:
        """The client asked for no new requests: deregister now, close once those in flight are done."""
        tunnel.leaving = True
        self.router.deregister(tunnel)
        log.info("tunnel_leaving", in_flight=tunnel.in_flight, **tunnel.log_fields())
        self._tasks.spawn(self._close_when_idle, tunnel)

    def _close_when_idle(self, tunnel: Tunnel) -> None:
        while tunnel.in_flight and not tunnel.is_closed:
            self._closed.wait(DRAIN_POLL)
        tunnel.close()

    def _session_cap_refusal(self, token: str, user: str) -> str | None:
        """Why one more tunnel for this token or user is refused (None: it is not)."""
        per_token, per_user = self.config.max_sessions_per_token, self.config.max_sessions_per_user
        if per_token is not None and self._per_token[token] >= per_token:
            return (f"too many tunnels for this token: {self._per_token[token]} are connected to this server, "
                    f"which allows {per_token} per token; close one (or wait for a dead one to time out)")
        if per_user is not None and self._per_user[user] >= per_user:
            return (f"too many tunnels for this user: {self._per_user[user]} are connected to this server, "
                    f"which allows {per_user} per user; close one (or wait for a dead one to time out)")
        return None

    def _count_auth(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.auth[outcome].inc()

    def _session_samples(self) -> list[SessionSample]:
        """This node's tunnels as the metrics collector reads them at scrape time."""
        return [SessionSample(t.domain, t.session.num_streams, t.session.buffered_bytes, t.in_flight)
                for t in self.tunnels]

    def _read_auth(self, control: smux.Stream) -> Auth:
        """One JSON object from the control stream, bounded in time and size."""
        control.settimeout(self.config.auth_timeout)
        reader = JSONObjectReader(MAX_AUTH_SIZE)
        deadline = time.monotonic() + self.config.auth_timeout
        while True:
            data = control.recv(4096)
            if not data:
                raise AuthFormatError("the client closed the control stream before sending its Auth")
            obj = reader.feed(data)
            if obj is not None:
                control.settimeout(None)
                return parse_auth(obj)
            control.settimeout(max(0.001, deadline - time.monotonic()))

    def _health_loop(self, tunnel: Tunnel) -> None:
        """Ping every interval; a failed ping closes the tunnel."""
        while not tunnel.is_closed:
            gevent.sleep(self.config.ping_interval)  # the ping cadence itself, not synchronisation
            try:
                tunnel.ping(self.config.ping_timeout)
            except Exception as exc:
                log.warning("ping_failed", error=str(exc), phi=round(tunnel.phi, 2), **tunnel.log_fields())
                tunnel.close()
                return

    def _dead(self, tunnel: Tunnel, reason: str) -> None:
        """The liveness check failed (docs/protocol.md#liveness): close the tunnel (it is deregistered)."""
        log.warning("ping_failed", error=reason, phi=round(tunnel.phi, 2), **tunnel.log_fields())
        gevent.spawn(tunnel.close)  # closing flushes for up to a second: never in the shared timer's greenlet

    def _revoked(self, tunnel: Tunnel, reason: str) -> None:
        """Its token was revoked or its route removed: disconnect it (the client reconnects and is refused)."""
        tunnel.close()
        self.router.deregister(tunnel)

    def _forget(self, tunnel: Tunnel) -> None:
        if tunnel in self._counted:  # once per tunnel, however it was deregistered
            self._counted.discard(tunnel)
            for counter, key in ((self._per_token, tunnel.auth.token), (self._per_user, tunnel.user)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
        if self.tcp is not None:
            self.tcp.deregister(tunnel)
        if self.router.deregister(tunnel):
            log.info("deregistered", reason=_reason(tunnel.session), **tunnel.log_fields())

    # -- requests ----------------------------------------------------------------------

    def round_trip(self, head: RequestHead, body: Body = None) -> StreamedResponse:
        """Send one request through the tunnel for its Host (Go's RoundTrip); returns a streamed response."""
        return self.pipeline.round_trip(head, body)

    def adapter(self):
        """A requests transport adapter: `session.mount("http://", server.adapter())`."""
        from tun2g.server.roundtrip import TunnelAdapter

        return TunnelAdapter(self)

    # -- admin -------------------------------------------------------------

    def get_all_backends(self) -> list[Backend]:
        """This process's backends, and in a cluster every other live node's too (see Backend.node)."""
        return self.router.backends()

    def get_backends_for_domain(self, domain: str) -> list[Backend]:
        """The backends serving a route key (a domain, a wildcard, a host with a path)."""
        domain = normalize_route_key(domain)
        return [b for b in self.get_all_backends() if b.serves(domain)]

    def get_backends_for_user(self, user: str) -> list[Backend]:
        return [b for b in self.get_all_backends() if b.user == user]

    def kill_backend(self, backend_id: str) -> None:
        """Disconnect one backend at once; raises NoSuchBackend if unknown."""
        self.router.kill(backend_id)

    def health(self) -> pages.Page:
        """This node's health answer (GET /_tun2g/health): 200, or 503 while it is stopping.

        Answered by this process's event loop, so a frozen or overloaded node
        does not answer at all: a balancer's timeout sees that.
        """
        return pages.node_health(self.config.node_id, self.draining or self.closed, len(self.tunnels))

    def drain(self, grace: float, busy: Callable[[], int] = lambda: 0) -> None:
        """Stop taking tunnels, tell tun2g clients to move, and wait (at most ``grace`` s) for the work in flight.

        ``busy()``: the public requests the fronts are still serving. In a cluster the
        wait also covers the tun2g clients re-registering elsewhere (each says LEAVING
        here once it has); alone, there is nowhere to move to, so only requests count.
        The caller then closes the server (``close``).
        """
        self.draining = True
        for listener in self._listeners:
            try:
                listener.close()
            except OSError:
                pass
        self.router.draining = True
        if self.router.cluster is not None:
            self.router.cluster.drain()
        movers = [tunnel for tunnel in self.tunnels if tunnel.auth.tun2g]
        for tunnel in movers:
            tunnel.moving = True
            _try_send(tunnel.control_stream, encode_event(MOVE, grace=grace))
        log.info("draining", grace_period=grace, tunnels=len(self.tunnels), told_to_move=len(movers))
        started = time.monotonic()
        deadline = started + grace
        in_cluster = self.router.cluster is not None
        last_busy = started
        while time.monotonic() < deadline:
            moving = in_cluster and time.monotonic() - started < MOVE_WAIT
            staying = [t for t in movers if not t.leaving and not t.is_closed] if moving else []
            in_flight = sum(t.in_flight for t in self.tunnels) + busy()
            if in_flight:
                last_busy = time.monotonic()
            quiet = not in_cluster or time.monotonic() - last_busy >= DRAIN_QUIET
            if not staying and not in_flight and quiet:
                log.info("drained")
                return
            self._closed.wait(DRAIN_POLL)
        log.warning("grace_period_over", grace_period=grace,
                    in_flight=sum(t.in_flight for t in self.tunnels) + busy())

    def close(self) -> None:
        """Stop accepting, close every connection and wake `wait()`."""
        self.draining = True
        self._closed.set()
        for listener in self._listeners:
            try:
                listener.close()
            except OSError:
                pass
        if self.tcp is not None:
            self.tcp.close()
        self.router.close()  # leaves the cluster first: other nodes stop forwarding here at once
        self._tasks.kill(block=False)
        if self.inspector is not None:
            self.inspector.close()
        self.policies.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `close()` is called."""
        return self._closed.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


def _peer(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return "unknown"


def _reason(session) -> str:
    reason = getattr(session, "close_reason", None)
    return str(reason) if reason else "closed"


def _try_send(stream, data: bytes) -> None:
    try:
        stream.sendall(data)
    except Exception:
        pass  # the reply is a courtesy; the peer may already be gone



