"""The TCP stream preamble, the Auth's "tcp" field and the edge policy: pure codecs and hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.control import Auth, AuthFormatError, parse_auth
from tun2g.tcp.edge import AddressPolicy, ConnectionCap, PolicyError
from tun2g.tcp.wire import (HEADER_SIZE, KIND_TCP, KIND_TLS, MAX_SERVICES, Announcement, Preamble, PreambleError,
                            decode_preamble, is_preamble_start, parse_announcement, preamble_length)

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("preamble", [Preamble(KIND_TCP, port=2222, remote="203.0.113.5:4000"),
                                      Preamble(KIND_TLS, name="db.example.com", remote="[2001:db8::1]:443")])
def test_a_preamble_round_trips_and_never_looks_like_http(preamble):
    data = preamble.encode()
    assert is_preamble_start(data) and not is_preamble_start(b"GET / HTTP/1.1")
    assert preamble_length(data[:HEADER_SIZE]) == len(data)
    assert decode_preamble(data) == preamble


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n", "does not start"),
    (b"\x00t2g\x02\x01\x00\x02{}", "version 2"),
    (b"\x00t2g\x01\x09\x00\x02{}", "unknown stream kind"),
    (b"\x00t2g\x01\x01\xff\xff", "limit"),
    (b"\x00t2g\x01\x01\x00\x02[]", "object"),
    (b"\x00t2g\x01\x01\x00\x02{}", "not a TCP port"),
    (b"\x00t2g\x01\x01\x00\x0e{\"port\":70000}", "not a TCP port"),
    (b"\x00t2g\x01\x02\x00\x02{}", "needs a name"),
    (b"\x00t2g\x01\x01\x00\x03{\"p", "not JSON"),
])
def test_junk_preambles_are_refused(data, why):
    with pytest.raises(PreambleError, match=why):
        decode_preamble(data)


@given(st.binary(max_size=64))
@settings(max_examples=1000, deadline=None)
def test_random_preambles_raise_only_preamble_errors(data):
    try:
        decode_preamble(b"\x00t2g" + data)
    except PreambleError:
        pass


def test_the_auth_carries_the_announcement_only_for_tun2g_clients():
    auth = Auth("t", "app.test", tun2g=1, tcp=Announcement((2222, 0), ("db.example.com",)))
    assert parse_auth(json.loads(auth.encode())) == auth
    assert "tcp" not in json.loads(Auth("t", "app.test", tun2g=1).encode())
    with pytest.raises(AuthFormatError, match="tun2g extension"):
        parse_auth({"token": "t", "domain": "d", "tcp": {"ports": [22]}})


@pytest.mark.parametrize("value, why", [
    ([22], "must be an object"),
    ({"ports": 22}, "must be lists"),
    ({"ports": [22, 22]}, "twice"),
    ({"ports": [True]}, "not a TCP port"),
    ({"ports": [65536]}, "not a TCP port"),
    ({"ports": list(range(1, MAX_SERVICES + 2))}, "at most"),
    ({"names": [""]}, "host names"),
])
def test_bad_announcements_are_refused(value, why):
    with pytest.raises(PreambleError, match=why):
        parse_announcement(value)


def test_address_policy_deny_wins_and_an_allow_list_admits_only_its_blocks():
    policy = AddressPolicy.from_strings(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.9.0.0/16"])
    assert policy.admits("10.1.2.3") and policy.admits("2001:db8::7") and policy.admits("::ffff:10.1.2.3")
    assert not policy.admits("10.9.1.1") and not policy.admits("192.0.2.1") and not policy.admits("junk")
    assert AddressPolicy().admits("192.0.2.1")
    with pytest.raises(PolicyError, match="not a CIDR"):
        AddressPolicy.from_strings(allow=["10.0.0.0/33"])


def test_the_connection_cap_counts_per_key():
    cap = ConnectionCap(2)
    assert cap.acquire("a") and cap.acquire("a") and not cap.acquire("a") and cap.acquire("b")
    cap.release("a")
    assert cap.acquire("a") and cap.acquire("c", limit=1) and not cap.acquire("c", limit=1)
