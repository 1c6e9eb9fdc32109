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
from dataclasses import dataclass, field
from typing import Iterable

import gevent
from gevent.event import Event
from gevent.pool import Group

from tun2g import pages, smux
from tun2g.backend import Backend
from tun2g.errors import AuthMismatch, ConfigurationError, NoSuchBackend
from tun2g.log import get_logger
from tun2g.cluster import ClusterNode
from tun2g.control import (MAX_AUTH_SIZE, Auth, AuthFormatError, JSONObjectReader, encode_reply, parse_auth,
                           verify_auth)
from tun2g.http import ExchangeTimeouts, RequestHead
from tun2g.http.client import Body, StreamedResponse
from tun2g.metrics import Metrics, SessionSample
from tun2g.server.inspect import Inspector
from tun2g.server.pipeline import Pipeline, TrustedProxies
from tun2g.server.revocation import RevocationWatch
from tun2g.server.router import Router
from tun2g.server.tunnel import Tunnel
from tun2g.server.tunnels import Tunnels
from tun2g.storage import Storage, StorageError, normalize_domain
from tun2g.transport.base import ByteStream
from tun2g.transport.tcp import tune

log = get_logger(__name__)

# After this many consecutive accept() failures, wait before retrying, so a
# broken listener does not spin the CPU (the Go original loops hot).
ACCEPT_BACKOFF_MAX = 1.0


@dataclass
class ServerConfig:
    """How a Server behaves. Only `storage` is required."""

    storage: Storage
    smux_config: smux.Config | None = None
    auth_timeout: float = 10.0
    ping_interval: float = 5.0
    ping_timeout: float = 3.0
    phi_threshold: float = 8.0
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self):
        if self.storage is None:
            raise ConfigurationError("ServerConfig needs a storage (e.g. tun2g.storage.open_storage())")
        if self.smux_config is None:
            self.smux_config = smux.Config.tun2_server()
        self.smux_config.validate()
        for name in ("auth_timeout", "ping_interval", "ping_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"ServerConfig.{name} must be positive")


class Server:
    """Routes public HTTP traffic to tunnel clients (Go tun2's Server)."""

    def __init__(self, config: ServerConfig, *, tunnels: Tunnels | None = None, cluster: ClusterNode | None = None,
                 access_log: bool = True, trusted_proxies: Iterable[str] = (),
                 timeouts: ExchangeTimeouts | None = None, metrics: Metrics | None = None,
                 inspector: Inspector | None = None):
        """`cluster`: this process's ClusterNode when it is one node of many (built over the same `tunnels`);
        `trusted_proxies`: CIDRs of balancers in front whose X-Forwarded-* headers are believed;
        `timeouts`: bounds on each exchange's waits (None: unbounded);
        `metrics`: what this node counts (None: nothing); `inspector`: captures of inspected routes (None: none)."""
        if not isinstance(config, ServerConfig):
            raise ConfigurationError("Server needs a ServerConfig, got %r" % (config,))
        self.config = config
        self.storage = config.storage
        self.tunnels = Tunnels() if tunnels is None else tunnels
        self.router = Router(self.tunnels, cluster)
        self.metrics = metrics
        self.inspector = inspector
        self.pipeline = Pipeline(self.router, access_log=access_log, trusted_proxies=TrustedProxies(trusted_proxies),
                                 timeouts=timeouts, metrics=metrics, inspector=inspector)
        if metrics is not None:
            metrics.watch(self._session_samples)
        self._tasks = Group()
        self._closed = Event()
        self.draining = False  # stopping: the health check says 503 so balancers send no more
        self._listeners: list = []
        self.revocations = RevocationWatch(self.storage, lambda: self.tunnels, self._revoked)
        self._tasks.spawn(self.revocations.run)

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
        self.serve_tunnel(conn, proto=proto)

    def serve_tunnel(self, sock: ByteStream, proto: str = "tcp") -> None:
        """Run one tunnel connection: smux, auth, registration, pings; returns when it ends."""
        remote = _peer(sock)
        try:
            session = smux.Session(sock, client=False, config=self.config.smux_config)
        except Exception as exc:  # a transport that cannot even start a session
            log.warning("session_failed", remote=remote, error=str(exc))
            sock.close()
            return
        tunnel = None
        try:
            control = session.open_stream()
            tunnel = self._authenticate(session, control, remote, proto)
            if tunnel is None:
                return
            ping_task = gevent.spawn(self._health_loop, tunnel)
            session.wait_closed()
            ping_task.kill()
        finally:
            session.close()
            if tunnel is not None:
                self._forget(tunnel)

    def _authenticate(self, session: smux.Session, control: smux.Stream, remote: str, proto: str) -> Tunnel | None:
        """Read and verify the Auth within the deadline; register on success."""
        try:
            auth = self._read_auth(control)
            revision = self.revocations.revision  # before the check: a revocation during it is caught later
            user = verify_auth(self.storage, auth, normalize_domain)
        except (AuthMismatch, AuthFormatError) as exc:
            reason = getattr(exc, "reason", str(exc))
            self._count_auth("malformed" if isinstance(exc, AuthFormatError) else
                             "invalid_token" if reason.startswith("unknown or revoked token") else "rejected")
            log.warning("auth_rejected", remote=remote, proto=proto, reason=reason)
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
        auth = Auth(token=auth.token, domain=normalize_domain(auth.domain))
        tunnel = Tunnel(session, control, auth, user, proto=proto, host=remote, node=self.config.node_id,
                        phi_threshold=self.config.phi_threshold, ping_interval=self.config.ping_interval)
        tunnel.revision = revision
        self._count_auth("ok")
        self.router.register(tunnel)
        session.add_close_callback(lambda _session: self._forget(tunnel))
        _try_send(control, encode_reply(True, backend=tunnel.id, domain=tunnel.domain, node=self.config.node_id))
        log.info("registered", **tunnel.log_fields())
        return tunnel

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

    def _revoked(self, tunnel: Tunnel, reason: str) -> None:
        """Its token was revoked or its route removed: disconnect it (the client reconnects and is refused)."""
        tunnel.close()
        self.router.deregister(tunnel)

    def _forget(self, tunnel: Tunnel) -> None:
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
        domain = normalize_domain(domain)
        return [b for b in self.get_all_backends() if b.domain == domain]

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

    def close(self) -> None:
        """Stop accepting, close every connection and wake `wait()`."""
        self.draining = True
        self._closed.set()
        for listener in self._listeners:
            try:
                listener.close()
            except OSError:
                pass
        self.router.close()  # leaves the cluster first: other nodes stop forwarding here at once
        self._tasks.kill(block=False)
        if self.inspector is not None:
            self.inspector.close()

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



