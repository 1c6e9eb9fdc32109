"""Public HTTPS: TLS on the public port, the certificate chosen per connection by SNI.

The HTTPS port is the same `HTTPFront` as the HTTP port (the same limits, the
same request pipeline, ``X-Forwarded-Proto: https``), with a TLS handshake run
first inside the connection's own greenlet: gevent's ssl yields to the hub while
it waits for the peer, so a slow handshake costs only its own greenlet, and
it must finish within `HANDSHAKE_TIMEOUT` in all (a client dribbling its hello
a byte at a time is cut there). The handshake happens after the front's
connection caps, so unfinished handshakes count against them like any
connection.

Certificates come from the store (`tun2g cert add`), kept by a
`CertificateBook`: one ssl context per stored name, chosen in the SNI callback
(exact name, then the wildcard one label up). A name with no certificate, or a
hello without SNI, fails the handshake with an ``unrecognized_name`` alert:
there is no default certificate, so no certificate of one customer is shown
for another's name. The book polls the store's certificate revision every
`REFRESH_INTERVAL` seconds (one GET on Redis), so a certificate stored by any
node or command is served by every node within that time, without a restart;
while the store cannot be read, the certificates already loaded keep serving.

Every ClientHello is first peeked (``MSG_PEEK``: the bytes stay in the kernel
for the TLS handshake or the backend; at most `MAX_RECORDS_SIZE`, within the
same handshake timeout) for its SNI and ALPN. TLS passthrough on this port:
when some connected client serves names by passthrough (`tun2g client --tls
NAME=HOST:PORT`), a hello naming such a name is handed, untouched, to the TCP
routes (`Passthrough.handle_passthrough`), so the tunnel never holds that
name's key (docs/tcp.md). ACME TLS-ALPN-01 (RFC 8737): any other hello that
offers ALPN ``acme-tls/1`` is an ACME server's validation; it gets the
challenge certificate of its name's pending challenge (tun2g.server.tls_alpn,
from the shared store), negotiates ``acme-tls/1`` and is closed after the
handshake (never served HTTP), or, with no challenge pending for its name,
fails with an ``unrecognized_name`` alert. Any other hello is terminated as
above.

TLS session resumption stays on (OpenSSL's session tickets, TLS 1.2 and 1.3).

A TLS socket cannot ``recv(n, MSG_PEEK)``, which the relay's watch for a
public client that gave up on a hung backend uses. `PeekableTLS` gives it
that: a peek reads through TLS (so a close_notify or a FIN shows as the end
of the stream) and keeps the bytes for the next ordinary read.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from typing import Callable, Protocol

import gevent

from tun2g.log import get_logger
from tun2g.storage import StorageError
from tun2g.storage.certificates import CertificateStore, StoredCertificate, candidate_names
from tun2g.server.tls_alpn import ACME_TLS_ALPN, ChallengeCertificates
from tun2g.tcp.sni import MAX_RECORDS_SIZE, ClientHelloError, HelloPeek, peek_server_name
from tun2g.transport.base import PEEKABLE_TLS

log = get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for a whole public TLS handshake
REFRESH_INTERVAL = 1.0    # seconds between certificate revision reads
ALPN_PROTOCOLS = ["http/1.1"]
PEEK_POLL = 0.02          # seconds between peeks at a ClientHello that arrived in pieces
_ACME_TLS_ALPN = ACME_TLS_ALPN.encode()
_ACME_TLS_ALPN_ENTRY = bytes((len(_ACME_TLS_ALPN),)) + _ACME_TLS_ALPN  # as it appears in an ALPN list


class Passthrough(Protocol):
    """The TCP routes as the HTTPS port sees them (tun2g.server.tcp_routes.TCPRoutes)."""

    def passthrough_names(self) -> set[str]: ...

    def handle_passthrough(self, conn: socket.socket, address, hello: bytes, name: str | None) -> None: ...


class HandshakeFailed(Exception):
    """A public TLS handshake that did not complete (timeout, unknown name, not TLS)."""


class CertificateBook:
    """The certificates this node serves, by name, refreshed from the store."""

    def __init__(self, store: CertificateStore, interval: float = REFRESH_INTERVAL,
                 on_unknown: Callable[[str], None] | None = None) -> None:
        """`on_unknown(name)`: told of an SNI name with no certificate (the ACME manager's `want`; must not block)."""
        self.store = store
        self.on_unknown = on_unknown
        self.interval = interval
        self.revision: str | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._failing = False
        self.listening_context = _base_context()
        self.listening_context.sni_callback = self._choose
        self.challenges = ChallengeCertificates(store, _challenge_context)
        self.refusing_context = _base_context()  # an acme-tls/1 hello with no challenge pending for its name
        self.refusing_context.sni_callback = _refuse

    def names(self) -> list[str]:
        """The names a certificate is loaded for."""
        return sorted(self._contexts)

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The ssl context serving an SNI name (exact, then wildcard), or None."""
        for name in candidate_names(server_name or ""):
            context = self._contexts.get(name)
            if context is not None:
                return context
        return None

    def refresh(self) -> bool:
        """Reload when the store's certificate revision changed; True when it did."""
        try:
            revision = self.store.certificate_revision()
            if revision == self.revision:
                return False
            stored = self.store.load_certificates()
        except StorageError as exc:
            if not self._failing:
                log.warning("certificates_unavailable", error=str(exc),
                            effect=f"serving the {len(self._contexts)} certificates already loaded")
            self._failing = True
            return False
        self._failing = False
        contexts = {}
        for certificate in stored:
            try:
                contexts[certificate.info.name] = _context_for(certificate)
            except (OSError, ssl.SSLError) as exc:
                log.error("certificate_unusable", name=certificate.info.name, error=str(exc))
                previous = self._contexts.get(certificate.info.name)
                if previous is not None:
                    contexts[certificate.info.name] = previous
        self._contexts, self.revision = contexts, revision
        log.info("certificates_loaded", count=len(contexts), revision=revision)
        return True

    def run(self) -> None:
        """Refresh forever (the cadence is polling, not synchronisation)."""
        while True:
            try:
                self.refresh()
            except Exception as exc:  # a bug must not stop new certificates for the process's lifetime
                log.error("certificates_refresh_failed", error=repr(exc))
            gevent.sleep(self.interval)

    def _choose(self, tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _context) -> int | None:
        context = self.context_for(server_name)
        if context is None:
            log.debug("tls_unknown_name", server_name=(server_name or "-")[:256])
            if server_name and self.on_unknown is not None:
                try:
                    self.on_unknown(server_name)  # ordered (if routed) in the manager's greenlet; this one fails
                except Exception as exc:  # a bug there must not turn the alert into an internal error
                    log.error("tls_unknown_name_callback_failed", error=repr(exc))
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        tls.context = context
        return None


class PeekableTLS:
    """A public TLS socket whose ``recv(n, MSG_PEEK)`` keeps the bytes it read for the next recv."""

    capabilities = PEEKABLE_TLS

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._tls = tls
        self._peeked = b""

    def recv(self, size: int, flags: int = 0) -> bytes:
        """TLS plaintext; with MSG_PEEK the bytes stay for the next call (b"": the peer closed)."""
        if flags & socket.MSG_PEEK:
            if not self._peeked:
                self._peeked = self._tls.recv(size)
            return self._peeked[:size]
        if self._peeked:
            data, self._peeked = self._peeked[:size], self._peeked[size:]
            return data
        return self._tls.recv(size)

    def __getattr__(self, name: str):
        return getattr(self._tls, name)  # sendall, settimeout, close, fileno, ...: the TLS socket's own


def handshake(book: CertificateBook, timeout: float = HANDSHAKE_TIMEOUT,
              passthrough: Passthrough | None = None) -> Callable:
    """The `HTTPFront` handshake step: wrap an accepted socket in TLS within `timeout`, or HandshakeFailed;
    None when the connection was a passthrough name's and `passthrough` served it (raw, to its end)."""

    def run(sock):
        names = passthrough.passthrough_names() if passthrough is not None else set()
        with gevent.Timeout(timeout, HandshakeFailed(f"no TLS handshake within {timeout:g} s")):
            hello = _peek_hello(sock, None if names else _ACME_TLS_ALPN_ENTRY)  # parse only what may matter
            name = hello.server_name if hello is not None else None
            if passthrough is None or name is None or name not in names:
                if hello is not None and _ACME_TLS_ALPN in hello.alpn:
                    _answer_challenge(book, sock, name)
                    return None
                return PeekableTLS(_terminate(book, sock))
        try:
            address = sock.getpeername()
        except OSError as exc:
            raise HandshakeFailed(str(exc)) from None
        passthrough.handle_passthrough(sock, address, b"", name)  # the hello is still unread in the socket
        return None

    return run


def _terminate(book: CertificateBook, sock) -> ssl.SSLSocket:
    tls = book.listening_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except OSError as exc:
        raise HandshakeFailed(str(exc)) from None
    return tls


def waiting_server_name(sock) -> str | None:
    """The SNI of the ClientHello waiting unread in `sock` (MSG_PEEK; None: none, or not a hello);
    raises HandshakeFailed when the peer leaves first. Bound it with a timeout."""
    peek = _peek_hello(sock, None)
    return peek.server_name if peek is not None else None


def _answer_challenge(book: CertificateBook, sock, name: str | None) -> None:
    """An ACME server's TLS-ALPN-01 validation: the challenge certificate, acme-tls/1, then close."""
    context = book.challenges.context_for(name)
    tls = (context or book.refusing_context).wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except OSError as exc:
        raise HandshakeFailed(f"acme-tls/1 for {name or 'no name'}: {exc}") from None
    finally:
        tls.close()  # RFC 8737 3: no data follows the handshake
    log.info("acme_tls_alpn_answered", domain=name)


def _refuse(_tls, server_name: str | None, _context) -> int:
    log.debug("acme_tls_alpn_not_pending", server_name=(server_name or "-")[:256])
    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def _peek_hello(sock, parse_only_if: bytes | None) -> HelloPeek | None:
    """The SNI and ALPN of the ClientHello waiting in `sock`, read with MSG_PEEK (None: not a hello
    the parser accepts, which the TLS handshake then refuses as before; unparsed when it lacks
    `parse_only_if`). One peek takes a hello that arrived whole; a cut one (the handshake timeout)
    has its peeked bytes read, so the close is a FIN, not a reset."""
    seen = b""
    try:
        while True:
            try:
                peek = peek_server_name(seen, parse_only_if=parse_only_if)
            except ClientHelloError:
                return None
            if peek.complete:
                return peek
            try:
                data = sock.recv(MAX_RECORDS_SIZE, socket.MSG_PEEK)  # whatever has come, up to the cap
            except OSError as exc:
                raise HandshakeFailed(str(exc)) from None
            if not data:
                raise HandshakeFailed("closed before its ClientHello")
            if len(data) == len(seen):
                gevent.sleep(PEEK_POLL)  # a hello in pieces: MSG_PEEK returns at once while bytes wait unread
            seen = data
    except HandshakeFailed:
        if seen:
            try:
                sock.recv(len(seen))  # they wait in the kernel: no block
            except OSError:
                pass
        raise


def _base_context() -> ssl.SSLContext:
    from gevent import ssl as gssl

    context = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def _context_for(certificate: StoredCertificate) -> ssl.SSLContext:
    """An ssl context holding one stored chain and key."""
    return _load(_base_context(), certificate.chain_pem, certificate.key_pem)


def _challenge_context(certificate_pem: str, key_pem: str) -> ssl.SSLContext:
    """An ssl context serving a TLS-ALPN-01 challenge certificate: ALPN acme-tls/1 only, no session tickets."""
    context = _base_context()
    context.set_alpn_protocols([ACME_TLS_ALPN])
    context.num_tickets = 0
    return _load(context, certificate_pem, key_pem)


def _load(context: ssl.SSLContext, chain_pem: str, key_pem: str) -> ssl.SSLContext:
    """`context` holding a chain and key (via a private temporary file, removed at once)."""
    with tempfile.TemporaryDirectory(prefix="tun2g-cert-") as directory:
        path = os.path.join(directory, "chain-and-key.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(chain_pem.rstrip("\n") + "\n" + key_pem)
        context.load_cert_chain(path)
    return context
