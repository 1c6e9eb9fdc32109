"""Client-side dialing: turn a ClientConfig into a connected, secured ByteStream for smux."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from tun2g.log import get_logger
from tun2g.smux.frame import NOP, encode_frame
from tun2g.transport import tcp, tls, upgrade
from tun2g.transport.base import ByteStream

if TYPE_CHECKING:
    from tun2g.client.client import ClientConfig

log = get_logger(__name__)


def server_host_port(server_addr: str, default_port: int = 443) -> tuple[str, int, str]:
    """(host, port, scheme) from "host:port" or a URL such as "https://tunnel.example"."""
    if "://" in server_addr:
        parts = urlsplit(server_addr)
        scheme = parts.scheme
        port = parts.port or (443 if scheme in ("https", "wss") else 80)
        return parts.hostname or "localhost", port, scheme
    host, port = tcp.split_host_port(server_addr, default_port)
    return host, port, ""


class HandshakeHangUp(OSError):
    """The peer closed the connection in the middle of our TLS handshake (a port without TLS does)."""


class Diagnosis(NamedTuple):
    """Why a dial failed, in a few words, and whether retrying could help (``permanent``: it cannot)."""

    reason: str
    permanent: bool = False
    hint: str = ""


# OpenSSL's words for "the peer does not speak TLS" (an HTTP port, a plain tunnel port).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def diagnose(exc: BaseException, config: ClientConfig) -> Diagnosis:
    """Turn a dial or handshake failure into a reason, a verdict and the fix to print."""
    host, port, _scheme = server_host_port(config.server_addr)
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or exc.reason or "certificate verify failed"
        if "hostname" in message.lower() or "not valid for" in message.lower():
            return Diagnosis(f"the server's certificate does not verify ({message})", True,
                             f"the certificate does not name {host}: make one that does (`tun2g cert --host {host}`) "
                             f"and start the server with --tls-cert/--tls-key, or connect by a name it holds")
        if config.ca_file:
            return Diagnosis(f"the server's certificate does not verify ({message})", True,
                             f"it is not signed by --ca {config.ca_file}: give the certificate the server uses")
        return Diagnosis(f"the server's certificate does not verify ({message})", True,
                         f"trust it with --ca PATH; for the development certificate of a server on this machine: "
                         f"--ca {dev_certificate_path()}")
    if isinstance(exc, ssl.SSLError) and (exc.reason or "").upper() in _NOT_TLS:
        return Diagnosis(f"{host}:{port} does not speak TLS", True,
                         f"if it is the server's public HTTP port, use --conn-type upgrade --server http://{host}:{port} "
                         f"(https:// behind TLS); if the server runs --plain-tunnel, add --plain")
    if isinstance(exc, HandshakeHangUp):
        return Diagnosis(f"{host}:{port} hung up during the TLS handshake", True,
                         "if the server runs --plain-tunnel, add --plain; if it is the public HTTP port, use "
                         "--conn-type upgrade")
    if isinstance(exc, upgrade.UpgradeRefused):  # a 4xx will not change; a 5xx (a node stopping) may
        return Diagnosis(str(exc), 400 <= getattr(exc, "status", 0) < 500)
    if isinstance(exc, ConnectionRefusedError):
        return Diagnosis("connection refused")
    if isinstance(exc, socket.gaierror):
        return Diagnosis(f"cannot resolve {host} ({exc.strerror or exc})")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Diagnosis(f"no answer within {config.connect_timeout:g} s")
    if isinstance(exc, ssl.SSLError):
        return Diagnosis(f"TLS failed ({exc.reason or exc})")
    if isinstance(exc, OSError):
        return Diagnosis((exc.strerror or str(exc) or type(exc).__name__).lower())
    return Diagnosis(str(exc) or type(exc).__name__)


def dev_certificate_path() -> str:
    """Where `tun2g server` on this machine keeps its development certificate."""
    from tun2g.storage import default_sqlite_path

    return str(default_sqlite_path().parent / tls.DEV_CERT_NAME)


def client_tls_context(config: ClientConfig):
    """The TLS context a client uses: the given one, else one from --ca / --insecure."""
    if config.tls_context is not None:
        return config.tls_context
    return tls.client_context(ca_file=config.ca_file, insecure=config.insecure)


def dial(config: ClientConfig) -> ByteStream:
    """Connect as `config.conn_type` says; returns the byte stream smux runs on."""
    host, port, scheme = server_host_port(config.server_addr)
    if config.conn_type == "kcp":
        return _dial_kcp(config, host, port)
    if config.conn_type == "upgrade":
        return _dial_upgrade(config, host, port, scheme)
    sock = tcp.dial(f"{host}:{port}", timeout=config.connect_timeout)
    if config.plain:
        # The server speaks first in tun2; a NOP (ignored by every smux server) makes a TLS or HTTP port
        # answer at once with an error, instead of waiting out its handshake timeout.
        sock.sendall(encode_frame(config.smux_config.version or 1, NOP, 0))
        return sock
    try:
        return tls.connect_tls(sock, client_tls_context(config), server_hostname=host)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as exc:
        sock.close()
        raise HandshakeHangUp(str(exc)) from exc
    except BaseException:
        sock.close()
        raise


def _dial_kcp(config: ClientConfig, host: str, port: int) -> ByteStream:
    from tun2g.transport import kcp, tls_bio

    connection = kcp.kcp_dial(host, port, config.kcp_options or kcp.KCPOptions.fast())
    if config.plain:
        # A KCP listener learns of a client from its first datagram, and the
        # server speaks first in tun2: say a NOP so it can open the control stream.
        version = config.smux_config.version or 1
        connection.sendall(encode_frame(version, NOP, 0))
        return connection
    context = tls_bio.client_context(ca_file=config.ca_file, insecure=config.insecure)
    return tls_bio.wrap(connection, context, server_side=False, server_hostname=host)


def _dial_upgrade(config: ClientConfig, host: str, port: int, scheme: str) -> ByteStream:
    """Connect, run TLS for https, and switch the connection to the tunnel protocol."""
    sock = tcp.dial(f"{host}:{port}", timeout=config.connect_timeout)
    use_tls = scheme in ("https", "wss") or (scheme == "" and not config.plain)
    if scheme in ("http", "ws") and not config.plain:
        log.warning("plain_upgrade", server=config.server_addr,
                    note="http:// sends the token unencrypted; use https:// outside development")
    try:
        if use_tls:
            sock = tls.connect_tls(sock, client_tls_context(config), server_hostname=host)
        default_port = 443 if use_tls else 80
        sock.settimeout(config.connect_timeout)
        sock.sendall(upgrade.encode_request(host if port == default_port else f"{host}:{port}"))
        head, leftover = upgrade.read_response_head(sock)
        status, status_line = upgrade.parse_response_head(head)
        if status != 101:
            refused = upgrade.UpgradeRefused(
                f"the server answered {status_line!r} instead of 101 to the tunnel upgrade at "
                f"{config.server_addr}{upgrade.TUNNEL_PATH}; check the URL, and that any proxy in "
                f"front passes Upgrade requests through")
            refused.status = status
            raise refused
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return upgrade.UpgradedStream(sock, leftover)


def reachable(config: ClientConfig) -> bool:
    """True when the server's address accepts a TCP connection now (closed at once, nothing sent).

    The reconnect wait uses it to end a long backoff as soon as a server that was down is back.
    KCP (UDP) has no connection to probe: always False, the backoff runs its course.
    """
    if config.conn_type == "kcp":
        return False
    host, port, _scheme = server_host_port(config.server_addr)
    try:
        tcp.dial(f"{host}:{port}", timeout=min(1.0, config.connect_timeout)).close()
    except OSError:
        return False
    return True
