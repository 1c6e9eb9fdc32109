"""Client-side dialing: turn a ClientConfig into a connected, secured ByteStream for smux."""

from __future__ import annotations

from typing import TYPE_CHECKING
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
        return sock
    return tls.connect_tls(sock, client_tls_context(config), server_hostname=host)


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
            raise upgrade.UpgradeRefused(
                f"the server answered {status_line!r} instead of 101 to the tunnel upgrade at "
                f"{config.server_addr}{upgrade.TUNNEL_PATH}; check the URL, and that any proxy in "
                f"front passes Upgrade requests through")
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
