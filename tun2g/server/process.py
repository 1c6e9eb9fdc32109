"""Assemble a complete server process from settings: listeners, TLS, storage, cluster, admin API.

The one place the server's parts are put together and their defaults live.
The command line builds a ServerSetup from its options; tests and embedders
can do the same and get back a RunningServer with its bound addresses.
`create_wsgi_app()` does the same for gunicorn, from the environment.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import gevent
from gevent.event import Event
from gevent.lock import BoundedSemaphore
from gevent.pywsgi import WSGIServer

from tun2g import smux
from tun2g.cluster import ClusterConfig, ClusterNode, default_advertise_url
from tun2g.cluster.forward import HOP_READ_TIMEOUT
from tun2g.config import ConfigChange, ConfigError, log_reload_failure
from tun2g.log import configure, get_logger
from tun2g.errors import ConfigurationError, SetupError
from tun2g.metrics import DEFAULT_DOMAIN_CAP, Metrics
from tun2g.policy import Policy
from tun2g.server.acme import challenge_answer
from tun2g.server.admin_api import AdminAPI
from tun2g.server.cert_manager import AcmeSettings, CertManager
from tun2g.http import ExchangeTimeouts
from tun2g.server.admin_token import is_loopback, load_or_create_admin_token, write_admin_address
from tun2g.server.front import FrontLimits, HTTPFront
from tun2g.server.https import HANDSHAKE_TIMEOUT, CertificateBook, handshake
from tun2g.server.inspect import QUEUE_SIZE, CaptureStore, Inspector, MemoryCaptures, RedisCaptures
from tun2g.server.pipeline import HTTPSPolicy
from tun2g.server.policy_step import PolicyBook
from tun2g.server.rate_limit import ClusterLimiter
from tun2g.server.server import Server, ServerConfig
from tun2g.server.tunnels import Tunnels
from tun2g.server.tcp_routes import TCPRoutes, TCPSettings
from tun2g.server.wsgi import WSGIFront
from tun2g.storage import RedisStorage, StorageError, default_sqlite_path, open_storage
from tun2g.storage.certificates import CertificateStore
from tun2g.transport import tcp, tls

log = get_logger(__name__)

# Public-port and exchange bounds (the `tun2g server` flags and TUN2G_* variables override them).
HEADER_TIMEOUT = 15.0      # s for a whole request head, however slowly it trickles (slowloris)
IDLE_TIMEOUT = 60.0        # s a kept-alive public connection may wait for its next request
RESPONSE_TIMEOUT = 60.0    # s from the request sent to the response head (then 504)
BODY_TIMEOUT = 60.0        # s a body relay may make no progress, either way (then the exchange ends)
MAX_CONNECTIONS_PER_IP = 256
# The total cap is derived from the fd limit: what is left after this share for tunnels, node hops,
# storage and listeners (a public connection is one fd; tunnel streams need none).
FD_RESERVE_SHARE, FD_RESERVE_MIN = 4, 32
# The ServerSetup fields a running server can change in place (a config reload): each takes effect for
# the next request, connection or ping, and nothing in flight is dropped. Every other one needs a restart.
_HTTPS_ONLY_CLUSTER = ("--http none: a cluster node (a Redis store) needs its HTTP port for the other nodes' "
                       "forwarded requests; give --http HOST:PORT")
LIVE_SETTINGS = frozenset({"log_level", "access_log", "ping_interval", "metrics_domain_cap", "inspect",
                           "trusted_proxies", "response_timeout", "body_timeout", "header_timeout", "idle_timeout",
                           "max_connections_per_ip", "max_connections", "policies"})


def listen(flag: str, address: str):
    """A listener on ``address``; a port in use (or any bind failure) is a SetupError naming ``flag``."""
    try:
        return tcp.listen(address)
    except (OSError, OverflowError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        hint = ("another process holds it: stop that one or give another port"
                if getattr(exc, "errno", None) == errno.EADDRINUSE else "give another address")
        raise SetupError(f"{flag} {address}: cannot listen there ({reason}); {hint}") from None


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def parse_port_range(text: str | None) -> tuple[int, int] | None:
    """``A-B`` (or one port) -> (A, B); raises ConfigurationError naming --tcp-ports."""
    if not text:
        return None
    first, _, last = text.partition("-")
    last = last or first
    if not (first.strip().isdigit() and last.strip().isdigit()) or not 1 <= int(first) <= int(last) <= 65535:
        raise ConfigurationError(f"--tcp-ports {text!r}: write FIRST-LAST, e.g. --tcp-ports 20000-20100")
    return int(first), int(last)


def connection_cap(fd_limit: int) -> int:
    """The default cap on open public connections for a process allowed `fd_limit` descriptors."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit <= 0:
        fd_limit = 1 << 20
    return max(1, fd_limit - max(FD_RESERVE_MIN, fd_limit // FD_RESERVE_SHARE))


@dataclass
class ServerSetup:
    """Everything `tun2g server` can be told."""

    http_addr: str = ":8080"
    https_addr: str | None = None  # public HTTPS, certificates from the store by SNI (tun2g.server.https)
    https_handshake_timeout: float = HANDSHAKE_TIMEOUT
    https_redirect: bool = False  # plain public HTTP gets a 308 to HTTPS (needs --https)
    hsts_max_age: int = 0         # Strict-Transport-Security max-age on HTTPS responses (0: none)
    # ACME by the server (tun2g.server.cert_manager): order routed names on first use, renew; needs --https.
    acme: bool = False
    acme_settings: AcmeSettings = field(default_factory=AcmeSettings)
    tunnel_addr: str = ":4443"
    tls_cert: str | None = None
    tls_key: str | None = None
    plain_tunnel: bool = False
    kcp_addr: str | None = None
    kcp_profile: str = "fast"
    storage_url: str | None = None
    admin_addr: str | None = "127.0.0.1:7070"
    # None: the one kept in the data dir's admin-token file (made on first start). A non-loopback
    # admin_addr needs an explicit token.
    admin_token: str | None = None
    node_id: str | None = None
    smux_version: int | None = None  # None: negotiated (v2 with tun2g clients, v1 with Go ones)
    ping_interval: float = 5.0
    liveness_interval: float = 15.0  # tun2g clients: control-stream pings (docs/protocol.md#liveness)
    liveness_timeout: float = 10.0
    access_log: bool = True
    log_level: str = "info"
    # Balancers in front (CIDRs) whose X-Forwarded-*/Forwarded/X-Real-IP headers are believed.
    trusted_proxies: tuple[str, ...] = ()
    # Cluster (used when the storage is Redis): where other nodes reach this one's HTTP
    # front, the shared hop secret (else one kept in Redis), and the registry TTL.
    advertise_url: str | None = None
    advertise_tunnel: str | None = None  # host:port tunnel clients reach this node at (default: the tunnel port)
    cluster_secret: str | None = None
    registry_ttl: float = 10.0
    hop_timeout: float = HOP_READ_TIMEOUT
    # Bounds on the public port and on each exchange (0 disables a timeout or a cap;
    # max_connections None: derived from the fd limit, see connection_cap).
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    max_connections: int | None = None
    # Prometheus metrics at the admin API's /metrics; past `metrics_domain_cap` domains, label "other".
    metrics: bool = True
    metrics_domain_cap: int = DEFAULT_DOMAIN_CAP
    # Capture of the routes marked `tun2g route inspect DOMAIN on` (False: never, whatever the routes say).
    inspect: bool = True
    inspect_queue: int = QUEUE_SIZE
    # Edge policies per route from the config file ([policy."DOMAIN"] tables), installed before the first
    # request is served.
    policies: dict[str, Any] = field(default_factory=dict)
    public_url: str | None = None  # "https://{domain}": the URL clients are told they serve
    # Self-service names (docs/routing.md#self-service): "<random>.BASE" claimed by tokens, N per user.
    self_service_domain: str | None = None
    self_service_limit: int = 3
    # TCP routes and TLS passthrough (docs/tcp.md): ports a client asking for port 0 gets one of ("A-B"),
    # a bind address overriding the stored ones, the shared passthrough listener, and their bounds.
    tcp_ports: str | None = None
    tcp_bind: str | None = None
    tls_passthrough: str | None = None
    tcp: TCPSettings = field(default_factory=TCPSettings)
    # `tun2g server --workers N`: this process is one worker (tun2g.server.workers.WorkerLink), else None.
    worker: Any = None

    def front_limits(self, fd_limit: int) -> FrontLimits:
        total = connection_cap(fd_limit) if self.max_connections is None else self.max_connections
        return FrontLimits(head_timeout=self.header_timeout or None, idle_timeout=self.idle_timeout or None,
                           max_per_ip=self.max_connections_per_ip, max_total=total)

    def check_https(self) -> None:
        """ConfigurationError when the redirect or HSTS is asked for without an HTTPS port."""
        if (self.https_redirect or self.hsts_max_age) and not self.https_addr:
            raise ConfigurationError("--https-redirect and --hsts need --https HOST:PORT (the port to send visitors to)")
        if self.acme and not self.https_addr:
            raise ConfigurationError("--acme needs --https HOST:PORT (the port its certificates are served on)")
        if self.https_only():
            if not self.https_addr:
                raise ConfigurationError("--http none needs --https HOST:PORT (else there is no public port)")
            if self.https_redirect:
                raise ConfigurationError("--https-redirect redirects the plain HTTP port, which --http none "
                                         "removes: drop one of them")
            if self.acme and self.acme_settings.challenge == "http-01":
                raise ConfigurationError("--acme answers its HTTP-01 challenges on the plain HTTP port: keep "
                                         "--http HOST:PORT (port 80 must reach it), or validate on the HTTPS "
                                         "port with --acme-challenge tls-alpn-01")
            if (self.storage_url or "").lower().startswith("redis"):
                raise ConfigurationError(_HTTPS_ONLY_CLUSTER)

    def https_only(self) -> bool:
        """True for `--http none`: public HTTPS only, no plain HTTP listener."""
        return (self.http_addr or "").lower() == "none"

    def exchange_timeouts(self) -> ExchangeTimeouts:
        return ExchangeTimeouts(response=self.response_timeout or None, body=self.body_timeout or None,
                                watch_downstream=True)

    def start(self) -> "RunningServer":
        """Open the store and every listener, start serving, and return the running server."""
        self.check_admin_exposure()
        self.check_https()
        configure(self.log_level)
        fd_before, fd_limit = raise_fd_limit()
        limits = self.front_limits(fd_limit)
        log.info("fd_limit", soft=fd_limit, raised_from=fd_before if fd_before != fd_limit else "-",
                 max_connections=limits.max_total or "-", max_connections_per_ip=limits.max_per_ip or "-")
        try:
            storage = open_storage(self.storage_url)
        except StorageError as exc:
            raise type(exc)(f"--storage: {exc}") from None
        smux_config = smux.Config.tun2_server()
        smux_config.version = self.smux_version
        config = ServerConfig(storage=storage, smux_config=smux_config, ping_interval=self.ping_interval,
                              liveness_interval=self.liveness_interval, liveness_timeout=self.liveness_timeout,
                              public_url=self.public_url, self_service_domain=self.self_service_domain,
                              self_service_limit=self.self_service_limit)
        if self.node_id:
            config.node_id = self.node_id
        http_listener = None if self.https_only() else self._listen("--http", self.http_addr)
        http_address = http_listener.getsockname()[:2] if http_listener is not None else None
        https_listener = self._listen("--https", self.https_addr) if self.https_addr else None
        https_policy = HTTPSPolicy(redirect=self.https_redirect, hsts_max_age=self.hsts_max_age,
                                   https_port=https_listener.getsockname()[1] if https_listener else 443)
        tunnels = Tunnels() if self.worker is None else self.worker.tunnels
        cluster = None
        metrics = Metrics(self.metrics_domain_cap) if self.metrics else None
        if isinstance(storage, RedisStorage) and http_address is None:
            storage.close()
            raise ConfigurationError(_HTTPS_ONLY_CLUSTER)
        if isinstance(storage, RedisStorage) and http_address is not None:  # with Redis: one node of a cluster
            cluster = _cluster_node(storage, config.node_id, tunnels, self.advertise_url or
                                    default_advertise_url(http_address), self.cluster_secret, self.registry_ttl,
                                    self.hop_timeout, metrics)
        inspector = self.start_inspector(storage, config.node_id, metrics) if self.inspect else None
        self.tcp.port_range = parse_port_range(self.tcp_ports)
        self.tcp.bind_host = self.tcp_bind or None
        passthrough_listener = listen("--tls-passthrough", self.tls_passthrough) if self.tls_passthrough else None
        policies = policy_book(storage, metrics)
        tcp_routes = TCPRoutes(storage, self.tcp, metrics, cluster, policies)
        server = Server(config, tunnels=tunnels, cluster=cluster, access_log=self.access_log,
                        trusted_proxies=self.trusted_proxies, timeouts=self.exchange_timeouts(), metrics=metrics,
                        inspector=inspector, policies=policies, https=https_policy,
                        acme_challenge=(lambda target: challenge_answer(storage, target))
                        if isinstance(storage, CertificateStore) else None, tcp=tcp_routes)
        install_policies(server, self.policies)
        running = RunningServer(server, cluster, http_address=http_address, setup=self, fd_limit=fd_limit,
                                inspector=inspector)
        if passthrough_listener is not None:
            running.passthrough_address = passthrough_listener.getsockname()[:2]
            running.services.append(tcp_routes.serve_passthrough(passthrough_listener))
        if http_listener is not None:
            running.front = (HTTPFront(server, limits=limits) if self.worker is None
                             else self.worker.make_front(server, limits))
            running.public_services.append(running.front.serve(http_listener))
            running.services.append(running.public_services[-1])
        if https_listener is not None:
            self._start_https(https_listener, server, running, storage, limits, tcp_routes)
        if cluster is not None:
            cluster.start()

        cert, key = self._certificate()
        if self._tunnel_port_wanted():
            self._start_tunnel_port(server, running, cert, key)
        if cluster is not None and (self.advertise_tunnel or running.tunnel_address is not None):
            cluster.registry.advertise_tunnel = self.advertise_tunnel or _tunnel_advertised(running.tunnel_address)
            cluster.changed()
        if self.kcp_addr:
            running.kcp_address = self._start_kcp(self.kcp_addr, server, running, cert, key)
        if self.admin_addr:
            self._start_admin(server, running)
        if self.worker is not None:
            self.worker.attach(running)
        log.info("listening", http=_fmt(running.http_address), https=_fmt(running.https_address), tunnel=_fmt(running.tunnel_address),
                 tunnel_tls=not self.plain_tunnel and running.tunnel_address is not None, kcp=_fmt(running.kcp_address),
                 admin=_fmt(running.admin_address), storage=storage.describe(), node=config.node_id)
        if cert is not None and not self.plain_tunnel and self.tls_cert is None:
            log.info("dev_certificate", cert=str(cert),
                     hint=f"clients connect with --ca {cert} (or use --tls-cert/--tls-key in production)")
        return running

    def start_inspector(self, storage, node: str, metrics: Metrics | None) -> Inspector:
        """Capture of inspected routes, kept in Redis with a Redis store (shared by the nodes), else in memory."""
        store: CaptureStore = (RedisCaptures(storage.url, storage.key_prefix) if isinstance(storage, RedisStorage)
                               else MemoryCaptures())
        inspector = Inspector(store, node=node, queue_size=self.inspect_queue,
                              on_outcome=None if metrics is None else _capture_counter(metrics),
                              on_store_error=None if metrics is None else lambda: metrics.redis_error("inspect"))
        inspector.start(storage)
        return inspector

    def check_admin_exposure(self) -> None:
        """ConfigurationError when the admin API would listen beyond loopback without an explicit token."""
        if not self.admin_addr or self.admin_token:
            return
        host, _port = tcp.split_host_port(self.admin_addr)
        if not is_loopback(host):
            raise ConfigurationError(f"--admin {self.admin_addr} is not a loopback address: exposing the admin API "
                                     f"needs an explicit --admin-token (or TUN2G_ADMIN_TOKEN)")

    def _start_admin(self, server: Server, running: RunningServer) -> None:
        if not self.admin_addr:
            return
        token = self.admin_token
        if not token:
            token, path, created = load_or_create_admin_token()
            log.info("admin_token", file=str(path), created=created,
                     hint="tun2g backends / tun2g kill read it from there")
        listener = self._listen("--admin", self.admin_addr)
        address = listener.getsockname()[:2]
        admin = WSGIServer(listener, AdminAPI(server, token, address, reload=running.reload), log=None,
                           error_log=None)
        admin.start()
        if not self.admin_token:  # the CLI on this machine finds the API next to its token
            write_admin_address(_fmt(address))
        running.admin_address = address
        running.admin_token = token
        running.services.append(admin)

    def _start_https(self, listener, server: Server, running: "RunningServer", storage,
                     limits: FrontLimits, tcp_routes: TCPRoutes) -> None:
        """The public HTTPS port: the same front and pipeline behind a TLS handshake chosen by SNI;
        a name a client serves by TLS passthrough is handed to `tcp_routes` untouched."""
        if not isinstance(storage, CertificateStore):
            raise ValueError(f"--https needs a store that keeps certificates; {storage.describe()} does not")
        running.https_address = listener.getsockname()[:2]
        manager = None
        if self.acme:
            manager = CertManager(storage, server.config.node_id, self.acme_settings,  # type: ignore[arg-type]
                                  None if server.metrics is None else server.metrics.acme)
            running.acme = manager
            running.tasks += [gevent.spawn(manager.run), gevent.spawn(manager.scan_forever)]
        book = CertificateBook(storage, on_unknown=None if manager is None else manager.want)
        book.refresh()
        running.certificates = book
        running.tasks.append(gevent.spawn(book.run))
        step = handshake(book, self.https_handshake_timeout, tcp_routes)
        if self.worker is not None:  # a name another worker holds goes there before the handshake
            step = self.worker.tls_step(step, server.router, self.https_handshake_timeout)
        running.https_front = HTTPFront(server, scheme="https", limits=limits, handshake=step)
        running.public_services.append(running.https_front.serve(listener))
        running.services.append(running.public_services[-1])
        if not book.names() and manager is None:
            log.warning("https_without_certificates", https=_fmt(running.https_address),
                        hint="add one with `tun2g cert add DOMAIN --cert F --key F`; until then handshakes fail")

    def _start_tunnel_port(self, server: Server, running: RunningServer, cert, key) -> None:
        tunnel_listener = self._listen("--tunnel", self.tunnel_addr)
        running.tunnel_address = tunnel_listener.getsockname()[:2]
        if self.plain_tunnel:
            log.warning("plain_tunnel", note="tunnel traffic, tokens included, is NOT encrypted; "
                                             "use this for development and tests only")
            secure = None
        else:
            context = tls.server_context(cert, key)
            secure = lambda sock: tls.accept_tls(sock, context)  # noqa: E731
        running.tasks.append(gevent.spawn(server.listen, tunnel_listener, secure,
                                          "tcp" if self.plain_tunnel else "tcp+tls"))

    def _tunnel_port_wanted(self) -> bool:
        """False for `--tunnel none` (one public port: clients use --conn-type upgrade)."""
        return bool(self.tunnel_addr) and self.tunnel_addr.lower() != "none"

    def _listen(self, flag: str, address: str):
        """The listener for `flag`: a worker's comes from its supervisor (shared with the other workers)."""
        inherited = None if self.worker is None else self.worker.listener(flag)
        return listen(flag, address) if inherited is None else inherited

    def shared_certificate(self) -> None:
        """Make the development certificate now, if one is needed (a supervisor, before its workers start)."""
        self._certificate()

    def _certificate(self):
        if self.tls_cert:
            return self.tls_cert, self.tls_key
        if (self.plain_tunnel or not self._tunnel_port_wanted()) and not self.kcp_addr:
            return None, None
        return tls.make_dev_certificate(default_sqlite_path().parent)

    def _start_kcp(self, address: str, server: Server, running: RunningServer, cert, key) -> tuple:
        from tun2g.transport import kcp, tls_bio

        try:
            listener = kcp.KCPListener(*tcp.split_host_port(address), kcp.options_for(self.kcp_profile))
        except (OSError, OverflowError) as exc:
            raise SetupError(f"--kcp {address}: cannot listen there ({getattr(exc, 'strerror', None) or exc}); "
                             f"give another address") from None
        if self.plain_tunnel:
            secure = None
        else:
            context = tls_bio.server_context(str(cert), str(key))
            secure = lambda conn: tls_bio.wrap(conn, context, server_side=True)  # noqa: E731
        running.tasks.append(gevent.spawn(server.listen, listener, secure,
                                          "kcp" if self.plain_tunnel else "kcp+tls"))
        running.kcp_listener = listener
        return listener.address[:2]


@dataclass
class RunningServer:
    """A started server and the addresses it actually bound."""

    server: Server
    cluster: ClusterNode | None = None
    http_address: tuple | None = None
    https_address: tuple | None = None
    tunnel_address: tuple | None = None
    kcp_address: tuple | None = None
    kcp_listener: object | None = None
    admin_address: tuple | None = None
    passthrough_address: tuple | None = None
    front: HTTPFront | None = None
    https_front: HTTPFront | None = None
    certificates: CertificateBook | None = None
    acme: CertManager | None = None  # with --acme
    admin_token: str | None = None
    services: list = field(default_factory=list)
    public_services: list = field(default_factory=list)  # the HTTP and HTTPS fronts' listeners, closed first on a drain
    tasks: list = field(default_factory=list)
    setup: ServerSetup | None = None  # the settings in force (a reload replaces the live ones)
    fd_limit: int = 1024
    inspector: Inspector | None = None  # made on start, or by the first reload that turns capture on
    # Reads the config file again and says what changed (set by `tun2g server --config`; None: no file).
    reloader: Callable[[], ConfigChange] | None = None
    _reload_lock: BoundedSemaphore = field(default_factory=BoundedSemaphore)
    stopped: Event = field(default_factory=Event)

    def reload(self) -> ConfigChange:
        """Read the config file again and apply what can change live (SIGHUP, POST /reload of the admin API).

        Tunnels and requests in flight are untouched. What only a restart applies is logged as such and left
        as it is; a file that cannot be used raises ConfigError and leaves the settings in force as they were."""
        if self.reloader is None:
            raise ConfigError("-", "this server was started without --config: there is no file to reload")
        with self._reload_lock:  # SIGHUP and the admin API may ask at once
            try:
                change = self.reloader()
            except ConfigError as exc:
                log_reload_failure(log, exc)
                raise
            self.reconfigure(change.live)
        change.log(log)
        return change

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        """Apply new values of LIVE_SETTINGS (ServerSetup field names) to the running server, in place.

        None for a bound (a timeout, a connection cap) means its default, as when the flag is not given."""
        unknown = set(changes) - LIVE_SETTINGS
        if unknown:
            raise ConfigurationError(f"cannot change {', '.join(sorted(unknown))} while running: restart")
        assert self.setup is not None
        defaults = ServerSetup()
        values: dict[str, Any] = {name: getattr(defaults, name) if value is None else value
                                  for name, value in changes.items()}
        setup = self.setup = replace(self.setup, **values)
        server, pipeline = self.server, self.server.pipeline
        if "log_level" in changes:
            configure(setup.log_level)
        if "access_log" in changes:
            pipeline.access_log = setup.access_log
        if "ping_interval" in changes:
            server.config.ping_interval = setup.ping_interval  # each tunnel's next ping
        if "metrics_domain_cap" in changes and server.metrics is not None:
            server.metrics.domain_cap = setup.metrics_domain_cap  # domains labelled already keep their label
        if "inspect" in changes:
            if setup.inspect and self.inspector is None:
                self.inspector = setup.start_inspector(server.storage, server.config.node_id, server.metrics)
            server.inspector = pipeline.inspector = self.inspector if setup.inspect else None
        if "trusted_proxies" in changes:
            pipeline.set_trusted_proxies(setup.trusted_proxies)
        if {"response_timeout", "body_timeout"} & set(changes):
            pipeline.timeouts = setup.exchange_timeouts()
        if {"header_timeout", "idle_timeout", "max_connections_per_ip", "max_connections"} & set(changes) \
                and self.front is not None:
            self.front.limits = setup.front_limits(self.fd_limit)  # for the connections accepted from now on
        if "policies" in changes:
            install_policies(server, setup.policies)

    def drain(self, grace: float) -> None:
        """SIGTERM: stop taking public connections and tunnels, let the work in flight finish
        (at most ``grace`` s; tun2g clients are told to move), then `stop()`."""
        if self.server.draining:
            return
        self.server.draining = True  # the health check answers 503 from now on: balancers send no more
        for service in self.public_services:
            service.close()  # the public HTTP/HTTPS listeners (new connections); the open ones carry on
        fronts = [front for front in (self.front, self.https_front) if front is not None]
        tcp_routes = self.server.tcp
        if tcp_routes is not None:
            tcp_routes.stop_accepting()  # new TCP connections go to another node; the open ones carry on
        self.server.drain(grace, busy=lambda: sum(front.requests_in_flight for front in fronts)
                          + (tcp_routes.forwarding if tcp_routes is not None else 0))
        self.stop()

    def stop(self) -> None:
        """Close listeners and tunnels; wakes `wait()`."""
        if self.stopped.is_set():
            return
        log.info("stopping")
        self.server.draining = True  # the health check answers 503 from now on
        if self.cluster is not None:
            self.cluster.close()  # first: the other nodes stop forwarding here before the front closes
        for service in self.services:
            service.stop(timeout=1)
        self.server.close()
        if self.inspector is not None:  # capture switched off by a reload: the server no longer holds it
            self.inspector.close()
        gevent.killall(self.tasks, block=True, timeout=2)
        gevent.sleep(0)  # gevent closes a socket a waiting greenlet held on the next loop turn
        self.server.storage.close()
        self.stopped.set()

    def wait(self) -> None:
        """Block until `stop()` has finished."""
        self.stopped.wait()


def install_policies(server: Server, policies: Mapping[str, Policy]) -> None:
    """Put the config file's edge policies (by route) in force, replacing the file's previous ones; they win
    over stored policies for the same route (tun2g.server.policy_step)."""
    server.policies.set_config_policies(dict(policies))


def policy_book(storage, metrics: Metrics | None = None) -> PolicyBook:
    """The routes' edge policies; with Redis, rate limits shared by the cluster (tun2g.server.rate_limit)."""
    if not isinstance(storage, RedisStorage):
        return PolicyBook()
    from tun2g.storage.redis_connect import open_redis

    client = open_redis(storage.url, socket_timeout=1.0, socket_connect_timeout=1.0)  # Sentinel URLs too
    return PolicyBook(ClusterLimiter(client, storage.key_prefix,
                                     on_error=None if metrics is None else lambda: metrics.redis_error("ratelimit")))


def _capture_counter(metrics: Metrics):
    def count(outcome: str) -> None:
        metrics.captures[outcome].value += 1

    return count


def _tunnel_advertised(address) -> str:
    """host:port of this node's tunnel port for clients: its IP, or this host's when it listens on all."""
    return default_advertise_url(address, scheme="tcp").removeprefix("tcp://")


def _fmt(address) -> str:
    return f"{address[0]}:{address[1]}" if address else "-"


def _cluster_node(storage: RedisStorage, node_id: str, tunnels: Tunnels, advertise_url: str, secret: str | None,
                  ttl: float, hop_timeout: float = HOP_READ_TIMEOUT, metrics: Metrics | None = None) -> ClusterNode:
    """This process as one node of the cluster that shares `storage`'s Redis."""
    return ClusterNode(ClusterConfig(redis_url=storage.url, advertise_url=advertise_url, secret=secret, ttl=ttl,
                                     key_prefix=storage.key_prefix, hop_timeout=hop_timeout,
                                     on_redis_error=None if metrics is None else metrics.redis_error),
                       node_id, local_backends=tunnels.records, kill_local=tunnels.close_one)


def create_wsgi_app(environ: dict | None = None) -> WSGIFront:
    """A whole tun2g node as a WSGI application, configured from the environment (once per gunicorn worker).

        gunicorn -k gevent -b 0.0.0.0:$PORT 'tun2g.server.process:create_wsgi_app()'

    Each worker becomes one node: its own Server (tunnel clients connect to it
    by HTTP Upgrade on the public port), its storage from ``REDIS_URL`` /
    ``TUN2G_STORAGE``, and with Redis its own entry in the shared registry.
    Other nodes reach a worker's backends through a small internal HTTP
    listener per worker: ``TUN2G_HOP_LISTEN`` (default ``0.0.0.0:0``, a free
    port) advertised as ``TUN2G_ADVERTISE`` (default: that port on this host's
    address). ``TUN2G_CLUSTER_SECRET``, ``TUN2G_REGISTRY_TTL``,
    ``TUN2G_NODE_ID``, ``TUN2G_TRUSTED_PROXY`` and ``TUN2G_LOG_LEVEL`` work as for `tun2g server`.
    """
    env = os.environ if environ is None else environ
    configure(env.get("TUN2G_LOG_LEVEL", "info"))
    storage = open_storage(env.get("TUN2G_STORAGE") or env.get("REDIS_URL") or None)
    config = ServerConfig(storage=storage)
    if env.get("TUN2G_NODE_ID"):
        config.node_id = f"{env['TUN2G_NODE_ID']}-{os.getpid()}"  # one node per worker process
    tunnels = Tunnels()
    cluster = None
    hop_listener = None
    if isinstance(storage, RedisStorage):
        hop_listener = tcp.listen(env.get("TUN2G_HOP_LISTEN", "0.0.0.0:0"))
        advertise = env.get("TUN2G_ADVERTISE") or default_advertise_url(hop_listener.getsockname()[:2])
        cluster = _cluster_node(storage, config.node_id, tunnels, advertise, env.get("TUN2G_CLUSTER_SECRET") or None,
                                float(env.get("TUN2G_REGISTRY_TTL", "10")),
                                float(env.get("TUN2G_HOP_TIMEOUT", str(HOP_READ_TIMEOUT))))
    defaults = ServerSetup()
    server = Server(config, tunnels=tunnels, cluster=cluster, access_log=False,
                    trusted_proxies=env.get("TUN2G_TRUSTED_PROXY", "").replace(",", " ").split(),
                    timeouts=defaults.exchange_timeouts(), policies=policy_book(storage))
    if hop_listener is not None and cluster is not None:
        # Only other nodes connect here (many kept-alive connections from few addresses): no per-IP cap.
        limits = defaults.front_limits(raise_fd_limit()[1])
        HTTPFront(server, limits=FrontLimits(limits.head_timeout, limits.idle_timeout, 0, limits.max_total)
                  ).serve(hop_listener)
        cluster.start()
    log.info("wsgi_node_ready", node=config.node_id, storage=storage.describe(), cluster=cluster is not None)
    _drain_on_sigterm(server, cluster, float(env.get("TUN2G_GRACE_PERIOD", "25")))
    return WSGIFront(server)


def _drain_on_sigterm(server: Server, cluster: ClusterNode | None, grace: float) -> None:
    """Under gunicorn: SIGTERM also drains this worker's node, then closes its tunnels.

    gunicorn's worker waits up to its graceful timeout (30 s) for every open request, and a
    tunnel by Upgrade is one that never ends on its own: closing the tunnels once their
    requests are answered (tun2g clients told to move first) makes the worker's exit prompt.
    The worker's own handler (installed before the app loads) still runs.
    """
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def drain_then_close() -> None:
        server.drain(grace)
        if cluster is not None:
            cluster.close()
        server.close()

    def on_sigterm(signum, frame) -> None:
        gevent.spawn(drain_then_close)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
