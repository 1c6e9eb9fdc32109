"""`tun2g server --workers N`: a supervisor and N worker processes sharing the public and tunnel ports.

The supervisor binds the listeners once and starts each worker as a `tun2g server`
process of its own (the same command line; ``TUN2G_WORKER`` tells it which worker it
is and which inherited descriptors are its listeners and its control socket). The
kernel spreads accepted connections over the workers; a tunnel lives in the worker
that accepted it.

Workers share which route keys they hold through the supervisor (no Redis): each
sends what it gained and lost over its control socket, and the supervisor passes
that on to the others. A public connection whose first request is for a route
another worker holds, and this one does not, is handed to that worker: its file
descriptor over a Unix socket (SCM_RIGHTS), the request still unread in the kernel
(the head is read with MSG_PEEK). A later request on a kept-alive connection is
handed over with the head bytes already read. The connection is never proxied.

Each worker's handover socket lives in a directory only this user can enter
(0700), and takes connections only from the processes the supervisor says are its
workers (SO_PEERCRED: same uid, a known pid). A message is one datagram
(SOCK_SEQPACKET) of at most HANDOVER_MAX bytes with exactly one TCP socket; anything
else closes that connection and every descriptor it carried.

A worker that exits without being told is started again (backoff, 0.25 s doubling
to 30 s, reset once it ran a minute); its tunnel clients reconnect to the others
meanwhile. SIGTERM on the supervisor drains every worker (each gets the grace
period) and exits 0; SIGINT stops them and exits 130.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Literal

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from tun2g import pages
from tun2g.cluster.hop import HOP_HEADER
from tun2g.errors import ConfigurationError
from tun2g.http import Later, RequestHead
from tun2g.http.encode import encode_request_head
from tun2g.http.heads import HTTPError
from tun2g.http.parser import DEFAULT_MAX_HEAD_SIZE, HeadEvent, MessageParser
from tun2g.log import configure, get_logger
from tun2g.requestid import new_request_id
from tun2g.server.front import HTTPFront
from tun2g.server.https import HandshakeFailed, waiting_server_name
from tun2g.server.process import ServerSetup, listen
from tun2g.server.router import Router, routing_key
from tun2g.server.tunnels import Tunnels
from tun2g.tcp.wire import HOP_PATH
from tun2g.transport import upgrade
from tun2g.transport.upgrade import UpgradedStream

log = get_logger(__name__)

WORKER_ENV = "TUN2G_WORKER"        # set by the supervisor in each worker's environment (JSON)
HANDOVER_MAX = 128 * 1024          # bytes in one handover message (a head read already, and what followed it)
HANDOVER_TIMEOUT = 2.0             # s to hand a connection over, else the accepting worker answers it
CONTROL_LINE_MAX = 8 * 1024 * 1024 # bytes in one control message (a whole worker's route keys at most)
PEEK_POLL_MIN, PEEK_POLL_MAX = 0.005, 0.2  # s between peeks at a request head that arrived in pieces
BACKOFF_MIN, BACKOFF_MAX = 0.25, 30.0      # s before restarting a worker that exited; doubling
STEADY_RUN = 60.0                  # s a worker must have run for its restart backoff to start again
STATS_INTERVAL = 5.0               # s between a worker's handover counts in the log (when they changed)
STOP_MARGIN = 10.0                 # s past the grace period before a worker that did not exit is killed
_PEERCRED = struct.Struct("3i")    # struct ucred: pid, uid, gid


def worker_count(requested: int) -> int:
    """--workers N: N, or the number of cores for 0."""
    return requested if requested > 0 else (os.cpu_count() or 1)


def check_combination(setup: ServerSetup) -> None:
    """ConfigurationError for what several workers cannot share (one line, naming the flag)."""
    refused = [(setup.kcp_addr, "--kcp (UDP sessions cannot be spread over processes)"),
               (setup.tls_passthrough, "--tls-passthrough (routed by SNI inside one process)"),
               (setup.tcp_ports, "--tcp-ports (each worker would allocate ports on its own)"),
               (setup.https_only(), "--http none (the supervisor shares the plain HTTP port with its workers)")]
    for value, flag in refused:
        if value:
            raise ConfigurationError(f"--workers above 1 cannot be combined with {flag}: "
                                     f"run --workers 1, or leave that flag out")


# -- wire: control lines and peer credentials ------------------------------------------


def _encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Newline-delimited JSON objects from a stream socket, each at most `limit` bytes."""

    def __init__(self, sock, limit: int = CONTROL_LINE_MAX) -> None:
        self.sock = sock
        self.limit = limit
        self._buffer = b""

    def read(self) -> dict | None:
        """The next message; None at EOF. Raises ValueError for one too long or not a JSON object."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > self.limit:
                raise ValueError(f"a control message longer than {self.limit} bytes")
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        if len(line) > self.limit:
            raise ValueError(f"a control message longer than {self.limit} bytes")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("a control message that is not a JSON object")
        return message


def peer_credentials(sock) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def _string_list(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


# -- the worker's side -------------------------------------------------------------------


class WatchedTunnels(Tunnels):
    """Tunnels that call `on_change()` when a route key is gained or lost."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        super().__init__()
        self.on_change = on_change

    def add(self, tunnel) -> None:
        super().add(tunnel)
        self.on_change()

    def remove(self, tunnel) -> None:
        super().remove(tunnel)
        self.on_change()

    def route_keys(self) -> set[str]:
        """The route keys some tunnel here serves."""
        return {route for tunnel in self for route in tunnel.routes}


