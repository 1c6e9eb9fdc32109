"""The Storage protocol, its records and errors, and the validation both stores share.

A store answers the two questions the server asks while a tunnel client
authenticates ("whose token is this, with which scopes?" and "who owns this
domain?") and lets operators manage tokens and routes.

Secrets are never stored: only their SHA-256 digest is. A salted slow hash
(bcrypt, scrypt) defends *guessable* passwords against offline guessing; our
generated secrets carry 256 random bits, which no guessing reaches, so a fast
unsalted digest is as safe here and lets the server find a token with one
indexed lookup. Imported secrets are whatever an operator already uses with Go
clients; the command line warns when one looks short.
"""

from __future__ import annotations

import hashlib
import json
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

try:
    import idna as _idna
except ImportError:  # optional: Python's own IDNA 2003 codec is the fallback
    _idna = None

CONNECT_SCOPE = "connect"  # the scope the server requires of a tunnel client's token
DEFAULT_SCOPES = (CONNECT_SCOPE,)
MAX_NAME_LENGTH = 256  # users, scopes and notes are labels, not documents

# An LDH label (RFC 1035/5890): 1-63 of [a-z0-9-], no hyphen first or last. Matched with
# fullmatch: "$" would also match before a trailing "\n".
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SCOPE = re.compile(r"^[A-Za-z0-9_.:-]+$")


class StorageError(Exception):
    """A storage operation failed; the message says why and what to do."""


class StorageUnavailable(StorageError):
    """The backing service (Redis) cannot be reached."""


class NoSuchToken(StorageError, LookupError):
    """The token (secret or id) is unknown or was revoked."""


class NoSuchRoute(StorageError, LookupError):
    """No route exists for the domain."""


class NoSuchPolicy(StorageError, LookupError):
    """No edge policy is stored for the route."""


@dataclass(frozen=True)
class TokenInfo:
    """The public facts about a token; the secret itself is never kept."""

    id: str
    user: str
    scopes: tuple[str, ...]
    created: float
    note: str

    def as_json(self) -> dict:
        """A JSON-ready dict (scopes as a list)."""
        return {"id": self.id, "user": self.user, "scopes": list(self.scopes),
                "created": self.created, "note": self.note}


@dataclass(frozen=True)
class Route:
    """A domain and the user whose tunnel clients may serve it; `inspect`: its exchanges are captured."""

    domain: str
    user: str
    created: float
    inspect: bool = False

    def as_json(self) -> dict:
        """A JSON-ready dict."""
        return {"domain": self.domain, "user": self.user, "created": self.created, "inspect": self.inspect}


@runtime_checkable
class Storage(Protocol):
    """What the server and the admin commands need from a persistence layer."""

    def has_token(self, token: str) -> tuple[str, list[str]]:
        """(user, scopes) for a secret; raises NoSuchToken if unknown or revoked."""

    def has_route(self, domain: str) -> str:
        """The user owning a domain (any case, with or without :port); raises NoSuchRoute."""

    def create_token(self, user: str, scopes: Iterable[str] = DEFAULT_SCOPES,
                     note: str = "") -> tuple[TokenInfo, str]:
        """A new random token: (info, secret). The secret is not retrievable later."""

    def import_token(self, user: str, secret: str, scopes: Iterable[str] = DEFAULT_SCOPES,
                     note: str = "") -> TokenInfo:
        """Register an existing secret (e.g. one Go clients already send)."""

    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        """All tokens, or one user's, oldest first."""

    def revoke_token(self, token_id: str) -> None:
        """Delete a token by its public id; it stops authenticating at once. NoSuchToken if unknown."""

    def add_route(self, domain: str, user: str) -> Route:
        """Give a domain to a user; StorageError if another user owns it already."""

    def remove_route(self, domain: str) -> None:
        """Delete a route; NoSuchRoute if there is none."""

    def list_routes(self, user: str | None = None) -> list[Route]:
        """All routes, or one user's, sorted by domain."""

    def set_route_inspect(self, domain: str, inspect: bool) -> Route:
        """Turn capture for the server's inspector on or off for a route; NoSuchRoute if there is none.

        Bumps the revision, so every server notices within its polling interval.
        """

    def set_policy(self, route: str, policy: dict) -> None:
        """Store a route's edge policy (the JSON-ready mapping of tun2g.policy.Policy.as_mapping); bumps the revision."""

    def get_policy(self, route: str) -> dict:
        """A route's stored policy mapping; NoSuchPolicy if there is none."""

    def remove_policy(self, route: str) -> None:
        """Delete a route's policy (bumps the revision); NoSuchPolicy if there is none."""

    def list_policies(self) -> dict[str, dict]:
        """Every stored policy, by route key."""

    def revision(self) -> str:
        """A cheap marker that changes whenever a token is revoked or a route removed (maybe more often).

        The server polls it to disconnect live tunnels whose token or route went
        away (tun2g.server.revocation). StorageUnavailable if the store cannot answer.
        """

    def ping(self) -> None:
        """Check that the store answers; StorageUnavailable if not."""

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def describe(self) -> str:
        """Where the data lives, without passwords (e.g. "sqlite:/path/tun2g.sqlite3")."""


