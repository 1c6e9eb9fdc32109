"""ACME (RFC 8555) issuance with HTTP-01 or TLS-ALPN-01, the challenge answered by whichever node the
validation reaches.

`issue()` orders a certificate for one routed name with certbot's `acme`
library (JWS, nonces and polling are its work, not ours), puts each HTTP-01
key authorization in the shared store under ``challenge:<token>`` for
`CHALLENGE_TTL` seconds, and stores the certificate it gets; every node's
public HTTP port answers ``/.well-known/acme-challenge/<token>`` from the store
(`challenge_answer`, called by the pipeline before routing, only for tokens
that are pending), and every node with ``--https`` serves the certificate
within a second of it being stored. The account key is kept in the store too,
one per directory URL, so repeated orders reuse one account. With
``challenge="tls-alpn-01"`` (RFC 8737) the key authorization goes under
``alpn:<domain>`` instead and every node's public HTTPS port answers the
validation's ``acme-tls/1`` handshake (tun2g.server.tls_alpn); the HTTP port
is not used.

It runs where it is called (the `tun2g cert issue` command); requests' sockets
are gevent's there, and every network call is bounded by `NETWORK_TIMEOUT` and
the whole order by `ORDER_TIMEOUT`; the server's own ordering on first use and
renewal (`tun2g server --acme`) calls it from tun2g.server.cert_manager.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
import time
from typing import cast

from tun2g.log import get_logger
from tun2g.server import tls_alpn
from tun2g.storage import Storage, StorageError
from tun2g.storage.certificates import CertificateStore, StoredCertificate, certificate_info

log = get_logger(__name__)

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"  # the default of --acme-directory (cli.options)
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
CHALLENGE_TTL = 600.0   # seconds a pending HTTP-01 answer is kept
NETWORK_TIMEOUT = 30.0  # seconds per request to the ACME directory
ORDER_TIMEOUT = 120.0   # seconds for a whole order (validation and finalization)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # base64url, as RFC 8555 8.3 makes tokens
CHALLENGES = ("http-01", "tls-alpn-01")


class IssuanceFailed(Exception):
    """An order that did not produce a certificate; the message carries the ACME server's error.

    `retry_after`: the server's Retry-After header on its refusal, as sent (None: none); `rate_limited`:
    its error was ``rateLimited`` (RFC 8555 6.6), so the caller must wait before asking again.
    """

    def __init__(self, message: str, retry_after: str | None = None, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.retry_after, self.rate_limited = retry_after, rate_limited


def challenge_answer(store: CertificateStore, target: str) -> str | None:
    """The key authorization for an HTTP-01 request target, when its token is pending; else None."""
    if not target.startswith(CHALLENGE_PREFIX):
        return None
    token = target[len(CHALLENGE_PREFIX):]
    if not _TOKEN.fullmatch(token):
        return None
    try:
        return store.acme_value(f"challenge:{token}")
    except StorageError as exc:
        log.warning("acme_challenge_unavailable", error=str(exc))
        return None


def issue(store: Storage, domain: str, *, directory_url: str = LETS_ENCRYPT, email: str | None = None,
          ca_bundle: str | None = None, source: str = "cli", challenge: str = "http-01") -> StoredCertificate:
    """Order, validate (`challenge`: http-01 or tls-alpn-01) and store a certificate for a routed `domain`;
    IssuanceFailed otherwise."""
    from acme import challenges, client, crypto_util, errors, messages
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import josepy

    if challenge not in CHALLENGES:
        raise ValueError(f"challenge must be one of {', '.join(CHALLENGES)}, not {challenge!r}")
    if not isinstance(store, CertificateStore):
        raise IssuanceFailed(f"{store.describe()} does not keep certificates")
    kind = challenges.HTTP01 if challenge == "http-01" else _tls_alpn_01()
    store.has_route(domain)  # NoSuchRoute: never order a name nobody routes
    account_key = _account_key(store, directory_url, josepy)
    # requests takes a CA file path for `verify`; acme annotates the pass-through as bool only.
    network = client.ClientNetwork(account_key, user_agent="tun2g", verify_ssl=cast(bool, ca_bundle or True),
                                   timeout=int(NETWORK_TIMEOUT))
    refusals: list[str] = []  # the Retry-After of each refusal, seen by a requests response hook

    def note_refusal(response, *args, **kwargs) -> None:
        if response.status_code >= 400:
            refusals.append(response.headers.get("Retry-After", ""))

    network.session.hooks["response"].append(note_refusal)
    tokens: list[str] = []
    alpn_pending = False
    started = time.monotonic()
    try:
        directory = client.ClientV2.get_directory(directory_url, network)
        acme = client.ClientV2(directory, network)
        registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as conflict:  # this key has an account already: use it
            network.account = messages.RegistrationResource(body=messages.Registration(), uri=conflict.location)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        order = acme.new_order(crypto_util.make_csr(key_pem, [domain]))
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated for this account recently (authorization reuse): nothing to answer
            offered = next((c for c in authorization.body.challenges if isinstance(c.chall, kind)), None)
            if offered is None:
                raise IssuanceFailed(f"the ACME server offers no {challenge.upper()} challenge for {domain}")
            response = offered.chall.response(account_key)
            if challenge == "http-01":
                token = offered.chall.encode("token")
                store.put_acme_value(f"challenge:{token}", response.key_authorization, CHALLENGE_TTL)
                tokens.append(token)
            else:
                tls_alpn.put_pending(store, domain, response.key_authorization, CHALLENGE_TTL)
                alpn_pending = True
            acme.answer_challenge(offered, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        order = acme.poll_and_finalize(order, deadline)
    except (errors.Error, messages.Error) as exc:
        log.warning("acme_order_failed", domain=domain, directory=directory_url, error=str(exc))
        raise IssuanceFailed(f"the ACME server refused the order for {domain}: {exc}",
                             retry_after=(refusals[-1] or None) if refusals else None,
                             rate_limited=getattr(exc, "code", None) == "rateLimited") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise IssuanceFailed(f"cannot reach the ACME directory {directory_url}: {exc}") from None
    finally:
        for token in tokens:
            store.remove_acme_value(f"challenge:{token}")
        if alpn_pending:
            tls_alpn.remove_pending(store, domain)
    certificate = certificate_info(domain, order.fullchain_pem, key_pem.decode(), source, time.time())
    store.put_certificate(certificate)
    log.info("acme_issued", domain=domain, issuer=certificate.info.issuer, not_after=certificate.info.not_after,
             seconds=round(time.monotonic() - started, 1))
    return certificate


@functools.cache
def _tls_alpn_01() -> type:
    """The tls-alpn-01 challenge type, registered with acme's parser (acme 3 and later dropped theirs):
    a key authorization challenge like HTTP-01, its response an empty JSON object."""
    from acme import challenges

    known = challenges.Challenge.TYPES.get("tls-alpn-01")
    if known is not None:
        return known

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = "tls-alpn-01"

        def validation(self, account_key, **unused_kwargs) -> str:
            return self.key_authorization(account_key)

    return TLSALPN01


def _account_key(store: CertificateStore, directory_url: str, josepy):
    """The account key for a directory, made and stored on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    name = "account:" + hashlib.sha256(directory_url.encode()).hexdigest()
    stored = store.acme_value(name)
    if stored is not None:
        return josepy.JWKRSA(key=serialization.load_pem_private_key(stored.encode(), password=None))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    store.put_acme_value(name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode(), None)
    return josepy.JWKRSA(key=key)
