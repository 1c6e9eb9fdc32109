"""smux frame format: constants, encoders and an incremental decoder (sans-I/O).

Wire layout (docs/protocol.md#frame-header): an 8-byte little-endian header
``ver:u8 cmd:u8 length:u16 sid:u32`` followed by ``length`` payload bytes for PSH
and exactly 8 bytes (``consumed:u32 window:u32``) for UPD.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION_1 = 1
VERSION_2 = 2
SUPPORTED_VERSIONS = (VERSION_1, VERSION_2)

SYN = 0  # open a stream
FIN = 1  # the sender is done with a stream
PSH = 2  # stream data
NOP = 3  # keepalive, never answered
UPD = 4  # v2 only: window update from a stream's reader

COMMAND_NAMES = {SYN: "SYN", FIN: "FIN", PSH: "PSH", NOP: "NOP", UPD: "UPD"}

HEADER = struct.Struct("<BBHI")
HEADER_SIZE = HEADER.size
UPDATE_BODY = struct.Struct("<II")
UPDATE_BODY_SIZE = UPDATE_BODY.size
MAX_PAYLOAD = 0xFFFF  # the length field is a uint16

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_unpack_update = UPDATE_BODY.unpack_from


class ProtocolError(Exception):
    """The peer sent bytes that are not valid smux; the session cannot continue."""


def encode_header(version: int, cmd: int, length: int, sid: int) -> bytes:
    """The 8 header bytes of one frame."""
    return _pack_header(version, cmd, length, sid)


def encode_frame(version: int, cmd: int, sid: int, payload: bytes = b"") -> bytes:
    """One complete frame; the payload must fit in one frame (at most 65535 bytes)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes does not fit in one frame (max {MAX_PAYLOAD})")
    return _pack_header(version, cmd, len(payload), sid) + payload


