"""`tun2g policy set|show|rm ROUTE`: a route's edge policy in the store (docs/policy.md).

The flags become a policy mapping checked by `Policy.from_mapping`; a bad
value is one line naming the flag and what to write, exit status 2. Passwords
are hashed (scrypt) and bearer tokens digested (SHA-256) here: the store never
sees them. `set` on a route that has a policy changes only the settings given
(`--replace` starts from nothing). Servers apply a change within a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tun2g.cli.store_cmd import CONTEXT, _json_flag, _opened, _storage_option
from tun2g.policy import Policy, PolicyError, hash_bearer, hash_password
from tun2g.storage import NoSuchPolicy, StorageError, normalize_policy_route

SHORT_BEARER = 20  # characters; shorter bearer tokens get a warning (they are stored as a fast digest)
_FLAGS = {"basic_auth": "--basic-auth", "bearer": "--bearer", "allow": "--allow", "deny": "--deny",
          "request_headers": "--set-request-header/--remove-request-header",
          "response_headers": "--set-response-header/--remove-response-header", "max_body": "--max-body",
          "max_head": "--max-head", "timeout": "--timeout", "rate": "--rate", "burst": "--burst",
          "rate_per_ip": "--rate-per-ip", "burst_per_ip": "--burst-per-ip", "error_pages": "--error-page"}


def _bad(flag: str, message: str) -> None:
    click.echo(f"tun2g policy: {flag}: {message}", err=True)
    sys.exit(2)


def _route(route: str) -> str:
    try:
        return normalize_policy_route(route)
    except StorageError as exc:
        _bad("ROUTE", f"{exc} (e.g. app.example.com, *.example.com or example.com/api)")
    raise AssertionError("unreachable")


def _pairs(flag: str, values: tuple[str, ...], separator: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, found, rest = value.partition(separator)
        if not found or not name.strip():
            _bad(flag, f"expected {what}, got {value!r}")
        pairs.append((name.strip(), rest.strip() if separator != ":" or flag != "--basic-auth" else rest))
    return pairs


@click.group(context_settings=CONTEXT)
def policy():
    """Edge policy per route: auth, address lists, headers, limits, rate, error pages.

    \b
    Examples:
      tun2g policy set app.example.com --basic-auth alice:s3cret --rate 10/s --rate-per-ip 2/s
      tun2g policy set app.example.com --allow 10.0.0.0/8 --deny 10.6.6.0/24 --max-body 10M --timeout 30s
      tun2g policy show app.example.com --json
      tun2g policy rm app.example.com
    """


@policy.command("set", context_settings=CONTEXT)
@click.argument("route")
@click.option("--basic-auth", multiple=True, metavar="USER:PASSWORD", help="A user who may pass (repeatable); "
              "the password is stored as a salted scrypt hash.")
@click.option("--bearer", multiple=True, metavar="TOKEN", help="A bearer token that may pass (repeatable); "
              "stored as its SHA-256, so use a long random one.")
@click.option("--allow", multiple=True, metavar="CIDR", help="Only these client networks (IPv4 or IPv6).")
@click.option("--deny", multiple=True, metavar="CIDR", help="Never these client networks (beats --allow).")
@click.option("--set-request-header", multiple=True, metavar="'NAME: VALUE'", help="Set on requests going up.")
@click.option("--remove-request-header", multiple=True, metavar="NAME", help="Remove from requests going up.")
@click.option("--set-response-header", multiple=True, metavar="'NAME: VALUE'", help="Set on responses.")
@click.option("--remove-response-header", multiple=True, metavar="NAME", help="Remove from responses.")
@click.option("--max-body", metavar="SIZE", help="Largest request body, e.g. 10M (413 past it).")
@click.option("--max-head", metavar="SIZE", help="Largest request head, e.g. 16K (431 past it).")
@click.option("--timeout", metavar="DURATION", help="Backend response timeout, e.g. 30s (504 past it).")
@click.option("--rate", metavar="RATE", help="Requests for the whole route, e.g. 10/s or 600/m (429 past it).")
@click.option("--burst", type=int, metavar="N", help="Requests at once under --rate (default: one second's).")
@click.option("--rate-per-ip", metavar="RATE", help="Requests per client address, e.g. 5/s.")
@click.option("--burst-per-ip", type=int, metavar="N", help="Requests at once under --rate-per-ip.")
@click.option("--error-page", multiple=True, metavar="STATUS=FILE", help="Your HTML for a status, e.g. "
              "502=down.html; {{request_id}} in it becomes the request id.")
@click.option("--replace", is_flag=True, help="Replace the whole policy instead of changing the settings given.")
@_storage_option
def policy_set(route, basic_auth, bearer, allow, deny, set_request_header, remove_request_header,
               set_response_header, remove_response_header, max_body, max_head, timeout, rate, burst, rate_per_ip,
               burst_per_ip, error_page, replace, storage_url):
    """Set ROUTE's edge policy (a host, *.host or host/path); servers apply it within a second."""
    route = _route(route)
    data: dict = {}
    if basic_auth:
        data["basic_auth"] = {user: hash_password(password)
                              for user, password in _pairs("--basic-auth", basic_auth, ":", "USER:PASSWORD")}
    if bearer:
        if any(len(token) < SHORT_BEARER for token in bearer):
            click.echo(f"tun2g policy: warning: a bearer token shorter than {SHORT_BEARER} characters is easy to "
                       f"guess (try: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')", err=True)
        data["bearer"] = [hash_bearer(token) for token in bearer]
    for key, values in (("allow", allow), ("deny", deny)):
        if values:
            data[key] = list(values)
    for key, sets, removes, flag in (("request_headers", set_request_header, remove_request_header,
                                      "--set-request-header"),
                                     ("response_headers", set_response_header, remove_response_header,
                                      "--set-response-header")):
        if sets or removes:
            data[key] = {"set": dict(_pairs(flag, sets, ":", "'NAME: VALUE'")), "remove": list(removes)}
    for key, value in (("max_body", max_body), ("max_head", max_head), ("timeout", timeout), ("rate", rate),
                       ("burst", burst), ("rate_per_ip", rate_per_ip), ("burst_per_ip", burst_per_ip)):
        if value is not None:
            data[key] = value
    if error_page:
        pages = {}
        for status, path in _pairs("--error-page", error_page, "=", "STATUS=FILE such as 502=down.html"):
            try:
                pages[status] = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                _bad("--error-page", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        data["error_pages"] = pages
    if not data and not replace:
        _bad("ROUTE", "give at least one setting (see tun2g policy set --help)")
    try:
        given = Policy.from_mapping(data, "tun2g policy set")
    except PolicyError as exc:
        _bad(_FLAGS.get(exc.key, exc.key), exc.detail)
    with _opened(storage_url) as storage:
        current = None
        if not replace:
            try:
                current = Policy.from_mapping(storage.get_policy(route), f"stored policy for {route}")
            except NoSuchPolicy:
                current = None
            except PolicyError:
                current = None  # unreadable: the new settings replace it
        new = given if current is None else current.merged(given)
        storage.set_policy(route, new.as_mapping())
    click.echo(f"Policy for {route}: {', '.join(sorted(new.as_mapping())) or 'empty'}.")


@policy.command("show", context_settings=CONTEXT)
@click.argument("route", required=False)
@_json_flag
@_storage_option
def policy_show(route, as_json, storage_url):
    """Show ROUTE's policy (every route's without ROUTE); hashes only, never a secret."""
    with _opened(storage_url) as storage:
        if route is None:
            shown = storage.list_policies()
        else:
            route = _route(route)
            try:
                shown = {route: storage.get_policy(route)}
            except NoSuchPolicy as exc:
                click.echo(f"tun2g: {exc}", err=True)
                sys.exit(1)
    if as_json:
        click.echo(json.dumps(shown if route is None else shown[route], indent=2, sort_keys=True))
        return
    if not shown:
        click.echo("no policies")
    for name, data in shown.items():
        click.echo(name)
        for key, value in data.items():
            if key == "error_pages":
                value = {status: f"{len(page)} characters" for status, page in value.items()}
            click.echo(f"  {key}: {json.dumps(value, sort_keys=True)}")


@policy.command("rm", context_settings=CONTEXT)
@click.argument("route")
@_storage_option
def policy_rm(route, storage_url):
    """Remove ROUTE's policy; servers stop applying it within a second."""
    route = _route(route)
    with _opened(storage_url) as storage:
        try:
            storage.remove_policy(route)
        except NoSuchPolicy as exc:
            click.echo(f"tun2g: {exc}", err=True)
            sys.exit(1)
    click.echo(f"Removed the policy for {route}.")
