"""Hostile bytes at the smux layer: whatever a peer sends, the pure state machine refuses cleanly and stays bounded.

Random and mutated frame streams go into `SessionState.receive`: the only
failure it may report is a ProtocolError (in `Received.error`, never raised),
and, read the way the session's reader reads (it stops while the budget is
spent), what it holds for unread streams stays within the budget plus one read.
A longer run: `TUN2G_FUZZ_EXAMPLES=50000 python3 -m pytest tests/smux/test_fuzz.py`.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tun2g.smux.config import Config
from tun2g.smux.frame import FIN, NOP, PSH, SYN, UPD, ProtocolError, encode_frame, encode_update
from tun2g.smux.state import SessionState

pytestmark = pytest.mark.pure

# A bounded run in CI; TUN2G_FUZZ_EXAMPLES=50000 for a long one.
FUZZ = settings(max_examples=int(os.environ.get("TUN2G_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

BUDGET = 64 * 1024
READ_SIZE = 4096


def _frames(version: int):
    sid = st.integers(0, 12)
    frame = st.one_of(
        st.builds(lambda s: encode_frame(version, SYN, s), sid),
        st.builds(lambda s, n: encode_frame(version, PSH, s, b"x" * n), sid, st.integers(0, 3000)),
        st.builds(lambda s: encode_frame(version, FIN, s), sid),
        st.just(encode_frame(version, NOP, 0)),
        st.builds(lambda s, a, b: encode_update(version, s, a, b), sid, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        st.binary(max_size=16),  # junk between frames
    )
    return st.lists(frame, max_size=80).map(b"".join)


def _held(state: SessionState) -> int:
    return sum(stream.buffered for stream in state.streams.values())


@FUZZ
@given(data=st.data(), version=st.sampled_from([1, 2]), client=st.booleans())
def test_any_byte_stream_is_refused_cleanly_and_held_within_the_budget(data, version, client):
    state = SessionState(Config(version=version, max_receive_buffer=BUDGET), client)
    wire = data.draw(_frames(version))
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(0, 8))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    position = 0
    while position < len(mutated) and state.budget > 0:  # the reader pauses once the budget is spent
        step = data.draw(st.integers(1, READ_SIZE))
        result = state.receive(bytes(mutated[position:position + step]))
        position += step
        assert result.error is None or isinstance(result.error, ProtocolError)
        assert _held(state) <= BUDGET + READ_SIZE, "held more than the budget plus one read"
        if result.error is not None:
            break
