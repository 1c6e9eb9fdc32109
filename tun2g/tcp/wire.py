"""The tun2g TCP extension on the wire, sans-I/O: the stream preamble, the client's answer, the Auth field.

docs/protocol.md#tcp-streams. An HTTP stream starts with a request line, as in
tun2; a TCP or TLS-passthrough stream starts with a preamble, whose first byte
(0x00) no HTTP request can start with, so a client tells the two apart by one
byte and an HTTP stream is unchanged::

    0x00 "t2g" | version (1) | kind (1) | length (2, big-endian) | JSON object (length bytes)

``kind`` 1 = TCP port, 2 = TLS passthrough by name. The JSON says which
service (``{"port": 2222}`` or ``{"name": "db.example.com"}``) and for whom
(``"remote": "203.0.113.5:51234"``). The client answers with one status byte
before any data: 0 = the local service accepted, 1 = it refused the
connection, 2 = it could not be reached in time; on anything but 0 it closes
the stream. The Auth announces the services in one field, ``"tcp"``:
``{"ports": [2222, 0], "names": ["db.example.com"]}`` (port 0: any free port
of the server's range).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAGIC = b"\x00t2g"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 4
MAX_BODY = 1024  # the JSON names one service and one address
KIND_TCP = 1
KIND_TLS = 2
KINDS = {KIND_TCP: "tcp", KIND_TLS: "tls"}

STATUS_CONNECTED = 0
STATUS_REFUSED = 1
STATUS_UNREACHABLE = 2
STATUS_NAMES = {STATUS_CONNECTED: "connected", STATUS_REFUSED: "refused", STATUS_UNREACHABLE: "unreachable"}

# What one client may announce: enough for any real setup, small enough to check quickly.
MAX_SERVICES = 64
MAX_NAME = 253


class PreambleError(ValueError):
    """Bytes that are not a tun2g stream preamble (or an announcement that is not one)."""


@dataclass(frozen=True)
class Preamble:
    """What a TCP stream is for: ``kind`` with its ``port`` or ``name``, and the public peer's address."""

    kind: int
    port: int = 0
    name: str = ""
    remote: str = ""

    def encode(self) -> bytes:
        fields: dict = {"port": self.port} if self.kind == KIND_TCP else {"name": self.name}
        fields["remote"] = self.remote
        body = json.dumps(fields, separators=(",", ":")).encode()
        if len(body) > MAX_BODY:
            raise PreambleError(f"a preamble of {len(body)} bytes (the limit is {MAX_BODY})")
        return MAGIC + bytes((VERSION, self.kind)) + len(body).to_bytes(2, "big") + body


def is_preamble_start(first_byte: bytes) -> bool:
    """True when a stream's first byte starts a preamble (an HTTP request never starts with 0x00)."""
    return first_byte[:1] == MAGIC[:1]


def preamble_length(header: bytes) -> int:
    """The whole preamble's size from its first HEADER_SIZE bytes; raises PreambleError for junk."""
    if len(header) < HEADER_SIZE or header[:len(MAGIC)] != MAGIC:
        raise PreambleError("the stream does not start with the tun2g preamble")
    version, kind = header[4], header[5]
    if version != VERSION:
        raise PreambleError(f"preamble version {version}, this client speaks {VERSION}; upgrade it")
    if kind not in KINDS:
        raise PreambleError(f"unknown stream kind {kind}")
    length = int.from_bytes(header[6:8], "big")
    if length > MAX_BODY:
        raise PreambleError(f"a preamble body of {length} bytes (the limit is {MAX_BODY})")
    return HEADER_SIZE + length


def decode_preamble(data: bytes) -> Preamble:
    """The Preamble in exactly `preamble_length(data)` bytes; raises PreambleError."""
    total = preamble_length(data)
    if len(data) != total:
        raise PreambleError(f"the preamble is {total} bytes, got {len(data)}")
    try:
        fields = json.loads(data[HEADER_SIZE:])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PreambleError("the preamble body is not JSON") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("remote", ""), str):
        raise PreambleError("the preamble body is not an object with a string remote")
    kind = data[5]
    if kind == KIND_TCP:
        return Preamble(kind, port=_port(fields.get("port"), allow_zero=False), remote=fields.get("remote", ""))
    name = fields.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise PreambleError("a TLS preamble needs a name")
    return Preamble(kind, name=name, remote=fields.get("remote", ""))


@dataclass(frozen=True)
class Announcement:
    """The TCP services a client offers in its Auth: public ports (0: any free one) and TLS names."""

    ports: tuple[int, ...] = ()
    names: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.ports or self.names)

    def as_json(self) -> dict:
        return {"ports": list(self.ports), "names": list(self.names)}


def parse_announcement(value: object) -> Announcement:
    """Validate the Auth's ``"tcp"`` field; raises PreambleError saying what is wrong."""
    if value is None:
        return Announcement()
    if not isinstance(value, dict):
        raise PreambleError('the Auth field "tcp" must be an object {"ports": [...], "names": [...]}')
    ports, names = value.get("ports", []), value.get("names", [])
    if not isinstance(ports, list) or not isinstance(names, list):
        raise PreambleError('"tcp.ports" and "tcp.names" must be lists')
    if len(ports) + len(names) > MAX_SERVICES:
        raise PreambleError(f"at most {MAX_SERVICES} TCP services per client")
    checked_ports = tuple(_port(port, allow_zero=True) for port in ports)
    fixed = [port for port in checked_ports if port]
    if len(set(fixed)) != len(fixed):
        raise PreambleError("a TCP port is announced twice")
    if not all(isinstance(name, str) and 0 < len(name) <= MAX_NAME for name in names):
        raise PreambleError('"tcp.names" must hold host names')
    return Announcement(checked_ports, tuple(names))


def _port(value: object, *, allow_zero: bool) -> int:
    if type(value) is not int or not (0 if allow_zero else 1) <= value <= 65535:
        raise PreambleError(f"not a TCP port: {value!r}")
    return value


# The node-to-node hop of a TCP connection (docs/cluster.md#tcp-routes): an HTTP Upgrade to the
# node holding the tunnel, signed like any hop (tun2g.cluster.hop), Host = the service's registry name.
HOP_PATH = "/_tun2g/tcp"
HOP_UPGRADE = "tun2g-tcp"
HOP_SWITCHED = (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {HOP_UPGRADE}\r\n"
                f"Connection: Upgrade\r\n\r\n").encode()


def registry_name(kind: int, port: int = 0, name: str = "") -> str:
    """The name a node publishes for a TCP service it serves ("tcp:2222", "tls:db.example.com"); never a domain."""
    return f"tcp:{port}" if kind == KIND_TCP else f"tls:{name}"


def is_tcp_hop(method: str, target: str, upgrade: str | None) -> bool:
    """Whether a request head asks for a spliced TCP connection from another node."""
    return method == "GET" and target == HOP_PATH and (upgrade or "").strip().lower() == HOP_UPGRADE
