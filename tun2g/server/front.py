"""The standalone public HTTP front: one greenlet per public connection.

It reads each request head and hands it to the server's request pipeline,
which streams the exchange between the public socket and an upstream. A
tunnel client on the public port (HTTP Upgrade) is handed to the Server.
This path moves bytes without building WSGI environs; `tun2g.server.wsgi` is
the mountable alternative.

Public connections are bounded (`FrontLimits`): a head must arrive whole
within the header timeout, a kept-alive connection may idle only so long,
and past a cap per client address or in all a connection gets a fast 503.
Running out of file descriptors makes accepting pause briefly, with one log
line now and then instead of a traceback per attempt.
"""

from __future__ import annotations

import errno
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from gevent.server import StreamServer

from tun2g import pages
from tun2g.http import HTTPError, Later, MessageReader, RequestHead, serve_requests
from tun2g.log import get_logger
from tun2g.tcp.wire import HOP_PATH, is_tcp_hop
from tun2g.requestid import new_request_id
from tun2g.server.server import Server
from tun2g.transport import upgrade
from tun2g.transport.base import ByteStream
from tun2g.transport.tcp import tune

log = get_logger(__name__)

# accept() failing for want of resources: pause accepting instead of spinning.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE_MIN, _ACCEPT_PAUSE_MAX = 0.01, 0.5
_REFUSAL_WRITE_TIMEOUT = 1.0  # a refused peer that does not read gets its 503 dropped after this


@dataclass(frozen=True)
class FrontLimits:
    """Bounds on public connections (None / 0: unbounded; `tun2g.server.process` holds the defaults)."""

    head_timeout: float | None = None  # seconds for a whole request head (408 if it started, else a quiet close)
    idle_timeout: float | None = None  # seconds a kept-alive connection may wait for its next request
    max_per_ip: int = 0                # open connections per client address (more get a 503)
    max_total: int = 0                 # open public connections in all (more get a 503)


class _RateLimited:
    """Logs one line per `interval` for a recurring condition, with the count of those not logged."""

    def __init__(self, event: str, interval: float = 10.0) -> None:
        self.event = event
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, **fields) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self.interval
        log.warning(self.event, **fields, suppressed=self._suppressed, per_s=self.interval)
        self._suppressed = 0


