"""Tunnel: one authenticated tunnel client (an smux session) as the server holds it."""

from __future__ import annotations

import socket
import time
import uuid
from collections import deque
from typing import Callable

from tun2g.backend import Backend
from tun2g.errors import CantOpenSessionStream, CantReadResponse, CantWriteRequest
from tun2g.http import HTTPError, MessageReader
from tun2g.phi import PhiAccrualDetector
from tun2g.control import PING_REQUEST, STREAM_IDLE_SECONDS, TUN2G_LEVEL, Auth, encode_ping
from tun2g.smux import Session, SessionClosedError, Stream
from tun2g.smux.timer import shared_timer
from tun2g.storage import hash_secret

# Request streams are kept alive between exchanges (docs/protocol.md#request-streams), as a keep-alive
# pool: at most this many idle per tunnel, each for at most this long. As many as a busy tunnel has
# exchanges in flight at once: past the cap every exchange opens a stream (a SYN, two FINs and the
# client's first exchange in a greenlet; at 256 connections the cap of 32 cost the client 20% more CPU).
# An idle stream holds about 3 KiB here, and only for IDLE_STREAM_SECONDS after a burst.
MAX_IDLE_STREAMS = 256
IDLE_STREAM_SECONDS = STREAM_IDLE_SECONDS


