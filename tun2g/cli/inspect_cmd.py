"""`tun2g inspect DOMAIN`: the exchanges the server captured for an inspected route, newest first, or followed."""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import quote

import click

from tun2g.cli.live_cmd import _admin_request, _admin_token, _admin_url

MAX_PAGE = 1000  # records one poll asks for


def _line(record: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(record.get("time", 0)))
    return (f"{when}  {record.get('method', '-'):7} {record.get('status', '-')}  {record.get('ms', 0):>8.1f} ms  "
            f"in {record.get('bytes_in', 0)} B  out {record.get('bytes_out', 0)} B  "
            f"{record.get('client_ip') or '-'}  {record.get('node') or '-'}  {record.get('path', '')}")


@click.command()
@_admin_url
@_admin_token
@click.argument("domain")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=20, show_default=True,
              help="How many of the newest captures to show first.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the records as JSON (a list; with --follow, one record per line).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new captures as they come, until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="With --follow: how often to ask the server.")
def inspect(admin_url, admin_token, domain, limit, as_json, follow, interval):
    """Show the exchanges the server captured for DOMAIN (in a cluster, from every node).

    Capture is opt-in per route: `tun2g route inspect DOMAIN on`. Records carry
    method, path, status, duration, sizes, headers (secrets redacted) and the
    first 16 KiB of each body.

    \b
    Examples:
      tun2g inspect app.example.com
      tun2g inspect app.example.com --json --limit 5
      tun2g inspect app.example.com --follow
    """
    base = f"{admin_url.rstrip('/')}/inspect?domain={quote(domain)}"
    payload = _admin_request("GET", f"{base}&limit={limit}", admin_token)
    records = payload["records"]
    if not payload.get("inspected") and not records:
        click.echo(f"{payload['domain']} is not inspected: tun2g route inspect {payload['domain']} on", err=True)
    if not follow:
        if as_json:
            click.echo(json.dumps(records, indent=2))
        else:
            for record in records:
                click.echo(_line(record))
        return
    newest = records[0]["id"] if records else None
    try:
        for record in reversed(records):  # oldest first when following, like tail -f
            click.echo(json.dumps(record) if as_json else _line(record))
        sys.stdout.flush()
        while True:
            time.sleep(interval)  # the polling cadence
            query = f"{base}&limit={MAX_PAGE}" + (f"&after={quote(newest)}" if newest else "")
            fresh = _admin_request("GET", query, admin_token)["records"]
            for record in reversed(fresh):
                click.echo(json.dumps(record) if as_json else _line(record))
            if fresh:
                newest = fresh[0]["id"]
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
