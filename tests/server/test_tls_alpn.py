"""TLS-ALPN-01 on the public HTTPS port: the challenge certificate for a pending name, nothing for any other.

Real sockets: a client offering ALPN ``acme-tls/1`` (as an ACME server's
validation does) gets the self-signed certificate with the acmeIdentifier
extension of the pending challenge in the store, negotiates acme-tls/1, and the
connection closes after the handshake. An acme-tls/1 hello for a name with no
pending challenge (unrouted, or nothing ordered) or with no SNI fails with an
alert and the port keeps serving; ordinary clients never see a challenge
certificate; a passthrough name's acme-tls/1 hello goes to its backend (nginx).
Pending challenges live in both stores with their TTL.
"""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.fixtures.tunnel import DOMAIN, wait_until
from tests.server.test_https import _curl, _handshake, _tls_client, ca, https_deployment, served  # noqa: F401
from tests.tcp.test_https_passthrough import NAME as PASSTHROUGH_NAME, shared_port  # noqa: F401
from tests.tcp.test_real_peers import nginx_tls  # noqa: F401  (a fixture shared_port uses)
from tun2g.server.tls_alpn import (ACME_IDENTIFIER_OID, ChallengeCertificates, challenge_certificate, pending,
                                   put_pending, remove_pending)

KEY_AUTHORIZATION = "token-one.thumbprint"


def _acme_client() -> ssl.SSLContext:
    """What an ACME server's validation offers: acme-tls/1 only, no chain verification (RFC 8737 3)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["acme-tls/1"])
    return context


def _identifier(der: bytes) -> tuple[bool, bytes, list[str]]:
    certificate = x509.load_der_x509_certificate(der)
    extension = certificate.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return extension.critical, extension.value.value, names.get_values_for_type(x509.DNSName)


@pytest.mark.pure
def test_the_challenge_certificate_carries_the_digest_critically_for_the_name_only():
    certificate_pem, key_pem = challenge_certificate("shop.test", KEY_AUTHORIZATION)
    der = x509.load_pem_x509_certificate(certificate_pem.encode()).public_bytes(Encoding.DER)
    critical, value, names = _identifier(der)
    assert critical and names == ["shop.test"]
    assert value == b"\x04\x20" + hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
    assert "PRIVATE KEY" in key_pem


def test_pending_challenges_are_shared_and_expire(storage_factory):
    writer, reader = storage_factory(), storage_factory()
    put_pending(writer, "shop.test", KEY_AUTHORIZATION)
    assert pending(reader, "shop.test") == KEY_AUTHORIZATION and pending(reader, "other.test") is None
    remove_pending(writer, "shop.test")
    assert pending(reader, "shop.test") is None
    put_pending(writer, "shop.test", KEY_AUTHORIZATION, ttl=0.2)
    wait_until(lambda: pending(reader, "shop.test") is None, timeout=10, message="the challenge expired")


def test_a_store_that_is_down_answers_no_challenge(redis_server):
    from tun2g.storage.redis_store import RedisStorage

    store = RedisStorage(redis_server.url)
    put_pending(store, "shop.test", KEY_AUTHORIZATION)
    redis_server.stop()
    book = ChallengeCertificates(store, lambda cert, key: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert pending(store, "shop.test") is None and book.context_for("shop.test") is None


def test_a_challenge_certificate_is_made_once_per_key_authorization(storage_factory):
    store = storage_factory()
    made: list[str] = []
    book = ChallengeCertificates(store, lambda cert, key: made.append(cert) or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                                 size=2)
    assert book.context_for("shop.test") is None and book.context_for(None) is None
    put_pending(store, "shop.test", KEY_AUTHORIZATION)
    first = book.context_for("shop.test")
    assert book.context_for("shop.test") is first and len(made) == 1
    put_pending(store, "shop.test", "token-two.thumbprint")  # a new token: a new certificate
    assert book.context_for("shop.test") is not first and len(made) == 2
    for name in ("a.test", "b.test"):
        put_pending(store, name, KEY_AUTHORIZATION)
        book.context_for(name)
    assert len(book._contexts) == 2  # the cap


def test_a_pending_challenge_is_answered_with_acme_tls_1_and_closed_after_the_handshake(served):
    put_pending(served.storage, DOMAIN, KEY_AUTHORIZATION)  # a renewal: the name has a certificate already
    with _handshake(served, _acme_client(), DOMAIN) as tls:
        assert tls.selected_alpn_protocol() == "acme-tls/1"
        critical, value, names = _identifier(tls.getpeercert(binary_form=True))
        assert critical and names == [DOMAIN]
        assert value[2:] == hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
        try:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            answer = tls.recv(1024)
        except (ssl.SSLError, OSError):
            answer = b""
        assert answer == b""  # never served HTTP


@pytest.mark.parametrize("server_name", ["unrouted.test", DOMAIN, None])
def test_acme_tls_1_without_a_pending_challenge_fails_cleanly_and_the_port_keeps_serving(served, ca, tmp_path,
                                                                                         server_name):
    if server_name != DOMAIN:
        put_pending(served.storage, DOMAIN, KEY_AUTHORIZATION)  # pending for another name than asked
    with pytest.raises(ssl.SSLError) as failure:
        _handshake(served, _acme_client(), server_name).close()
    assert "UNRECOGNIZED_NAME" in str(failure.value).upper()
    assert _curl(served, ca.write_root(tmp_path)).returncode == 0


def test_ordinary_clients_never_see_a_challenge_certificate(served, ca):
    put_pending(served.storage, DOMAIN, KEY_AUTHORIZATION)
    with _handshake(served, _tls_client(ca), DOMAIN) as tls:  # verified against the test CA: the real one
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_acme_tls_1_for_a_passthrough_name_goes_to_its_backend_not_to_our_challenge(shared_port):
    deployment, _nginx_ca = shared_port
    put_pending(deployment.storage, PASSTHROUGH_NAME, KEY_AUTHORIZATION)  # even so: the backend's own ACME
    # nginx's answer (it offers no acme-tls/1); tun2g would have answered the challenge or said unrecognized_name
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        _handshake(deployment, _acme_client(), PASSTHROUGH_NAME).close()


def test_a_hello_that_is_no_tls_still_fails_the_handshake(https_deployment):
    with socket.create_connection(("127.0.0.1", https_deployment.running.https_address[1]), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert b"HTTP/1.1 200" not in answer