class _Acceptor(StreamServer):
    """A StreamServer whose accept() failing for want of fds pauses accepting and logs one rate-limited line."""

    def __init__(self, listener, handle) -> None:
        super().__init__(listener, handle)
        self._pause = _ACCEPT_PAUSE_MIN
        self._pause_timer: Any = None  # a gevent loop timer while accepting is paused
        self._log_failure = _RateLimited("accept_failed")

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            self._log_failure(error=exc.strerror or str(exc), pause_s=self._pause,
                              hint="raise the fd limit (ulimit -n) or lower --max-connections")
            self._pause_accepting()
            return None
        self._pause = _ACCEPT_PAUSE_MIN
        return accepted

    def _pause_accepting(self) -> None:
        self.stop_accepting()
        if self._pause_timer is not None:
            self._pause_timer.close()
        timer = self.loop.timer(self._pause)
        timer.start(self._resume_accepting)
        self._pause_timer = timer
        self._pause = min(_ACCEPT_PAUSE_MAX, self._pause * 2)

    def _resume_accepting(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()

    def stop(self, timeout=None) -> None:
        if self._pause_timer is not None:
            self._pause_timer.close()
            self._pause_timer = None
        super().stop(timeout)


class HTTPFront:
    """Serves public HTTP for a Server; `serve(listener)` returns the running StreamServer."""

    def __init__(self, server: Server, *, scheme: str = "http", limits: FrontLimits | None = None,
                 handshake: Callable[[Any], Any] | None = None) -> None:
        self.server = server
        self.scheme = scheme
        # Turns an accepted socket into the stream to serve (public HTTPS: `tun2g.server.https.handshake`);
        # None: the step served it (TLS passthrough); raising drops the connection quietly.
        # Runs after the caps, so unfinished handshakes count too.
        self.handshake = handshake
        self.limits = limits or FrontLimits()
        self.connections = 0  # open public connections
        self.requests_in_flight = 0  # public requests being served (a draining server waits for them)
        self._per_ip: defaultdict[str, int] = defaultdict(int)
        self._log_refusal = _RateLimited("connection_refused")

    def serve(self, listener) -> StreamServer:
        stream_server = _Acceptor(listener, self.handle)
        stream_server.start()
        return stream_server

    def handle(self, sock, address) -> None:
        """Serve requests on one public connection until it closes."""
        peer_ip = address[0] if isinstance(address, tuple) else ""
        limits = self.limits
        over = self._over_cap(peer_ip)
        if over is not None:
            self._refuse(sock, peer_ip, over)
            return
        self.connections += 1
        self._per_ip[peer_ip] += 1
        try:
            tune(sock)
            if self.handshake is not None:
                try:
                    stream = self.handshake(sock)
                except Exception as exc:  # the handshake's own error type: a quiet close, one debug line
                    log.debug("handshake_failed", remote=peer_ip, error=str(exc))
                    return
                if stream is None:  # the step served the connection itself (TLS passthrough)
                    return
                sock = stream
            serve_requests(sock, lambda head, reader: self.handle_request(head, reader, sock, peer_ip), _reject,
                           head_timeout=limits.head_timeout, idle_timeout=limits.idle_timeout)
        finally:
            self.connections -= 1
            left = self._per_ip[peer_ip] - 1
            if left:
                self._per_ip[peer_ip] = left
            else:
                del self._per_ip[peer_ip]
            sock.close()

    def connections_from(self, peer_ip: str) -> int:
        return self._per_ip.get(peer_ip, 0)

    def _over_cap(self, peer_ip: str) -> str | None:
        limits = self.limits
        if limits.max_total and self.connections >= limits.max_total:
            return f"{self.connections} connections open, the most this server takes"
        if limits.max_per_ip and self._per_ip.get(peer_ip, 0) >= limits.max_per_ip:
            return f"{limits.max_per_ip} connections open from your address, the most allowed"
        return None

    def _refuse(self, sock, peer_ip: str, reason: str) -> None:
        """A fast 503 before reading anything, then close (after taking what the peer already sent)."""
        self._log_refusal(remote=peer_ip, reason=reason)
        try:
            sock.settimeout(_REFUSAL_WRITE_TIMEOUT)
            sock.sendall(pages.server_busy(reason).encode())
            sock.settimeout(0)
            try:
                sock.recv(65536)  # unread request bytes would turn our close into a reset that eats the 503
            except OSError:
                pass
        except OSError:
            pass
        finally:
            sock.close()

    def handle_request(self, head: RequestHead, reader: MessageReader, sock: ByteStream,
                       peer_ip: str) -> bool | Later:
        """Serve one request; True when the public connection may carry another (a `Later`: once it ends)."""
        if upgrade.is_tunnel_request(head):  # a tunnel client on the public port (--conn-type upgrade)
            tune(sock)
            sock.sendall(upgrade.SWITCHING_PROTOCOLS)
            # Behind a trusted balancer the client's own address (for the login limit and the log) is in its
            # X-Forwarded-For; the peer's would put every client in one bucket.
            self.server.serve_tunnel(upgrade.UpgradedStream(sock, reader.take_buffered()),
                                     proto="upgrade+tls" if self.scheme == "https" else "upgrade",
                                     remote=self.server.pipeline.client_address(head, peer_ip))
            return False
        tcp = self.server.tcp
        if tcp is not None and head.target == HOP_PATH and is_tcp_hop(head.method, head.target, head.get("Upgrade")):
            tcp.serve_hop(head, sock, reader.take_buffered(), self.server.router.accept_hop)  # another node's
            return False
        if pages.is_health_request(head.method, head.target):
            return self._health(head, reader, sock)
        if self.server.draining and not reader.upgrade:
            reader.keep_alive = False  # this answer says Connection: close: the client's next request goes elsewhere
        self.requests_in_flight += 1
        try:
            kept = self.server.pipeline.serve(head, reader, sock, peer_ip=peer_ip, scheme=self.scheme, later=True)
        except BaseException:
            self.requests_in_flight -= 1
            raise
        if kept is True or kept is False or kept.done:
            self.requests_in_flight -= 1
        else:  # its response is relayed from callbacks; serve_requests holds it
            kept.ended = self._request_ended
        return kept

    def _request_ended(self) -> None:
        self.requests_in_flight -= 1

    def _health(self, head: RequestHead, reader: MessageReader, sock: ByteStream) -> bool:
        """The node's own health answer (for balancers and the other nodes), whatever the Host."""
        page = self.server.health()
        keep = head.keep_alive and reader.body_complete
        data = page.encode(version=head.version, close=not keep)
        sock.sendall(pages.head_only(data) if head.method == "HEAD" else data)
        return keep


def _reject(error: HTTPError) -> bytes:
    if error.status == 408:
        return pages.request_timeout(new_request_id()).encode()
    return pages.malformed_request(error.status, error.message, new_request_id()).encode()
