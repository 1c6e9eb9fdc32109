"""TLS over a socket-like object that is not a real socket (a KCP connection).

pyOpenSSL runs with memory BIOs: OpenSSL only ever sees bytes we hand it and
never touches a file descriptor, so it cannot block the gevent hub. All
waiting happens in the wrapped connection's own cooperative recv/sendall, so a
peer that stalls mid-handshake costs one greenlet until its deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import gevent.lock
from cryptography import x509
from OpenSSL import SSL

HANDSHAKE_TIMEOUT = 10.0
# One TLS record's worth of plaintext; output is drained after each batch of these.
RECORD_SIZE = 16384
ENCRYPT_BATCH = 4 * RECORD_SIZE
READ_SIZE = 65536


class TLSError(OSError):
    """A TLS failure: bad handshake, bad certificate, corrupt record."""


def server_context(cert_file: str, key_file: str) -> SSL.Context:
    """A TLS 1.2+ server context with the given certificate chain and key."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(cert_file)
        context.use_privatekey_file(key_file)
        context.check_privatekey()
    except SSL.Error as exc:
        raise ValueError(f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}") from None
    return context


def client_context(ca_file: str | None = None, insecure: bool = False) -> SSL.Context:
    """A TLS 1.2+ client context that verifies the server (ca_file, else system roots) unless insecure.

    With verification on, :func:`wrap` also checks the certificate names against server_hostname.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    if insecure:
        context.set_verify(SSL.VERIFY_NONE)
        return context
    context.set_verify(SSL.VERIFY_PEER)
    try:
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.set_default_verify_paths()
    except SSL.Error as exc:
        raise ValueError(f"cannot load CA file {ca_file}: {exc}") from None
    return context


def wrap(conn, context: SSL.Context, *, server_side: bool, server_hostname: str | None = None,
         handshake_timeout: float | None = HANDSHAKE_TIMEOUT) -> TLSBioStream:
    """Run a TLS handshake over conn within handshake_timeout; return the secured connection."""
    verify = context.get_verify_mode() & SSL.VERIFY_PEER
    if not server_side and verify and not server_hostname:
        raise ValueError("server_hostname is required to verify the server certificate:"
                         " pass it, or use client_context(insecure=True)")
    tls = SSL.Connection(context, None)
    if server_side:
        tls.set_accept_state()
    else:
        tls.set_connect_state()
        if server_hostname and not _is_ip_address(server_hostname):
            tls.set_tlsext_host_name(server_hostname.encode("idna"))
    secured = TLSBioStream(conn, tls)
    try:
        secured._handshake(handshake_timeout)
        if not server_side and verify:
            _check_hostname(tls.get_peer_certificate(as_cryptography=True), server_hostname)
    except BaseException:
        conn.close()
        raise
    return secured


class TLSBioStream:
    """A socket-like TLS stream over a socket-like transport (recv/sendall/close...)."""

    def __init__(self, conn, tls: SSL.Connection):
        self._conn = conn
        self._tls = tls
        # Ciphertext must reach the transport in the order OpenSSL produced it,
        # whichever greenlet (reader or writer) made OpenSSL produce it.
        self._output_lock = gevent.lock.RLock()
        self._closed = False

    @property
    def transport(self):
        """The connection TLS runs over."""
        return self._conn

    def version(self) -> str:
        """The negotiated protocol, e.g. "TLSv1.3"."""
        return self._tls.get_protocol_version_name()

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize bytes of plaintext; b"" once the peer sent close_notify."""
        while True:
            try:
                return self._tls.recv(bufsize)
            except SSL.WantReadError:
                self._send_output(wait=False)
                self._feed()
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as exc:
                raise TLSError(f"TLS receive failed: {_describe(exc)}") from None

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    def sendall(self, data) -> None:
        """Encrypt and send all of data (records of at most 16 KiB, drained in batches)."""
        view = memoryview(data).cast("B")
        with self._output_lock:
            for start in range(0, len(view), ENCRYPT_BATCH):
                batch = view[start : start + ENCRYPT_BATCH]
                for offset in range(0, len(batch), RECORD_SIZE):
                    self._encrypt(batch[offset : offset + RECORD_SIZE])
                self._send_output()

    def send(self, data) -> int:
        self.sendall(data)
        return len(memoryview(data))

    def settimeout(self, timeout: float | None) -> None:
        self._conn.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._conn.gettimeout()

    def getpeername(self):
        return self._conn.getpeername()

    def getsockname(self):
        return self._conn.getsockname()

    def shutdown(self, how: int) -> None:
        """SHUT_WR/SHUT_RDWR send close_notify first; then the transport is shut down."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._close_notify()
        self._conn.shutdown(how)

    def close(self) -> None:
        """Send close_notify (best effort) and close the transport."""
        if self._closed:
            return
        self._closed = True
        self._close_notify()
        self._conn.close()

    def __enter__(self) -> TLSBioStream:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------

    def _handshake(self, timeout: float | None) -> None:
        saved = self._conn.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except SSL.WantReadError:
                    self._send_output()
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError
                        self._conn.settimeout(left)
                    self._feed()
                except SSL.Error as exc:
                    self._send_output(wait=False)  # deliver our alert, if any
                    raise TLSError(f"TLS handshake failed: {_describe(exc)}") from None
            self._send_output()
        except TimeoutError:
            raise TimeoutError(f"TLS handshake did not finish within {timeout:g} s") from None
        finally:
            self._conn.settimeout(saved)

    def _feed(self) -> None:
        data = self._conn.recv(READ_SIZE)
        if data:
            self._tls.bio_write(data)
        else:
            self._tls.bio_shutdown()  # OpenSSL reports "unexpected EOF" or close_notify

    def _encrypt(self, plaintext: memoryview) -> None:
        try:
            self._tls.sendall(plaintext)
        except SSL.Error as exc:
            raise TLSError(f"TLS send failed: {_describe(exc)}") from None

    def _send_output(self, wait: bool = True) -> None:
        """Move OpenSSL's pending ciphertext to the transport, in order.

        With wait=False (the reader's path) a busy writer is left to do it: it
        drains everything before it releases the lock.
        """
        if not self._output_lock.acquire(blocking=wait):
            return
        try:
            while True:
                chunks = []
                try:
                    while True:
                        chunks.append(self._tls.bio_read(READ_SIZE))
                except SSL.WantReadError:
                    pass
                if not chunks:
                    return
                self._conn.sendall(b"".join(chunks))
        finally:
            self._output_lock.release()

    def _close_notify(self) -> None:
        # Best effort and never blocking: a writer stuck on a dead peer holds the
        # output lock, and closing the transport is what frees it.
        try:
            self._tls.shutdown()
            self._send_output(wait=False)
        except (SSL.Error, OSError):
            pass


def _describe(exc: SSL.Error) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "the peer closed the connection mid-stream"
    details = [item[2] for item in exc.args[0]] if exc.args and isinstance(exc.args[0], list) else []
    return ", ".join(str(item) for item in details) or repr(exc)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_hostname(cert: x509.Certificate | None, hostname: str) -> None:
    """Match hostname against the certificate's subjectAltName like Go and browsers (no CN fallback)."""
    if cert is None:
        raise TLSError("the server sent no certificate")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if _is_ip_address(hostname):
        wanted = ipaddress.ip_address(hostname)
        if wanted in names.get_values_for_type(x509.IPAddress):
            return
    else:
        host = hostname.rstrip(".").lower()
        for pattern in names.get_values_for_type(x509.DNSName):
            if _dns_name_matches(pattern.rstrip(".").lower(), host):
                return
    raise TLSError(f"the server certificate is not valid for {hostname!r} (its names: {list(names)});"
                   " connect by a name it holds, or give the server a certificate for this name")


def _dns_name_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        # A wildcard stands for exactly one whole left-most label.
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == host
