"""Hostile bytes on the tun2 control stream: the Auth reader and the reply decoder refuse cleanly, within limits.

Before a client has proven anything, whatever it writes may only end in an
Auth or an AuthFormatError: never another exception, never more than the size
limit buffered. A longer run: `TUN2G_FUZZ_EXAMPLES=50000 python3 -m pytest tests/test_fuzz_control.py`.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tun2g.control import MAX_AUTH_SIZE, Auth, AuthFormatError, JSONObjectReader, decode_reply, parse_auth

pytestmark = pytest.mark.pure

FUZZ = settings(max_examples=int(os.environ.get("TUN2G_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4),
                            max_leaves=30)


def _read(pieces: list[bytes]) -> Auth | None:
    reader = JSONObjectReader(MAX_AUTH_SIZE)
    for piece in pieces:
        obj = reader.feed(piece)
        if obj is not None:
            return parse_auth(obj)
    return None


@FUZZ
@given(st.lists(st.binary(max_size=600), max_size=30))
def test_arbitrary_bytes_give_an_auth_nothing_yet_or_a_clean_refusal(pieces):
    try:
        _read(pieces)
    except AuthFormatError:
        pass


@FUZZ
@given(_json_values, st.integers(1, 64))
def test_any_json_value_split_anywhere_gives_an_auth_or_a_clean_refusal(value, split):
    wire = json.dumps(value).encode()
    try:
        auth = _read([wire[i:i + split] for i in range(0, len(wire), split)])
    except AuthFormatError:
        return
    if auth is not None:
        assert isinstance(value, dict) and value.get("token") == auth.token and value.get("domain") == auth.domain


@pytest.mark.parametrize("depth", [100, 1_500, 100_000])
def test_deeply_nested_auth_json_is_a_clean_refusal(depth):
    with pytest.raises(AuthFormatError):
        _read([b'{"token":' + b"[" * depth + b"]" * depth + b', "domain": "a"}'])


@FUZZ
@given(st.binary(max_size=200))
def test_any_reply_line_decodes_or_is_a_clean_refusal(line):
    try:
        reply = decode_reply(line)
    except AuthFormatError:
        return
    assert isinstance(reply["ok"], bool)
