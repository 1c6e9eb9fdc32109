"""Helpers shared by the commands: environment fallbacks, value checks, table output."""

from __future__ import annotations

import click

from tun2g.transport.tcp import split_host_port


def env_option(*decls, env: str, **kwargs):
    """A click option that falls back to the environment variable `env` (shown in --help)."""
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


def host_port(ctx, param, value):
    """Validate HOST:PORT values early, with a message that shows the expected form."""
    if value is None:
        return None
    try:
        _host, port = split_host_port(value)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT (e.g. 0.0.0.0:8080 or :8080), got {value!r}") from None
    if not 0 <= port <= 65535:
        raise click.BadParameter(f"port {port} is out of range (0-65535) in {value!r}")
    return value


def host_port_or_none(ctx, param, value):
    """`host_port`, or the word ``none`` (no such listener)."""
    return value if value == "none" else host_port(ctx, param, value)


def http_url(ctx, param, value):
    """Validate an http(s):// URL with a host (and a port in range) early: the backend's, the admin API's."""
    from urllib.parse import urlsplit

    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}; expected e.g. http://127.0.0.1:3000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"expected a URL such as http://127.0.0.1:3000, got {value!r}")
    return value


POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)


def cidrs(ctx, param, values):
    """Validate CIDR blocks (10.0.0.0/8, 2001:db8::/32, or one address) early; returns them as a tuple."""
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise click.BadParameter(f"expected an address or CIDR block such as 10.0.0.0/8, got {value!r}") from None
    return tuple(values)


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"  # tun2g.server.acme.LETS_ENCRYPT


ACME_CHALLENGES = ("http-01", "tls-alpn-01")


def acme_challenge_option(flag: str):
    """`tun2g cert issue --challenge` / `tun2g server --acme-challenge`: how the ACME server validates."""
    return env_option(flag, "acme_challenge", env="TUN2G_ACME_CHALLENGE", type=click.Choice(ACME_CHALLENGES),
                      default="http-01", show_default=True,
                      help="How the ACME server validates: http-01 on the servers' public HTTP port (port 80), "
                           "tls-alpn-01 on their public HTTPS port (443; works behind a TCP-mode balancer "
                           "and with --http none).")


def acme_options(command):
    """--acme-directory, --acme-email and --acme-ca-bundle: where `tun2g cert issue` and `server --acme` order."""
    for option in reversed((
            env_option("--acme-directory", env="TUN2G_ACME_DIRECTORY", default=LETS_ENCRYPT, show_default=True,
                       metavar="URL", help="The ACME directory URL (any RFC 8555 server)."),
            env_option("--acme-email", env="TUN2G_ACME_EMAIL", metavar="EMAIL",
                       help="Contact address for the ACME account (expiry notices)."),
            env_option("--acme-ca-bundle", env="TUN2G_ACME_CA_BUNDLE", type=click.Path(exists=True, dir_okay=False),
                       metavar="FILE", help="CA file to verify the ACME directory with (a test server's); "
                                            "default: the system's."))):
        command = option(command)
    return command


def print_table(header, rows) -> None:
    """Print rows of strings as left-aligned columns under a header row."""
    table = [tuple(header), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
