"""kcp-go's datagram framing around KCP segments, as pure functions over bytes.

kcp-go 5.6.1 wraps the segments a KCP core emits in up to two optional layers
(docs/protocol.md#crypt-header): a 20-byte nonce + CRC32 header whenever a block cipher is
set (kcptun's ``--crypt none`` included) and an 8-byte FEC header when FEC is on.
tun2's ``kcp.Dial`` uses neither. This module adds/verifies the crypt header,
strips FEC data-shard headers, drops parity shards (we never recover, we only
tolerate FEC peers, docs/protocol.md#fec) and sanity-checks segments so a listener
can reject junk before it costs a session.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

NONCE_SIZE = 16
CRC_SIZE = 4
CRYPT_HEADER_SIZE = NONCE_SIZE + CRC_SIZE
# seqid u32 + flag u16 + size u16; kcp-go feeds data shards from offset 8.
FEC_HEADER_SIZE = 8
FEC_TYPE_DATA = 0x00F1
FEC_TYPE_PARITY = 0x00F2

SEGMENT_HEADER_SIZE = 24
CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS = 81, 82, 83, 84
KCP_COMMANDS = frozenset((CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS))

# kcp-go reads datagrams into 1500-byte buffers: a larger payload is truncated.
MAX_DATAGRAM_SIZE = 1500

_SEGMENT = struct.Struct("<IBBHIIII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class SegmentHeader:
    """The 24-byte header of one KCP segment (docs/protocol.md#kcp-segment)."""

    conv: int
    cmd: int
    frg: int
    wnd: int
    ts: int
    sn: int
    una: int
    length: int


@dataclass(frozen=True)
class Inbound:
    """What a received datagram carries for the KCP core.

    ``kcp`` is the concatenated KCP segments to feed (empty for an FEC parity
    shard, which only a Reed-Solomon decoder could use); ``conv`` is None for a
    parity shard, whose conv field is not readable.
    """

    kcp: bytes
    conv: int | None


def encode_datagram(kcp_bytes: bytes, crypt_header: bool) -> bytes:
    """Frame the KCP core's output for the wire: as is, or behind nonce + CRC32."""
    if not crypt_header:
        return kcp_bytes
    checksum = zlib.crc32(kcp_bytes)
    return os.urandom(NONCE_SIZE) + _U32.pack(checksum) + kcp_bytes


def parse_datagram(datagram: bytes, crypt_header: bool) -> Inbound | None:
    """Unwrap one received datagram, or None when kcp-go would drop it.

    Dropped: a crypt header with a wrong CRC, anything shorter than one KCP
    segment header once unwrapped, a truncated FEC data shard.
    """
    payload = datagram
    if crypt_header:
        if len(payload) < CRYPT_HEADER_SIZE:
            return None
        (checksum,) = _U32.unpack_from(payload, NONCE_SIZE)
        payload = payload[CRYPT_HEADER_SIZE:]
        if zlib.crc32(payload) != checksum:
            return None
    if len(payload) < SEGMENT_HEADER_SIZE:
        return None
    # In a plain segment these two bytes are cmd (81..84) and frg, so their
    # little-endian value can never be 0xF1 or 0xF2 (docs/protocol.md#fec).
    (fec_flag,) = _U16.unpack_from(payload, 4)
    if fec_flag == FEC_TYPE_PARITY:
        return Inbound(b"", None)
    if fec_flag == FEC_TYPE_DATA:
        payload = payload[FEC_HEADER_SIZE:]
        if len(payload) < SEGMENT_HEADER_SIZE:
            return None
    return Inbound(bytes(payload), peek_conv(payload))


def peek_conv(kcp_bytes: bytes) -> int:
    """The conv of the first segment (the caller guarantees 4 bytes or more)."""
    return _U32.unpack_from(kcp_bytes, 0)[0]


def parse_segments(kcp_bytes: bytes) -> list[SegmentHeader] | None:
    """Headers of every segment, or None if the bytes are not sane KCP.

    Sane means what a KCP receiver would accept in full: at least one segment,
    one conv throughout, known commands, lengths that fit, no data on a
    non-PUSH segment. Fewer than 24 trailing bytes are ignored, as ikcp does.
    """
    headers: list[SegmentHeader] = []
    offset = 0
    end = len(kcp_bytes)
    while end - offset >= SEGMENT_HEADER_SIZE:
        header = SegmentHeader(*_SEGMENT.unpack_from(kcp_bytes, offset))
        offset += SEGMENT_HEADER_SIZE
        if header.cmd not in KCP_COMMANDS or header.length > end - offset:
            return None
        if header.cmd != CMD_PUSH and header.length:
            return None
        if headers and header.conv != headers[0].conv:
            return None
        headers.append(header)
        offset += header.length
    return headers or None


def opens_session(kcp_bytes: bytes) -> bool:
    """True if these segments can start a conversation: sane, with PUSH sn 0.

    A kcp-go client's first datagram always carries its first data segment
    (sn 0). Requiring it keeps junk and stray late segments from creating
    sessions, and is kcp-go's own rule for replacing a session's conv.
    """
    headers = parse_segments(kcp_bytes)
    return headers is not None and any(h.cmd == CMD_PUSH and h.sn == 0 for h in headers)


# QUIC's anti-amplification factor (RFC 9000 section 8.1), in bytes.
DEFAULT_AMPLIFICATION_FACTOR = 3
# PUSH (sn, ts) pairs remembered while a peer is unproven; enough for any first flight.
_MAX_RECORDED_PUSHES = 256


class AmplificationLimit:
    """The byte budget of a session whose peer has not yet proved it receives (docs/protocol.md#unproven-peers).

    A listener learns a peer's address from one datagram, which anyone can
    forge. Until the peer shows it reads what we send to that address, we send
    at most ``factor`` times the bytes received from it (all datagrams, ACKs and
    retransmissions included) and take new data only up to 1x of them, so the
    other 2x are left for retransmitting it.

    Proof is an ACK echoing the (sn, ts) of a PUSH we really sent. KCPStream
    runs its KCP clock from a random 32-bit offset, so a spoofer who never sees
    our datagrams cannot guess ts. Pure bookkeeping over bytes; no I/O.
    """

    def __init__(self, factor: int = DEFAULT_AMPLIFICATION_FACTOR):
        if factor < 1:
            raise ValueError("the amplification factor must be at least 1")
        self.factor = factor
        self.proven = False
        self.received = 0  # wire bytes from the peer
        self.datagrams_received = 0
        self.sent = 0  # wire bytes to the peer
        self.admitted = 0  # wire bytes of new data (with per-segment headers) handed to KCP
        self._pushes: set[tuple[int, int]] = set()

    def on_receive(self, size: int, kcp_bytes: bytes) -> bool:
        """Count a datagram of ``size`` wire bytes; True if it is the proof (from now on: no limit)."""
        if self.proven:
            return False
        self.received += size
        self.datagrams_received += 1
        if self._pushes:
            headers = parse_segments(kcp_bytes) or ()
            if any(h.cmd == CMD_ACK and (h.sn, h.ts) in self._pushes for h in headers):
                self.proven = True
                self._pushes.clear()
                return True
        return False

    def may_send(self, size: int) -> bool:
        """True if a datagram of ``size`` wire bytes fits the budget (count it with on_sent)."""
        return self.proven or self.sent + size <= self.factor * self.received

    def on_sent(self, size: int, kcp_bytes: bytes) -> None:
        """Count a datagram that left, remembering the PUSH segments it carried."""
        if self.proven:
            return
        self.sent += size
        if not self.admitted:
            return  # no data queued yet, so no PUSH to remember: ACKs only (the cheap, common case)
        for header in parse_segments(kcp_bytes) or ():
            if header.cmd == CMD_PUSH and len(self._pushes) < _MAX_RECORDED_PUSHES:
                self._pushes.add((header.sn, header.ts))

    def admissible(self, per_segment: int) -> int | None:
        """Bytes of new data the sender may queue now (None: unlimited), if each segment costs per_segment more."""
        if self.proven:
            return None
        return max(0, self.received - self.admitted - per_segment)

    def admit(self, size: int, per_segment: int) -> None:
        if not self.proven:
            self.admitted += size + per_segment
