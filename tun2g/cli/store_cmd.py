"""`tun2g token` and `tun2g route`: who may connect, and which domains each user may serve.

Both commands open the same store the server uses: --storage, else
TUN2G_STORAGE, else REDIS_URL, else the embedded SQLite file, so on one
machine no flags are needed and on a Heroku-style deploy `heroku run` finds
the add-on's Redis. Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import click

from tun2g.cli.errors import EXIT_FAILED, Fatal
from tun2g.cli.options import env_option, print_table
from tun2g.storage import CONNECT_SCOPE, NoSuchRoute, Storage, StorageError, open_storage
from tun2g.storage.routing import normalize_route_key, parse_route_key
from tun2g.storage.tcp_route import is_tcp_route, new_tcp_route, parse_tcp_route

SHORT_SECRET = 20  # characters; shorter imported secrets get a warning (generated ones have 43)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_storage_option = env_option(
    "--storage", "storage_url", env="TUN2G_STORAGE", metavar="URL",
    help="Where tokens and routes live: sqlite:///path.db, sqlite:relative.db, redis://host:port/db or "
         "rediss://... (add ?ssl_cert_reqs=none for a provider's self-signed Redis), "
         "redis+sentinel://host:port[,host:port]/service_name[/db] (the master Sentinel names). "
         "Default: REDIS_URL if set, else the embedded SQLite file the server uses.")
_user_filter = click.option("--user", help="Only this user's entries.")
_json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@contextmanager
def _opened(storage_url: str | None) -> Iterator[Storage]:
    """The store, closed afterwards; a StorageError (refused or down) becomes one line and exit status 1."""
    storage = None
    try:
        storage = open_storage(storage_url)
        yield storage
    except StorageError as exc:
        raise Fatal(str(exc), EXIT_FAILED) from None
    finally:
        if storage is not None:
            storage.close()


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _show(what: str, records: list, user, where: str, as_json: bool, header, row) -> None:
    """A listing as JSON, as a table, or a line saying there is nothing."""
    if as_json:
        click.echo(json.dumps([record.as_json() for record in records], indent=2))
    elif not records:
        click.echo(f"no {what}{f' for {user}' if user else ''} in {where}")
    else:
        print_table(header, [row(record) for record in records])


def _policy(route) -> str:
    parts = [f"allow {','.join(route.allow)}"] if route.allow else []
    parts += [f"deny {','.join(route.deny)}"] if route.deny else []
    parts += [f"max {route.max_connections}"] if route.max_connections else []
    return "; ".join(parts) or "-"


# -- tun2g token ----------------------------------------------------------------------------

@click.group(context_settings=CONTEXT)
def token():
    """Create, list, import and revoke the tokens tunnel clients authenticate with.

    A token belongs to a user; a client may serve a domain when its token's
    user owns the domain's route (see `tun2g route`). The secret is printed
    once at creation; only its SHA-256 hash is stored.

    \b
    Examples:
      tun2g token create --user alice --note "alice's laptop"
      tun2g token list --user alice
      tun2g token revoke 3f9a1c2b7d4e
      tun2g token import --user alice --secret -   < token-from-go-tun2.txt
      heroku run scripts/tun2g-token list          # against the app's REDIS_URL
    """


@token.command("create", context_settings=CONTEXT)
@click.option("--user", required=True, help="The user the token authenticates as.")
@click.option("--scope", "scopes", multiple=True, default=(CONNECT_SCOPE,), show_default=True,
              help=f"Grant this scope (repeat for several). The server requires {CONNECT_SCOPE!r}.")
@click.option("--note", default="", help="A reminder of who or what uses the token.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the secret (for scripts).")
@_json_flag
@_storage_option
def token_create(user, scopes, note, quiet, as_json, storage_url):
    """Create a token for a user and print its secret, once.

    \b
    Examples:
      tun2g token create --user alice
      TOKEN=$(tun2g token create --user ci --note "CI previews" --quiet)
      tun2g token create --user alice --json
    """
    with _opened(storage_url) as storage:
        info, secret = storage.create_token(user, scopes=scopes, note=note)
        domains = [route.domain for route in storage.list_routes(user=info.user)]
        where = storage.describe()
    if quiet:
        click.echo(secret)
        return
    if as_json:
        click.echo(json.dumps({**info.as_json(), "token": secret}, indent=2))
        return
    click.echo(f"Created token {info.id} for user {info.user} (scopes: {', '.join(info.scopes)}) in {where}.\n")
    click.echo("The token is shown only now; only its hash is stored:\n")
    click.echo(f"    {secret}\n")
    if CONNECT_SCOPE not in info.scopes:
        click.echo(f"Without the {CONNECT_SCOPE!r} scope this token cannot open tunnels.")
        return
    click.echo("Connect a tunnel client with it:\n")
    click.echo(f"    tun2g client --server SERVER:4443 --token {secret} \\\n"
               f"        --domain {domains[0] if domains else 'DOMAIN'} --backend http://127.0.0.1:3000\n")
    if not domains:
        click.echo(f"{info.user} owns no domain yet: tun2g route add DOMAIN --user {info.user}")


@token.command("list", context_settings=CONTEXT)
@_user_filter
@_json_flag
@_storage_option
def token_list(user, as_json, storage_url):
    """List tokens (ids, users, scopes; never secrets), oldest first.

    \b
    Examples:
      tun2g token list
      tun2g token list --user alice --json
    """
    with _opened(storage_url) as storage:
        tokens, where = storage.list_tokens(user=user), storage.describe()
    _show("tokens", tokens, user, where, as_json, ("ID", "USER", "SCOPES", "CREATED", "NOTE"),
          lambda t: (t.id, t.user, ",".join(t.scopes), _when(t.created), t.note))


@token.command("revoke", context_settings=CONTEXT)
@click.argument("token_id", metavar="ID")
@_storage_option
def token_revoke(token_id, storage_url):
    """Revoke the token with this ID (from `tun2g token list`).

    New connections with it are refused at once, and the tunnels already
    connected with it are disconnected within a second, on every node.

    \b
    Example:
      tun2g token revoke 3f9a1c2b7d4e
    """
    with _opened(storage_url) as storage:
        storage.revoke_token(token_id)
    click.echo(f"Revoked token {token_id.strip().lower()}.")


@token.command("import", context_settings=CONTEXT)
@click.option("--user", required=True, help="The user the token authenticates as.")
@click.option("--secret", prompt="Token secret", hide_input=True,
              help="The existing token string; '-' reads it from stdin. Prompted for if omitted, "
                   "which keeps it out of your shell history.")
@click.option("--scope", "scopes", multiple=True, default=(CONNECT_SCOPE,), show_default=True,
              help="Grant this scope (repeat for several).")
@click.option("--note", default="", help="A reminder of who or what uses the token.")
@_storage_option
def token_import(user, secret, scopes, note, storage_url):
    """Register a token string that clients already use, as with Go tun2.

    Go tun2 clients send their token as is, so importing the same string lets
    them connect to tun2g unchanged. Only its hash is stored.

    \b
    Examples:
      tun2g token import --user alice                 # prompts for the secret
      tun2g token import --user alice --secret - < secret.txt
    """
    if secret == "-":
        secret = sys.stdin.readline().strip()
    with _opened(storage_url) as storage:
        info = storage.import_token(user, secret, scopes=scopes, note=note)
    click.echo(f"Imported token {info.id} for user {info.user} (scopes: {', '.join(info.scopes)}).")
    if len(secret) < SHORT_SECRET:
        click.echo(f"tun2g: warning: this secret is only {len(secret)} characters; whoever reads the stored "
                   f"hashes could guess it. Prefer `tun2g token create`.", err=True)


# -- tun2g route ----------------------------------------------------------------------------

@click.group(context_settings=CONTEXT)
def route():
    """Add, remove and list routes: which user's tunnel clients may serve a domain.

    Domains are matched case-insensitively and without the port, as the
    server sees them in the Host header.

    \b
    Examples:
      tun2g route add app.example.com --user alice
      tun2g route add '*.example.com' --user alice          # one label: a.example.com
      tun2g route add example.com --path /api --strip --user alice
      tun2g route list --user alice
      tun2g route rm app.example.com
      heroku run scripts/tun2g-route list          # against the app's REDIS_URL
    """


@route.command("add", context_settings=CONTEXT)
@click.argument("domain")
@click.option("--user", required=True, help="The user whose tokens may serve DOMAIN.")
@click.option("--path", default=None, metavar="/PREFIX",
              help="Route only this path prefix on DOMAIN (longest prefix wins; same as DOMAIN/PREFIX).")
@click.option("--strip", is_flag=True, help="Remove the path prefix before the request reaches the backend.")
@click.option("--allow", multiple=True, metavar="CIDR", help="TCP routes: only these addresses may connect.")
@click.option("--deny", multiple=True, metavar="CIDR", help="TCP routes: these addresses may not connect.")
@click.option("--max-connections", type=click.IntRange(min=1), metavar="N",
              help="TCP routes: open connections at once per node.")
@_storage_option
def route_add(domain, user, path, strip, allow, deny, max_connections, storage_url):
    """Let USER's tunnel clients serve DOMAIN (a host, *.domain for one label under it, or host/prefix),
    or a public TCP port (tcp:HOST:PORT).

    Every route on one host belongs to one user, and names under a wildcard to
    the wildcard's owner (docs/routing.md#ownership); a port belongs to one user.
    To move one, remove it first.

    \b
    Examples:
      tun2g route add app.example.com --user alice
      tun2g route add '*.example.com' --user alice
      tun2g route add example.com --path /api --strip --user alice
      tun2g route add tcp:0.0.0.0:2222 --user alice --allow 203.0.113.0/24
    """
    if is_tcp_route(domain):
        _add_tcp_route(domain, user, allow, deny, max_connections, storage_url)
        return
    if allow or deny or max_connections:
        raise click.UsageError("--allow, --deny and --max-connections apply to TCP routes (tcp:HOST:PORT)")
    with _opened(storage_url) as storage:
        key = normalize_route_key(domain) if path is None else str(parse_route_key(domain, path))
        try:
            existed = storage.has_route(key) == user.strip()
        except NoSuchRoute:
            existed = False
        added = storage.add_route(key, user, strip=strip)
    if existed:
        click.echo(f"Route {added.domain} already belongs to {added.user}; nothing changed but strip "
                   f"(now {'on' if added.strip else 'off'}).")
    else:
        click.echo(f"Route {added.domain} -> {added.user}. Clients with a token of {added.user} "
                   f"may now connect with --domain {added.domain}.")


@route.command("rm", context_settings=CONTEXT)
@click.argument("domain")
@_storage_option
def route_rm(domain, storage_url):
    """Remove the route for DOMAIN; new tunnels for it are refused, live ones disconnected within a second.

    \b
    Example:
      tun2g route rm app.example.com
    """
    if is_tcp_route(domain):
        with _opened(storage_url) as storage:
            _host, port = parse_tcp_route(domain)
            storage.remove_tcp_route(port)
        click.echo(f"Removed TCP route for port {port}.")
        return
    with _opened(storage_url) as storage:
        domain = normalize_route_key(domain)
        storage.remove_route(domain)
    click.echo(f"Removed route {domain}.")


def _add_tcp_route(text: str, user: str, allow, deny, max_connections, storage_url) -> None:
    with _opened(storage_url) as storage:  # also turns a bad route into one line on stderr
        route = new_tcp_route(text, user, time.time(), allow=allow, deny=deny, max_connections=max_connections)
        added = storage.add_tcp_route(route)
    click.echo(f"TCP route {added.address} -> {added.user}. Clients with a token of {added.user} may now "
               f"connect with --tcp {added.port}=HOST:PORT.")


@route.command("list", context_settings=CONTEXT)
@_user_filter
@_json_flag
@_storage_option
def route_list(user, as_json, storage_url):
    """List routes, sorted by domain.

    \b
    Examples:
      tun2g route list
      tun2g route list --user alice --json
    """
    with _opened(storage_url) as storage:
        routes, where = storage.list_routes(user=user), storage.describe()
        tcp_routes = storage.list_tcp_routes(user=user)
    if tcp_routes and not as_json:
        print_table(("TCP ROUTE", "USER", "CREATED", "POLICY"),
                    [(f"tcp:{r.address}", r.user, _when(r.created), _policy(r)) for r in tcp_routes])
    routes = routes + tcp_routes if as_json else routes
    if tcp_routes and not routes and not as_json:
        return  # only TCP routes: their table is the listing (not "no routes" under it)
    _show("routes", routes, user, where, as_json, ("ROUTE", "USER", "CREATED", "STRIP", "INSPECT"),
          lambda r: (r.domain, r.user, _when(r.created), "on" if r.strip else "off",
                     "on" if r.inspect else "off"))


@route.command("inspect", context_settings=CONTEXT)
@click.argument("domain")
@click.argument("state", type=click.Choice(["on", "off"]))
@_storage_option
def route_inspect(domain, state, storage_url):
    """Capture DOMAIN's exchanges for the server's inspector (on), or stop (off).

    Servers notice within a second. Captures keep the first 16 KiB of each body,
    with Authorization, Cookie and Set-Cookie redacted; read them with
    `tun2g inspect DOMAIN`.

    \b
    Example:
      tun2g route inspect app.example.com on
    """
    with _opened(storage_url) as storage:
        updated = storage.set_route_inspect(domain, state == "on")
    click.echo(f"Inspection of {updated.domain} is {state}."
               + (f" Read it with: tun2g inspect {updated.domain}" if updated.inspect else ""))
