"""The admin API's bearer token: made on a server's first start, kept in the data dir, read by the CLI.

`tun2g server` without --admin-token uses the token in `<data dir>/admin-token`
(a random secret, file mode 0600), creating it the first time; `tun2g backends`
and `tun2g kill` read the same file when given no token, so on one machine no
flags are needed and nothing else on the host (a web page included) can call
the API.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from tun2g.storage import default_sqlite_path

ADMIN_TOKEN_FILE = "admin-token"
ADMIN_ADDRESS_FILE = "admin-address"  # HOST:PORT of the last server here that uses the admin-token file


def admin_token_path() -> Path:
    """`admin-token` next to the embedded SQLite file ($TUN2G_DATA_DIR, else ~/.local/share/tun2g)."""
    return default_sqlite_path().parent / ADMIN_TOKEN_FILE


def read_admin_token(path: Path | None = None) -> str | None:
    """The stored token, or None when there is no (readable, non-empty) file."""
    path = admin_token_path() if path is None else path
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def load_or_create_admin_token(path: Path | None = None) -> tuple[str, Path, bool]:
    """(token, its file, whether it was just made): the stored token, else a new one written with mode 0600.

    The new file appears whole or not at all (written aside, then hard-linked
    into place), so servers started side by side on one data dir agree on one token.
    """
    path = admin_token_path() if path is None else path
    existing = read_admin_token(path)
    if existing is not None:
        return existing, path, False
    token = secrets.token_urlsafe(32)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        try:
            os.link(scratch, path)
        except FileExistsError:  # another server made it first (or left an empty one): theirs wins
            existing = read_admin_token(path)
            if existing is None:
                raise OSError(f"{path} exists but holds no admin token; delete it and start again") from None
            return existing, path, False
    finally:
        scratch.unlink(missing_ok=True)
    return token, path, True


def is_loopback(host: str) -> bool:
    """True for localhost and loopback literals; "" and 0.0.0.0 (every interface) and other names are not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_address_path() -> Path:
    """`admin-address` next to the admin token: where a local server's admin API listens."""
    return default_sqlite_path().parent / ADMIN_ADDRESS_FILE


def write_admin_address(address: str, path: Path | None = None) -> None:
    """Record the admin API's HOST:PORT for the CLI (best effort: the file only saves typing a flag)."""
    path = admin_address_path() if path is None else path
    try:
        path.write_text(address + "\n")
    except OSError:
        pass


def read_admin_address(path: Path | None = None) -> str | None:
    """The recorded HOST:PORT, or None."""
    path = admin_address_path() if path is None else path
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
