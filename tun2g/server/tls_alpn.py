"""TLS-ALPN-01 (RFC 8737): pending challenges in the shared store, and the challenge certificate.

The side that orders (`tun2g.server.acme.issue(..., challenge="tls-alpn-01")`)
puts a name's key authorization in the store under ``alpn:<domain>`` for a
few minutes (`put_pending`; SQLite or Redis, so every node sees it). Whichever
node the ACME server's connection reaches (behind a TCP balancer: any of them)
answers on its public HTTPS port: a ClientHello that offers ALPN ``acme-tls/1``
for a name with a pending challenge gets a self-signed certificate for that
name carrying the critical acmeIdentifier extension (the SHA-256 of the key
authorization), ``acme-tls/1`` is negotiated and the connection is closed after
the handshake (tun2g.server.https). `ChallengeCertificates` makes that
certificate once per key authorization (a new token is a new key
authorization) and keeps at most `CACHE_SIZE` of them.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections import OrderedDict
from typing import Callable

from tun2g.log import get_logger
from tun2g.storage import StorageError
from tun2g.storage.certificates import CertificateStore

log = get_logger(__name__)

ACME_TLS_ALPN = "acme-tls/1"            # RFC 8737 section 6.2
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"  # id-pe-acmeIdentifier, RFC 8737 section 6.1
CHALLENGE_TTL = 600.0                   # seconds a pending challenge is kept in the store
CACHE_SIZE = 64                         # challenge certificates kept per node
CERTIFICATE_DAYS = 7                    # validity of a challenge certificate (nobody checks it but the VA)


def _key(domain: str) -> str:
    return f"alpn:{domain}"


def put_pending(store: CertificateStore, domain: str, key_authorization: str, ttl: float = CHALLENGE_TTL) -> None:
    """Make `domain`'s TLS-ALPN-01 challenge answerable by every node sharing `store`, for `ttl` seconds."""
    store.put_acme_value(_key(domain), key_authorization, ttl)


def remove_pending(store: CertificateStore, domain: str) -> None:
    """Stop answering `domain`'s TLS-ALPN-01 challenge."""
    store.remove_acme_value(_key(domain))


def pending(store: CertificateStore, domain: str) -> str | None:
    """The key authorization of `domain`'s pending challenge, or None (also while the store cannot be read)."""
    try:
        return store.acme_value(_key(domain))
    except StorageError as exc:
        log.warning("acme_challenge_unavailable", challenge="tls-alpn-01", domain=domain, error=str(exc))
        return None


def challenge_certificate(domain: str, key_authorization: str) -> tuple[str, str]:
    """(certificate PEM, key PEM): self-signed for `domain` with the critical acmeIdentifier extension."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tun2g ACME TLS-ALPN-01 challenge")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        # extnValue is the DER of `Authorization ::= OCTET STRING (SIZE (32))`
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER_OID),
                                                  b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


class ChallengeCertificates:
    """The ssl contexts answering pending TLS-ALPN-01 challenges, made on first use per key authorization."""

    def __init__(self, store: CertificateStore, make_context: Callable[[str, str], ssl.SSLContext],
                 size: int = CACHE_SIZE) -> None:
        self.store = store
        self._make_context = make_context   # (certificate PEM, key PEM) -> a context offering only acme-tls/1
        self._size = size
        self._contexts: OrderedDict[tuple[str, str], ssl.SSLContext] = OrderedDict()

    def context_for(self, domain: str | None) -> ssl.SSLContext | None:
        """The context answering `domain`'s pending challenge, or None when none is pending."""
        if not domain:
            return None
        key_authorization = pending(self.store, domain)
        if key_authorization is None:
            return None
        cached = (domain, key_authorization)
        context = self._contexts.get(cached)
        if context is None:
            context = self._make_context(*challenge_certificate(domain, key_authorization))
            self._contexts[cached] = context
            while len(self._contexts) > self._size:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(cached)
        return context