class WorkerLink:
    """One worker's ties to its supervisor and its sibling workers."""

    def __init__(self, index: int, control, directory: str, listeners: dict[str, Any], grace: float) -> None:
        self.index = index
        self.control = control
        self.directory = directory
        self.listeners = listeners
        self.grace = grace
        self.path = os.path.join(directory, f"w{index}.sock")
        self.tunnels = WatchedTunnels(self._changed)
        self.peers: dict[int, tuple[int, str]] = {}      # worker index -> (pid, handover socket path)
        self.held: dict[int, set[str]] = {}               # worker index -> the route keys it holds
        self.holders: dict[str, set[int]] = {}            # route key -> the other workers holding it
        self.nodes: dict[str, int] = {}                   # another worker's node id (hops name it) -> its index
        self.handed_over = 0   # connections this worker gave to another
        self.taken_over = 0    # connections another worker gave to this one
        self.refused = 0       # handover connections refused (not a sibling) or dropped (a bad message)
        self._connections: dict[int, tuple[socket.socket, Semaphore]] = {}
        self._change = Event()
        self._control_lock = Semaphore()
        self.front: "WorkerFront | None" = None
        self.https_front: HTTPFront | None = None
        self._taken_tls: set[int] = set()  # fds of TLS connections a sibling handed over, not peeked again
        self.running: Any = None
        self._tasks: list = []

    @classmethod
    def from_env(cls, text: str) -> "WorkerLink":
        """The link a worker's TUN2G_WORKER describes (inherited descriptors, the handover directory)."""
        try:
            spec = json.loads(text)
            control = socket.socket(fileno=int(spec["control"]))
            listeners = {flag: socket.socket(fileno=int(fd)) for flag, fd in spec["listeners"].items()}
            return cls(int(spec["index"]), control, spec["dir"], listeners, float(spec["grace"]))
        except (ValueError, TypeError, KeyError, AttributeError, OSError):
            raise ConfigurationError(f"{WORKER_ENV} is set, but not by a tun2g supervisor: unset it "
                                     f"(use --workers N to run workers)") from None

    def adjust(self, setup: ServerSetup) -> None:
        """This worker's own settings: a node id of its own, the admin API in worker 0 only."""
        setup.worker = self
        if setup.node_id:
            setup.node_id = f"{setup.node_id}-w{self.index}"
        if "--admin" not in self.listeners:
            setup.admin_addr = None

    def make_front(self, server, limits) -> "WorkerFront":
        """This worker's public HTTP front (hands connections to siblings)."""
        front = WorkerFront(server, limits=limits)
        front.link = self
        return front

    def tls_step(self, step: Callable, router: Router, timeout: float) -> Callable:
        """The public HTTPS front's handshake `step`, first handing a connection whose SNI names a route a
        sibling holds (and this worker does not) to that sibling, its ClientHello unread."""

        def run(sock):
            if not self.holders or sock.fileno() in self._taken_tls:
                self._taken_tls.discard(sock.fileno())
                return step(sock)
            with gevent.Timeout(timeout, HandshakeFailed(f"no TLS handshake within {timeout:g} s")):
                name = waiting_server_name(sock)
            route = None if name is None else routing_key(name)
            holders = None if route is None or router.tunnels.pick(route) is not None else self.holders.get(route)
            if holders and self.hand_over(random.choice(tuple(holders)), sock, kind=b"S"):
                return None  # served by the sibling
            return step(sock)

        return run

    def listener(self, flag: str):
        """The supervisor's listener for `flag`, or None."""
        return self.listeners.pop(flag, None)

    def attach(self, running) -> None:
        """Start the handover socket and the control stream for a started server."""
        self.running = running
        self.front = running.front if isinstance(running.front, WorkerFront) else None
        self.https_front = running.https_front
        try:
            os.unlink(self.path)  # left by this worker's predecessor
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._tasks += [gevent.spawn(self._accept_handovers, listener), gevent.spawn(self._read_control),
                        gevent.spawn(self._send_changes), gevent.spawn(self._log_stats)]
        self._send_control({"node": running.server.config.node_id})
        self._changed()
        log.info("worker_ready", worker=self.index, pid=os.getpid())

    # -- route keys, both ways ---------------------------------------------------------

    def _changed(self) -> None:
        self._change.set()

    def _send_changes(self) -> None:
        sent: set[str] = set()
        while True:
            self._change.wait()
            self._change.clear()
            now = self.tunnels.route_keys()
            added, dropped = sorted(now - sent), sorted(sent - now)
            if added or dropped:
                self._send_control({"add": added, "drop": dropped})
                sent = now

    def _send_control(self, message: dict) -> None:
        with self._control_lock:
            try:
                self.control.sendall(_encode(message))
            except OSError:
                pass  # the supervisor is gone: _read_control drains this worker

    def _read_control(self) -> None:
        reader = LineReader(self.control)
        try:
            while (message := reader.read()) is not None:
                self._apply(message)
        except (OSError, ValueError) as exc:
            log.warning("worker_control_failed", error=str(exc))
        log.warning("supervisor_gone", worker=self.index, action="draining")
        if self.running is not None:
            self.running.drain(self.grace)

    def _apply(self, message: dict) -> None:
        if "peers" in message:
            peers = {}
            nodes = {}
            for key, value in message["peers"].items():
                if isinstance(value, list) and len(value) == 3:
                    peers[int(key)] = (int(value[0]), str(value[1]))
                    if value[2] and int(key) != self.index:
                        nodes[str(value[2])] = int(key)
            self.peers, self.nodes = peers, nodes
            for known in list(self._connections):
                self._forget(known)  # a restarted sibling listens anew
            return
        index = message.get("w")
        if not isinstance(index, int) or index == self.index:
            return
        held = self.held.setdefault(index, set())
        if message.get("gone"):
            dropped, held = set(held), set()
            self.held.pop(index, None)
            self._forget(index)
        else:
            dropped = set(_string_list(message.get("drop")))
            added = set(_string_list(message.get("add")))
            held -= dropped
            held |= added
            for route in added:
                self.holders.setdefault(route, set()).add(index)
        for route in dropped:
            holders = self.holders.get(route)
            if holders is not None:
                holders.discard(index)
                if not holders:
                    del self.holders[route]

    def holder(self, router: Router, head: RequestHead) -> int | None:
        """The sibling to hand `head`'s connection to: it holds the route and this worker does not."""
        if not self.holders:
            return None
        if self.nodes and (hop := head.get(HOP_HEADER)) is not None:  # with Redis: the node it is signed for
            to = next((field[3:] for field in hop.split(";") if field.startswith("to=")), "")
            return self.nodes.get(to)
        route = router.route(head, "", None).route
        if route is None or router.tunnels.pick(route) is not None:
            return None
        holders = self.holders.get(route)
        if not holders:
            return None
        return random.choice(tuple(holders)) if len(holders) > 1 else next(iter(holders))

    # -- handing connections over -------------------------------------------------------

    def hand_over(self, index: int, sock, data: bytes = b"", kind: bytes = b"C") -> bool:
        """Give `sock` (and the bytes already read from it) to worker `index`; False if it could not.
        `kind`: b"C" plain HTTP, b"S" a TLS connection not yet handshaken (for the HTTPS front)."""
        if len(data) + 1 > HANDOVER_MAX or index not in self.peers:
            return False
        try:
            conn, lock = self._connection(index)
            with lock:
                conn.settimeout(HANDOVER_TIMEOUT)
                socket.send_fds(conn, [kind + data], [sock.fileno()])
        except (OSError, ValueError) as exc:
            log.warning("handover_failed", to=index, error=str(exc))
            self._forget(index)
            return False
        self.handed_over += 1
        log.debug("handed_over", to=index, bytes=len(data))
        return True

    def _connection(self, index: int) -> tuple[socket.socket, Semaphore]:
        known = self._connections.get(index)
        if known is not None:
            return known
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(HANDOVER_TIMEOUT)
        try:
            conn.connect(self.peers[index][1])
        except OSError:
            conn.close()
            raise
        known = self._connections[index] = (conn, Semaphore())
        return known

    def _forget(self, index: int) -> None:
        known = self._connections.pop(index, None)
        if known is not None:
            known[0].close()

    def _accept_handovers(self, listener) -> None:
        while True:
            conn, _address = listener.accept()
            pid, uid = peer_credentials(conn)
            if uid != os.getuid() or pid not in {peer_pid for peer_pid, _ in self.peers.values()} \
                    or pid == os.getpid():
                self.refused += 1
                log.warning("handover_refused", pid=pid, uid=uid, reason="not a worker of this supervisor")
                conn.close()
                continue
            gevent.spawn(self.take_handovers, conn)

    def take_handovers(self, conn) -> None:
        """Serve each connection a sibling hands over on `conn`; a malformed message ends `conn`."""
        try:
            while True:
                data, fds, flags, _ = socket.recv_fds(conn, HANDOVER_MAX, 1)
                if not data and not fds:
                    return  # the sibling closed
                taken = self._check(data, fds, flags)
                if taken is None:
                    self.refused += 1
                    return
                self.taken_over += 1
                log.debug("taken_over", worker=self.index, bytes=len(data) - 1)
                gevent.spawn(self._serve_taken, taken, data[1:], data[:1] == b"S")
        except OSError:
            return
        finally:
            conn.close()

    def _check(self, data: bytes, fds: list[int], flags: int) -> socket.socket | None:
        """The TCP socket a handover message carries, or None (and every fd closed) for anything else."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1 or data[:1] not in (b"C", b"S") \
                or (data[:1] == b"S" and (len(data) > 1 or self.https_front is None)):
            for fd in fds:
                os.close(fd)
            log.warning("handover_dropped", reason="not one connection within the message bound",
                        fds=len(fds), size=len(data))
            return None
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:  # not a socket at all
            os.close(fds[0])
            sock = None
        if sock is not None and sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            return sock
        if sock is not None:
            sock.close()
        log.warning("handover_dropped", reason="not a TCP connection")
        return None

    def _serve_taken(self, sock, data: bytes, tls: bool = False) -> None:
        front, https_front = self.front, self.https_front
        try:
            address = sock.getpeername()
        except OSError:
            address = None
        if address is None or (https_front if tls else front) is None:
            sock.close()
        elif tls and https_front is not None:
            self._taken_tls.add(sock.fileno())
            https_front.handle(sock, address)
        elif front is not None:
            front.serve_taken(UpgradedStream(sock, data) if data else sock, address)

    def stats(self) -> dict[str, int]:
        """This worker's handover counts since it started."""
        return {"handed_over": self.handed_over, "taken_over": self.taken_over, "refused": self.refused}

    def _log_stats(self) -> None:
        logged = self.stats()
        while True:
            gevent.sleep(STATS_INTERVAL)
            now = self.stats()
            if now != logged:
                log.info("handovers", worker=self.index, **now)
                logged = now


