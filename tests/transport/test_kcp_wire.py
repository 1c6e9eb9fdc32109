"""kcp-go datagram framing: crypt header, FEC tolerance, segment sanity."""

import struct
import zlib

import pytest
from hypothesis import given, strategies as st

from tun2g.transport import kcp_wire
from tun2g.transport.kcp_wire import CMD_ACK, CMD_PUSH, CMD_WASK, CMD_WINS

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


convs = st.integers(0, 2**32 - 1)
u32 = st.integers(0, 2**32 - 1)


def segment(conv, cmd=CMD_PUSH, sn=0, data=b"", frg=0, wnd=32, ts=0, una=0, length=None):
    """One KCP segment in wire form (docs/protocol.md#kcp-segment)."""
    size = len(data) if length is None else length
    return struct.pack("<IBBHIIII", conv, cmd, frg, wnd, ts, sn, una, size) + data


segments = st.builds(
    lambda cmd, sn, una, data: (cmd, sn, una, data if cmd == CMD_PUSH else b""),
    st.sampled_from([CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS]), u32, u32, st.binary(max_size=64),
)


@given(convs, st.lists(segments, min_size=1, max_size=6), st.booleans())
def test_roundtrip_through_framing(conv, parts, crypt):
    kcp = b"".join(segment(conv, cmd, sn=sn, una=una, data=data) for cmd, sn, una, data in parts)
    inbound = kcp_wire.parse_datagram(kcp_wire.encode_datagram(kcp, crypt), crypt)
    assert inbound == kcp_wire.Inbound(kcp, conv)
    headers = kcp_wire.parse_segments(kcp)
    assert [(h.cmd, h.sn, h.una, h.length) for h in headers] == [
        (cmd, sn, una, len(data)) for cmd, sn, una, data in parts
    ]


def test_crypt_header_layout_matches_kcptun_capture():
    # docs/protocol.md#crypt-header example datagram: nonce(16) | crc32 LE over bytes 20.. | segments
    kcp = bytes.fromhex("9f02b4a1510000029004000000000000000000000800000001000000" "03000000")
    datagram = kcp_wire.encode_datagram(kcp, True)
    assert len(datagram) == 20 + len(kcp)
    assert datagram[16:20] == struct.pack("<I", zlib.crc32(kcp))
    assert kcp_wire.parse_datagram(datagram, True).conv == 0xA1B4029F
    assert kcp_wire.encode_datagram(kcp, False) == kcp


def test_nonce_differs_per_datagram():
    kcp = segment(7, data=b"x")
    assert kcp_wire.encode_datagram(kcp, True)[:16] != kcp_wire.encode_datagram(kcp, True)[:16]


@given(convs, st.binary(max_size=40), st.integers(0, 10_000), st.integers(1, 255))
def test_any_corrupted_byte_fails_the_crc(conv, data, position, flip):
    datagram = bytearray(kcp_wire.encode_datagram(segment(conv, data=data), True))
    position = 16 + position % (len(datagram) - 16)  # the nonce is not covered, like kcp-go
    datagram[position] ^= flip
    assert kcp_wire.parse_datagram(bytes(datagram), True) is None


@given(st.binary(max_size=300), st.booleans())
def test_garbage_never_raises(junk, crypt):
    inbound = kcp_wire.parse_datagram(junk, crypt)
    if inbound is not None:
        kcp_wire.parse_segments(inbound.kcp)
        if inbound.kcp:
            kcp_wire.opens_session(inbound.kcp)


def test_short_datagrams_are_dropped():
    assert kcp_wire.parse_datagram(b"\x00" * 23, False) is None
    assert kcp_wire.parse_datagram(kcp_wire.encode_datagram(b"\x00" * 23, True), True) is None


@given(convs, u32, st.binary(max_size=100), st.booleans())
def test_fec_data_shard_is_stripped_and_parity_dropped(conv, seqid, data, crypt):
    kcp = segment(conv, data=data)
    shard = struct.pack("<IHH", seqid, kcp_wire.FEC_TYPE_DATA, 2 + len(kcp)) + kcp
    assert kcp_wire.parse_datagram(kcp_wire.encode_datagram(shard, crypt), crypt) == kcp_wire.Inbound(kcp, conv)
    parity = struct.pack("<IHH", seqid, kcp_wire.FEC_TYPE_PARITY, 0) + bytes(len(kcp))
    assert kcp_wire.parse_datagram(kcp_wire.encode_datagram(parity, crypt), crypt) == kcp_wire.Inbound(b"", None)


def test_truncated_fec_data_shard_is_dropped():
    shard = struct.pack("<IHH", 1, kcp_wire.FEC_TYPE_DATA, 30) + b"\x00" * 20
    assert kcp_wire.parse_datagram(shard, False) is None


@given(convs, st.binary(max_size=23))
def test_trailing_bytes_shorter_than_a_header_are_ignored(conv, tail):
    headers = kcp_wire.parse_segments(segment(conv, data=b"abc") + tail)
    assert [h.length for h in headers] == [3]


def test_insane_segments_are_rejected():
    good = segment(5, data=b"hello")
    assert kcp_wire.parse_segments(good) is not None
    assert kcp_wire.parse_segments(segment(5, cmd=80)) is None  # unknown command
    assert kcp_wire.parse_segments(segment(5, data=b"hi", length=3)) is None  # length overruns
    assert kcp_wire.parse_segments(segment(5, cmd=CMD_ACK, data=b"x")) is None  # ACK with data
    assert kcp_wire.parse_segments(good + segment(6)) is None  # two convs
    assert kcp_wire.parse_segments(b"") is None


def test_only_push_sn_zero_opens_a_session():
    assert kcp_wire.opens_session(segment(9, sn=0, data=b"hello"))
    assert kcp_wire.opens_session(segment(9, CMD_ACK, sn=4) + segment(9, sn=0))
    assert not kcp_wire.opens_session(segment(9, sn=1, data=b"late"))
    assert not kcp_wire.opens_session(segment(9, CMD_ACK, sn=0))
    assert not kcp_wire.opens_session(segment(9, cmd=99, sn=0))