def encode_update(version: int, sid: int, consumed: int, window: int) -> bytes:
    """A UPD frame: the reader of ``sid`` has consumed ``consumed`` bytes (mod 2**32) and offers ``window``."""
    return _pack_header(version, UPD, UPDATE_BODY_SIZE, sid) + UPDATE_BODY.pack(
        consumed & 0xFFFFFFFF, window & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole frame, as the tests and tools see it (the decoder streams PSH payloads instead)."""

    version: int
    cmd: int
    sid: int
    payload: bytes = b""

    def encode(self) -> bytes:
        """The frame's wire bytes."""
        return encode_frame(self.version, self.cmd, self.sid, self.payload)


# Decoder events are plain tuples, because the receive path builds one or more per
# frame: (cmd, sid, value, frame_complete).
#   SYN/FIN/NOP: value None, complete True.
#   PSH: value is a memoryview into the fed data (keep it only if that data is
#        immutable and never reused; copy it otherwise); a frame may come in several
#        pieces and the last one has complete True. A zero-length PSH yields one
#        empty piece.
#   UPD: value is (consumed, window), complete True.
Event = tuple
_EMPTY = memoryview(b"")


class FrameDecoder:
    """Turns an arbitrarily chunked byte stream into frame events.

    ``version`` is the only version accepted; ``None`` adopts the version byte of
    the first header (1 or 2) and then holds the peer to it.

    Length rules follow smux v1.5.56+: SYN/FIN/NOP must carry length 0 and UPD
    length 8, otherwise ProtocolError. (1.5.16 ignored the field for those
    commands and silently desynchronised; refusing is the only safe reading.)
    UPD is refused on a version-1 session, as smux v1.5.51+ does.
    After a ProtocolError the decoder refuses all further input.

    ``upgradable`` (tun2g's negotiation, docs/protocol.md#version-negotiation): while
    the version is 1, one header with version byte 2 switches the decoder to 2 for
    good; version-1 headers after it are errors again.
    """

    def __init__(self, version: int | None = VERSION_1, upgradable: bool = False) -> None:
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported smux version {version!r}; use 1 or 2")
        self.version = version
        self.upgradable = upgradable
        self.headers_decoded = 0  # every complete header counts as keepalive activity
        self.error: ProtocolError | None = None
        self._partial = bytearray()  # an incomplete header, or an incomplete UPD body
        self._psh_sid = 0
        self._psh_remaining = 0  # payload bytes of the current PSH still to come
        self._upd_sid: int | None = None  # set while a UPD body is incomplete

    @property
    def in_frame(self) -> bool:
        """True when the bytes seen so far end in the middle of a frame."""
        return bool(self._partial) or self._psh_remaining > 0 or self._upd_sid is not None

    def feed(self, data) -> list[Event]:
        """Decode ``data`` (bytes-like). Events decoded before a malformed header are
        returned; then ``self.error`` is set and later calls raise it."""
        if self.error is not None:
            raise self.error
        view = memoryview(data).cast("B")
        end = len(view)
        events: list[Event] = []
        pos = 0
        while pos < end:
            if self._psh_remaining:
                take = min(self._psh_remaining, end - pos)
                self._psh_remaining -= take
                events.append((PSH, self._psh_sid, view[pos:pos + take], self._psh_remaining == 0))
                pos += take
                continue
            size = HEADER_SIZE if self._upd_sid is None else UPDATE_BODY_SIZE
            if self._partial or end - pos < size:
                take = min(size - len(self._partial), end - pos)
                self._partial += view[pos:pos + take]
                pos += take
                if len(self._partial) < size:
                    break
                source, offset = bytes(self._partial), 0
                self._partial.clear()
            else:
                source, offset = view, pos
                pos += size
            if self._upd_sid is not None:
                events.append((UPD, self._upd_sid, _unpack_update(source, offset), True))
                self._upd_sid = None
                continue
            version, cmd, length, sid = _unpack_header(source, offset)
            self.headers_decoded += 1
            if (cmd != PSH or version != self.version) and not self._check_header(version, cmd, length, sid):
                break
            if cmd == PSH:
                if length <= end - pos:  # the whole payload is here: one event, one loop turn
                    events.append((PSH, sid, view[pos:pos + length] if length else _EMPTY, True))
                    pos += length
                else:
                    self._psh_sid, self._psh_remaining = sid, length
            elif cmd == UPD:
                self._upd_sid = sid
            else:
                events.append((cmd, sid, None, True))
        return events

    def _check_header(self, version: int, cmd: int, length: int, sid: int) -> bool:
        """Validate a non-fast-path header; set self.error and return False when it is bad."""
        problem = None
        if self.version is None and version in SUPPORTED_VERSIONS:
            self.version = version
        elif self.upgradable and self.version == VERSION_1 and version == VERSION_2:
            self.version, self.upgradable = VERSION_2, False
        if version != self.version:
            expected = "1 or 2" if self.version is None else str(self.version)
            problem = f"version byte {version} where {expected} was expected"
        elif cmd not in COMMAND_NAMES:
            problem = f"unknown command {cmd}"
        elif cmd == UPD and version == VERSION_1:
            problem = "UPD frame on a version-1 session (UPD exists only in version 2)"
        elif cmd == UPD and length != UPDATE_BODY_SIZE:
            problem = f"UPD frame with length {length} (must be {UPDATE_BODY_SIZE})"
        elif cmd in (SYN, FIN, NOP) and length != 0:
            problem = f"{COMMAND_NAMES[cmd]} frame with length {length} (must be 0)"
        if problem is None:
            return True
        self.error = ProtocolError(
            f"smux protocol error from peer: {problem} (stream {sid}); "
            "check that both ends use the same smux version and speak smux at all")
        return False


def decode_frames(data: bytes, version: int | None = VERSION_1) -> list[Frame]:
    """Decode complete frames from ``data`` in one go (for tests and tools)."""
    decoder = FrameDecoder(version)
    frames: list[Frame] = []
    payload = bytearray()
    for cmd, sid, value, complete in decoder.feed(data):
        if cmd == PSH:
            payload += value
            if complete:
                frames.append(Frame(decoder.version, PSH, sid, bytes(payload)))
                payload.clear()
        elif cmd == UPD:
            frames.append(Frame(decoder.version, UPD, sid, UPDATE_BODY.pack(*value)))
        else:
            frames.append(Frame(decoder.version, cmd, sid))
    if decoder.error is not None:
        raise decoder.error
    if decoder.in_frame:
        raise ProtocolError(f"input ends inside a frame ({len(data)} bytes)")
    return frames