class WorkerFront(HTTPFront):
    """The public HTTP front of one worker: a request for a route a sibling holds goes to that sibling."""

    link: WorkerLink

    def handle(self, sock, address) -> None:
        """A connection accepted here: peek at its first head, hand it over or serve it."""
        link = self.link
        if not link.holders:
            super().handle(sock, address)
            return
        peer_ip = address[0] if isinstance(address, tuple) else ""
        if self._over_cap(peer_ip) is None:
            self._count(peer_ip, 1)  # a connection being peeked at counts against the caps too
            try:
                head = self._peek_head(sock)
            finally:
                self._count(peer_ip, -1)
            if head is False:
                sock.close()
                return
            if head is not None and _routable(head):
                index = link.holder(self.server.router, head)
                if index is not None and link.hand_over(index, sock):
                    sock.close()  # our copy: the sibling holds the connection now
                    return
        super().handle(sock, address)

    def serve_taken(self, sock, address) -> None:
        """A connection a sibling handed over: served here whatever its first request."""
        super().handle(sock, address)

    def handle_request(self, head: RequestHead, reader, sock, peer_ip: str) -> bool | Later:
        """A later request on a kept-alive connection, for a route a sibling holds, goes there with its head."""
        if reader.messages_read > 1 and self.link.holders and reader.idle and not isinstance(sock, UpgradedStream) \
                and _routable(head):
            index = self.link.holder(self.server.router, head)
            if index is not None:
                data = encode_request_head(head, connection=None if reader.keep_alive else "close")
                if self.link.hand_over(index, sock, data):
                    return False
        return super().handle_request(head, reader, sock, peer_ip)

    def _count(self, peer_ip: str, step: int) -> None:
        self.connections += step
        left = self._per_ip[peer_ip] + step
        if left:
            self._per_ip[peer_ip] = left
        else:
            del self._per_ip[peer_ip]

    def _peek_head(self, sock) -> RequestHead | None | Literal[False]:
        """The first request head, read with MSG_PEEK (the bytes stay in the kernel for whoever serves it).

        None: no head to route by (malformed, too large: the normal path answers it); False: the
        connection is done (the peer left, or the head did not come within the header timeout: 408)."""
        timeout = self.limits.head_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        parser = MessageParser(True, DEFAULT_MAX_HEAD_SIZE)
        seen, pause = 0, PEEK_POLL_MIN
        try:
            while True:
                sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
                try:
                    data = sock.recv(DEFAULT_MAX_HEAD_SIZE + 1, socket.MSG_PEEK)
                except socket.timeout:
                    if seen:
                        sock.settimeout(1.0)
                        sock.sendall(pages.request_timeout(new_request_id()).encode())
                    return False
                if not data:
                    return False
                if len(data) > seen:
                    try:
                        parser.receive_data(data[seen:])
                    except HTTPError:
                        return None
                    seen = len(data)
                    for event in parser.events:
                        if type(event) is HeadEvent and isinstance(event.head, RequestHead):
                            return event.head
                    if parser.finished or seen > DEFAULT_MAX_HEAD_SIZE:
                        return None
                    pause = PEEK_POLL_MIN
                else:  # the head came in pieces: MSG_PEEK returns at once while bytes wait unread
                    if deadline is not None and time.monotonic() + pause > deadline:
                        sock.settimeout(1.0)
                        sock.sendall(pages.request_timeout(new_request_id()).encode())
                        return False
                    gevent.sleep(pause)
                    pause = min(PEEK_POLL_MAX, pause * 2)
        except OSError:
            return False
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass


def _routable(head: RequestHead) -> bool:
    """Whether `head` goes to a tunnel (not the node's health answer, a tunnel login or another node's TCP hop)."""
    return not (pages.is_health_request(head.method, head.target) or upgrade.is_tunnel_request(head)
                or head.target == HOP_PATH)


# -- the supervisor ----------------------------------------------------------------------


class _Worker:
    """The supervisor's record of one worker slot."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.routes: set[str] = set()
        self.node = ""  # its node id, once it said
        self.served = False  # it started serving once (a worker that never did is not restarted)
        self.started = 0.0
        self.backoff = BACKOFF_MIN
        self.lock = Semaphore()


class Supervisor:
    """Starts, watches and restarts the workers; relays their route keys; drains them on SIGTERM."""

    def __init__(self, setup: ServerSetup, count: int, argv: list[str], grace: float,
                 env: dict[str, str] | None = None, reloads: bool = False) -> None:
        """`reloads`: the workers read a config file, and SIGHUP (passed on to them) reloads it."""
        self.setup = setup
        self.reloads = reloads
        self.count = count
        self.argv = argv
        self.grace = grace
        self.env = dict(os.environ if env is None else env)
        self.env.pop(WORKER_ENV, None)
        self.workers = [_Worker(index) for index in range(count)]
        self.listeners: dict[str, socket.socket] = {}
        self.directory = ""
        self.stopping: int | None = None  # the signal that stops the workers
        self.kill_at = float("inf")       # when a worker still running after that signal is killed
        self.failed = 0                   # the status of a worker that failed before it ever served
        self.done = Event()

    def bind(self) -> None:
        """The shared listeners (a port in use is a one-line SetupError) and the handover directory."""
        setup = self.setup
        self.listeners["--http"] = listen("--http", setup.http_addr)
        if setup.https_addr:
            self.listeners["--https"] = listen("--https", setup.https_addr)
        if setup.tunnel_addr and setup.tunnel_addr.lower() != "none":
            self.listeners["--tunnel"] = listen("--tunnel", setup.tunnel_addr)
        if setup.admin_addr:
            setup.check_admin_exposure()
            self.listeners["--admin"] = listen("--admin", setup.admin_addr)
        self.directory = tempfile.mkdtemp(prefix="tun2g-workers-")  # mode 0700: only this user enters
        setup.shared_certificate()  # made once here, not by every worker at once

    def run(self) -> int:
        """Run until every worker stopped after a signal; the exit status."""
        gevent.signal_handler(signal.SIGTERM, self.stop, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, self.stop, signal.SIGINT)
        gevent.signal_handler(signal.SIGHUP, self._reload)  # never the default (exit): pass it on, or ignore it
        address = self.listeners["--http"].getsockname()[:2]
        tunnel = self.listeners.get("--tunnel")
        log.info("supervisor", workers=self.count, pid=os.getpid(), dir=self.directory, http=f"{address[0]}:{address[1]}",
                 tunnel="-" if tunnel is None else "%s:%s" % tunnel.getsockname()[:2])
        watchers = [gevent.spawn(self._keep, worker) for worker in self.workers]
        self.done.wait()
        gevent.joinall(watchers, timeout=self.grace + 2 * STOP_MARGIN)
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.failed or (130 if self.stopping == signal.SIGINT else 0)

    def stop(self, signum: int) -> None:
        """SIGTERM: every worker drains (the grace period); SIGINT: every worker stops now."""
        if self.stopping is not None:
            return
        self.stopping = signum
        self.kill_at = time.monotonic() + (self.grace if signum == signal.SIGTERM else 0.0) + STOP_MARGIN
        if not self.failed:
            log.info("supervisor_stopping", signal=signal.Signals(signum).name, workers=self.count)
        for listener in self.listeners.values():
            listener.close()  # the workers' copies carry on until each one drains
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)
        self.done.set()

    def _reload(self) -> None:
        """SIGHUP: each worker reads its config file again (without --config, nothing to do)."""
        if not self.reloads:
            log.info("sighup_ignored", reason="started without --config: there is no file to reload")
            return
        for worker in self.workers:
            if worker.served and worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGHUP)

    def _keep(self, worker: _Worker) -> None:
        """Run one worker slot: start it, wait for it, restart it with backoff until stopping.

        A worker that fails before it ever served (a store that is down, a bad setting it found)
        stops them all: the supervisor exits with its status, after the worker's own one-line error."""
        while self.stopping is None:
            try:
                self._start(worker)
            except OSError as exc:  # no fork (out of memory or processes): try again later
                log.warning("worker_not_started", worker=worker.index, error=str(exc), restart_in_s=worker.backoff)
                gevent.sleep(worker.backoff)
                worker.backoff = min(BACKOFF_MAX, worker.backoff * 2)
                continue
            process = worker.process
            assert process is not None
            reader = gevent.spawn(self._relay, worker)
            status = self._wait(process)
            reader.join(1.0)  # what it said before exiting (its node id: it had started)
            reader.kill()
            self._gone(worker)
            if self.stopping is not None:
                return
            if not worker.served and status:
                self.failed = status
                self.stop(signal.SIGTERM)
                return
            ran = time.monotonic() - worker.started
            if ran >= STEADY_RUN:
                worker.backoff = BACKOFF_MIN
            log.warning("worker_exited", worker=worker.index, pid=process.pid, status=status,
                        restart_in_s=round(worker.backoff, 2))
            gevent.sleep(worker.backoff)
            worker.backoff = min(BACKOFF_MAX, worker.backoff * 2)

    def _wait(self, process: subprocess.Popen) -> int:
        while True:
            try:
                return process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if self.stopping is not None and time.monotonic() >= self.kill_at:
                    log.warning("worker_killed", pid=process.pid, reason="did not exit within the grace period")
                    process.kill()

    def _start(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners = {flag: sock for flag, sock in self.listeners.items() if flag != "--admin" or worker.index == 0}
        spec = {"index": worker.index, "control": theirs.fileno(), "dir": self.directory, "grace": self.grace,
                "listeners": {flag: sock.fileno() for flag, sock in listeners.items()}}
        env = self.env | {WORKER_ENV: json.dumps(spec)}
        worker.process = subprocess.Popen([sys.executable, "-m", "tun2g.cli", *self.argv], env=env,
                                          pass_fds=[theirs.fileno(), *(sock.fileno() for sock in listeners.values())])
        theirs.close()
        worker.control = ours
        worker.started = time.monotonic()
        self._broadcast({"peers": self._peers()})
        for other in self.workers:  # what the others hold already
            if other is not worker and other.routes:
                self._send(worker, {"w": other.index, "add": sorted(other.routes), "drop": []})

    def _peers(self) -> dict[str, list]:
        return {str(worker.index): [worker.process.pid, os.path.join(self.directory, f"w{worker.index}.sock"),
                                    worker.node]
                for worker in self.workers if worker.process is not None and worker.process.poll() is None}

    def _relay(self, worker: _Worker) -> None:
        """Pass on the route keys a worker gains and loses to the other workers."""
        assert worker.control is not None
        reader = LineReader(worker.control)
        try:
            while (message := reader.read()) is not None:
                if isinstance(message.get("node"), str):
                    worker.node, worker.served = message["node"], True
                    self._broadcast({"peers": self._peers()})
                    continue
                added, dropped = _string_list(message.get("add")), _string_list(message.get("drop"))
                worker.routes.difference_update(dropped)
                worker.routes.update(added)
                self._broadcast({"w": worker.index, "add": added, "drop": dropped}, but=worker)
        except OSError:
            pass  # the worker exited (its watcher says so)
        except ValueError as exc:
            log.warning("worker_control_failed", worker=worker.index, error=str(exc))

    def _gone(self, worker: _Worker) -> None:
        worker.routes, worker.node = set(), ""
        if worker.control is not None:
            worker.control.close()
            worker.control = None
        self._broadcast({"w": worker.index, "gone": True}, but=worker)
        self._broadcast({"peers": self._peers()}, but=worker)

    def _broadcast(self, message: dict, but: _Worker | None = None) -> None:
        for worker in self.workers:
            if worker is not but:
                self._send(worker, message)

    def _send(self, worker: _Worker, message: dict) -> None:
        control = worker.control
        if control is None:
            return
        with worker.lock:
            try:
                control.sendall(_encode(message))
            except OSError:
                pass  # that worker is exiting: its watcher sees it


def supervise(setup: ServerSetup, count: int, grace: float, argv: Iterable[str] | None = None,
              reloads: bool = False) -> int:
    """Run `tun2g server` as a supervisor of `count` workers; returns the exit status."""
    check_combination(setup)
    configure(setup.log_level)
    supervisor = Supervisor(setup, count, list(sys.argv[1:] if argv is None else argv), grace, reloads=reloads)
    supervisor.bind()
    return supervisor.run()


__all__ = ["HANDOVER_MAX", "LineReader", "Supervisor", "WORKER_ENV", "WatchedTunnels", "WorkerFront", "WorkerLink",
           "check_combination", "peer_credentials", "supervise", "worker_count"]
