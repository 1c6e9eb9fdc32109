"""`tun2g server`: the public HTTP front, the tunnel listeners and the admin API."""

from __future__ import annotations

import os
import signal
import sys

import click

from tun2g.cli.config_cmd import ConfigCommand, config_option, loaded_config, policy_section
from tun2g.cli.options import POSITIVE_SECONDS, acme_challenge_option, acme_options, cidrs, env_option, host_port, host_port_or_none


@click.command(cls=ConfigCommand)
@config_option("TUN2G_SERVER_CONFIG", sections={"policy": policy_section})
@env_option("--http", "http_addr", env="TUN2G_HTTP", metavar="HOST:PORT|none",
            callback=host_port_or_none,
            help="Public HTTP address. Default :$PORT when PORT is set (Heroku), else :8080. `none`: HTTPS only "
                 "(with --https; not with --https-redirect, --acme's http-01 or a Redis store).")
@env_option("--https", "https_addr", env="TUN2G_HTTPS", callback=host_port, metavar="HOST:PORT",
            help="Public HTTPS address (next to --http), certificates chosen by SNI from the store "
                 "(`tun2g cert add`); see docs/https.md. Default: no HTTPS.")
@env_option("--https-redirect", env="TUN2G_HTTPS_REDIRECT", is_flag=True,
            help="Answer plain public HTTP with a 308 to the same URL on the --https port (health checks and "
                 "tunnel clients by Upgrade are not redirected).")
@env_option("--hsts", "hsts_max_age", env="TUN2G_HSTS", type=click.IntRange(min=0), default=0, metavar="SECONDS",
            help="Send Strict-Transport-Security: max-age=SECONDS on responses over HTTPS. 0: none.")
@env_option("--acme", env="TUN2G_ACME", is_flag=True,
            help="Order certificates by ACME for routed names on their first HTTPS use and renew them "
                 "(one node per name; --acme-challenge says how it is validated); needs --https. See docs/https.md.")
@acme_options
@acme_challenge_option("--acme-challenge")
@env_option("--tunnel", "tunnel_addr", env="TUN2G_TUNNEL", default=":4443", show_default=True,
            callback=host_port_or_none,
            metavar="HOST:PORT|none", help="Address where tunnel clients connect (TCP). `none`: no tunnel port; "
                                           "clients connect by HTTP Upgrade on the public port (--conn-type upgrade).")
@env_option("--tls-cert", env="TUN2G_TLS_CERT", type=click.Path(exists=True, dir_okay=False),
            help="PEM certificate for the tunnel port. Without it a development certificate is made.")
@env_option("--tls-key", env="TUN2G_TLS_KEY", type=click.Path(exists=True, dir_okay=False),
            help="PEM private key matching --tls-cert.")
@env_option("--plain-tunnel", is_flag=True, env="TUN2G_PLAIN_TUNNEL",
            help="No TLS on the tunnel port. For development and tests only: tokens travel in clear.")
@env_option("--kcp", "kcp_addr", env="TUN2G_KCP", callback=host_port, metavar="HOST:PORT",
            help="Also accept tunnel clients over KCP (UDP) here, with TLS inside as Go tun2 does.")
@env_option("--kcp-profile", env="TUN2G_KCP_PROFILE", type=click.Choice(["fast", "kcp-go"]), default="fast",
            show_default=True, help="KCP timing and windows: fast (wire-compatible with Go peers on their defaults) "
                                    "or kcp-go (kcp-go's own defaults, as Go tun2 runs).")
@env_option("--storage", env="TUN2G_STORAGE", metavar="URL",
            help="Token and route store: sqlite:///path.db, redis://host:port/db or "
                 "redis+sentinel://host:port[,host:port]/service_name[/db]. "
                 "Default: REDIS_URL if set, else the embedded SQLite file.")
@env_option("--redis-url", env="REDIS_URL", metavar="URL", help="Redis for storage (when --storage is unset).")
@env_option("--admin", "admin_addr", env="TUN2G_ADMIN", default="127.0.0.1:7070", show_default=True,
            callback=host_port, metavar="HOST:PORT",
            help="Admin API (backends, kill, status). A non-loopback address needs --admin-token.")