class Tunnel:
    """A registered tunnel: its session, its Auth and its health.

    A request takes a kept-alive stream (`take_stream`) or opens one, and gives it back at a clean
    message boundary (`keep_stream`); `in_flight` drives least-loaded routing.
    Its public record (Go tun2's name for it) is a `Backend`.
    """

    def __init__(self, session: Session, control_stream: Stream, auth: Auth, user: str, *, proto: str, host: str,
                 node: str = "", phi_threshold: float = 8.0, ping_interval: float = 5.0):
        self.id = uuid.uuid4().hex[:16]
        self.session = session
        self.control_stream = control_stream
        self.auth = auth
        self.user = user
        self.domain = auth.domain
        self.routes = auth.route_keys  # every route key it serves, domain first (normalized by the server)
        self.instance = auth.instance or ""  # its client instance id: a newer session of it takes over
        self.proto = proto
        self.host = host
        self.node = node
        self.connected_at = time.time()
        self.usable = True
        self.in_flight = 0
        # A tun2g client serves keep-alive HTTP on a stream; a Go tun2 client's http.Server cancels a second
        # request on one (its smux stream's read deadlines), so it gets one stream per exchange, as from Go.
        self.keeps_streams = auth.tun2g is not None and auth.tun2g >= TUN2G_LEVEL
        self.leaving = False  # the client said LEAVING (docs/protocol.md#control-messages): no new requests
        # Told to MOVE by a draining server: its client's new session elsewhere (same instance id) must not
        # take this one over, which would cut its requests in flight; the client's LEAVING ends it instead.
        self.moving = False
        self.served = 0
        self.pings_answered = 0
        self.token_hash = hash_secret(auth.token)  # names the token in logs without the secret
        # The store's revision read before this tunnel's Auth check (tun2g.server.revocation).
        self.revision: str | None = None
        self._ping_sent_at: float | None = None  # the liveness ping waiting for its pong (start_liveness)
        self._idle_streams: deque[tuple[Stream, MessageReader, float]] = deque()  # oldest first
        self._expiry_due = False  # the shared timer will close idle streams past IDLE_STREAM_SECONDS
        self._phi = PhiAccrualDetector(threshold=phi_threshold, first_heartbeat_estimate=ping_interval)
        self._phi.heartbeat()

    @property
    def is_closed(self) -> bool:
        return self.session.is_closed

    def take_stream(self) -> tuple[Stream, MessageReader | None]:
        """A stream for one HTTP exchange: the newest kept one still idle (with its response reader), else a
        new one (reader None)."""
        idle = self._idle_streams
        while idle:
            stream, reader, _ = idle.pop()
            if stream.reusable:  # the client may have closed it meanwhile
                return stream, reader
            stream.close()
        return self.open_stream(), None

    def keep_stream(self, stream: Stream, reader: MessageReader) -> None:
        """Keep a stream whose exchange ended at a clean boundary for a next request, or close it."""
        idle = self._idle_streams
        if (not self.keeps_streams or self.leaving or self.moving or not self.usable or len(idle) >= MAX_IDLE_STREAMS
                or not stream.reusable or not reader.idle):
            stream.close()
            return
        idle.append((stream, reader, time.monotonic()))
        if not self._expiry_due:
            self._expiry_due = True
            shared_timer().call_later(IDLE_STREAM_SECONDS, self._expire_idle_streams)

    def _expire_idle_streams(self) -> float | None:
        idle = self._idle_streams
        now = time.monotonic()
        while idle and (now - idle[0][2] >= IDLE_STREAM_SECONDS or self.is_closed):
            idle.popleft()[0].close()
        if not idle:
            self._expiry_due = False
            return None
        return idle[0][2] + IDLE_STREAM_SECONDS - now

    @property
    def idle_streams(self) -> int:
        """Request streams kept alive for a next exchange."""
        return len(self._idle_streams)

    def open_stream(self) -> Stream:
        """A new stream to the client."""
        try:
            return self.session.open_stream()
        except (SessionClosedError, OSError) as exc:
            self.usable = False
            raise CantOpenSessionStream(str(exc)) from exc

    def ping(self, timeout: float) -> float:
        """Send the Go server's health request and wait for any response head.

        Any HTTP status counts as alive, as in the original. Returns the round
        trip in seconds; raises a tun2 error on failure.
        """
        started = time.monotonic()
        stream = self.open_stream()
        try:
            stream.settimeout(timeout)
            try:
                stream.sendall(PING_REQUEST)
            except (OSError, SessionClosedError) as exc:
                raise CantWriteRequest(str(exc)) from exc
            try:
                MessageReader(stream).read_final_response_head("GET")
            except (OSError, HTTPError, SessionClosedError, socket.timeout) as exc:
                raise CantReadResponse(str(exc) or type(exc).__name__) from exc
        finally:
            stream.close()
        self._phi.heartbeat()
        self.pings_answered += 1
        return time.monotonic() - started

    def start_liveness(self, interval: float, timeout: float, on_dead: Callable[[Tunnel, str], None]) -> None:
        """Ping on the control stream every ``interval`` from the shared timer (docs/protocol.md#liveness);
        ``on_dead(tunnel, reason)`` when a pong is ``timeout`` late or the ping cannot be written."""
        self._liveness = (interval, timeout, on_dead)
        self._ping_seq = 0
        self._ping_sent_at = None
        self._last_ping_at = time.monotonic()
        shared_timer().call_later(interval, self._liveness_tick)

    def _liveness_tick(self) -> float | None:
        if self.is_closed:
            return None
        interval, timeout, on_dead = self._liveness
        now = time.monotonic()
        if self._ping_sent_at is not None:
            late = now - self._ping_sent_at
            if late < timeout:
                return timeout - late
            on_dead(self, f"no pong within {timeout:g} s")
            return None
        wait = self._last_ping_at + interval - now
        if wait > 0:
            return wait
        self._ping_seq += 1
        line = encode_ping(self._ping_seq)
        if not self.control_stream.send_nowait(line):  # the shared timer never waits for one tunnel
            on_dead(self, "the client takes nothing more on its control stream")
            return None
        self._ping_sent_at = self._last_ping_at = now
        return min(interval, timeout)  # the next ping if the pong came by then, else the timeout's check

    def pong(self, event: dict) -> bool:
        """A pong arrived: True (and a heartbeat) when it answers the ping outstanding, else it is ignored."""
        seq = event.get("seq")
        if type(seq) is not int or self._ping_sent_at is None or seq != self._ping_seq:
            return False
        self._ping_sent_at = None
        self._phi.heartbeat()
        self.pings_answered += 1
        return True

    @property
    def phi(self) -> float:
        return self._phi.phi()

    def close(self) -> None:
        """Close the session (and so every stream); idempotent."""
        self.usable = False
        self.session.close()
        self._idle_streams.clear()  # closed with the session

    def backend(self) -> Backend:
        """The public record of this connection."""
        return Backend(id=self.id, proto=self.proto, user=self.user, domain=self.domain, phi=self.phi,
                       host=self.host, usable=self.usable and not self.is_closed, node=self.node,
                       connected_at=self.connected_at, requests_in_flight=self.in_flight,
                       requests_served=self.served, routes=self.routes, instance=self.instance)

    def log_fields(self) -> dict:
        """Key/value pairs identifying this connection in log lines (Go's F())."""
        return {"backend": self.id, "domain": self.domain, "user": self.user, "remote": self.host,
                "proto": self.proto}

    def __repr__(self) -> str:
        return f"<Tunnel {self.id} {self.domain} {self.host}>"
