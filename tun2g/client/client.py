"""Client: holds a tunnel to a tun2 server and reverse-proxies its streams to a local backend."""

from __future__ import annotations

import random
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

import gevent
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from gevent.pool import Group

from tun2g import pages, smux
from tun2g.client import connect
from tun2g.control import (HEALTH_HOST, HEALTH_PATH, INSTANCE_ID, LEAVING, LIVENESS_KEEPALIVE, LIVENESS_LEVEL,
                           MAX_REPLY_SIZE, MAX_SERVER_EVENT_SIZE, MOVE, NODES, PING, PONG, ROUTE_HEADER,
                           STREAM_IDLE_SECONDS, Auth, AuthFormatError, EventReader, decode_reply, encode_event)
from tun2g.errors import ConfigurationError, Tun2Error
from tun2g.client.kept_stream import KeptStream, LoopExchange
from tun2g.client.telemetry import ExchangeObserver, Served
from tun2g.http import (BackendPool, DownstreamError, ExchangeResult, ExchangeTimeouts, HTTPError, MessageReader,
                        RequestHead, UpstreamError, serve_requests, upstream_request_head)
from tun2g.log import get_logger
from tun2g.storage import StorageError
from tun2g.storage.routing import normalize_route_key
from tun2g.tcp.wire import is_preamble_start
from tun2g.transport.base import nonblocking_socket

if TYPE_CHECKING:
    from tun2g.client.inspector import Inspector
    from tun2g.client.tcp_forward import TCPForwarder
    from tun2g.client.telemetry import ClientMetrics, Observed
    from tun2g.transport.kcp_conn import KCPOptions

log = get_logger(__name__)

CONN_TYPES = ("tcp", "kcp", "upgrade")
# A Go tun2 server never answers the Auth; after this long without a reply on a
# live session we take the silence as acceptance.
REPLY_GRACE = 3.0
# After REPLY_GRACE, how often a client still waiting for a late reply looks whether a request came instead.
REPLY_POLL = 0.1
REACHABLE_PROBE = 0.5  # seconds between TCP probes of an unreachable server during the reconnect wait
ACCEPT_CONTROL_TIMEOUT = 15.0
# Greenlets that served a stream wait for the next one, up to this many: a request then
# costs a wake-up instead of a spawn (and Python's 16 KiB frame chunk, mmap'ed each time).
MAX_IDLE_WORKERS = 64
# The server resets a stream whose public client left: notice it at once (the smux stream says so)
# and close the backend connection, rather than hold it until the backend answers.
_WATCH_THE_SERVER = ExchangeTimeouts(watch_downstream=True)


class AuthRejected(Tun2Error):
    """The server refused the token or domain; retrying would not help."""


class ConnectionLost(Tun2Error):
    """The tunnel could not be set up or broke; the client may retry."""