@env_option("--admin-token", env="TUN2G_ADMIN_TOKEN",
            help="Bearer token the admin API requires. Default: a random one made on first start and kept in "
                 "the data dir's admin-token file (mode 0600), which `tun2g backends`/`kill` read.")
@env_option("--node-id", env="TUN2G_NODE_ID", help="This process's name in logs and the backend list.")
@env_option("--advertise", "advertise_url", env="TUN2G_ADVERTISE", metavar="URL",
            help="With Redis: where the other nodes reach this node's HTTP front, e.g. http://10.0.0.2:8080. "
                 "Default: the --http address (this host's IP when it listens on all interfaces).")
@env_option("--advertise-tunnel", env="TUN2G_ADVERTISE_TUNNEL", metavar="HOST:PORT", callback=host_port,
            help="With Redis: where tunnel clients reach this node's tunnel port, told to every client so it can "
                 "hold sessions on several nodes. Default: the --tunnel address (this host's IP on all interfaces).")
@env_option("--cluster-secret", env="TUN2G_CLUSTER_SECRET",
            help="With Redis: the secret that signs node-to-node requests; the same on every node. "
                 "Default: one kept in Redis.")
@env_option("--registry-ttl", env="TUN2G_REGISTRY_TTL", type=POSITIVE_SECONDS, default=10.0, show_default=True,
            help="With Redis: seconds after which a silent node's backends leave the shared registry.")
@env_option("--hop-timeout", env="TUN2G_HOP_TIMEOUT", type=POSITIVE_SECONDS, default=75.0, show_default=True,
            help="With Redis: seconds a request forwarded to another node may wait for it (its response head, "
                 "or the next piece of a body). Frozen nodes are detected sooner, by their health check.")
@env_option("--smux-version", env="TUN2G_SMUX_VERSION", type=click.Choice(["auto", "1", "2"]), default="auto",
            show_default=True, help="smux protocol version: auto gives tun2g clients 2 (per-stream flow control) "
                                    "and Go tun2 clients 1; a fixed version must match every client's.")
@env_option("--ping-interval", env="TUN2G_PING_INTERVAL", type=POSITIVE_SECONDS, default=5.0, show_default=True,
            help="Seconds between health pings of each Go tun2 client's tunnel (an HTTP GET /health).")
@env_option("--liveness-interval", env="TUN2G_LIVENESS_INTERVAL", type=POSITIVE_SECONDS, default=15.0,
            show_default=True, help="Seconds between the control-stream pings of each tun2g client's tunnel.")
@env_option("--liveness-timeout", env="TUN2G_LIVENESS_TIMEOUT", type=POSITIVE_SECONDS, default=10.0,
            show_default=True, help="Seconds a tun2g client has to answer a ping before its tunnel is dropped.")
@env_option("--trusted-proxy", "trusted_proxies", env="TUN2G_TRUSTED_PROXY", multiple=True, metavar="CIDR",
            callback=cidrs,
            help="A balancer in front whose X-Forwarded-For/-Proto/-Host, Forwarded and X-Real-IP headers "
                 "are believed (repeat, or space-separated in the variable). Others' are replaced.")
@env_option("--access-log/--no-access-log", env="TUN2G_ACCESS_LOG", default=True, show_default=True,
            help="Log one line per proxied request.")
@env_option("--metrics/--no-metrics", env="TUN2G_METRICS", default=True, show_default=True,
            help="Count requests, bytes, tunnels, auth and Redis errors; served at the admin API's /metrics.")
@env_option("--metrics-domain-cap", env="TUN2G_METRICS_DOMAIN_CAP", type=click.IntRange(min=0), default=200,
            show_default=True, metavar="N",
            help="Domains with their own metrics label; later ones are counted under domain=\"other\".")
@env_option("--inspect/--no-inspect", env="TUN2G_INSPECT", default=True, show_default=True,
            help="Capture the exchanges of routes marked `tun2g route inspect DOMAIN on` (read: `tun2g inspect`).")
