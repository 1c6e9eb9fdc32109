"""The `tun2g` command line: one click group, one module per family of commands."""

from __future__ import annotations

from gevent import monkey

# Before anything else opens a socket: redis-py (storage, cluster registry) and the
# standard library must yield to the hub instead of blocking the whole process.
monkey.patch_all()

import click  # noqa: E402

from tun2g import __version__  # noqa: E402
from tun2g.cli.errors import Group  # noqa: E402


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tun2g")
def main():
    """tun2g: a self-hosted HTTP tunnel, wire-compatible with Go tun2.

    \b
    Quick start (one machine, embedded SQLite storage):
      tun2g server                                  # public HTTP :8080, tunnels :4443 (TLS)
      tun2g route add app.localhost --user me
      tun2g token create --user me                  # prints a token, once
      tun2g client --server localhost:4443 --ca ~/.local/share/tun2g/tun2g-dev-cert.pem \\
                   --token TOKEN --domain app.localhost --backend http://127.0.0.1:3000
      curl -H 'Host: app.localhost' http://127.0.0.1:8080/

    Every option also reads an environment variable, shown in each command's --help.
    """


def _register() -> None:
    from tun2g.cli.store_cmd import route, token
    from tun2g.cli.client_cmd import client
    from tun2g.cli.inspect_cmd import inspect
    from tun2g.cli.cert_cmd import cert
    from tun2g.cli.live_cmd import backends, kill
    from tun2g.cli.login_cmd import http, login
    from tun2g.cli.policy_cmd import policy
    from tun2g.cli.server_cmd import server

    for command in (server, client, login, http, token, route, policy, backends, kill, cert, inspect):
        main.add_command(command)


_register()
