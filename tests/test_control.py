"""The control stream's wire forms, sans I/O: the bounded JSON object reader and Auth's encoding."""

import json

import pytest

from tun2g.control import Auth, AuthFormatError, JSONObjectReader

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_json_reader_handles_braces_inside_strings():
    reader = JSONObjectReader(limit=1000)
    assert reader.feed(b'{"token": "a}b{\\"c", ') is None
    assert reader.feed(b'"domain": "d"}') == {"token": 'a}b{"c', "domain": "d"}


def test_json_reader_rejects_garbage_before_object():
    with pytest.raises(AuthFormatError):
        JSONObjectReader(limit=1000).feed(b"GET / HTTP/1.1\r\n")


def test_auth_wire_form_matches_go_json_marshal():
    assert Auth("tok1", "lb.test").encode() == b'{"token":"tok1","domain":"lb.test"}'
    assert json.loads(Auth("t", "d").encode()) == {"token": "t", "domain": "d"}


def test_auth_extension_routes_and_instance_round_trip_and_go_form_is_unchanged():
    from tun2g.control import parse_auth

    auth = Auth("t", "example.com", tun2g=1, routes=("example.com/api", "*.example.com"), instance="box-1")
    wire = json.loads(auth.encode())
    assert wire == {"token": "t", "domain": "example.com", "tun2g": 1,
                    "routes": ["example.com/api", "*.example.com"], "instance": "box-1"}
    assert parse_auth(wire) == auth
    assert parse_auth({"token": "t", "domain": "d"}) == Auth("t", "d")  # a Go client's Auth
    assert parse_auth({"token": "t", "domain": "d", "routes": ["a", "a", "b"]}).routes == ("a", "b")


@pytest.mark.parametrize("fields", [
    {"routes": "example.com"}, {"routes": [1]}, {"routes": [["x"]]}, {"routes": ["r"] * 33},
    {"instance": ""}, {"instance": "a b"}, {"instance": "x" * 65}, {"instance": 7}, {"instance": "é"},
])
def test_a_malformed_auth_extension_is_refused(fields):
    from tun2g.control import parse_auth

    with pytest.raises(AuthFormatError):
        parse_auth({"token": "t", "domain": "d", **fields})


def test_the_ping_encoder_writes_what_encode_event_writes():
    from tun2g.control import PING, encode_event, encode_ping

    for seq in (0, 1, 15, 2**31, 10**18):
        assert encode_ping(seq) == encode_event(PING, seq=seq)