@env_option("--header-timeout", env="TUN2G_HEADER_TIMEOUT", type=click.FloatRange(min=0), metavar="SECONDS",
            help="A public request head must arrive whole within this (408 after; slowloris). 0: no limit. "
                 "Default 15.")
@env_option("--idle-timeout", env="TUN2G_IDLE_TIMEOUT", type=click.FloatRange(min=0), metavar="SECONDS",
            help="Close a kept-alive public connection idle this long. 0: never. Default 60.")
@env_option("--response-timeout", env="TUN2G_RESPONSE_TIMEOUT", type=click.FloatRange(min=0), metavar="SECONDS",
            help="504 when a backend sends no response head this long after the request. 0: wait forever. "
                 "Default 60.")
@env_option("--body-timeout", env="TUN2G_BODY_TIMEOUT", type=click.FloatRange(min=0), metavar="SECONDS",
            help="End an exchange whose body (either way) makes no progress this long. 0: never. Default 60.")
@env_option("--max-connections-per-ip", env="TUN2G_MAX_CONNECTIONS_PER_IP", type=click.IntRange(min=0),
            metavar="N", help="Open public connections per client address; more get a fast 503. 0: no cap. "
                              "Default 256.")
@env_option("--max-connections", env="TUN2G_MAX_CONNECTIONS", type=click.IntRange(min=0), metavar="N",
            help="Open public connections in all; more get a fast 503. 0: no cap. "
                 "Default: three quarters of the fd limit (raised to the hard limit at start).")
@env_option("--public-url", env="TUN2G_PUBLIC_URL", metavar="URL",
            callback=lambda ctx, param, value: _public_url(value),
            help="The public URL of a client's domain, told to each client when it connects, e.g. "
                 "https://{domain} (or https://{domain}:8443), or a bare base such as https://tunnels.example.com"
                 "[:8443] (its scheme and port, each client's domain). Default: clients show http://DOMAIN.")
@env_option("--self-service-domain", env="TUN2G_SELF_SERVICE_DOMAIN", metavar="BASE",
            callback=lambda ctx, param, value: _self_service_domain(value),
            help="Let tokens claim random names RANDOM.BASE for themselves (`tun2g http PORT` with no --domain; "
                 "docs/routing.md#self-service). Point *.BASE's DNS here. Default: off.")
@env_option("--self-service-limit", env="TUN2G_SELF_SERVICE_LIMIT", type=click.IntRange(1, 1000), default=3,
            show_default=True, metavar="N", help="Self-service names one user may hold (`tun2g route rm` frees one).")
@env_option("--grace-period", env="TUN2G_GRACE_PERIOD", type=click.FloatRange(min=0), default=25.0,
            show_default=True, metavar="SECONDS",
            help="On SIGTERM: stop taking new connections and tunnels, tell tun2g clients to move, and let the "
                 "requests in flight finish for up to this long (inside Heroku's 30 s), then exit 0.")
@env_option("--workers", env="TUN2G_WORKERS", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
            help="Processes sharing the public and tunnel ports (0: one per core); a request for a tunnel another "
                 "worker holds is handed to it. See docs/cli.md#workers.")
@env_option("--tcp-ports", env="TUN2G_TCP_PORTS", metavar="FIRST-LAST",
            help="Ports to allocate for clients asking `--tcp 0=HOST:PORT` (held while they are connected).")
@env_option("--tcp-bind", env="TUN2G_TCP_BIND", metavar="HOST",
            help="Bind every TCP route on this address instead of the one in its route.")
@env_option("--tls-passthrough", env="TUN2G_TLS_PASSTHROUGH", callback=host_port, metavar="HOST:PORT",
            help="A shared TLS port routed by SNI to clients serving `--tls NAME=HOST:PORT`, never decrypted.")
@env_option("--tcp-idle-timeout", env="TUN2G_TCP_IDLE_TIMEOUT", type=click.FloatRange(min=0), default=3600.0,
            show_default=True, metavar="SECONDS", help="Close a TCP connection with no byte either way this long. 0: never.")
