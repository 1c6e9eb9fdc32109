"""The node-to-node hop: an HMAC over the request that lets one node forward it to another, once.

A node that has no local backend for a Host forwards the request to a node
that has one, adding one header::

    X-Tun2g-Hop: v1;node=<origin node id>;ts=<unix seconds>;sig=<hex HMAC-SHA256>

The signature covers the origin node, the timestamp, the method, the Host,
the target, the request id and X-Forwarded-For, keyed by the cluster secret
every node shares. A receiving node accepts the header only when the
signature matches and the timestamp lies within WINDOW seconds of its clock;
an accepted hop is served from local backends only, so nothing is forwarded
twice, and its X-Forwarded-For is trusted as the origin node wrote it.

Pure functions over strings: the drivers live in `tun2g.cluster.forward` and
the HTTP front.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

HOP_HEADER = "X-Tun2g-Hop"
VERSION = "v1"
# Seconds a signed hop stays valid either side of the receiver's clock: long
# enough for NTP-level skew between nodes, short enough that a captured
# header is worth little.
WINDOW = 30.0


class HopRefused(Exception):
    """A request carried a hop header that is not a valid, fresh signature of this cluster."""


@dataclass(frozen=True)
class Hop:
    """An accepted hop: which node forwarded the request, and when."""

    origin: str
    timestamp: int


def _message(origin: str, timestamp: int, method: str, host: str, target: str, request_id: str,
             forwarded_for: str) -> bytes:
    return "\n".join((VERSION, origin, str(timestamp), method, host, target, request_id, forwarded_for)).encode()


def _signature(secret: bytes, *parts) -> str:
    return hmac.digest(secret, _message(*parts), "sha256").hex()


def sign(secret: bytes, *, origin: str, timestamp: int, method: str, host: str, target: str, request_id: str,
         forwarded_for: str) -> str:
    """The X-Tun2g-Hop value for a request this node forwards."""
    if not secret:
        raise ValueError("a cluster secret is required to sign node-to-node requests")
    if ";" in origin or "=" in origin:
        raise ValueError(f"node id {origin!r} must not contain ';' or '='")
    signature = _signature(secret, origin, timestamp, method, host, target, request_id, forwarded_for)
    return f"{VERSION};node={origin};ts={timestamp};sig={signature}"


def verify(secret: bytes, value: str, *, now: float, method: str, host: str, target: str, request_id: str,
           forwarded_for: str, window: float = WINDOW) -> Hop:
    """Check a received X-Tun2g-Hop value; raises HopRefused saying why it is not acceptable."""
    if not secret:
        raise HopRefused("this node has no cluster secret, so it accepts no node-to-node requests")
    version, _, rest = value.partition(";")
    if version.strip() != VERSION:
        raise HopRefused(f"unknown hop version {version.strip()!r}")
    fields = {}
    for part in rest.split(";"):
        key, sep, field_value = part.strip().partition("=")
        if sep:
            fields[key] = field_value
    origin, timestamp, signature = fields.get("node"), fields.get("ts", ""), fields.get("sig", "")
    if not origin or not timestamp.isdigit() or not signature:
        raise HopRefused("malformed hop header (needs node=, ts= and sig=)")
    timestamp_value = int(timestamp)
    if abs(now - timestamp_value) > window:
        raise HopRefused(f"hop timestamp is {round(now - timestamp_value)} s away from this node's clock "
                         f"(allowed: {window:g} s); check the nodes' clocks")
    expected = _signature(secret, origin, timestamp_value, method, host, target, request_id, forwarded_for)
    if not hmac.compare_digest(expected, signature):
        raise HopRefused("bad hop signature: the sender does not know this cluster's secret")
    return Hop(origin=origin, timestamp=timestamp_value)
