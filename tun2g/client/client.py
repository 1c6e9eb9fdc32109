"""Client: holds a tunnel to a tun2 server and reverse-proxies its streams to a local backend."""

from __future__ import annotations

import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple
from urllib.parse import urlsplit

import gevent
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from gevent.pool import Group

from tun2g import pages, smux
from tun2g.client import connect
from tun2g.control import HEALTH_HOST, HEALTH_PATH, MAX_REPLY_SIZE, TUN2G_LEVEL, Auth, AuthFormatError, decode_reply
from tun2g.errors import ConfigurationError, Tun2Error
from tun2g.http import BackendPool, HTTPError, MessageReader, RequestHead, UpstreamError, serve_requests
from tun2g.log import get_logger
from tun2g.tcp.wire import is_preamble_start

if TYPE_CHECKING:
    from tun2g.client.inspector import Inspector
    from tun2g.client.tcp_forward import TCPForwarder
    from tun2g.client.telemetry import ClientMetrics
    from tun2g.transport.kcp_conn import KCPOptions

log = get_logger(__name__)

CONN_TYPES = ("tcp", "kcp", "upgrade")
# A Go tun2 server never answers the Auth; after this long without a reply on a
# live session we take the silence as acceptance.
REPLY_GRACE = 3.0
ACCEPT_CONTROL_TIMEOUT = 15.0
# Greenlets that served a stream wait for the next one, up to this many: a request then
# costs a wake-up instead of a spawn (and Python's 16 KiB frame chunk, mmap'ed each time).
MAX_IDLE_WORKERS = 64


class Served(NamedTuple):
    """One exchange the client proxied, for a status line (``status`` 0: no response came)."""

    method: str
    path: str
    status: int
    seconds: float
    request_bytes: int
    response_bytes: int


class AuthRejected(Tun2Error):
    """The server refused the token or domain; retrying would not help."""


class ConnectionLost(Tun2Error):
    """The tunnel could not be set up or broke; the client may retry."""


@dataclass
class ClientConfig:
    """What a Client dials and where it sends the requests it receives."""

    server_addr: str
    token: str
    domain: str
    backend_url: str
    conn_type: str = "tcp"
    plain: bool = False
    ca_file: str | None = None
    insecure: bool = False
    tls_context: ssl.SSLContext | None = None
    backend_ca_file: str | None = None
    backend_insecure: bool = False
    # version=None: negotiated (docs/protocol.md#version-negotiation): v2 with a tun2g
    # server, v1 with a Go one. A fixed version must match the server's.
    smux_config: smux.Config = field(default_factory=lambda: smux.Config(version=None))
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    # A Go tun2 server pings every 5 s. If it sent neither a reply nor any stream
    # within this long, it most likely lost our Auth to its smux race
    # (docs/protocol.md#differences) and will never serve us: reconnect instead of waiting forever.
    unconfirmed_timeout: float = 15.0
    kcp_options: KCPOptions | None = None
    # Local TCP services behind public ports and TLS names (docs/tcp.md); needs the negotiated smux version.
    tcp: TCPForwarder | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.conn_type not in CONN_TYPES:
            raise ConfigurationError(f"conn_type must be one of {', '.join(CONN_TYPES)}, not {self.conn_type!r}")
        for name in ("server_addr", "token", "domain", "backend_url"):
            if not getattr(self, name):
                raise ConfigurationError(f"ClientConfig.{name} is required")
        if urlsplit(self.backend_url).scheme not in ("http", "https"):
            raise ConfigurationError(f"backend URL must start with http:// or https://, got {self.backend_url!r}")
        self.smux_config.validate()
        if self.tcp and self.smux_config.version is not None:
            raise ConfigurationError("TCP services need the tun2g extension: leave the smux version negotiated")