@env_option("--tcp-connect-timeout", env="TUN2G_TCP_CONNECT_TIMEOUT", type=click.FloatRange(min=0.1), default=10.0,
            show_default=True, metavar="SECONDS", help="A client must dial its local service within this (else RST).")
@env_option("--tcp-max-connections", env="TUN2G_TCP_MAX_CONNECTIONS", type=click.IntRange(min=1), default=4096,
            show_default=True, metavar="N", help="Open connections per TCP route or TLS name (a route may set fewer).")
@env_option("--log-level", env="TUN2G_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
            default="info", show_default=True, help="Least severe log lines to print (key=value on stderr).")
def server(http_addr, https_addr, https_redirect, hsts_max_age, tunnel_addr, tls_cert, tls_key, plain_tunnel, kcp_addr,
           kcp_profile, storage, redis_url, admin_addr, admin_token, node_id, advertise_url, advertise_tunnel,
           cluster_secret, registry_ttl, hop_timeout, smux_version,
           ping_interval, liveness_interval, liveness_timeout, trusted_proxies, access_log, metrics, metrics_domain_cap, inspect, header_timeout,
           idle_timeout, response_timeout, body_timeout, max_connections_per_ip, max_connections, public_url,
           self_service_domain, self_service_limit, grace_period,
           workers, tcp_ports, tcp_bind, tls_passthrough, tcp_idle_timeout, tcp_connect_timeout, tcp_max_connections,
           log_level, acme, acme_directory, acme_email, acme_ca_bundle, acme_challenge):
    """Run a tun2g server: public HTTP in, routed by Host to connected tunnel clients.

    \b
    Examples:
      tun2g server                                 # development: SQLite store, dev TLS certificate
      tun2g server --tls-cert cert.pem --tls-key key.pem --http :80 --tunnel :4443
      PORT=8080 REDIS_URL=redis://localhost:6379/0 tun2g server
      tun2g server --config tun2g.toml             # kill -HUP reloads it (docs/config.md)
    """
    from tun2g.server.cert_manager import AcmeSettings
    from tun2g.server.process import ServerSetup
    from tun2g.server.tcp_routes import TCPSettings

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if http_addr is None:
        http_addr = f":{os.environ['PORT']}" if os.environ.get("PORT") else ":8080"
    setup = ServerSetup(http_addr=http_addr, https_addr=https_addr, https_redirect=https_redirect,
                        hsts_max_age=hsts_max_age, tunnel_addr=tunnel_addr, tls_cert=tls_cert, tls_key=tls_key,
                        plain_tunnel=plain_tunnel, kcp_addr=kcp_addr, kcp_profile=kcp_profile,
                        storage_url=storage or redis_url,
                        admin_addr=admin_addr, admin_token=admin_token, node_id=node_id,
                        smux_version=None if smux_version == "auto" else int(smux_version), ping_interval=ping_interval,
                        liveness_interval=liveness_interval, liveness_timeout=liveness_timeout, access_log=access_log,
                        log_level=log_level, advertise_url=advertise_url, advertise_tunnel=advertise_tunnel,
                        cluster_secret=cluster_secret,
                        registry_ttl=registry_ttl, hop_timeout=hop_timeout, trusted_proxies=trusted_proxies,
                        metrics=metrics, metrics_domain_cap=metrics_domain_cap, inspect=inspect,
                        public_url=public_url,
                        self_service_domain=self_service_domain,
                        self_service_limit=self_service_limit,
                        tcp_ports=tcp_ports, tcp_bind=tcp_bind, tls_passthrough=tls_passthrough,
                        tcp=TCPSettings(idle_timeout=tcp_idle_timeout or None, connect_timeout=tcp_connect_timeout,
                                        max_connections_per_route=tcp_max_connections),
                        acme=acme, acme_settings=AcmeSettings(acme_directory, acme_email, acme_ca_bundle,
                                                              challenge=acme_challenge))
    bounds = dict(header_timeout=header_timeout, idle_timeout=idle_timeout, response_timeout=response_timeout,
                  body_timeout=body_timeout, max_connections_per_ip=max_connections_per_ip,
                  max_connections=max_connections)
    for name, value in bounds.items():
        if value is not None:  # unset: the default in tun2g.server.process
            setattr(setup, name, value)
    ctx = click.get_current_context()
    loaded = loaded_config(ctx)
    if loaded is not None:
        setup.policies = loaded.sections.get("policy", {})
    setup.check_https()  # a ConfigurationError is one line and status 2: tun2g.cli.errors
    if _run_workers(setup, workers, grace_period, reloads=loaded is not None):
        return
    import gevent

    from tun2g.cli.errors import EXIT_INTERRUPTED

    signals: list[int] = []  # handled from the start: a signal during start-up acts once the server runs

    def handle(signum: int) -> None:
        signals.append(signum)
        if running is not None:
            act(signum)

    def act(signum: int) -> None:
        if signum == signal.SIGINT:  # Ctrl-C: stop now
            gevent.spawn(running.stop)
        else:  # SIGTERM: drain, then stop
            gevent.spawn(running.drain, grace_period)

    running = None
    gevent.signal_handler(signal.SIGINT, handle, signal.SIGINT)
    gevent.signal_handler(signal.SIGTERM, handle, signal.SIGTERM)
    reload_asked: list[bool] = []  # a SIGHUP during start-up (a worker's supervisor passed one on) is applied after
    if loaded is not None:
        gevent.signal_handler(signal.SIGHUP, reload_asked.append, True)
    running = setup.start()  # a refusal (a port in use, a bad store URL) is one line: tun2g.cli.errors
    from tun2g.cli import gctune

    gctune.after_start_up()
    for signum in signals:
        act(signum)
    if loaded is not None:
        _reload_on_sighup(ctx, running, asked_already=bool(reload_asked))
    running.wait()
    if signal.SIGINT in signals:
        sys.exit(EXIT_INTERRUPTED)


