"""`tun2g login` and `tun2g http`: save the server and token once, then one short command per tunnel.

`tun2g login --server URL --token T [--domain D] [--ca F]` keeps them in the user's
config dir (`$XDG_CONFIG_HOME/tun2g/credentials`, else `~/.config/tun2g/credentials`,
JSON, mode 0600); `tun2g http 3000` is then `tun2g client` for http://127.0.0.1:3000
with those settings (any `tun2g client` option may still be given). With no domain
saved or given, it asks a server run with --self-service-domain for a random name
and saves it (``claimed_domain``), so the next run serves the same URL;
``--new-name`` asks for a fresh one (docs/routing.md#self-service).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from tun2g.cli.errors import EXIT_USAGE, Fatal


def credentials_path() -> Path:
    """Where `tun2g login` keeps the server and token of this user."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tun2g" / "credentials"


def read_credentials() -> dict:
    """The saved settings ({} when `tun2g login` was never run)."""
    path = credentials_path()
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise Fatal(f"{path}: cannot read it ({exc}); run `tun2g login` again", EXIT_USAGE) from None
    return saved if isinstance(saved, dict) else {}


@click.command()
@click.option("--server", "server_addr", required=True, metavar="HOST:PORT|URL",
              help="The tun2 server's tunnel address (as `tun2g client --server`).")
@click.option("--token", required=True, help="Your token (from `tun2g token create`); stored mode 0600.")
@click.option("--domain", help="The domain `tun2g http` serves when given none.")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False), help="Trust this CA for the server.")
@click.option("--conn-type", type=click.Choice(["tcp", "kcp", "upgrade"]), help="As `tun2g client --conn-type`.")
def login(server_addr, token, domain, ca_file, conn_type):
    """Save the server and token for `tun2g http` (in the user config dir, mode 0600)."""
    saved = {"server": server_addr, "token": token}
    try:
        before = read_credentials()
    except Fatal:  # unreadable: this login replaces it
        before = {}
    if before.get("claimed_domain") and before.get("server") == server_addr:
        saved["claimed_domain"] = before["claimed_domain"]  # the same server: keep its name
    if domain:
        saved["domain"] = domain
    if ca_file:
        saved["ca"] = str(Path(ca_file).resolve())
    if conn_type:
        saved["conn_type"] = conn_type
    path = write_credentials(saved)
    click.echo(f"saved to {path}; now: tun2g http PORT" + ("" if domain else " (--domain DOMAIN, or a random "
                                                                           "name where the server gives them)"))


def write_credentials(saved: dict) -> Path:
    """Replace the saved settings at once (mode 0600, never half-written); returns the file."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(saved, out)
    os.replace(scratch, path)
    return path


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--domain", help="Public domain to serve. Default: the one `tun2g login` saved, else the random name "
                                "claimed before, else a new one (auto: the same without the saved domain).")
@click.option("--new-name", is_flag=True, help="Ask the server for a fresh random name (saved for the next runs).")
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
@click.option("--inspect", "inspect_addr", default="127.0.0.1:4040", show_default=True, metavar="HOST:PORT|off",
              help="Where the request inspector listens (as `tun2g client --inspect`); off: none.")
@click.pass_context
def http(ctx, port, domain, new_name, quiet, inspect_addr):
    """Expose http://127.0.0.1:PORT with the server and token `tun2g login` saved (like `ngrok http PORT`)."""
    from tun2g.cli.client_cmd import ON_CLAIM, client

    if new_name and domain and domain.lower() != "auto":
        raise Fatal(f"--new-name asks for a random name: drop --domain {domain}", EXIT_USAGE)
    saved = read_credentials()
    if not saved.get("server") or not saved.get("token"):
        raise Fatal(f"no saved server and token in {credentials_path()}: run "
                    f"`tun2g login --server URL --token TOKEN` first", EXIT_USAGE)
    if new_name or (domain or "").lower() == "auto":
        domain = None
    else:
        domain = domain or saved.get("domain")
    reused = None
    if not domain:
        reused = None if new_name else saved.get("claimed_domain")
        domain = reused or "auto"
    if domain == "auto":
        ctx.meta[ON_CLAIM] = lambda name: _save_claim(name, quiet)
    try:
        ctx.invoke(client, server_addr=saved["server"], token=saved["token"], domain=domain,
                   backend_url=f"http://127.0.0.1:{port}", ca_file=saved.get("ca"),
                   conn_type=saved.get("conn_type", "tcp"), quiet=quiet, inspect_addr=inspect_addr)
    except Fatal as exc:
        if reused and exc.status == EXIT_USAGE:
            raise Fatal(f"{exc} (the name saved from an earlier run; `tun2g http {port} --new-name` asks for "
                        f"a fresh one)", exc.status) from None
        raise


def _save_claim(name: str, quiet: bool) -> None:
    """Keep the name a claim got in the saved settings, for the next `tun2g http`."""
    try:
        saved = read_credentials()
        saved["claimed_domain"] = name
        path = write_credentials(saved)
    except (OSError, Fatal) as exc:
        click.echo(f"tun2g: got the name {name}, but cannot save it ({getattr(exc, 'strerror', None) or exc}); "
                   f"the next run gets another", err=True)
        return
    if not quiet:
        click.echo(f"tun2g: the server gave you {name}; saved in {path}, so the next `tun2g http` serves it again "
                   f"(--new-name for a fresh one)")