class Client:
    """Connects to a server and proxies every stream it opens to the backend (Go tun2's Client)."""

    def __init__(self, config: ClientConfig, on_status=None, *, on_request: Callable[[Served], None] | None = None,
                 inspector: Inspector | None = None, metrics: ClientMetrics | None = None):
        """``on_request`` hears of every proxied exchange; ``inspector`` captures them; ``metrics`` counts."""
        if not isinstance(config, ClientConfig):
            raise ConfigurationError("Client needs a ClientConfig, got %r" % (config,))
        self.config = config
        self.pool = BackendPool(config.backend_url, tls_verify=not config.backend_insecure,
                                ca_file=config.backend_ca_file)
        self.state = "idle"
        self.backend_id = None
        self.requests_served = 0
        self.health_checks = 0
        self._on_status = on_status or (lambda client: None)
        self._closed = Event()
        self._session: smux.Session | None = None
        self._handlers = Group()
        self._idle_workers: list[Waiter] = []
        self.public_urls: list[str] = []
        self.connections = 0
        self._on_request = on_request
        self.inspector = inspector
        if inspector is not None:
            inspector.use_backend(self.pool)
        self.metrics = metrics
        self._observed = on_request is not None or inspector is not None or metrics is not None

    def run(self) -> None:
        """Connect and serve, reconnecting with exponential backoff and jitter.

        Returns after `close()`; raises AuthRejected when the server refuses us.
        """
        delay = self.config.backoff_initial
        while not self._closed.is_set():
            started = time.monotonic()
            try:
                self.connect()
            except AuthRejected:
                self._set_state("rejected")
                raise
            except (ConnectionLost, OSError, smux.SessionClosedError, socket.timeout) as exc:
                log.warning("disconnected", server=self.config.server_addr, error=str(exc) or type(exc).__name__)
            if self._closed.is_set() or not self.config.reconnect:
                return
            if time.monotonic() - started > 60:
                delay = self.config.backoff_initial  # it was up for a while: start the backoff afresh
            wait = random.uniform(0.5, 1.0) * delay
            self._set_state("waiting", retry_in=round(wait, 2))
            if self._closed.wait(wait):
                return
            delay = min(self.config.backoff_max, delay * 2)

    def connect(self) -> None:
        """Dial once, authenticate and serve until the session ends (Go's Connect)."""
        self._set_state("connecting")
        transport = connect.dial(self.config)
        self.connections += 1
        if self.metrics is not None and self.connections > 1:
            self.metrics.reconnects.inc()
        session = smux.Session(transport, client=True, config=self.config.smux_config)
        self._session = session
        try:
            control = session.accept_stream(timeout=ACCEPT_CONTROL_TIMEOUT)
            # A negotiating client says it is tun2g (a Go server ignores the field) and
            # follows the server's switch to smux v2 (the session does that on its own).
            level = TUN2G_LEVEL if self.config.smux_config.version is None else None
            tcp = self.config.tcp.announcement() if self.config.tcp else None
            control.sendall(Auth(self.config.token, self.config.domain, tun2g=level,
                                 **({"tcp": tcp} if tcp else {})).encode())
            first_stream = Event()
            serving = gevent.spawn(self._accept_loop, session, first_stream, _peer_ip(transport))
            try:
                confirmed = self._await_reply(control, session)
                if not confirmed and not first_stream.wait(self.config.unconfirmed_timeout):
                    raise ConnectionLost(f"the server neither confirmed our Auth nor sent a request in "
                                         f"{self.config.unconfirmed_timeout:g} s (a Go tun2 server loses "
                                         f"an Auth now and then); reconnecting")
                session.wait_closed()
            finally:
                serving.kill()
            raise ConnectionLost(f"session ended: {session.close_reason or 'closed'}")
        finally:
            session.close()
            self._session = None

    def _await_reply(self, control, session) -> bool:
        """Read tun2g's auth reply; True when confirmed, False when a live session stayed silent.

        Silence is what a Go server that accepted us sends.
        """
        control.settimeout(REPLY_GRACE)
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < MAX_REPLY_SIZE:
                data = control.recv(MAX_REPLY_SIZE)
                if not data:
                    break
                line += data
        except socket.timeout:
            if not session.is_closed:
                self.backend_id = None
                self.public_urls = [f"http://{self.config.domain}"]
                self._set_state("connected", confirmed=False)
                return False
        except (OSError, smux.SessionClosedError):
            pass
        if not line:
            raise ConnectionLost("the server closed the tunnel right after our Auth (a Go tun2 server does this "
                                 "when it rejects the token or the domain)")
        try:
            reply = decode_reply(line.strip())
        except AuthFormatError as exc:
            raise ConnectionLost(str(exc)) from None
        if not reply["ok"]:
            reason = reply.get("error", "no reason given")
            if reply.get("retry"):
                raise ConnectionLost(f"server could not check our Auth: {reason}")
            raise AuthRejected(f"server rejected us: {reason}")
        self.backend_id = reply.get("backend")
        self.public_urls = _public_urls(reply, self.config.domain)
        if self.config.tcp:
            host = self.config.server_addr.rsplit(":", 1)[0]
            self.public_urls += [f"tcp://{host}:{port}" for port in self.config.tcp.granted(reply.get("tcp"))]
            self.public_urls += [f"tls://{name}" for name in self.config.tcp.names]
        self._set_state("connected", confirmed=True, smux=session.version)
        return True

    def _accept_loop(self, session, first_stream: Event, peer_ip: str) -> None:
        while True:
            try:
                stream = session.accept_stream()
            except (smux.SessionClosedError, OSError):
                first_stream.set()  # wakes connect(), which then sees the session is gone
                return
            first_stream.set()
            # A tun2 server's FIN ends the exchange (its reader is gone, e.g. a stream it
            # reset for a too-slow public reader): stop relaying the response into the void.
            stream.peer_fin_ends_writes = True
            if self._idle_workers:
                get_hub().loop.run_callback(self._idle_workers.pop().switch, (stream, peer_ip))
            else:
                self._handlers.spawn(self._stream_worker, stream, peer_ip)

    def _stream_worker(self, stream, peer_ip: str) -> None:
        """Serve ``stream``, then wait (parked, up to MAX_IDLE_WORKERS of us) for the next one."""
        while True:
            self._serve_stream(stream, peer_ip)
            if self._closed.is_set() or len(self._idle_workers) >= MAX_IDLE_WORKERS:
                return
            waiter = Waiter()
            self._idle_workers.append(waiter)
            stream, peer_ip = waiter.get()

    def _serve_stream(self, stream, peer_ip: str) -> None:
        """Serve the HTTP exchanges the server sends on one stream (``peer_ip``: the server's address)."""
        log.debug("stream_opened", stream=getattr(stream, "id", None))
        if self.config.tcp:  # a TCP stream starts with the tun2g preamble, an HTTP one with its request line
            try:
                first = stream.peek_first_byte()
            except (OSError, smux.SessionClosedError, smux.StreamResetError):
                stream.close()
                return
            if is_preamble_start(first):
                self.config.tcp.serve(stream)
                return
        try:
            serve_requests(stream, lambda head, reader: self._proxy(head, reader, stream, peer_ip), _reject)
        finally:
            stream.close()
            log.debug("stream_closed", stream=getattr(stream, "id", None))

    def _proxy(self, head: RequestHead, reader: MessageReader, stream: smux.Stream, peer_ip: str) -> bool:
        if head.target == HEALTH_PATH and (head.host or "") == HEALTH_HOST and head.method == "GET":
            # The server's health ping: answered here, so a slow backend /health
            # cannot make the server drop a healthy tunnel (the original did).
            self.health_checks += 1
            stream.sendall(pages.health_ok().encode(close=not head.keep_alive))
            return head.keep_alive
        if self._observed:
            return self._proxy_observed(head, reader, stream, peer_ip)
        if not self._join_backend_path(head, stream):
            return False
        head.append_to("X-Forwarded-For", peer_ip)
        try:
            result = self.pool.forward_exchange(head, reader, stream)
        except UpstreamError as exc:
            log.warning("backend_failed", backend=self.config.backend_url, error=str(exc))
            stream.sendall(pages.backend_failed(str(exc)).encode())
            return False
        except OSError as exc:
            log.warning("backend_unreachable", backend=self.config.backend_url, error=str(exc))
            stream.sendall(pages.backend_unreachable(exc).encode())  # the URL stays in the log
            return False
        self.requests_served += 1
        return result.keep_alive

    def _join_backend_path(self, head: RequestHead, stream: smux.Stream) -> bool:
        """Put the backend URL's path before the target; a target climbing out of it is refused (400)."""
        try:
            head.target = self.pool.join_path(head.target)
        except HTTPError as exc:
            log.warning("request_refused", status=exc.status, reason=exc.message, path=head.target[:200])
            stream.sendall(pages.malformed_request(exc.status, exc.message).encode())
            return False
        return True

    def _proxy_observed(self, head: RequestHead, reader: MessageReader, stream: smux.Stream, peer_ip: str) -> bool:
        """`_proxy` with a status line, metrics and the inspector's tee (only paid for when one is on)."""
        started = time.monotonic()
        method, path = head.method, head.target
        log.debug("request", method=method, path=path, stream=getattr(stream, "id", None))
        capture = None
        downstream: object = stream
        if self.inspector is not None:
            capture, reader, downstream = self.inspector.begin(head, reader, stream)
        if not self._join_backend_path(head, stream):
            return False
        head.append_to("X-Forwarded-For", peer_ip)
        status, keep_alive, error = 0, False, None
        request_bytes = response_bytes = 0
        try:
            result = self.pool.forward_exchange(head, reader, downstream,
                                                response_filter=None if capture is None else capture.response_filter)
            status, keep_alive = result.status, result.keep_alive
            request_bytes, response_bytes = result.request_bytes, result.response_bytes
            self.requests_served += 1
        except UpstreamError as exc:
            log.warning("backend_failed", backend=self.config.backend_url, error=str(exc))
            error, status = str(exc), 502
            self._count_backend_error("bad_response")
            stream.sendall(pages.backend_failed(str(exc)).encode())
        except OSError as exc:
            log.warning("backend_unreachable", backend=self.config.backend_url, error=str(exc))
            error, status = str(exc), 502
            self._count_backend_error("unreachable")
            stream.sendall(pages.backend_unreachable(exc).encode())  # the URL stays in the log
        except BaseException as exc:
            error = str(exc) or type(exc).__name__  # the server's side went away mid-exchange
            raise
        finally:
            seconds = time.monotonic() - started
            log.debug("response", method=method, path=path, status=status, ms=round(seconds * 1000, 1),
                      bytes_in=request_bytes, bytes_out=response_bytes, error=error)
            if capture is not None and self.inspector is not None:
                self.inspector.finish(capture, status, error)
            if self.metrics is not None:
                self.metrics.request_served(status, seconds, request_bytes, response_bytes)
            if self._on_request is not None:
                self._on_request(Served(method, path, status, seconds, request_bytes, response_bytes))
        return keep_alive

    def _count_backend_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.backend_errors.labels(kind).inc()

    def _set_state(self, state: str, **fields) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.connected.set(1 if state == "connected" else 0)
        log.info(state, server=self.config.server_addr, domain=self.config.domain, **fields)
        self._on_status(self)

    def close(self) -> None:
        """Stop serving and do not reconnect."""
        self._closed.set()
        if self._session is not None:
            self._session.close()
        self._idle_workers.clear()
        self._handlers.kill(block=False)
        self.pool.close()


def _public_urls(reply: dict, domain: str) -> list[str]:
    """The public URL(s) the server says it serves us at ("urls" or "url"), else http://DOMAIN."""
    urls = reply.get("urls")
    if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        return list(urls)
    if isinstance(reply.get("url"), str) and reply["url"]:
        return [reply["url"]]
    served = reply.get("domain") if isinstance(reply.get("domain"), str) and reply.get("domain") else domain
    return [f"http://{served}"]


def _reject(error: HTTPError) -> bytes:
    return pages.malformed_request(error.status, error.message).encode()


def _peer_ip(transport) -> str:
    try:
        return transport.getpeername()[0]
    except (OSError, IndexError, TypeError, AttributeError):
        return "127.0.0.1"