def _run_workers(setup, workers: int, grace_period: float, reloads: bool = False) -> bool:
    """--workers: True when this process was the supervisor (it has run and stopped); a worker (or
    --workers 1) gets its settings adjusted and serves as one server does."""
    from tun2g.server import workers as pool

    spec = os.environ.get(pool.WORKER_ENV)
    if spec:
        pool.WorkerLink.from_env(spec).adjust(setup)
        return False
    count = pool.worker_count(workers)
    if count == 1:
        return False
    status = pool.supervise(setup, count, grace_period, reloads=reloads)
    if status:
        sys.exit(status)
    return True


def _reload_on_sighup(ctx: click.Context, running, asked_already: bool = False) -> None:
    """SIGHUP (and the admin API's POST /reload) read the config file again; see RunningServer.reload."""
    import gevent

    from tun2g.cli.config_cmd import Reloader
    from tun2g.config import ConfigError
    from tun2g.server.process import LIVE_SETTINGS

    reread = Reloader(ctx, (LIVE_SETTINGS - {"policies"}) | {"policy"})

    def reloader():
        change = reread()
        if "policy" in change.live:  # the file's [policy."DOMAIN"] tables are ServerSetup.policies
            change.live["policies"] = change.live.pop("policy") or {}
        return change

    def on_sighup():
        try:
            running.reload()
        except ConfigError:
            pass  # logged by reload(); the settings in force stay

    running.reloader = reloader
    gevent.signal_handler(signal.SIGHUP, on_sighup)
    if asked_already:
        on_sighup()


def _public_url(value: str | None) -> str | None:
    """--public-url: an http(s) URL template holding {domain}, or a bare scheme://host[:port] base."""
    if value is None:
        return None
    from tun2g.server.self_service import public_url_template

    try:
        return public_url_template(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _self_service_domain(value: str | None) -> str | None:
    """--self-service-domain: a DNS name of two labels or more, normalized."""
    if value is None:
        return None
    from tun2g.storage import StorageError
    from tun2g.storage.claims import check_claim_base

    try:
        return check_claim_base(value)
    except StorageError as exc:
        raise click.BadParameter(str(exc)) from None
