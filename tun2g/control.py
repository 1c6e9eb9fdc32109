"""The tun2 control protocol: the Auth handshake and the health ping, sans-I/O.

On every tunnel the server opens the control stream (id 2 from a Go server),
the client writes one JSON object `{"token": ..., "domain": ...}` with no
newline, and the server decodes it with a streaming JSON reader. tun2g adds a
one-line JSON reply on the same stream (`{"ok": true, ...}` or
`{"ok": false, "error": ...}`); the Go client never reads that stream, so the
reply is invisible to it, while a tun2g client learns why it was refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tun2g.errors import AuthMismatch
from tun2g.storage import StorageError
from tun2g.tcp.wire import Announcement, PreambleError, parse_announcement

# The Auth object is two short strings; anything near this size is not a client.
MAX_AUTH_SIZE = 8192
MAX_REPLY_SIZE = 8192
# Objects and arrays nested deeper than this are no Auth (it is flat); json.loads would
# recurse once per level (RecursionError near 1,000).
MAX_AUTH_DEPTH = 16

# What the Go server writes on each ping stream (docs/protocol.md#health-ping), byte for byte.
HEALTH_PATH = "/health"
HEALTH_HOST = "backend"
PING_REQUEST = b"GET /health HTTP/1.1\r\nHost: backend\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"

CONNECT_SCOPE = "connect"

# Kept-alive request streams (docs/protocol.md#request-streams): a tun2g server closes one that was
# idle this long; a tun2g client waits twice as long for a next request on one before it closes it
# itself (a server that forgot it), so the server's close comes first and no request meets a closing stream.
STREAM_IDLE_SECONDS = 30.0

# tun2g's extension field in the Auth (docs/protocol.md#version-negotiation): a client
# sending "tun2g": 1 follows a switch of the session to smux version 2. Go ignores it.
TUN2G_LEVEL = 1
# "tun2g": 2 (or more) adds the liveness check (docs/protocol.md#liveness): the client answers the
# server's pings on the control stream, and the server sends it no HTTP `GET /health` any more.
LIVENESS_LEVEL = 2
# Both sides' smux keepalive (interval, timeout) once the liveness check is agreed: the pings and
# pongs (every 15 s by default) are frames that feed both keepalive timeouts, so no NOP is sent.
LIVENESS_KEEPALIVE = (20.0, 30.0)
# More tun2g extension fields (docs/routing.md#multi-route-clients): "routes", the route keys
# a client serves besides "domain", and "instance", the id that names one client across its
# reconnects (a new session of the same instance takes over the old ones).
MAX_EXTRA_ROUTES = 32
INSTANCE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# The header by which the server tells a multi-route client which route a stream is for; set
# only on streams to such a client, removed from every public request (never taken from outside).
ROUTE_HEADER = "X-Tun2g-Route"


class AuthFormatError(ValueError):
    """The bytes on the control stream are not an Auth object."""


@dataclass(frozen=True)
class Auth:
    """What a client presents: its token and the domain it wants to serve.

    ``tun2g`` (tun2g clients only, omitted when None): the client's protocol level;
    1 means it follows a switch to smux version 2 (docs/protocol.md#version-negotiation).
    ``routes`` (omitted when empty): more route keys the same session serves;
    ``instance`` (omitted when None): the client instance id for takeover (docs/routing.md#takeover).
    """

    token: str
    domain: str
    tun2g: int | None = None
    routes: tuple[str, ...] = ()
    instance: str | None = None

    @property
    def route_keys(self) -> tuple[str, ...]:
        """Every route the session asks to serve, `domain` first."""
        return (self.domain, *self.routes)
    # The TCP services a tun2g client offers (docs/tcp.md; Auth field "tcp"); empty for a Go client.
    tcp: Announcement = Announcement()
    # "claim": 1 asks the server for a self-service name (docs/protocol.md#self-service-names); "domain"
    # is then ignored, and so is any label the client puts anywhere: the server alone picks the name.
    claim: bool = False

    def encode(self) -> bytes:
        """The wire form, as Go's json.Marshal writes it: compact, no newline."""
        fields: dict = {"token": self.token, "domain": self.domain}
        if self.tun2g is not None:
            fields["tun2g"] = self.tun2g
        if self.routes:
            fields["routes"] = list(self.routes)
        if self.instance is not None:
            fields["instance"] = self.instance
        if self.tcp:
            fields["tcp"] = self.tcp.as_json()
        if self.claim:
            fields["claim"] = 1
        return json.dumps(fields, separators=(",", ":")).encode()


class JSONObjectReader:
    """Finds the end of one JSON object in a byte stream fed piece by piece.

    Go's json.Decoder reads exactly one value and no more; this tracks braces
    outside strings so a split object waits for its tail and a stream that never
    closes its object is cut off at `limit` bytes.
    """

    def __init__(self, limit: int, max_depth: int = MAX_AUTH_DEPTH):
        self._limit = limit
        self._max_depth = max_depth
        self._buffer = bytearray()
        self._depth = 0
        self._nesting = 0  # objects and arrays open right now
        self._in_string = False
        self._escaped = False
        self._started = False

    def feed(self, data: bytes) -> dict | None:
        """Add bytes; return the decoded object once it is complete, else None."""
        for index, byte in enumerate(data):
            self._buffer.append(byte)
            if len(self._buffer) > self._limit:
                raise AuthFormatError(f"no complete JSON object within {self._limit} bytes")
            if self._advance(byte):
                return self._decode()
        return None

    def _advance(self, byte: int) -> bool:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif byte == 0x5C:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self._in_string = False
            return False
        if byte == 0x22:
            self._in_string = True
        elif byte == 0x7B or byte == 0x5B:  # { or [
            if byte == 0x7B:
                self._depth += 1
                self._started = True
            self._nesting += 1
            if self._nesting > self._max_depth:
                raise AuthFormatError(f"the JSON is nested more than {self._max_depth} levels deep")
        elif byte == 0x7D or byte == 0x5D:  # } or ]
            self._nesting -= 1
            if byte == 0x7D:
                self._depth -= 1
                return self._started and self._depth == 0
        elif not self._started and byte not in b" \t\r\n":
            raise AuthFormatError(f"expected a JSON object, got byte {bytes([byte])!r}")
        return False

    def _decode(self) -> dict:
        try:
            value = json.loads(self._buffer)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuthFormatError(f"invalid JSON: {exc}") from None
        except RecursionError:  # the depth cap stops this first; never let one escape anyway
            raise AuthFormatError("the JSON is nested too deeply") from None
        if not isinstance(value, dict):
            raise AuthFormatError("expected a JSON object")
        return value


def parse_auth(obj: dict) -> Auth:
    """Validate a decoded Auth object: both fields present and strings (a non-integer
    "tun2g" is ignored, as any other unknown field). "routes", when present, must be a list
    of at most MAX_EXTRA_ROUTES strings and "instance" a short plain id (else AuthFormatError)."""
    token, domain, level = obj.get("token"), obj.get("domain"), obj.get("tun2g")
    if not isinstance(token, str) or not isinstance(domain, str):
        raise AuthFormatError('the Auth object needs string fields "token" and "domain"')
    if type(level) is not int:
        level = None
    routes = obj.get("routes", [])
    if not isinstance(routes, list) or len(routes) > MAX_EXTRA_ROUTES or \
            not all(isinstance(route, str) for route in routes):
        raise AuthFormatError(f'"routes" must be a list of at most {MAX_EXTRA_ROUTES} route keys')
    instance = obj.get("instance")
    if instance is not None and (not isinstance(instance, str) or not INSTANCE_ID.fullmatch(instance)):
        raise AuthFormatError('"instance" must be 1-64 letters, digits or . _ : -')
    try:
        tcp = parse_announcement(obj.get("tcp"))
    except PreambleError as exc:
        raise AuthFormatError(str(exc)) from None
    if tcp and (level is None or level < TUN2G_LEVEL):
        raise AuthFormatError('TCP services ("tcp") need the tun2g extension ("tun2g": 1)')
    claim = obj.get("claim")  # any true value asks for a name; whatever it says is no label we would use
    return Auth(token=token, domain=domain, tun2g=level, routes=tuple(dict.fromkeys(routes)), instance=instance,
                tcp=tcp, claim=bool(claim))


INVALID_TOKEN = "invalid token"


def verify_auth(storage, auth: Auth, normalize_domain) -> str:
    """Check an Auth with the Go server's checks; return the owning user.

    Route exists, token exists, token has the connect scope, route owner equals
    token owner: the same outcome as Go for every Auth, but until the token is
    proven valid a rejection says only "invalid token", so an unauthenticated
    client learns nothing about which domains exist (both lookups always run).
    With a valid token the reason is precise. Raises AuthMismatch, whose
    `log_reason` names every check that failed.
    """
    try:
        domain, domain_error = normalize_domain(auth.domain), None
    except (StorageError, ValueError) as exc:  # not a host name: a rejection, never a storage outage
        domain, domain_error = None, str(exc)
    route_user = None
    if domain is not None:
        try:
            route_user = storage.has_route(domain)
        except LookupError:
            route_user = None
    try:
        token_user, scopes = storage.has_token(auth.token)
    except LookupError:
        route = domain_error or (f"no route for domain {domain!r}" if route_user is None
                                 else f"domain {domain!r} is routed")
        raise AuthMismatch(INVALID_TOKEN, log_reason=f"unknown or revoked token; {route}") from None
    if CONNECT_SCOPE not in scopes:
        raise AuthMismatch(f"token lacks the {CONNECT_SCOPE!r} scope (it has {sorted(scopes)})")
    if domain_error is not None:
        raise AuthMismatch(domain_error)
    if route_user is None:
        raise AuthMismatch(f"no route for domain {domain!r}; add one with `tun2g route add {domain} --user USER`")
    if route_user != token_user:
        raise AuthMismatch(f"domain {domain!r} does not belong to the token's user")
    for key in auth.routes:
        try:
            normalized = normalize_domain(key)
        except (StorageError, ValueError) as exc:
            raise AuthMismatch(f"route {key!r}: {exc}") from None
        try:
            owner = storage.has_route(normalized)
        except LookupError:  # StorageUnavailable is no LookupError: an outage stays an outage
            raise AuthMismatch(f"no route {normalized!r}; add one with "
                               f"`tun2g route add {normalized} --user USER`") from None
        if owner != token_user:
            raise AuthMismatch(f"route {normalized!r} does not belong to the token's user")
    return token_user


def encode_reply(ok: bool, **fields) -> bytes:
    """tun2g's reply on the control stream: one JSON line."""
    return json.dumps({"ok": ok, **fields}, separators=(",", ":")).encode() + b"\n"


def decode_reply(line: bytes) -> dict:
    """Parse a reply line; raises AuthFormatError when it is not one."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AuthFormatError(f"invalid reply on the control stream: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("ok"), bool):
        raise AuthFormatError("invalid reply on the control stream: no boolean 'ok'")
    return value


# -- tun2g's control messages (docs/protocol.md#control-messages) ---------------------------
#
# After the reply, the control stream of a tun2g client (one whose Auth said "tun2g": 1) carries
# one-line JSON events both ways. A Go tun2 peer never sees one: the server sends them only to
# tun2g clients, and a tun2g client sends them only to a server that replied to its Auth.

MAX_EVENT_SIZE = 1024
# Server -> client: this server is draining; connect again (a balancer sends you elsewhere),
# then send LEAVING on this session. "grace": seconds before the server closes it anyway.
MOVE = "move"
# Client -> server: route no new requests to this session; close it once those in flight are done.
LEAVING = "leaving"
# Server -> client, in a cluster: the live nodes changed; "nodes" as in the auth reply (at most
# MAX_LISTED_NODES entries). A multi-homed client opens or drops sessions to match (tun2g.client.multi).
NODES = "nodes"
MAX_LISTED_NODES = 64
# A client reads the server's events with this bound: a "nodes" event lists up to 64 nodes.
MAX_SERVER_EVENT_SIZE = 65536
# Server -> client {"event":"ping","seq":N}; the client answers {"event":"pong","seq":N} (docs/protocol.md#liveness).
PING = "ping"
PONG = "pong"


def encode_event(event: str, **fields) -> bytes:
    """One control message: a JSON line with an "event" field."""
    return json.dumps({"event": event, **fields}, separators=(",", ":")).encode() + b"\n"


def encode_ping(seq: int) -> bytes:
    """``encode_event(PING, seq=seq)`` without json: the server sends one per tunnel every liveness interval."""
    return b'{"event":"ping","seq":%d}\n' % seq


class EventReader:
    """Splits a control stream into events, a line at a time; a line over MAX_EVENT_SIZE is an error."""

    def __init__(self, limit: int = MAX_EVENT_SIZE) -> None:
        self._limit = limit
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict]:
        """The complete events in ``data`` (with what came before); lines that are no event are skipped."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self._limit or any(len(line) > self._limit for line in lines):
            raise AuthFormatError(f"a control message longer than {self._limit} bytes")
        events = []
        for line in lines:
            try:
                value = json.loads(line)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(value, dict) and isinstance(value.get("event"), str):
                events.append(value)
        return events
