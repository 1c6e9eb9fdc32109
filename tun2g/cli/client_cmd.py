"""`tun2g client`: expose a local HTTP service through a tun2 server."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import click

from tun2g.cli.options import env_option

DEFAULT_INSPECT = "127.0.0.1:4040"
NEXT_FREE_PORTS = 9  # with the default address: 4040 taken, try up to 4049 (as ngrok moves to 4041)


@click.command()
@env_option("--server", "server_addr", env="TUN2G_SERVER", required=True, metavar="HOST:PORT|URL",
            help="The tun2 server's tunnel address (or https://host for --conn-type upgrade).")
@env_option("--token", env="TUN2G_TOKEN",
            help="Token from `tun2g token create`. On the command line it shows in `ps`: prefer --token-file "
                 "or the TUN2G_TOKEN variable.")
@env_option("--token-file", env="TUN2G_TOKEN_FILE", metavar="PATH",
            help="Read the token from this file (its first line; keep it mode 0600). Instead of --token.")
@env_option("--domain", env="TUN2G_DOMAIN", required=True, help="Public domain to serve (a route you own).")
@env_option("--backend", "backend_url", env="TUN2G_BACKEND", required=True, metavar="URL",
            help="Local service to forward to, e.g. http://127.0.0.1:3000 (a path prefix is kept).")
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
def client(server_addr, token, token_file, domain, backend_url, conn_type, kcp_profile, ca_file, insecure, plain, backend_insecure,
           smux_version, reconnect, log_level, inspect_addr, no_inspect, tcp_specs, tls_specs, quiet):
    """Connect to a tun2 server and serve DOMAIN from a local backend.

    \b
    Examples (the token stays out of `ps`):
      tun2g client --server tunnel.example.com:4443 --token-file ~/.config/tun2g/token \\
                   --domain app.example.com --backend http://127.0.0.1:3000
      TUN2G_TOKEN=$TOKEN tun2g client --server tunnel.example.com:4443 \\
                   --domain app.example.com --backend http://127.0.0.1:3000

    Exits with status 2 when the server rejects the token or domain, 1 on other fatal errors.
    """
    import gevent

    from tun2g import smux
    from tun2g.client import AuthRejected, Client, ClientConfig
    from tun2g.errors import ConfigurationError
    from tun2g.log import configure

    token = _token(token, token_file)
    configure(log_level)
    if plain:
        click.echo("tun2g client: --plain: the tunnel is NOT encrypted (development and tests only)", err=True)
    from tun2g.client.tcp_forward import TCPForwarder

    try:
        forwarder = TCPForwarder.from_specs(tcp_specs, tls_specs)
        config = ClientConfig(server_addr=server_addr, token=token, domain=domain, backend_url=backend_url,
                              conn_type=conn_type, kcp_options=_kcp_options(conn_type, kcp_profile), plain=plain,
                              ca_file=ca_file, insecure=insecure, backend_insecure=backend_insecure,
                              reconnect=reconnect, tcp=forwarder or None,
                              smux_config=smux.Config(version=None if smux_version == "auto" else int(smux_version)))
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    from tun2g.cli.status import StatusPrinter

    printer = StatusPrinter(quiet=quiet)
    inspector = metrics = None
    if not no_inspect and inspect_addr.strip().lower() not in ("off", "no", "false", "0", ""):
        inspector, metrics = _start_inspector(config, inspect_addr, printer)
    tunnel = Client(config, on_status=printer.status, on_request=None if quiet else printer.request,
                    inspector=inspector, metrics=metrics)
    if inspector is not None:
        inspector.set_status(lambda: {"state": tunnel.state, "public_urls": tunnel.public_urls,
                                      "backend": backend_url, "requests_served": tunnel.requests_served})

    def stop():
        tunnel.close()
        if inspector is not None:
            inspector.close()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop)
    try:
        tunnel.run()
    except AuthRejected as exc:
        printer.flush()
        click.echo(f"tun2g client: {exc}. Check the token (`tun2g token list`) and that the route for "
                   f"{domain} belongs to the token's user (`tun2g route list`).", err=True)
        sys.exit(2)
    finally:
        if inspector is not None:
            inspector.close()
        printer.flush()


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
    click.echo(f"tun2g client: {message}", err=True)
    sys.exit(2)  # a usage error, as click's own


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
