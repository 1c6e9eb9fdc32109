"""`tun2g client`: expose a local HTTP service through a tun2 server."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import click

from tun2g.cli.config_cmd import ConfigCommand, config_option, loaded_config, route_section
from tun2g.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Fatal
from tun2g.cli.options import env_option, http_url

DEFAULT_INSPECT = "127.0.0.1:4040"
NEXT_FREE_PORTS = 9  # with the default address: 4040 taken, try up to 4049 (as ngrok moves to 4041)
# What a config reload (SIGHUP) changes without dropping the session; the rest needs a restart.
LIVE_SETTINGS = frozenset({"log_level", "quiet", "backend_url"})
# A callable the context's meta may hold (`tun2g http` sets it): hears the self-service name a claim got.
ON_CLAIM = "tun2g.on_claim"


@click.command(cls=ConfigCommand)
@config_option("TUN2G_CLIENT_CONFIG", sections={"route": route_section})
@env_option("--server", "server_addr", env="TUN2G_SERVER", required=True, metavar="HOST:PORT|URL",
            help="The tun2 server's tunnel address (or https://host for --conn-type upgrade).")
@env_option("--token", env="TUN2G_TOKEN",
            help="Token from `tun2g token create`. On the command line it shows in `ps`: prefer --token-file "
                 "or the TUN2G_TOKEN variable.")
@env_option("--token-file", env="TUN2G_TOKEN_FILE", metavar="PATH", type=click.Path(readable=False),
            help="Read the token from this file (its first line; keep it mode 0600). Instead of --token.")
@env_option("--domain", env="TUN2G_DOMAIN", help="Public domain to serve (a route you own); auto: a random name "
                                                 "from a server with --self-service-domain.")
@env_option("--backend", "backend_url", env="TUN2G_BACKEND", metavar="URL", callback=http_url,
            help="Local service to forward to, e.g. http://127.0.0.1:3000 (a path prefix is kept).")
@click.option("--route", "route_specs", multiple=True, metavar="ROUTE=URL",
              help="Serve one more route from its own backend over the same tunnel, e.g. "
                   "--route example.com/api=http://127.0.0.1:4000 (repeatable; without --domain/--backend "
                   "the first one is the main route). See docs/routing.md.")
@env_option("--instance-id", env="TUN2G_INSTANCE_ID", metavar="ID",
            help="Names this client across restarts: a new client with the same id (and user) takes over the "
                 "old one's sessions at once (default: random per process, kept across its reconnects).")
@env_option("--conn-type", env="TUN2G_CONN_TYPE", type=click.Choice(["tcp", "kcp", "upgrade"]), default="tcp",
            show_default=True, help="tcp: TLS over TCP; kcp: TLS over KCP (UDP); upgrade: HTTP Upgrade "
                                    "on the server's public port.")
@env_option("--kcp-profile", env="TUN2G_KCP_PROFILE", type=click.Choice(["fast", "kcp-go"]), default="fast",
            show_default=True, help="With --conn-type kcp: fast (wire-compatible with Go peers on their defaults) "
                                    "or kcp-go (kcp-go's own defaults, as Go tun2 runs).")
@env_option("--ca", "ca_file", env="TUN2G_CA", type=click.Path(exists=True, dir_okay=False),
            help="Trust this CA (or self-signed certificate) for the server, e.g. the dev certificate.")
@env_option("--insecure", is_flag=True, env="TUN2G_INSECURE",
            help="Do not verify the server's certificate (tests only).")
@env_option("--plain", is_flag=True, env="TUN2G_PLAIN", help="No TLS at all; for a server run with "
                                                             "--plain-tunnel (development and tests only).")
@env_option("--backend-insecure", is_flag=True, env="TUN2G_BACKEND_INSECURE",
            help="Do not verify an https backend's certificate.")
@env_option("--smux-version", env="TUN2G_SMUX_VERSION", type=click.Choice(["auto", "1", "2"]), default="auto",
            show_default=True, help="auto: 2 with a tun2g server, 1 with a Go tun2 server; "
                                    "a fixed version must match the server's.")
@env_option("--reconnect/--no-reconnect", env="TUN2G_RECONNECT", default=True, show_default=True,
            help="Reconnect with exponential backoff when the tunnel drops.")
@env_option("--sessions", env="TUN2G_SESSIONS", type=click.IntRange(1, 16), default=None, metavar="K",
            help="Hold sessions on K nodes of a cluster at once, one per node, learnt from the server's reply "
                 "(docs/cluster.md#multi-homed-clients). Default: 2 when the cluster has more than one node, else 1.")
@env_option("--grace-period", env="TUN2G_GRACE_PERIOD", type=click.FloatRange(min=0), default=25.0,
            show_default=True, metavar="SECONDS",
            help="On SIGTERM: take no new requests and let those in flight finish for up to this long, then exit 0.")
@env_option("--log-level", env="TUN2G_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
            default="info", show_default=True, help="Least severe log lines to print (key=value on stderr); "
                                                    "debug adds the life of each stream and request.")
@env_option("--inspect", "inspect_addr", env="TUN2G_INSPECT", default=DEFAULT_INSPECT, show_default=True,
            metavar="HOST:PORT|off", help="Serve the request inspector (web UI, JSON API, /metrics) here. When the "
                                          "default port is taken the next free one up to 4049 is used; a port given "
                                          "here that is taken is reported and the client runs without it.")
@click.option("--no-inspect", is_flag=True, help="Do not run the request inspector (same as --inspect off).")
@env_option("--tcp", "tcp_specs", env="TUN2G_TCP", multiple=True, metavar="PORT=HOST:PORT",
            help="Serve a public TCP port routed to you (tun2g route add tcp:...) from a local address; "
                 "repeatable. PORT 0: any port of the server's --tcp-ports range.")
@env_option("--tls", "tls_specs", env="TUN2G_TLS", multiple=True, metavar="NAME=HOST:PORT",
            help="Serve TLS passthrough for NAME (a route you own) from a local TLS server; repeatable. "
                 "The server routes by SNI and never decrypts.")
@env_option("--quiet", "-q", is_flag=True, env="TUN2G_QUIET",
            help="No status lines on stdout (the public URL, one line per request).")
def client(server_addr, token, token_file, domain, backend_url, route_specs, instance_id, conn_type, kcp_profile, ca_file,
           insecure, plain, backend_insecure, smux_version, reconnect, sessions, grace_period, log_level, inspect_addr,
           no_inspect, tcp_specs, tls_specs, quiet):
    """Connect to a tun2 server and serve DOMAIN from a local backend.

    \b
    Examples (the token stays out of `ps`):
      tun2g client --server tunnel.example.com:4443 --token-file ~/.config/tun2g/token \\
                   --domain app.example.com --backend http://127.0.0.1:3000
      TUN2G_TOKEN=$TOKEN tun2g client --server tunnel.example.com:4443 \\
                   --domain app.example.com --backend http://127.0.0.1:3000
      tun2g client --config client.toml            # kill -HUP reloads it (docs/config.md)

    Exit status (docs/cli.md#exit-status): 0 stopped by SIGTERM after finishing the requests in flight;
    1 the tunnel ended (or never began) with --no-reconnect; 2 a bad option, a token or domain the
    server refuses, or a server certificate that does not verify; 130 Ctrl-C.
    """
    import gevent

    from tun2g import smux
    from tun2g.client import AuthRejected, ClientConfig
    from tun2g.client.client import ConnectionLost, ServerMismatch, parse_route_spec
    from tun2g.client.multi import MultiClient
    from tun2g.errors import ConfigurationError
    from tun2g.log import configure
    from tun2g.transport import tls

    token = _token(token, token_file)
    configure(log_level)
    if plain:
        click.echo("tun2g client: --plain: the tunnel is NOT encrypted (development and tests only)", err=True)
    from tun2g.client.tcp_forward import TCPForwarder

    tls_context = None
    if ca_file or (not plain and conn_type != "kcp"):
        tls_context = tls.client_context(ca_file=ca_file, insecure=insecure)  # a bad --ca: one line, now
    routes = [parse_route_spec(spec) for spec in route_specs]
    if bool(domain) != bool(backend_url):
        raise ConfigurationError("--domain and --backend go together (or give --route ROUTE=URL only)")
    if not domain:
        if not routes:
            raise ConfigurationError("nothing to serve: give --domain D --backend URL, or --route ROUTE=URL")
        (domain, backend_url), routes = routes[0], routes[1:]
    claim = domain.strip().lower() == "auto"  # docs/routing.md#self-service
    forwarder = TCPForwarder.from_specs(tcp_specs, tls_specs)
    identity = {"instance_id": instance_id} if instance_id else {}
    # A ConfigurationError (an invalid --domain, say) is one line and status 2: tun2g.cli.errors.
    config = ClientConfig(server_addr=server_addr, token=token, domain="" if claim else domain,
                          backend_url=backend_url, routes=routes, claim=claim, **identity,
                          conn_type=conn_type, kcp_options=_kcp_options(conn_type, kcp_profile), plain=plain,
                          ca_file=ca_file, insecure=insecure, backend_insecure=backend_insecure,
                          tls_context=None if conn_type == "kcp" else tls_context,
                          reconnect=reconnect, tcp=forwarder or None,
                          smux_config=smux.Config(version=None if smux_version == "auto" else int(smux_version)))
    from tun2g.cli.status import StatusPrinter

    printer = StatusPrinter(quiet=quiet)
    inspector = metrics = None
    if not no_inspect and inspect_addr.strip().lower() not in ("off", "no", "false", "0", ""):
        inspector, metrics = _start_inspector(config, inspect_addr, printer)
    tunnel = MultiClient(config, sessions=sessions, on_status=printer.status,
                         on_request=None if quiet else printer.request, inspector=inspector, metrics=metrics,
                         on_claim=click.get_current_context().meta.get(ON_CLAIM))
    if inspector is not None:
        inspector.set_status(lambda: {"state": tunnel.entry.state, "public_urls": tunnel.entry.public_urls,
                                      "backend": backend_url, "requests_served": tunnel.requests_served,
                                      "nodes": tunnel.connected_nodes()})

    interrupted = []

    def interrupt():  # Ctrl-C: stop now, even mid-handshake
        interrupted.append(True)
        tunnel.close()

    gevent.signal_handler(signal.SIGINT, interrupt)
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(tunnel.drain, grace_period))
    ctx = click.get_current_context()
    if loaded_config(ctx) is not None:
        _reload_on_sighup(ctx, tunnel, printer)
    from tun2g.cli import gctune

    gctune.after_start_up()
    try:
        tunnel.run()
    except AuthRejected as exc:
        printer.flush()
        if claim and not config.domain:
            raise Fatal(str(exc), EXIT_USAGE) from None
        raise Fatal(f"{exc}. Check the token (`tun2g token list`) and that the route for {domain} belongs to "
                    f"the token's user (`tun2g route list`).", EXIT_USAGE) from None
    except ServerMismatch as exc:
        printer.flush()
        raise Fatal(f"cannot use {server_addr}: {exc}; {exc.hint}", EXIT_USAGE) from None
    except ConnectionLost as exc:
        printer.flush()
        raise Fatal(f"{server_addr}: {exc}; stopping (--no-reconnect)", EXIT_FAILED) from None
    finally:
        if inspector is not None:
            inspector.close()
        printer.flush()
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)


def _reload_on_sighup(ctx: click.Context, tunnel, printer) -> None:
    """SIGHUP reads the config file again: the log level, quiet and the backend change live (the session
    stays up); what only a restart applies is logged as such; a bad file changes nothing."""
    import gevent

    from tun2g.cli.config_cmd import Reloader
    from tun2g.config import ConfigError, log_reload_failure
    from tun2g.log import configure, get_logger

    log = get_logger(__name__)
    reread = Reloader(ctx, LIVE_SETTINGS)

    def on_sighup():
        try:
            change = reread()
        except ConfigError as exc:
            log_reload_failure(log, exc)
            return
        live = change.live
        if "backend_url" in live:
            try:
                tunnel.use_backend(live["backend_url"])
            except ValueError as exc:
                log_reload_failure(log, ConfigError(change.source, str(exc), key="backend"))
                return
        if "log_level" in live:
            configure(live["log_level"])
        if "quiet" in live:
            printer.quiet = live["quiet"]
            tunnel.set_on_request(None if live["quiet"] else printer.request)
        change.log(log)

    gevent.signal_handler(signal.SIGHUP, on_sighup)


def _token(token: str | None, token_file: str | None) -> str:
    """The token from --token/TUN2G_TOKEN or from --token-file; a problem is one line and exit status 2."""
    if token and token_file:
        _usage("give --token (or TUN2G_TOKEN) or --token-file, not both")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            _usage(f"--token-file {token_file}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
        if not token:
            _usage(f"--token-file {token_file}: the file is empty")
    if not token:
        _usage("a token is needed: --token-file PATH, TUN2G_TOKEN, or --token")
    return token


def _usage(message: str) -> NoReturn:
    raise Fatal(message, EXIT_USAGE)


def _kcp_options(conn_type: str, profile: str):
    if conn_type != "kcp":
        return None
    from tun2g.transport.kcp import options_for

    return options_for(profile)


def _start_inspector(config, address: str, printer):
    """The inspector listening at ``address`` with the client's metrics, or (None, None) when it cannot listen."""
    from tun2g.client.inspector import Inspector
    from tun2g.client.telemetry import ClientMetrics
    from tun2g.transport.tcp import split_host_port

    try:
        host, port = split_host_port(address, 4040)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT or off, got {address!r}", param_hint="--inspect") from None
    host = host.strip("[]") or "127.0.0.1"
    metrics = ClientMetrics()
    inspector = Inspector(secrets=[config.token], metrics=metrics)
    try:
        _host, bound = inspector.listen(host, port, next_free=NEXT_FREE_PORTS if address == DEFAULT_INSPECT else 0)
    except OSError as exc:
        printer.line(f"tun2g: inspector not started: cannot listen on {address} ({exc.strerror or exc}); "
                     f"use --inspect HOST:PORT or --no-inspect")
        return None, None
    moved = f" ({address} is in use)" if port and bound != port else ""
    printer.line(f"tun2g: inspector at {inspector.url}{moved}")
    return inspector, metrics
