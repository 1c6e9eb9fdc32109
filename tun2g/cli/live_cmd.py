"""`tun2g backends` and `tun2g kill`: operating a running server."""

from __future__ import annotations

import json
import sys
import time

import click

from tun2g.cli.errors import Fatal
from tun2g.cli.options import env_option, print_table

_admin_url = click.option("--admin", "admin_url", envvar=["TUN2G_ADMIN", "TUN2G_ADMIN_URL"], show_envvar=True,
                          metavar="HOST:PORT|URL",
                          help="The server's admin API: its --admin address (the same form and variable as "
                               "`tun2g server --admin`). Default: the address a server on this machine recorded "
                               "in the data dir, else 127.0.0.1:7070.")
_admin_token = env_option("--admin-token", env="TUN2G_ADMIN_TOKEN",
                          help="The admin API's bearer token. Default: the admin-token file in the data dir "
                               "(where `tun2g server` on this machine keeps it).")


def _admin_base(admin: str | None) -> str:
    """The admin API's base URL from --admin (HOST:PORT or URL), else from the local server's record."""
    from tun2g.server.admin_token import read_admin_address

    admin = admin or read_admin_address() or "127.0.0.1:7070"
    if "://" not in admin:
        host, _, port = admin.rpartition(":")
        if host in ("", "0.0.0.0", "[::]", "::"):  # a server on every interface is reached on loopback here
            host = "127.0.0.1"
        admin = f"http://{host}:{port}"
    return admin.rstrip("/")


def _admin_request(method: str, url: str, token: str | None):
    import requests

    from tun2g.server.admin_token import read_admin_token

    token = token or read_admin_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        if method == "GET":
            response = requests.request(method, url, headers=headers, timeout=10)
        else:  # changes go as JSON: the API refuses any other Content-Type (no cross-site form can send it)
            response = requests.request(method, url, headers=headers, json={}, timeout=10)
    except requests.RequestException as exc:
        raise Fatal(f"cannot reach the admin API at {url} ({_why(exc)}). Is `tun2g server` running, "
                    f"and is --admin right?") from None
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code != 200:
        error = payload.get("error") if isinstance(payload, dict) else None
        raise Fatal(error or f"the admin API at {url} answered {response.status_code} {response.reason}; "
                             f"is --admin the server's admin address?")
    if payload is None:
        raise Fatal(f"{url} did not answer JSON: it is not a tun2g admin API; give --admin the address "
                    f"`tun2g server --admin` listens on")
    return payload


def _why(exc: Exception) -> str:
    """The root of a requests error in a few words (connection refused, name not known, timed out)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__context__ or cause.__cause__
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Failed to resolve"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


@click.command()
@_admin_url
@_admin_token
@click.option("--domain", help="Only backends serving this domain.")
@click.option("--user", help="Only backends owned by this user.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", "watch", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS", is_flag=False,
              flag_value=2.0, help="Refresh the table every SECONDS (default 2) until Ctrl-C.")
@click.option("--count", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --watch: stop after N refreshes (for scripts).")
def backends(admin_url, admin_token, domain, user, as_json, watch, count):
    """List the tunnel clients connected to the server (--watch: keep the table current)."""
    query = f"?domain={domain}" if domain else f"?user={user}" if user else ""
    url = f"{_admin_base(admin_url)}/backends{query}"
    if watch is None:
        _print_backends(_admin_request("GET", url, admin_token), as_json)
        return
    shown = 0
    try:
        while count is None or shown < count:
            rows = _admin_request("GET", url, admin_token)
            if sys.stdout.isatty():
                click.clear()
            click.echo(f"{time.strftime('%H:%M:%S')}  {len(rows)} backend(s), every {watch:g} s; Ctrl-C to stop")
            _print_backends(rows, as_json)
            sys.stdout.flush()
            shown += 1
            if count is None or shown < count:
                time.sleep(watch)  # the refresh cadence
    except KeyboardInterrupt:
        click.echo("")


def _print_backends(rows: list, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no backends connected")
        return
    columns = ("id", "domain", "user", "proto", "host", "usable", "phi", "requests_in_flight", "node")
    print_table(columns, [tuple(str(round(r[c], 2) if c == "phi" else r[c]) for c in columns) for r in rows])


@click.command()
@_admin_url
@_admin_token
@click.argument("backend_id")
def kill(admin_url, admin_token, backend_id):
    """Disconnect one backend (by the ID `tun2g backends` shows). It may reconnect."""
    _admin_request("POST", f"{_admin_base(admin_url)}/backends/{backend_id}/kill", admin_token)
    click.echo(f"killed {backend_id}")
