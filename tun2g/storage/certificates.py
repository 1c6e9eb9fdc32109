"""Certificates for public HTTPS as the stores keep them, and the pure rules around them.

A certificate is stored under the name it serves (``app.example.com`` or a
wildcard ``*.example.com``): its PEM chain, its PEM private key, and facts read
from the certificate when it was stored (issuer, expiry) plus who stored it.
The key never leaves the store except into the server's ssl context: listings
(`CertificateInfo`) do not carry it.

Name choice for an SNI (`candidate_names`) is exact first, then the wildcard
one label up; nothing else (a wildcard covers exactly one label, RFC 6125).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tun2g.storage.base import StorageError, normalize_domain


class InvalidCertificate(StorageError, ValueError):
    """A certificate or key that cannot be used (unparsable, mismatched, not for the name)."""


@dataclass(frozen=True)
class CertificateInfo:
    """What a listing shows about a stored certificate (never its key)."""

    name: str
    issuer: str
    not_before: float  # unix seconds
    not_after: float   # unix seconds
    source: str        # who stored it: "static" (tun2g cert add) or the node id that ordered it
    updated: float     # unix seconds

    def as_json(self) -> dict:
        """A JSON-ready dict."""
        return {"name": self.name, "issuer": self.issuer, "not_before": self.not_before,
                "not_after": self.not_after, "source": self.source, "updated": self.updated}


@dataclass(frozen=True)
class StoredCertificate:
    """A certificate with its key, as the server loads it."""

    info: CertificateInfo
    chain_pem: str
    key_pem: str


@runtime_checkable
class CertificateStore(Protocol):
    """The part of a store that keeps public HTTPS certificates (both stores implement it)."""

    def put_certificate(self, certificate: StoredCertificate) -> None:
        """Store (or replace) the certificate for its name and bump the certificate revision."""

    def load_certificates(self) -> list[StoredCertificate]:
        """Every stored certificate with its key (the server's ssl contexts are built from these)."""

    def list_certificates(self) -> list[CertificateInfo]:
        """Every stored certificate's public facts, sorted by name."""

    def remove_certificate(self, name: str) -> bool:
        """Delete a name's certificate; False when there was none."""

    def certificate_revision(self) -> str:
        """A cheap marker that changes whenever a certificate is stored or removed."""

    def put_acme_value(self, key: str, value: str, ttl: float | None) -> None:
        """Keep an ACME value (``challenge:<token>``, ``account:<directory>``) for `ttl` seconds (None: always)."""

    def acme_value(self, key: str) -> str | None:
        """An ACME value, or None when absent or expired."""

    def remove_acme_value(self, key: str) -> None:
        """Forget an ACME value (absent: nothing to do)."""

    def acquire_acme_lock(self, key: str, owner: str, ttl: float) -> bool:
        """Hold the lock `key` (``order:<name>``) as `owner` for `ttl` seconds; False while another holds it."""

    def release_acme_lock(self, key: str, owner: str) -> bool:
        """Drop the lock `key` if `owner` still holds it (never another's); True when it did."""


def normalize_cert_name(name: str) -> str:
    """A certificate name: a domain, or ``*.`` and a domain; InvalidCertificate otherwise."""
    if not isinstance(name, str):
        raise InvalidCertificate("a certificate name must be a domain such as app.example.com or *.example.com")
    wildcard = name.startswith("*.")
    try:
        domain = normalize_domain(name[2:] if wildcard else name)
    except StorageError as exc:
        raise InvalidCertificate(str(exc)) from None
    return f"*.{domain}" if wildcard else domain


def candidate_names(server_name: str) -> tuple[str, ...]:
    """The stored names that may serve an SNI, best first: the exact name, then the wildcard one label up."""
    name = server_name.strip().rstrip(".").lower()
    if not name:
        return ()
    parent = name.partition(".")[2]
    return (name, f"*.{parent}") if "." in parent else (name,)


def certificate_info(name: str, chain_pem: str, key_pem: str, source: str, now: float) -> StoredCertificate:
    """Parse and check a PEM chain and key for `name`; InvalidCertificate naming what is wrong.

    Checks: the chain's first certificate parses, the key parses and matches it, and the name is
    among its subject alternative names (a wildcard certificate covers one-label names under it).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    name = normalize_cert_name(name)
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    except (ValueError, IndexError) as exc:
        raise InvalidCertificate(f"the certificate file holds no PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidCertificate(f"the key file holds no unencrypted PEM private key ({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        raise InvalidCertificate("the key does not belong to the certificate (their public keys differ)")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {dns.lower() for dns in sans.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        names = set()
    if not any(candidate in names for candidate in candidate_names(name) + (name,)):
        raise InvalidCertificate(f"the certificate is not valid for {name} (its names: "
                                 f"{', '.join(sorted(names)) or 'none'})")
    info = CertificateInfo(name, leaf.issuer.rfc4514_string(), _unix(leaf.not_valid_before_utc),
                           _unix(leaf.not_valid_after_utc), source, now)
    return StoredCertificate(info, chain_pem, key_pem)


def _unix(moment: datetime.datetime) -> float:
    return moment.timestamp()
