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


def print_table(header, rows) -> None:
    """Print rows of strings as left-aligned columns under a header row."""
    table = [tuple(header), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
