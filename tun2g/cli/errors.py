"""One place where a user's mistake or a broken environment becomes one line and an exit status.

Commands raise (or let through) the project's own exceptions; the group's
``invoke`` turns them into ``tun2g COMMAND: what happened; what to do`` on
stderr and the status of the table below, never a traceback. A traceback is
for a bug: ``TUN2G_TRACEBACK=1`` shows one for these errors too.

| status | meaning |
|---|---|
| 0 | done, or stopped on purpose (SIGTERM: drained and stopped) |
| 1 | failed at run time: a server that cannot be reached with --no-reconnect, a port in use, a store that is down |
| 2 | the command line or its credentials are wrong: a bad flag value, a token or domain the server refused, a certificate that does not verify |
| 130 | interrupted (Ctrl-C, SIGINT) |
"""

from __future__ import annotations

import os
import ssl
import sys

import click

from tun2g.errors import ConfigurationError, SetupError
from tun2g.storage import StorageError, StorageUnavailable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class Fatal(Exception):
    """A command's own refusal: ``message`` is the line (naming the flag and the fix), ``status`` the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for an error a user or their environment caused; None for a bug."""
    if isinstance(exc, Fatal):
        return str(exc), exc.status
    if isinstance(exc, ConfigurationError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, SetupError):
        return str(exc), EXIT_FAILED
    if isinstance(exc, StorageUnavailable):
        return str(exc), EXIT_FAILED
    if isinstance(exc, StorageError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}", EXIT_FAILED
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILED
    return None


class Group(click.Group):
    """The `tun2g` group: every command's user-facing errors leave as one line (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except click.UsageError as exc:  # click's own (a bad or missing option): the same one line
            command = ctx.invoked_subcommand or ctx.info_name
            click.echo(f"tun2g {command}: {_one_line(exc.format_message())} (tun2g {command} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:  # a command's own message, which may quote a server's lines
            exc.message = _one_line(exc.message)
            raise
        except Exception as exc:
            described = describe(exc)
            if described is None or os.environ.get("TUN2G_TRACEBACK"):
                raise
            message, status = described
            command = ctx.invoked_subcommand or ctx.info_name
            click.echo(f"tun2g {command}: {_one_line(message)}", err=True)
            sys.exit(status)


def _one_line(message: str) -> str:
    return " ".join(message.split())
