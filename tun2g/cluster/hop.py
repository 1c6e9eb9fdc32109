"""The node-to-node hop: an HMAC over the request that lets one node forward it to another, once.

A node that has no local backend for a Host forwards the request to a node
that has one, adding one header (docs/protocol.md#cluster-hop)::

    X-Tun2g-Hop: v2;node=<origin>;to=<receiver>;ts=<unix ms>;nonce=<32 hex>;sig=<hex HMAC-SHA256>

The signature covers the version, the origin and receiving nodes, the
timestamp, the nonce, the method, the Host, the target, the request id,
X-Forwarded-For and the body's framing (its Content-Length, or chunked),
keyed by the cluster secret every node shares. A receiving node accepts the
header only when it is addressed to it, the signature matches, the timestamp
lies within WINDOW seconds of its clock and the nonce was never seen before
(`NonceMemory` here, and Redis ``SET NX`` across restarts: tun2g.cluster.node);
an accepted hop is served from local backends only, so nothing is forwarded
twice, and its X-Forwarded-For is trusted as the origin node wrote it.

v1 headers (no nonce, no receiver, no framing) are refused: a captured one
could be replayed for 30 s with another body.

Pure functions over strings: the drivers live in `tun2g.cluster.forward`,
`tun2g.cluster.node` and the HTTP front.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from tun2g.requestid import new_request_id

HOP_HEADER = "X-Tun2g-Hop"
VERSION = "v2"
# Seconds a signed hop stays valid either side of the receiver's clock: long
# enough for NTP-level skew between nodes, short enough that the nonces to
# remember stay few (a nonce is kept for 2 x WINDOW).
WINDOW = 10.0
# Bound on the nonces one node remembers: at this many hops per 2 x WINDOW the
# node refuses further hops rather than forget a nonce still inside its window.
MAX_NONCES = 500_000


class HopRefused(Exception):
    """A request carried a hop header that is not a valid, fresh, first-seen signature of this cluster."""


@dataclass(frozen=True)
class Hop:
    """An accepted hop: which node forwarded the request, when (unix ms) and under which nonce."""

    origin: str
    timestamp: int
    nonce: str = ""


def framing_of(content_length: int | None, chunked: bool) -> str:
    """The body framing a signature covers: ``chunked``, or the Content-Length (0 when there is none)."""
    return "chunked" if chunked else str(content_length or 0)


def _message(origin: str, to: str, timestamp: int, nonce: str, method: str, host: str, target: str,
             request_id: str, forwarded_for: str, framing: str) -> bytes:
    return "\n".join((VERSION, origin, to, str(timestamp), nonce, method, host, target, request_id, forwarded_for,
                      framing)).encode()


def new_nonce() -> str:
    """32 hex digits never repeated: a random per-process prefix and a counter, with no syscall per hop.
    A nonce need not be secret (the signature covers it), only used once."""
    return new_request_id()


def sign(secret: bytes, *, origin: str, to: str, timestamp: int, method: str, host: str, target: str,
         request_id: str, forwarded_for: str, framing: str = "0", nonce: str | None = None) -> str:
    """The X-Tun2g-Hop value for a request this node forwards to node `to` (`timestamp` in unix ms)."""
    if not secret:
        raise ValueError("a cluster secret is required to sign node-to-node requests")
    for name in (origin, to):
        if not name or ";" in name or "=" in name:
            raise ValueError(f"node id {name!r} must be non-empty and must not contain ';' or '='")
    nonce = new_nonce() if nonce is None else nonce
    signature = hmac.digest(secret, _message(origin, to, timestamp, nonce, method, host, target, request_id,
                                             forwarded_for, framing), "sha256").hex()
    return f"{VERSION};node={origin};to={to};ts={timestamp};nonce={nonce};sig={signature}"


def verify(secret: bytes, value: str, *, receiver: str, now: float, method: str, host: str, target: str,
           request_id: str, forwarded_for: str, framing: str = "0", window: float = WINDOW) -> Hop:
    """Check a received X-Tun2g-Hop value (`now` in unix seconds); raises HopRefused saying why.

    The nonce's single use is the caller's part (`NonceMemory`, Redis): a Hop
    returned here is authentic and fresh, not yet proven unreplayed.
    """
    if not secret:
        raise HopRefused("this node has no cluster secret, so it accepts no node-to-node requests")
    version, _, rest = value.partition(";")
    version = version.strip()
    if version != VERSION:
        hint = "; every node must run the same tun2g version" if version.startswith("v") else ""
        raise HopRefused(f"unsupported hop version {version!r} (this node accepts {VERSION}){hint}")
    fields = {}
    for part in rest.split(";"):
        key, sep, field_value = part.strip().partition("=")
        if sep:
            fields[key] = field_value
    origin, to, timestamp = fields.get("node"), fields.get("to"), fields.get("ts", "")
    nonce, signature = fields.get("nonce", ""), fields.get("sig", "")
    if not origin or not to or not timestamp.isdigit() or len(nonce) != 32 or not signature:
        raise HopRefused("malformed hop header (needs node=, to=, ts=, nonce= and sig=)")
    if to != receiver:
        raise HopRefused(f"hop addressed to node {to!r}, not to this node")
    timestamp_value = int(timestamp)
    skew = now - timestamp_value / 1000
    if abs(skew) > window:
        raise HopRefused(f"hop timestamp is {round(skew)} s away from this node's clock "
                         f"(allowed: {window:g} s); check the nodes' clocks")
    expected = hmac.digest(secret, _message(origin, to, timestamp_value, nonce, method, host, target, request_id,
                                            forwarded_for, framing), "sha256").hex()
    if not hmac.compare_digest(expected, signature):
        raise HopRefused("bad hop signature: the sender does not know this cluster's secret, "
                         "or the request was altered")
    return Hop(origin=origin, timestamp=timestamp_value, nonce=nonce)


class NonceMemory:
    """The hop nonces this node accepted within the last 2 x window, each usable once (bounded).

    `started` (unix seconds) is when this memory began. An earlier process of the same node id took
    hops up to a window ahead of its clock, and its clock (on another host, maybe) may have run up to
    a window ahead of this one: only a hop signed before `started` + 2 x window may have reached it,
    so only those need the cluster-wide check (`may_predate`).
    """

    def __init__(self, window: float = WINDOW, limit: int = MAX_NONCES, started: float = 0.0) -> None:
        self.keep_for = 2 * window
        self.limit = limit
        self._remembers_from_ms = int((started + 2 * window) * 1000)
        self._seen: dict[str, float] = {}  # nonce -> forget after (monotonic); insertion-ordered

    def may_predate(self, timestamp: int) -> bool:
        """Whether a hop signed at `timestamp` (unix ms) could have reached an earlier process of this node."""
        return timestamp < self._remembers_from_ms

    def first_use(self, nonce: str, now: float) -> bool:
        """True the first time `nonce` is offered (and remember it); False for a replay.

        Raises HopRefused when the memory is full of nonces still inside their window.
        """
        seen = self._seen
        if nonce in seen:
            if seen[nonce] > now:
                return False
            del seen[nonce]  # expired: forget it, so the memory stays ordered by expiry
        if len(seen) >= self.limit:
            self._prune(now)
            if len(seen) >= self.limit:
                raise HopRefused("too many node-to-node requests to remember their nonces; retry shortly")
        seen[nonce] = now + self.keep_for
        if len(seen) % 1024 == 0:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        seen = self._seen
        for nonce in list(seen):  # oldest first: stop at the first one still valid
            if seen[nonce] > now:
                break
            del seen[nonce]

    def __len__(self) -> int:
        return len(self._seen)
