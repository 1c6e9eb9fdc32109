"""Client-side dialing: turn a ClientConfig into a connected, secured byte stream."""

from __future__ import annotations

from urllib.parse import urlsplit

from tun2g.smux.frame import NOP, encode_frame
from tun2g.transport import tcp, tls



def server_host_port(server_addr: str, default_port: int = 443) -> tuple[str, int, str]:
    """(host, port, scheme) from "host:port" or a URL such as "https://tunnel.example"."""
    if "://" in server_addr:
        parts = urlsplit(server_addr)
        scheme = parts.scheme
        port = parts.port or (443 if scheme in ("https", "wss") else 80)
        return parts.hostname or "localhost", port, scheme
    host, port = tcp.split_host_port(server_addr, default_port)
    return host, port, ""


def client_tls_context(config):
    """The TLS context a client uses: the given one, else one from --ca / --insecure."""
    if config.tls_context is not None:
        return config.tls_context
    return tls.client_context(ca_file=config.ca_file, insecure=config.insecure)


def dial(config):
    """Connect as `config.conn_type` says; returns a socket-like object for smux."""
    host, port, scheme = server_host_port(config.server_addr)
    if config.conn_type == "kcp":
        from tun2g.transport import kcp, memtls

        connection = kcp.kcp_dial(host, port, config.kcp_options or kcp.KCPOptions.fast())
        if config.plain:
            # A KCP listener learns of a client from its first datagram, and the
            # server speaks first in tun2: say a NOP so it can open the control stream.
            version = config.smux_config.version or 1
            connection.sendall(encode_frame(version, NOP, 0))
            return connection
        context = memtls.client_context(ca_file=config.ca_file, insecure=config.insecure)
        return memtls.wrap(connection, context, server_side=False, server_hostname=host)
    if config.conn_type == "upgrade":
        from tun2g.transport import upgrade

        return upgrade.dial(config, host, port, scheme)
    sock = tcp.dial(f"{host}:{port}", timeout=config.connect_timeout)
    if config.plain:
        return sock
    return tls.connect_tls(sock, client_tls_context(config), server_hostname=host)
