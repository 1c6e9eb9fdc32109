"""Server: accepts tunnel clients, authenticates them and routes requests to them."""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass, field

import gevent
from gevent.event import Event
from gevent.pool import Group

from tun2g import smux
from tun2g.errors import AuthMismatch, ConfigurationError, NoSuchBackend
from tun2g.log import get_logger
from tun2g.protocol import MAX_AUTH_SIZE, AuthFormatError, JSONObjectReader, encode_reply, parse_auth, verify_auth
from tun2g.registry import LocalRegistry
from tun2g.storage import StorageError, normalize_domain
from tun2g.transport.tcp import tune

log = get_logger(__name__)

# After this many consecutive accept() failures, wait before retrying, so a
# broken listener does not spin the CPU (the Go original loops hot).
ACCEPT_BACKOFF_MAX = 1.0


@dataclass
class ServerConfig:
    """How a Server behaves. Only `storage` is required."""

    storage: object
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

    def __init__(self, config: ServerConfig):
        if not isinstance(config, ServerConfig):
            raise ConfigurationError("Server needs a ServerConfig, got %r" % (config,))
        self.config = config
        self.storage = config.storage
        self.registry = LocalRegistry()
        # A tun2g.cluster.Cluster when this process is one node of many (set by Cluster itself):
        # consulted only where the local registry has no answer.
        self.cluster = None
        self._tasks = Group()
        self._closed = Event()
        self._listeners = []

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
            self._tasks.spawn(self._serve_tunnel_socket, conn, secure, proto)

    def _serve_tunnel_socket(self, conn, secure, proto: str) -> None:
        if secure is not None:
            try:
                conn = secure(conn)
            except (OSError, socket.timeout, ValueError) as exc:
                log.info("tls_handshake_failed", remote=_peer(conn), proto=proto,
                         error=str(exc) or type(exc).__name__)
                conn.close()
                return
        self.handle_conn(conn, proto=proto)

    def handle_conn(self, sock, proto: str = "tcp") -> None:
        """Run one tunnel connection: smux, auth, registration; returns when it ends."""
        remote = _peer(sock)
        try:
            session = smux.Session(sock, client=False, config=self.config.smux_config)
        except Exception as exc:  # a transport that cannot even start a session
            log.warning("session_failed", remote=remote, error=str(exc))
            sock.close()
            return
        connection = None
        try:
            control = session.open_stream()
            connection = self._authenticate(session, control, remote, proto)
            if connection is None:
                return
            ping_task = gevent.spawn(self._health_loop, connection)
            session.wait_closed()
            ping_task.kill()
        finally:
            session.close()
            if connection is not None and self.registry.discard(connection):
                self._registry_changed()
                log.info("deregistered", reason=_reason(session), **connection.log_fields())

    def _authenticate(self, session, control, remote: str, proto: str):
        """Read and verify the Auth within the deadline; register on success."""
        from tun2g.connection import Connection

        try:
            auth = self._read_auth(control)
            user = verify_auth(self.storage, auth, normalize_domain)
        except (AuthMismatch, AuthFormatError) as exc:
            reason = getattr(exc, "reason", str(exc))
            log.warning("auth_rejected", remote=remote, proto=proto, reason=reason)
            _try_send(control, encode_reply(False, error=reason))
            return None
        except StorageError as exc:
            # The details name internal hosts: they go to the log, not to the client.
            log.error("auth_storage_failed", remote=remote, proto=proto, error=str(exc))
            _try_send(control, encode_reply(False, error="the server cannot check tokens right now; "
                                                         "try again later", retry=True))
            return None
        except (OSError, smux.SessionClosedError, socket.timeout) as exc:
            log.info("auth_aborted", remote=remote, proto=proto, error=str(exc) or type(exc).__name__)
            return None
        auth = type(auth)(token=auth.token, domain=normalize_domain(auth.domain))
        connection = Connection(session, control, auth, user, proto=proto, host=remote,
                                node=self.config.node_id, phi_threshold=self.config.phi_threshold,
                                ping_interval=self.config.ping_interval)
        self.registry.add(connection)
        self._registry_changed()
        session.add_close_callback(lambda _session: self._forget(connection))
        _try_send(control, encode_reply(True, backend=connection.id, domain=connection.domain,
                                        node=self.config.node_id))
        log.info("registered", **connection.log_fields())
        return connection

    def _read_auth(self, control):
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

    def _health_loop(self, connection) -> None:
        """Ping every interval; a failed ping retires the connection."""
        while not connection.is_closed:
            gevent.sleep(self.config.ping_interval)  # the ping cadence itself, not synchronisation
            try:
                connection.ping(self.config.ping_timeout)
            except Exception as exc:
                log.warning("ping_failed", error=str(exc), phi=round(connection.phi, 2), **connection.log_fields())
                connection.close()
                return

    def _forget(self, connection) -> None:
        connection.usable = False
        if self.registry.discard(connection):
            self._registry_changed()
            log.info("deregistered", reason=_reason(connection.session), **connection.log_fields())

    def _registry_changed(self) -> None:
        if self.cluster is not None:
            self.cluster.changed()

    # -- routing -----------------------------------------------------------

    def route(self, host: str, exclude=()):
        """The connection that should serve a request for `host`, or None."""
        domain = routing_key(host or "")
        return None if domain is None else self.registry.pick(domain, exclude)

    def retire(self, connection, reason: str) -> None:
        """Drop a connection whose session failed under a request."""
        log.warning("backend_failed", reason=reason, **connection.log_fields())
        connection.close()
        self._forget(connection)

    def round_trip(self, head, body=None):
        """Send one request through the tunnel for its Host; returns a streaming TunnelResponse."""
        from tun2g.roundtrip import round_trip

        return round_trip(self, head, body)

    def adapter(self):
        """A requests transport adapter: `session.mount("http://", server.adapter())`."""
        from tun2g.adapter import TunnelAdapter

        return TunnelAdapter(self)

    # -- admin -------------------------------------------------------------

    def get_all_backends(self) -> list:
        """This process's backends, and in a cluster every other live node's too (see Backend.node)."""
        local = [connection.backend() for connection in self.registry]
        return local + self.cluster.remote_backends() if self.cluster is not None else local

    def get_backends_for_domain(self, domain: str) -> list:
        domain = normalize_domain(domain)
        return [b for b in self.get_all_backends() if b.domain == domain]

    def get_backends_for_user(self, user: str) -> list:
        return [b for b in self.get_all_backends() if b.user == user]

    def kill_backend(self, backend_id: str) -> None:
        """Disconnect one backend at once; raises NoSuchBackend if unknown."""
        try:
            connection = self.registry.get(backend_id)
        except NoSuchBackend:
            if self.cluster is None:
                raise
            self.cluster.kill(backend_id)  # the node holding it disconnects it (pub/sub)
            return
        log.info("killed", **connection.log_fields())
        connection.close()
        self._forget(connection)

    def close(self) -> None:
        """Stop accepting, close every connection and wake `wait()`."""
        self._closed.set()
        if self.cluster is not None:
            self.cluster.close()  # leave the cluster first: other nodes stop forwarding here at once
        for listener in self._listeners:
            try:
                listener.close()
            except OSError:
                pass
        for connection in self.registry:
            connection.close()
        self._tasks.kill(block=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `close()` is called."""
        return self._closed.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


@functools.lru_cache(maxsize=4096)
def routing_key(host: str) -> str | None:
    """The domain a Host header routes to (cached: hosts repeat, validation is not free)."""
    try:
        return normalize_domain(host)
    except StorageError:
        return None


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


__all__ = ["Server", "ServerConfig", "NoSuchBackend"]
