"""Edge credentials: basic-auth users with scrypt-hashed passwords, bearer tokens by SHA-256, and the check.

Passwords are people's and guessable, so each is stored as salted scrypt
(`scrypt$N$r$p$salt$key`, base64; N=2**14, r=8, p=1 by default, ~30 ms here).
Bearer tokens are meant to be random (`tun2g policy set --bearer` warns on short
ones), so, like tunnel tokens, a SHA-256 digest stores them and one dict lookup
finds them. Digests are compared with `hmac.compare_digest`.

A verdict, good or bad, is remembered per exact Authorization value (keyed by
its SHA-256, at most MAX_VERDICTS): a browser resending the same credentials
costs one hash per request, not one scrypt. Each *new* wrong password still
costs one scrypt: a route's rate limit (checked first) bounds that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Mapping

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY = 1 << 14, 8, 1, 32
_SCRYPT_MAX_N = 1 << 20
MAX_AUTHORIZATION = 4096  # bytes of an Authorization value considered at all
MAX_VERDICTS = 4096       # remembered verdicts per route
MAX_USERS = 1000
MAX_TOKENS = 1000


class CredentialError(ValueError):
    """A malformed stored credential (not a malformed request: those are just refused)."""


def hash_password(password: str, *, n: int = SCRYPT_N, salt: bytes | None = None) -> str:
    """The stored form of a basic-auth password: ``scrypt$N$r$p$<salt>$<key>``."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_KEY,
                         maxmem=256 * n * SCRYPT_R)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def check_password_hash(encoded: object) -> str:
    """`encoded` if it is a well-formed scrypt hash this module can verify; CredentialError if not."""
    if not isinstance(encoded, str):
        raise CredentialError("expected a scrypt$N$r$p$salt$key password hash (made by tun2g policy set)")
    parts = encoded.split("$")
    try:
        kind, n, r, p, salt, key = parts
        n_, r_, p_ = int(n), int(r), int(p)
        salt_bytes, key_bytes = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except (ValueError, binascii.Error):
        raise CredentialError("expected a scrypt$N$r$p$salt$key password hash (made by tun2g policy set)") from None
    if kind != "scrypt" or not (2 <= n_ <= _SCRYPT_MAX_N and n_ & (n_ - 1) == 0) or not 1 <= r_ <= 32 \
            or not 1 <= p_ <= 16 or len(salt_bytes) < 8 or len(key_bytes) < 16:
        raise CredentialError("the password hash's parameters are out of range (N a power of 2 up to 2**20)")
    return encoded


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the stored hash (constant-time comparison of the keys)."""
    _kind, n, r, p, salt, key = encoded.split("$")
    expected = base64.b64decode(key)
    actual = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=base64.b64decode(salt), n=int(n),
                            r=int(r), p=int(p), dklen=len(expected), maxmem=256 * int(n) * int(r) + (1 << 20))
    return hmac.compare_digest(actual, expected)


def hash_bearer(token: str) -> str:
    """The stored form of a bearer token: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def check_bearer_hash(encoded: object) -> str:
    """`encoded` if it is ``sha256:`` and 64 hex digits (lower-cased); CredentialError if not."""
    if isinstance(encoded, str) and encoded.startswith("sha256:"):
        digest = encoded[7:].lower()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return "sha256:" + digest
    raise CredentialError("expected sha256:<64 hex digits> (made by tun2g policy set --bearer)")


def parse_authorization(value: str) -> tuple[str, str, str] | None:
    """("basic", user, password) or ("bearer", token, "") from an Authorization value; None when malformed."""
    if len(value) > MAX_AUTHORIZATION:
        return None
    scheme, _, rest = value.strip().partition(" ")
    scheme, rest = scheme.lower(), rest.strip()
    if not rest or " " in rest:
        return None
    if scheme == "bearer":
        return "bearer", rest, ""
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            return None
        return "basic", user, password
    return None


class Credentials:
    """Who may pass a route: basic-auth users (user -> scrypt hash) and bearer digests."""

    __slots__ = ("users", "bearers", "_verdicts")

    def __init__(self, users: Mapping[str, str], bearers: frozenset[str]) -> None:
        self.users = dict(users)
        self.bearers = bearers
        self._verdicts: dict[bytes, bool] = {}

    @property
    def schemes(self) -> tuple[str, ...]:
        """The schemes to announce in WWW-Authenticate."""
        return (("Basic",) if self.users else ()) + (("Bearer",) if self.bearers else ())

    def admits(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries valid credentials for this route."""
        if not authorization:
            return False
        key = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._decide(authorization)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _decide(self, authorization: str) -> bool:
        parsed = parse_authorization(authorization)
        if parsed is None:
            return False
        scheme, name, password = parsed
        if scheme == "bearer":
            return hash_bearer(name) in self.bearers  # a dict lookup of a digest: its timing says nothing of the token
        encoded = self.users.get(name)
        if encoded is None:
            verify_password(password, _UNKNOWN_USER)  # the same cost whether or not the user exists
            return False
        return verify_password(password, encoded)


# A well-formed hash no password matches (its key is not scrypt's output for any): unknown users cost one scrypt.
_UNKNOWN_USER = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(bytes(16)).decode()}$" \
                f"{base64.b64encode(bytes(SCRYPT_KEY)).decode()}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
