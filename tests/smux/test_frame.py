"""The smux frame codec: header bytes, the incremental decoder and its error cases."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.smux.frame import (
    FIN, NOP, PSH, SYN, UPD, Frame, FrameDecoder, ProtocolError, decode_frames, encode_frame,
    encode_header, encode_update,
)

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_header_bytes_match_the_captures():
    # docs/protocol.md#frame-header example headers, taken from real Go traffic.
    assert encode_frame(1, SYN, 3) == bytes.fromhex("0100000003000000")
    assert encode_header(1, PSH, 22, 3) == bytes.fromhex("0102160003000000")
    assert encode_frame(1, FIN, 3) == bytes.fromhex("0101000003000000")
    assert encode_frame(1, NOP, 0) == bytes.fromhex("0103000000000000")
    assert encode_update(2, 3, 22, 2097152) == bytes.fromhex("02040800030000001600000000002000")


def test_update_values_wrap_to_uint32():
    assert encode_update(2, 5, 2**32 + 7, 65536)[8:12] == (7).to_bytes(4, "little")


def test_oversized_payload_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        encode_frame(1, PSH, 3, b"x" * 65536)


def test_decoder_streams_a_large_payload_in_pieces():
    decoder = FrameDecoder(1)
    wire = encode_frame(1, PSH, 7, b"a" * 65535)
    first = decoder.feed(wire[:1000])
    second = decoder.feed(wire[1000:])
    assert [(cmd, sid, len(piece), done) for cmd, sid, piece, done in first + second] == [
        (PSH, 7, 992, False), (PSH, 7, 65535 - 992, True)]
    assert not decoder.in_frame
    assert decoder.headers_decoded == 1


def test_zero_length_push_is_one_empty_complete_event():
    assert decode_frames(encode_frame(1, PSH, 9)) == [Frame(1, PSH, 9, b"")]


def test_automatic_version_adopts_the_first_header_and_then_insists():
    decoder = FrameDecoder(None)
    decoder.feed(encode_frame(2, NOP, 0))
    assert decoder.version == 2
    decoder.feed(encode_frame(1, NOP, 0))
    assert "version byte 1 where 2 was expected" in str(decoder.error)


@pytest.mark.parametrize("wire, message", [
    (encode_frame(2, SYN, 3), "version byte 2 where 1 was expected"),
    (encode_header(1, 5, 0, 3), "unknown command 5"),
    (encode_update(1, 3, 0, 0), "UPD frame on a version-1 session"),
    (encode_header(1, SYN, 4, 3) + b"abcd", "SYN frame with length 4"),
    (encode_header(1, FIN, 1, 3) + b"a", "FIN frame with length 1"),
    (encode_header(1, NOP, 2, 0) + b"ab", "NOP frame with length 2"),
])
def test_malformed_headers_are_protocol_errors(wire, message):
    decoder = FrameDecoder(1)
    events = decoder.feed(encode_frame(1, SYN, 5) + wire + encode_frame(1, FIN, 5))
    assert events == [(SYN, 5, None, True)]  # what came before is kept, nothing after
    assert message in str(decoder.error)
    with pytest.raises(ProtocolError):
        decoder.feed(b"")


def test_update_with_wrong_length_on_v2():
    decoder = FrameDecoder(2)
    decoder.feed(encode_header(2, UPD, 4, 3) + b"\0" * 4)
    assert "UPD frame with length 4 (must be 8)" in str(decoder.error)


def test_garbage_version_on_an_automatic_decoder():
    decoder = FrameDecoder(None)
    decoder.feed(b"GET / HTTP/1.1\r\n")
    assert "version byte 71 where 1 or 2 was expected" in str(decoder.error)
    assert decoder.version is None


def test_truncated_input_is_reported():
    decoder = FrameDecoder(1)
    decoder.feed(encode_frame(1, PSH, 3, b"abc")[:-1])
    assert decoder.in_frame
    with pytest.raises(ProtocolError, match="ends inside a frame"):
        decode_frames(encode_header(1, PSH, 3, 3))


def _frames(version):
    sid = st.integers(0, 2**32 - 1)
    return st.lists(st.one_of(
        st.builds(Frame, st.just(version), st.sampled_from([SYN, FIN, NOP]), sid),
        st.builds(Frame, st.just(version), st.just(PSH), sid, st.binary(max_size=300)),
        st.builds(lambda s, c, w: Frame(version, UPD, s, encode_update(version, s, c, w)[8:]),
                  sid, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    ) if version == 2 else st.one_of(
        st.builds(Frame, st.just(version), st.sampled_from([SYN, FIN, NOP]), sid),
        st.builds(Frame, st.just(version), st.just(PSH), sid, st.binary(max_size=300)),
    ), max_size=30)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), version=st.sampled_from([1, 2]), auto=st.booleans())
def test_any_frame_sequence_survives_any_rechunking(data, version, auto):
    frames = data.draw(_frames(version))
    wire = b"".join(frame.encode() for frame in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=40)))
    decoder = FrameDecoder(None if auto else version)
    decoded, payload = [], bytearray()
    for start, stop in zip([0] + cuts, cuts + [len(wire)]):
        for cmd, sid, value, complete in decoder.feed(wire[start:stop]):
            if cmd == PSH:
                payload += value
                if complete:
                    decoded.append(Frame(version, PSH, sid, bytes(payload)))
                    payload.clear()
            elif cmd == UPD:
                decoded.append(Frame(version, UPD, sid, encode_update(version, sid, *value)[8:]))
            else:
                decoded.append(Frame(version, cmd, sid))
    assert decoder.error is None and not decoder.in_frame
    assert decoded == frames
    assert decoder.headers_decoded == len(frames)