def hash_secret(secret: str) -> str:
    """The hex SHA-256 digest under which a secret is stored (see the module docstring)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """A fresh token secret: 32 random bytes, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def new_token_id() -> str:
    """A short public token id (12 hex digits) for listing and revoking."""
    return secrets.token_hex(6)


class SecretMinting:
    """`create_token` for any store with `import_token`: both stores mint secrets alike."""

    def create_token(self, user: str, scopes: Iterable[str] = DEFAULT_SCOPES,
                     note: str = "") -> tuple[TokenInfo, str]:
        secret = new_secret()
        return self.import_token(user, secret, scopes, note), secret


def new_token_record(user: str, secret: str, scopes: Iterable[str], note: str) -> tuple[TokenInfo, str]:
    """A validated TokenInfo for a secret, and the digest to store it under."""
    info = TokenInfo(new_token_id(), validate_user(user), validate_scopes(scopes), time.time(), validate_note(note))
    return info, hash_secret(validate_secret(secret))


def route_taken_error(domain: str, owner: str) -> StorageError:
    """The error for adding a route that another user already owns."""
    return StorageError(f"route {domain} already belongs to {owner}; remove it first "
                        f"(tun2g route rm {domain})")


def normalize_domain(domain: str) -> str:
    """Lowercase, without a trailing dot or :port; StorageError if not a host name or IP."""
    if not isinstance(domain, str):
        raise StorageError(f"domain must be a string, not {type(domain).__name__}")
    if _CONTROL.search(domain):  # "app.test\n", NUL, tabs: never a host name, not even trimmed
        raise _domain_error(domain)
    host = domain.strip(" ").lower()
    if host.startswith("["):  # bracketed IPv6 literal, as in a Host header
        literal, bracket, rest = host[1:].partition("]")
        if not bracket or not _is_port_suffix(rest):
            raise _domain_error(domain)
        return f"[{_ipv6(literal, domain)}]"
    if host.count(":") > 1:  # a bare IPv6 literal
        return f"[{_ipv6(host, domain)}]"
    host, colon, port = host.partition(":")
    if not _is_port_suffix(colon + port):
        raise _domain_error(domain)
    if host.endswith("."):  # the absolute form names the same host
        host = host[:-1]
    if not host.isascii():
        host = _to_a_labels(host, domain)
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _domain_error(domain)
    if "xn--" in host and not all(_valid_a_label(label) for label in labels if label.startswith("xn--")):
        raise _domain_error(domain)
    return host


