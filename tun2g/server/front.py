"""The standalone public HTTP front: one greenlet per public connection.

It reads each request head and hands it to the server's request pipeline,
which streams the exchange between the public socket and an upstream. A
tunnel client on the public port (HTTP Upgrade) is handed to the Server.
This path moves bytes without building WSGI environs; `tun2g.server.wsgi` is
the mountable alternative.
"""

from __future__ import annotations

from gevent.server import StreamServer

from tun2g import pages
from tun2g.http import HTTPError, MessageReader, RequestHead, serve_requests
from tun2g.requestid import new_request_id
from tun2g.server.server import Server
from tun2g.transport import upgrade
from tun2g.transport.base import ByteStream
from tun2g.transport.tcp import tune


class HTTPFront:
    """Serves public HTTP for a Server; `serve(listener)` returns the running StreamServer."""

    def __init__(self, server: Server, *, scheme: str = "http") -> None:
        self.server = server
        self.scheme = scheme

    def serve(self, listener) -> StreamServer:
        stream_server = StreamServer(listener, self.handle)
        stream_server.start()
        return stream_server

    def handle(self, sock, address) -> None:
        """Serve requests on one public connection until it closes."""
        tune(sock)
        peer_ip = address[0] if isinstance(address, tuple) else ""
        try:
            serve_requests(sock, lambda head, reader: self.handle_request(head, reader, sock, peer_ip), _reject)
        finally:
            sock.close()

    def handle_request(self, head: RequestHead, reader: MessageReader, sock: ByteStream, peer_ip: str) -> bool:
        """Serve one request; True when the public connection may carry another."""
        if upgrade.is_tunnel_request(head):  # a tunnel client on the public port (--conn-type upgrade)
            tune(sock)
            sock.sendall(upgrade.SWITCHING_PROTOCOLS)
            self.server.serve_tunnel(upgrade.UpgradedStream(sock, reader.take_buffered()),
                                     proto="upgrade+tls" if self.scheme == "https" else "upgrade")
            return False
        if pages.is_health_request(head.method, head.target):
            return self._health(head, reader, sock)
        return self.server.pipeline.serve(head, reader, sock, peer_ip=peer_ip, scheme=self.scheme)

    def _health(self, head: RequestHead, reader: MessageReader, sock: ByteStream) -> bool:
        """The node's own health answer (for balancers and the other nodes), whatever the Host."""
        page = self.server.health()
        keep = head.keep_alive and reader.body_complete
        data = page.encode(version=head.version, close=not keep)
        sock.sendall(pages.head_only(data) if head.method == "HEAD" else data)
        return keep


def _reject(error: HTTPError) -> bytes:
    return pages.malformed_request(error.status, error.message, new_request_id()).encode()