class ServerMismatch(Tun2Error):
    """What answered at --server cannot be this tunnel's server as configured (a certificate that
    does not verify, a port that does not speak TLS): retrying would not help; ``hint`` says the fix."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.hint = hint


class Moved(Tun2Error):
    """The server is draining and told us to connect again (docs/protocol.md#control-messages)."""


class Stopped(BaseException):
    """Thrown into a connect in progress by `close()`: a stop acts at once, not when a timeout ends."""


# How long a session the server told us to leave may take to finish its streams, beyond the grace it named.
RETIRE_MARGIN = 5.0
# A claim (ClientConfig.claim) that the server did not answer: no tun2g server with self-service names.
NO_CLAIMS = ("the server gave no self-service name (a Go tun2 server, or one without --self-service-domain); "
             "give --domain NAME")
# The server's liveness pings are answered at most this fast (a burst, then a rate per second);
# a tun2g server pings every 15 s, so only a peer flooding pings loses answers.
PONG_BURST = 10
PONG_RATE = 10.0
# While draining with a Go tun2 server (no LEAVING), how often we look whether our streams are done.
DRAIN_POLL = 0.05


@dataclass
class ClientConfig:
    """What a Client dials and where it sends the requests it receives."""

    server_addr: str
    token: str
    domain: str
    backend_url: str
    conn_type: str = "tcp"
    plain: bool = False
    ca_file: str | None = None
    insecure: bool = False
    tls_context: ssl.SSLContext | None = None
    backend_ca_file: str | None = None
    backend_insecure: bool = False
    # version=None: negotiated (docs/protocol.md#version-negotiation): v2 with a tun2g
    # server, v1 with a Go one. A fixed version must match the server's.
    smux_config: smux.Config = field(default_factory=lambda: smux.Config(version=None))
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    # A Go tun2 server pings every 5 s. If it sent neither a reply nor any stream
    # within this long, it most likely lost our Auth to its smux race
    # (docs/protocol.md#differences) and will never serve us: reconnect instead of waiting forever.
    unconfirmed_timeout: float = 15.0
    kcp_options: KCPOptions | None = None
    # Local TCP services behind public ports and TLS names (docs/tcp.md); needs the negotiated smux version.
    tcp: TCPForwarder | None = None
    extra: dict = field(default_factory=dict)
    # More (route key, backend URL) pairs served over the same session besides (domain, backend_url)
    # (docs/routing.md#multi-route-clients); `parse_route_spec` reads the CLI's --route KEY=URL.
    routes: list[tuple[str, str]] = field(default_factory=list)
    # Names this client across reconnects: a new session of the same instance (and user) takes over
    # the older ones still registered (docs/routing.md#takeover). Random per Client unless given.
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Ask the server for a self-service name (docs/routing.md#self-service) instead of serving `domain`
    # (then ""). Cleared once the server names one: the next sessions serve that name.
    claim: bool = False

    def __post_init__(self):
        if self.conn_type not in CONN_TYPES:
            raise ConfigurationError(f"conn_type must be one of {', '.join(CONN_TYPES)}, not {self.conn_type!r}")
        for name in ("server_addr", "token", "domain", "backend_url"):
            if not getattr(self, name) and not (name == "domain" and self.claim):
                raise ConfigurationError(f"ClientConfig.{name} is required")
        if not INSTANCE_ID.fullmatch(self.instance_id):
            raise ConfigurationError(f"instance id {self.instance_id!r}: use 1-64 letters, digits or . _ : -")
        for _, url in self.all_routes:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ConfigurationError(f"backend URL must start with http:// or https://, got {url!r}")
        try:
            if self.domain or not self.claim:
                normalize_route_key(self.domain)
        except StorageError as exc:  # refused before dialling: the server would refuse it for good
            raise ConfigurationError(f"--domain: {exc}") from None
        self.smux_config.validate()
        if self.tcp and self.smux_config.version is not None:
            raise ConfigurationError("TCP services need the tun2g extension: leave the smux version negotiated")

    @property
    def all_routes(self) -> list[tuple[str, str]]:
        """Every (route key, backend URL) this client serves, (domain, backend_url) first."""
        return [(self.domain, self.backend_url), *self.routes]


def parse_route_spec(spec: str) -> tuple[str, str]:
    """``KEY=URL`` (``example.com/api=http://127.0.0.1:4000``) as (route key, backend URL);
    ConfigurationError naming the spec when it is not one."""
    key, equals, url = spec.partition("=")
    if not equals or not key.strip() or not url.strip():
        raise ConfigurationError(f"--route {spec!r}: expected ROUTE=BACKEND_URL, e.g. "
                                 f"example.com/api=http://127.0.0.1:4000")
    try:
        key = normalize_route_key(key.strip())
    except StorageError as exc:
        raise ConfigurationError(f"--route {spec!r}: {exc}") from None
    if urlsplit(url.strip()).scheme not in ("http", "https"):
        raise ConfigurationError(f"--route {spec!r}: the backend URL must start with http:// or https://")
    return key, url.strip()


class Client:
    """Connects to a server and proxies every stream it opens to the backend (Go tun2's Client)."""

    def __init__(self, config: ClientConfig, on_status=None, *, on_request: Callable[[Served], None] | None = None,
                 inspector: Inspector | None = None, metrics: ClientMetrics | None = None,
                 on_claim: Callable[[str], None] | None = None):
        """``on_request`` hears of every proxied exchange; ``inspector`` captures them; ``metrics`` counts;
        ``on_claim`` hears the self-service name the server gave (with ``config.claim``)."""
        if not isinstance(config, ClientConfig):
            raise ConfigurationError("Client needs a ClientConfig, got %r" % (config,))
        self.config = config
        self.pool = BackendPool(config.backend_url, tls_verify=not config.backend_insecure,
                                ca_file=config.backend_ca_file)
        # The other routes' backends, by the route key the server names in X-Tun2g-Route.
        self._route_pools = {_route_key(key): BackendPool(url, tls_verify=not config.backend_insecure,
                                                          ca_file=config.backend_ca_file)
                             for key, url in config.routes}
        self.state = "idle"
        self.backend_id = None
        self.requests_served = 0
        self.health_checks = 0
        self._on_status = on_status or (lambda client: None)
        self._closed = Event()
        self._session: smux.Session | None = None
        self._handlers = Group()
        self._idle_workers: list[Waiter] = []
        self.public_urls: list[str] = []
        self.connections = 0
        self.reached_server = False  # whether the last attempt got as far as a connection
        # From the last auth reply: the node we are on and the live nodes' tunnel addresses (tun2g.client.multi).
        self.node_id: str | None = None
        self.cluster_nodes: dict[str, str] = {}
        self.nodes_heard = float("-inf")  # monotonic time cluster_nodes was last told (reply or "nodes" event)
        self.inspector = inspector
        if inspector is not None:
            inspector.use_backend(self.pool)
        self.metrics = metrics
        self._on_claim = on_claim
        # None when nothing listens: the proxy path then pays for no observation at all.
        self._observer: ExchangeObserver | None = None
        if on_request is not None or inspector is not None or metrics is not None:
            self._observer = ExchangeObserver(on_request=on_request, inspector=inspector, metrics=metrics)

        # Why the last attempt ended and when the next one starts (for the status line), and whether
        # that attempt had been connected; whether any attempt ever was.
        self.last_error = ""
        self.retry_in = 0.0
        self.was_connected = False
        self.ever_connected = False
        self.draining = False
        self._runner = None
        self._control: smux.Stream | None = None  # a tun2g server's control stream, for LEAVING
        self._after_reply = b""  # control-stream bytes read with the auth reply: the event reader's
        self._connected = Event()  # set while a session is connected (a moved session waits for the next)
        self._active_streams = 0
        self._retiring: Group = Group()
        # Whether another session of the same client (tun2g.client.multi) is up and serves our routes: then a
        # session told to move says LEAVING at once, without waiting for its own next session.
        self.sibling_up: Callable[[], bool] = lambda: False

    @property
    def streams_in_flight(self) -> int:
        """Requests being served now, on the current session and on any session retiring after a move."""
        return self._active_streams

    def use_backend(self, url: str) -> None:
        """Send the next requests to `url` (a config reload); exchanges in flight finish on the old backend."""
        pool = BackendPool(url, tls_verify=not self.config.backend_insecure, ca_file=self.config.backend_ca_file)
        old, self.pool = self.pool, pool
        self.config.backend_url = url
        if self.inspector is not None:
            self.inspector.use_backend(pool)
        old.close()  # its idle connections now; those in use when they are released

    def set_on_request(self, on_request: Callable[[Served], None] | None) -> None:
        """Hear of every proxied exchange from now on, or no longer (None)."""
        if on_request is None and self.inspector is None and self.metrics is None:
            self._observer = None
        else:
            self._observer = ExchangeObserver(on_request=on_request, inspector=self.inspector, metrics=self.metrics)

    def run(self) -> None:
        """Connect and serve, reconnecting with exponential backoff and jitter.

        Returns after `close()` or `drain()`; raises AuthRejected when the server refuses us,
        ServerMismatch when what answers cannot be our server (a certificate that does not verify),
        ConnectionLost when the tunnel ended and reconnecting is off.
        """
        self._runner = gevent.getcurrent()
        delay = self.config.backoff_initial
        try:
            while not self._closed.is_set():
                started = time.monotonic()
                self.was_connected = False
                try:
                    self.connect()
                except AuthRejected:
                    self._set_state("rejected")
                    raise
                except Moved as exc:
                    log.info("moving", server=self.config.server_addr, reason=str(exc))
                    delay = self.config.backoff_initial
                    continue  # at once: the old session serves on until the new one is up
                except (ConnectionLost, OSError, smux.SessionClosedError, socket.timeout) as exc:
                    if self._closed.is_set() or self.draining:
                        log.info("stopped", server=self.config.server_addr)
                        return
                    self._failed(exc)
                if self._closed.is_set():
                    return
                if not self.config.reconnect:
                    raise ConnectionLost(self.last_error or "the tunnel ended")
                if time.monotonic() - started > 60:
                    delay = self.config.backoff_initial  # it was up for a while: start the backoff afresh
                self.retry_in = round(random.uniform(0.5, 1.0) * delay, 1)
                self._set_state("waiting", retry_in=self.retry_in, error=self.last_error)
                outcome = self._wait_to_retry(self.retry_in)
                if outcome == "closed":
                    return
                # A server that was unreachable and answers again is retried with a fresh backoff.
                delay = self.config.backoff_initial if outcome == "reachable" else min(self.config.backoff_max,
                                                                                        delay * 2)
        except Stopped:
            log.info("stopped", server=self.config.server_addr)
        finally:
            self._runner = None

    def _failed(self, exc: BaseException) -> None:
        """Note why an attempt ended; raise ServerMismatch when retrying cannot help."""
        diagnosis = connect.diagnose(exc, self.config)
        self.last_error = diagnosis.reason
        if diagnosis.permanent and not self.ever_connected:
            # It never worked in this run: a configuration mistake, not an outage (a server that
            # worked before and now fails to verify may be mid-rotation: that one is retried).
            self._set_state("refused", error=diagnosis.reason)
            raise ServerMismatch(diagnosis.reason, diagnosis.hint) from None
        log.warning("disconnected" if self.was_connected else "unreachable", server=self.config.server_addr,
                    error=diagnosis.reason, detail=str(exc) or type(exc).__name__)

    def _wait_to_retry(self, wait: float) -> str:
        """Sleep `wait` s before the next attempt: "closed" (close() was called), "elapsed", or
        "reachable" as soon as a server we could not even dial accepts TCP connections again
        (probed every REACHABLE_PROBE s), so a node that comes back is not left waiting out a long backoff."""
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "elapsed"
            if self._closed.wait(min(remaining, REACHABLE_PROBE)):
                return "closed"
            if not self.reached_server and time.monotonic() < deadline and connect.reachable(self.config):
                return "reachable"

    def connect(self) -> None:
        """Dial once, authenticate and serve until the session ends (Go's Connect)."""
        self._set_state("connecting")
        self.reached_server = False
        transport = connect.dial(self.config)
        self.reached_server = True
        if self._closed.is_set():
            transport.close()
            raise Stopped()
        self.connections += 1
        if self.metrics is not None and self.connections > 1:
            self.metrics.reconnects.inc()
        session = smux.Session(transport, client=True, config=self.config.smux_config)
        self._session = session
        handed_off = False
        level = None
        try:
            control = session.accept_stream(timeout=ACCEPT_CONTROL_TIMEOUT)
            # A negotiating client says it is tun2g (a Go server ignores the field) and
            # follows the server's switch to smux v2 (the session does that on its own).
            level = LIVENESS_LEVEL if self.config.smux_config.version is None else None
            # Our control messages need a tun2g server (a confirmed reply) and the tun2g field in the Auth.
            tcp = self.config.tcp.announcement() if self.config.tcp else None
            control.sendall(Auth(self.config.token, self.config.domain, tun2g=level,
                                 routes=tuple(key for key, _ in self.config.routes),
                                 instance=self.config.instance_id, **({"tcp": tcp} if tcp else {}),
                                 claim=self.config.claim).encode())
            first_stream = Event()
            serving = gevent.spawn(self._accept_loop, session, first_stream, _peer_ip(transport))
            try:
                confirmed = self._await_reply(control, session, first_stream)
                moved = self._serve_until_closed(session, control if confirmed and level else None)
                if moved is not None and not self._closed.is_set():
                    handed_off = True
                    self._retiring.spawn(self._retire, session, control, serving, moved)
                    raise Moved(f"the server is draining (it closes this session within {moved:g} s)")
            finally:
                if not handed_off:
                    serving.kill()
            raise ConnectionLost(f"session ended: {session.close_reason or 'closed'}")
        except smux.SessionClosedError as exc:
            if self.connections == 1 and self.config.plain and not self.ever_connected:
                # A plain client's NOP makes a TLS port, or the public HTTP port, hang up at once.
                raise ServerMismatch(f"{self.config.server_addr} closed the connection before the tunnel began",
                                     "--plain is for a server run with --plain-tunnel: drop --plain for a TLS "
                                     "tunnel port; for the public HTTP port use --conn-type upgrade") from None
            raise ConnectionLost(str(exc)) from None
        finally:
            self._connected.clear()
            self._control = None
            if not handed_off:
                session.close()
            self._session = None

    def _serve_until_closed(self, session: smux.Session, control: smux.Stream | None) -> float | None:
        """Wait for the session to end; with a tun2g server, also read its control messages.

        Returns the grace the server named when it told us to move, else None (the session ended).
        """
        if control is None:
            session.wait_closed()
            return None
        self._control = control
        wake = Event()
        session.add_close_callback(lambda _session: wake.set())
        told: list[float] = []
        reading = gevent.spawn(self._read_events, control, told, wake)
        try:
            wake.wait()
        finally:
            reading.kill()
        return told[0] if told and not session.is_closed else None

    def _read_events(self, control: smux.Stream, told: list[float], wake: Event) -> None:
        reader = EventReader(MAX_SERVER_EVENT_SIZE)
        control.settimeout(None)
        pongs = PongBudget()
        pending, self._after_reply = self._after_reply, b""
        while True:
            try:
                data, pending = pending or control.recv(4096), b""
                events = reader.feed(data) if data else None
            except (OSError, smux.SessionClosedError, AuthFormatError):
                return
            if events is None:
                return
            for event in events:
                if event["event"] == PING and type(event.get("seq")) is int and pongs.take():
                    _send_quietly(control, encode_event(PONG, seq=event["seq"]))  # docs/protocol.md#liveness
                elif event["event"] == MOVE:
                    grace = event.get("grace")
                    told.append(float(grace) if isinstance(grace, (int, float)) and 0 <= grace < 3600 else 25.0)
                    wake.set()
                    return
                if event["event"] == NODES and isinstance(event.get("nodes"), list):
                    self.cluster_nodes = _cluster_view({"nodes": event["nodes"]})[1]
                    self.nodes_heard = time.monotonic()
                    log.info("nodes_changed", server=self.config.server_addr,
                             nodes=" ".join(sorted(self.cluster_nodes)))

    def _retire(self, session: smux.Session, control: smux.Stream, serving, grace: float) -> None:
        """A session the server told us to leave: serve on it until the next one is up, then say LEAVING
        and let the server close it once our requests on it are done (bounded by its grace)."""
        answering = gevent.spawn(self._read_events, control, [], Event())  # its liveness pings, till the end
        try:
            with gevent.Timeout(grace + RETIRE_MARGIN, False):
                while not self._connected.wait(DRAIN_POLL) and not self.sibling_up():
                    pass
                _send_quietly(control, encode_event(LEAVING))
                session.wait_closed()
        finally:
            answering.kill()
            serving.kill()
            session.close()

    def _await_reply(self, control, session, first_stream: Event) -> bool:
        """Read tun2g's auth reply; True when confirmed, False when a live session stayed silent
        and sent a request (``first_stream``): what a Go server that accepted us does.

        After REPLY_GRACE of silence we show "connected" but keep listening: a loaded tun2g
        server may reply late, and it sends a client with the liveness check no request
        (docs/protocol.md#liveness). Neither within unconfirmed_timeout: ConnectionLost.
        """
        control.settimeout(REPLY_GRACE)
        deadline = time.monotonic() + self.config.unconfirmed_timeout
        line = b""
        self._after_reply = b""
        shown = False
        try:
            while b"\n" not in line and len(line) < MAX_REPLY_SIZE:
                try:
                    data = control.recv(MAX_REPLY_SIZE)
                except socket.timeout:
                    if session.is_closed:
                        break
                    if self.config.claim:  # no name to show or serve until a reply names one
                        if time.monotonic() >= deadline:
                            raise AuthRejected(NO_CLAIMS) from None
                        control.settimeout(REPLY_POLL)
                        continue
                    if not shown:
                        shown = True
                        self.backend_id = None
                        self.public_urls = [f"http://{self.config.domain}"]
                        self._set_state("connected", confirmed=False)
                    if first_stream.is_set():
                        return False
                    if time.monotonic() >= deadline:
                        raise ConnectionLost(f"the server neither confirmed our Auth nor sent a request in "
                                             f"{self.config.unconfirmed_timeout:g} s (a Go tun2 server loses "
                                             f"an Auth now and then); reconnecting") from None
                    control.settimeout(REPLY_POLL)  # a cadence: the first request may come any moment
                    continue
                if not data:
                    break
                line += data
            # A control message (a ping, a move) may share the reply's read: it is the event reader's.
            line, newline, self._after_reply = line.partition(b"\n")
            line += newline
        except (OSError, smux.SessionClosedError):
            pass
        if not line and self.config.claim:
            raise AuthRejected(NO_CLAIMS)
        if not line:
            raise ConnectionLost("the server closed the tunnel right after our Auth (a Go tun2 server does this "
                                 "when it rejects the token or the domain)")
        try:
            reply = decode_reply(line.strip())
        except AuthFormatError as exc:
            raise ConnectionLost(str(exc)) from None
        if not reply["ok"]:
            reason = reply.get("error", "no reason given")
            if reply.get("retry"):
                raise ConnectionLost(f"server could not check our Auth: {reason}")
            raise AuthRejected(f"server rejected us: {reason}")
        if self.config.claim:
            self._claimed(reply.get("domain"))
        if isinstance(reply.get("liveness"), dict) and not session.config.keepalive_disabled:
            session.set_keepalive(*LIVENESS_KEEPALIVE)  # the server pings us (docs/protocol.md#liveness)
        self.backend_id = reply.get("backend")
        self.public_urls = _public_urls(reply, self.config.domain)
        self.node_id, self.cluster_nodes = _cluster_view(reply)
        self.nodes_heard = time.monotonic()
        if self.config.tcp:
            host = self.config.server_addr.rsplit(":", 1)[0]
            self.public_urls += [f"tcp://{host}:{port}" for port in self.config.tcp.granted(reply.get("tcp"))]
            self.public_urls += [f"tls://{name}" for name in self.config.tcp.names]
        self._set_state("connected", confirmed=True, smux=session.version)
        return True

    def _claimed(self, domain) -> None:
        """The server gave us a self-service name: serve it from now on (a reconnect asks for it by name)."""
        try:
            domain = normalize_route_key(domain) if isinstance(domain, str) else None
        except StorageError:
            domain = None
        if domain is None:
            raise ConnectionLost("the server accepted our claim but named no valid domain")
        self.config.domain, self.config.claim = domain, False
        log.info("name_claimed", server=self.config.server_addr, domain=domain)
        if self._on_claim is not None:
            self._on_claim(domain)

    def _accept_loop(self, session, first_stream: Event, peer_ip: str) -> None:
        while True:
            try:
                stream = session.accept_stream()
            except (smux.SessionClosedError, OSError):
                first_stream.set()  # wakes connect(), which then sees the session is gone
                return
            first_stream.set()
            # A tun2 server's FIN ends the exchange (its reader is gone, e.g. a stream it
            # reset for a too-slow public reader): stop relaying the response into the void.
            stream.peer_fin_ends_writes = True
            self._in_worker(partial(self._serve_stream, stream, peer_ip))

    def _in_worker(self, task: Callable[[], None]) -> None:
        """Run ``task`` in a parked worker greenlet, or a new one (callable from the event loop)."""
        if self._idle_workers:
            get_hub().loop.run_callback(self._idle_workers.pop().switch, task)
        else:
            self._handlers.spawn(self._worker, task)

    def _worker(self, task: Callable[[], None]) -> None:
        """Run ``task``, then wait (parked, up to MAX_IDLE_WORKERS of us) for the next one."""
        while True:
            task()
            if self._closed.is_set() or len(self._idle_workers) >= MAX_IDLE_WORKERS:
                return
            waiter = Waiter()
            self._idle_workers.append(waiter)
            task = waiter.get()

    def _serve_stream(self, stream, peer_ip: str) -> None:
        """Serve the HTTP exchanges the server sends on one stream (``peer_ip``: the server's address)."""
        log.debug("stream_opened", stream=getattr(stream, "id", None))
        if self.config.tcp:  # a TCP stream starts with the tun2g preamble, an HTTP one with its request line
            try:
                first = stream.peek_first_byte()
            except (OSError, smux.SessionClosedError, smux.StreamResetError):
                stream.close()
                return
            if is_preamble_start(first):
                self._active_streams += 1  # a TCP connection in flight: the drain waits for it too
                try:
                    self.config.tcp.serve(stream)
                finally:
                    self._active_streams -= 1
                return
        self._serve_kept(self._keep(stream, peer_ip))

    def _keep(self, stream: smux.Stream, peer_ip: str) -> KeptStream:
        """``stream`` as a kept request stream, its next requests handed to this client."""
        return KeptStream(stream, MessageReader(stream), peer_ip, on_request=self._request_from_loop,
                          on_unreadable=lambda kept: self._in_worker(partial(self._serve_kept, kept)),
                          idle_seconds=2 * STREAM_IDLE_SECONDS)

    def _serve_kept(self, kept: KeptStream, head: RequestHead | None = None,
                    pool: BackendPool | None = None) -> None:
        """In a worker: serve ``kept``'s next exchange (``head``, read already, else the next one read),
        then park the stream, or close it when the exchange leaves it closed."""
        stream = kept.stream

        def proxy(head: RequestHead, reader: MessageReader) -> bool:
            if self._proxy(head, reader, stream, kept.peer_ip, pool):
                kept.park()
            return False  # parked, or to be closed: either way this worker is done with it

        self._active_streams += 1
        try:
            if head is not None:
                proxy(head, kept.reader)
            else:
                serve_requests(stream, proxy, _reject, idle_timeout=2 * STREAM_IDLE_SECONDS, reader=kept.reader)
        finally:
            self._active_streams -= 1
            if not kept.parked:
                kept.close()

    def _request_from_loop(self, kept: KeptStream, head: RequestHead) -> None:
        """A request read by a parked stream's callback: sent up from here when that needs no wait
        (one non-blocking send on an idle plain-HTTP backend connection), else given to a worker."""
        reader = kept.reader
        if not reader.body_complete or reader.upgrade or self._is_health_check(head):
            self._in_worker(partial(self._serve_kept, kept, head))
            return
        pool = self._pool_for(head)
        connection = pool.take_idle() if pool.scheme == "http" else None
        raw = None if connection is None else nonblocking_socket(connection[0])
        target = None
        if raw is not None:
            try:
                target = pool.join_path(head.target)
            except HTTPError:
                pass  # a target climbing out of the backend's path: the worker answers it with a page
        if connection is None or raw is None or target is None:  # no idle plain connection: the worker dials
            if connection is not None:
                pool.release(connection[0], connection[1], True)
            self._in_worker(partial(self._serve_kept, kept, head, pool))
            return
        observed = self._observer.begin(head, kept.stream.id) if self._observer is not None else None
        head.target = target
        head.append_to("X-Forwarded-For", kept.peer_ip)
        payload = upstream_request_head(head, reader)
        try:
            sent = raw.send(payload)
        except OSError:  # BlockingIOError included; a kept connection the backend reset
            sent = 0
        self._active_streams += 1
        if sent != len(payload):
            connection[0].close()  # it holds part of a request, or nothing more can go on it
            self._in_worker(partial(self._forward_kept, kept, head, pool, observed))
            return
        if observed is not None:
            observed.up(sent, b"")
        LoopExchange(kept, head, pool, connection, raw, sent, observed, handover=self._exchange_to_worker,
                     done=self._loop_exchange_done, abandoned=self._loop_exchange_abandoned)

    def _forward_kept(self, kept: KeptStream, head: RequestHead, pool: BackendPool, observed: Observed | None,
                      connection=None, sent: int | None = None) -> None:
        """In a worker: go on with an exchange a callback started (counted in flight already), then park
        the stream, or close it."""
        keep_alive = False
        try:
            keep_alive = self._forward(head, kept.reader, kept.stream, pool, observed, connection, sent)
        finally:
            self._active_streams -= 1
            self._after_exchange(kept, keep_alive)

    def _write_kept(self, kept: KeptStream, pending: bytes, keep_alive: bool) -> None:
        """In a worker: write the response a callback relayed but could not write without waiting."""
        try:
            kept.stream.sendall(pending)
        except (OSError, smux.SessionClosedError, smux.StreamResetError) as exc:
            log.debug("request_abandoned", stream=kept.stream.id, reason=str(exc))
            keep_alive = False
        finally:
            self._active_streams -= 1
            self._after_exchange(kept, keep_alive)

    @staticmethod
    def _after_exchange(kept: KeptStream, keep_alive: bool) -> None:
        if keep_alive:
            kept.park()
        else:
            kept.close()

    def _exchange_to_worker(self, exchange: LoopExchange) -> None:
        self._in_worker(partial(self._forward_kept, exchange.kept, exchange.head, exchange.pool, exchange.observed,
                                exchange.connection, exchange.sent))

    def _loop_exchange_done(self, exchange: LoopExchange, result: ExchangeResult) -> None:
        exchange.pool.release(exchange.connection[0], exchange.connection[1], result.upstream_reusable)
        self.requests_served += 1
        if exchange.observed is not None:
            exchange.observed.finish(result.status, result)
        if exchange.pending:
            self._in_worker(partial(self._write_kept, exchange.kept, exchange.pending, result.keep_alive))
            return
        self._active_streams -= 1
        self._after_exchange(exchange.kept, result.keep_alive)

    def _loop_exchange_abandoned(self, exchange: LoopExchange, why: str) -> None:
        log.debug("request_abandoned", stream=exchange.kept.stream.id, reason=why)
        exchange.connection[0].close()
        self._active_streams -= 1
        if exchange.observed is not None:
            exchange.observed.finish(0, None, why)
        exchange.kept.close()

    @staticmethod
    def _is_health_check(head: RequestHead) -> bool:
        return head.target == HEALTH_PATH and (head.host or "") == HEALTH_HOST and head.method == "GET"

    def _proxy(self, head: RequestHead, reader: MessageReader, stream: smux.Stream, peer_ip: str,
               pool: BackendPool | None = None) -> bool:
        """Serve one exchange in this greenlet (``pool``: the route's, when the route header was read
        already); whether the stream stays open for another."""
        if self._is_health_check(head):
            # The server's health ping: answered here, so a slow backend /health
            # cannot make the server drop a healthy tunnel (the original did).
            self.health_checks += 1
            stream.sendall(pages.health_ok().encode(close=not head.keep_alive))
            return head.keep_alive
        if pool is None:
            pool = self._pool_for(head)
        observed = self._observer.begin(head, stream.id) if self._observer is not None else None
        try:
            head.target = pool.join_path(head.target)
        except HTTPError as exc:  # a target climbing out of the backend URL's path
            log.warning("request_refused", status=exc.status, reason=exc.message, path=head.target[:200])
            try:
                stream.sendall(pages.malformed_request(exc.status, exc.message).encode())
            finally:
                if observed is not None:
                    observed.finish(exc.status, None, exc.message)
            return False
        head.append_to("X-Forwarded-For", peer_ip)
        return self._forward(head, reader, stream, pool, observed)

    def _forward(self, head: RequestHead, reader: MessageReader, stream: smux.Stream, pool: BackendPool,
                 observed: Observed | None, connection=None, sent: int | None = None) -> bool:
        """Forward ``head`` (prepared for ``pool``'s backend) and relay the answer, or answer the failure;
        ``connection`` and ``sent``: the request went up already (see BackendPool.forward_exchange)."""
        status, result, error, failure = 0, None, None, None
        try:
            try:
                result = pool.forward_exchange(
                    head, reader, stream, timeouts=_WATCH_THE_SERVER, meter=observed,
                    response_filter=None if observed is None else observed.response_filter,
                    connection=connection, sent=sent)
            except UpstreamError as exc:
                log.warning("backend_failed", backend=pool.url, error=str(exc))
                status, error, failure = 502, str(exc), "bad_response"
                stream.sendall(pages.backend_failed().encode())
                return False
            except OSError as exc:
                log.warning("backend_unreachable", backend=pool.url, error=str(exc))
                status, error, failure = 502, str(exc), "unreachable"
                stream.sendall(pages.backend_unreachable(exc).encode())  # the URL stays in the log
                return False
            except DownstreamError as exc:  # the server gave up on the request (its client left)
                log.debug("request_abandoned", stream=stream.id, reason=str(exc))
                error = str(exc)
                return False
            self.requests_served += 1
            status = result.status
            return result.keep_alive
        except BaseException as exc:
            error = error or str(exc) or type(exc).__name__  # the server's side went away mid-exchange
            raise
        finally:
            if observed is not None:
                observed.finish(status, result, error, failure)

    def _pool_for(self, head: RequestHead) -> BackendPool:
        """The backend of the route the server named for this stream (X-Tun2g-Route, removed here), else
        the first one. The header comes from the server only: it drops any a public client sends."""
        if not self._route_pools:
            return self.pool
        route = head.get(ROUTE_HEADER)
        head.remove(ROUTE_HEADER)
        return self.pool if route is None else self._route_pools.get(route, self.pool)

    def _set_state(self, state: str, **fields) -> None:
        if state == "connected":
            self.was_connected = self.ever_connected = True
            self._connected.set()
        self.state = state
        if self.metrics is not None:
            self.metrics.connected.set(1 if state == "connected" else 0)
        log.info(state, server=self.config.server_addr, domain=self.config.domain, **fields)
        self._on_status(self)

    def close(self) -> None:
        """Stop serving and do not reconnect; a connect in progress stops at once."""
        self._closed.set()
        runner = self._runner
        if runner is not None and runner is not gevent.getcurrent() and self.state == "connecting":
            gevent.kill(runner, Stopped)  # a dial or handshake would otherwise end only at its timeout
        if self._session is not None:
            self._session.close()
        self._retiring.kill(block=False)
        self._idle_workers.clear()
        self._handlers.kill(block=False)
        self.pool.close()
        for pool in self._route_pools.values():
            pool.close()

    def drain(self, grace: float) -> None:
        """SIGTERM: take no new requests, finish those in flight (at most ``grace`` s), then `close()`.

        With a tun2g server we say LEAVING and the server closes the session once the requests
        it sent us are answered; with a Go tun2 server we close once our streams are done.
        """
        if self.draining or self._closed.is_set():
            return
        self.draining = True
        log.info("draining", server=self.config.server_addr, grace_period=grace, streams=self._active_streams)
        session, control = self._session, self._control
        with gevent.Timeout(grace, False):
            if session is not None and control is not None:
                _send_quietly(control, encode_event(LEAVING))
                session.wait_closed()
            else:
                while self._active_streams:
                    self._closed.wait(DRAIN_POLL)
        self.close()


class PongBudget:
    """At most PONG_BURST pongs at once, refilled at PONG_RATE a second: a server flooding pings gets no more."""

    def __init__(self) -> None:
        self._tokens = float(PONG_BURST)
        self._at = time.monotonic()

    def take(self) -> bool:
        """True when one more pong may be sent now."""
        now = time.monotonic()
        self._tokens = min(float(PONG_BURST), self._tokens + (now - self._at) * PONG_RATE)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _public_urls(reply: dict, domain: str) -> list[str]:
    """The public URL(s) the server says it serves us at ("urls" or "url"), else http://DOMAIN."""
    urls = reply.get("urls")
    if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        return list(urls)
    if isinstance(reply.get("url"), str) and reply["url"]:
        return [reply["url"]]
    served = reply.get("domain") if isinstance(reply.get("domain"), str) and reply.get("domain") else domain
    return [f"http://{served}"]


def _route_key(key: str) -> str:
    """A configured route key as the server will name it (normalized when it parses)."""
    try:
        return normalize_route_key(key)
    except StorageError:
        return key


def _send_quietly(stream: smux.Stream, data: bytes) -> None:
    try:
        stream.sendall(data)
    except (OSError, smux.SessionClosedError):
        pass  # the session is going anyway


def _reject(error: HTTPError) -> bytes:
    return pages.malformed_request(error.status, error.message).encode()


def _peer_ip(transport) -> str:
    try:
        return transport.getpeername()[0]
    except (OSError, IndexError, TypeError, AttributeError):
        return "127.0.0.1"


MAX_CLUSTER_NODES = 64  # a server may list at most this many nodes; the rest of a longer list is ignored


def _cluster_view(reply: dict) -> tuple[str | None, dict[str, str]]:
    """(our node id, {node id: tunnel address}) from an auth reply; malformed entries are dropped."""
    node = reply.get("node") if isinstance(reply.get("node"), str) else None
    nodes = {}
    listed = reply.get("nodes")
    for entry in listed[:MAX_CLUSTER_NODES] if isinstance(listed, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("node"), str) and isinstance(entry.get("tunnel"), str) \
                and 0 < len(entry["tunnel"]) <= 255 and 0 < len(entry["node"]) <= 255:
            nodes[entry["node"]] = entry["tunnel"]
    return node, nodes