def _to_a_labels(host: str, original: str) -> str:
    """An internationalised name in its ASCII (punycode) form: IDNA 2008 with UTS 46 mapping
    when the ``idna`` package is installed, else Python's IDNA 2003 codec."""
    try:
        if _idna is not None:
            return _idna.encode(host, uts46=True).decode("ascii")
        return host.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        raise _domain_error(original) from None


def _valid_a_label(label: str) -> bool:
    """Whether an "xn--" label decodes to a valid U-label (punycode that decodes is not enough)."""
    try:
        if _idna is not None:
            _idna.ulabel(label)
        else:
            label.encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        return False
    return True


def _is_port_suffix(text: str) -> bool:
    return text == "" or (text.startswith(":") and text[1:].isdigit() and len(text) <= 6 and int(text[1:]) <= 65535)


def _ipv6(literal: str, original: str) -> str:
    try:
        return ipaddress.IPv6Address(literal).compressed
    except ValueError:
        raise _domain_error(original) from None


def _domain_error(original: str) -> StorageError:
    return StorageError(f"invalid domain {original!r}: expected a host name such as "
                       f"app.example.com (an optional :port is ignored)")


MAX_POLICY_BYTES = 2 * 1024 * 1024  # one stored policy's JSON: pages are capped at 64 KiB each, lists at 1000
_PATH = re.compile(r"/[!-~]{0,1023}")


def normalize_policy_route(route: str) -> str:
    """The key a policy is stored under: a host (normalize_domain), "*.host" or "host/path"; StorageError if not."""
    if not isinstance(route, str):
        raise StorageError(f"a route must be a string, not {type(route).__name__}")
    host, slash, path = route.strip().partition("/")
    wildcard = host.startswith("*.")
    host = normalize_domain(host[2:] if wildcard else host)
    if slash and not _PATH.fullmatch("/" + path):
        raise StorageError(f"invalid route path in {route!r}: printable characters after the host, no spaces")
    return ("*." if wildcard else "") + host + (("/" + path).rstrip("/") if slash else "")


def policy_json(policy: dict) -> str:
    """A policy mapping as stored; StorageError if it is not JSON or too large."""
    try:
        text = json.dumps(policy, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"a policy must be a JSON-ready mapping: {exc}") from None
    if len(text) > MAX_POLICY_BYTES:
        raise StorageError(f"a policy may take at most {MAX_POLICY_BYTES} bytes stored")
    return text


def validate_user(user: str) -> str:
    """The user name, stripped; StorageError if empty, too long or containing control characters."""
    return _validate_label("user", user)


def validate_note(note: str) -> str:
    """The note, stripped; StorageError if too long or containing control characters."""
    return _validate_label("note", note or "", allow_empty=True)


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes without duplicates, in the given order; StorageError on an empty list or a bad name."""
    if isinstance(scopes, str):
        scopes = [scopes]
    cleaned: list[str] = []
    for scope in scopes:
        scope = scope.strip() if isinstance(scope, str) else scope
        if not isinstance(scope, str) or not _SCOPE.match(scope) or len(scope) > 64:
            raise StorageError(f"invalid scope {scope!r}: use letters, digits and . _ : - "
                               f"(the server requires {CONNECT_SCOPE!r})")
        if scope not in cleaned:
            cleaned.append(scope)
    if not cleaned:
        raise StorageError(f"a token needs at least one scope (the server requires {CONNECT_SCOPE!r})")
    return tuple(cleaned)


def validate_secret(secret: str) -> str:
    """The secret as given; StorageError if empty or containing whitespace or control characters."""
    if not isinstance(secret, str) or not secret:
        raise StorageError("the token secret is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in secret):
        raise StorageError("the token secret contains whitespace or control characters")
    return secret


def normalize_token_id(token_id: str) -> str:
    """A token id as stored (lowercase, stripped)."""
    return str(token_id).strip().lower()


def _validate_label(what: str, value: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise StorageError(f"{what} must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        raise StorageError(f"{what} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise StorageError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if not value.isprintable():
        raise StorageError(f"{what} {value!r} contains control characters")
    return value
