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
