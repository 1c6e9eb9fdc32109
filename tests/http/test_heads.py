"""Header records, hop-by-hop policy and encoders, over plain values and bytes."""

import pytest

from tun2g.http import (HTTPError, RequestHead, ResponseHead, encode_chunk, encode_request_head,
                        encode_response_head, simple_response, strip_hop_by_hop)
from tun2g.http.parser import END, MessageParser

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def parse_one(is_request: bool, data: bytes, method: str = "GET"):
    parser = MessageParser(is_request)
    parser.request_method = method
    parser.receive_data(data)
    head_event = parser.events.popleft()
    body = b"".join(e for e in parser.events if type(e) is bytes)
    return head_event, body, list(parser.events)


def test_header_lookup_is_case_insensitive_and_keeps_order_and_case():
    head = RequestHead("GET", "/", "HTTP/1.1", [("Host", "a.test"), ("X-A", "1"), ("x-a", "2")])
    assert head.get("HOST") == "a.test" and head.host == "a.test"
    assert head.get("x-A") == "1" and head.get_all("X-a") == ["1", "2"]
    assert head.get("missing", "dflt") == "dflt"
    head.set("X-A", "3")
    assert head.headers == [("Host", "a.test"), ("X-A", "3")]
    head.add("X-A", "4")
    head.set("New", "n")
    assert head.headers[-2:] == [("X-A", "4"), ("New", "n")]
    head.remove("x-a")
    assert head.headers == [("Host", "a.test"), ("New", "n")]


def test_keep_alive_follows_version_and_connection_tokens():
    assert RequestHead("GET", "/", "HTTP/1.1", []).keep_alive
    assert not RequestHead("GET", "/", "HTTP/1.1", [("Connection", "foo, Close")]).keep_alive
    assert not RequestHead("GET", "/", "HTTP/1.0", []).keep_alive
    assert RequestHead("GET", "/", "HTTP/1.0", [("Connection", "Keep-Alive")]).keep_alive
    assert not ResponseHead(200, "OK", "HTTP/1.0", []).keep_alive


def test_framing_and_intent_properties():
    head = RequestHead("POST", "/", "HTTP/1.1", [("Content-Length", "12"), ("Expect", "100-Continue")])
    assert head.content_length == 12 and not head.chunked and head.expects_continue
    head = RequestHead("POST", "/", "HTTP/1.1", [("Transfer-Encoding", "gzip, Chunked")])
    assert head.chunked and head.content_length is None
    upgrade = RequestHead("GET", "/", "HTTP/1.1", [("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket")])
    assert upgrade.wants_upgrade
    assert not RequestHead("GET", "/", "HTTP/1.1", [("Upgrade", "websocket")]).wants_upgrade


def test_strip_hop_by_hop_drops_standard_and_connection_named_fields():
    head = RequestHead("GET", "/", "HTTP/1.1", [
        ("Host", "a"), ("Connection", "close, X-Secret"), ("Keep-Alive", "5"), ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
        ("Proxy-Connection", "k"), ("Trailer", "t"), ("x-secret", "s"), ("Content-Length", "3"), ("Accept", "*/*")])
    strip_hop_by_hop(head)
    assert head.headers == [("Host", "a"), ("Content-Length", "3"), ("Accept", "*/*")]


def test_plain_connection_options_are_dropped_without_naming_other_fields():
    head = RequestHead("GET", "/", "HTTP/1.1", [("Close", "c"), ("Connection", "Close"), ("Keep-Alive", "5"),
                                                 ("connection", "keep-alive"), ("User-Agent", "u")])
    strip_hop_by_hop(head)
    assert head.headers == [("Close", "c"), ("User-Agent", "u")]


def test_append_to_merges_every_value_and_lists_the_new_one_last():
    head = RequestHead("GET", "/", "HTTP/1.1", [("X-Forwarded-For", "1.1.1.1"), ("Host", "a"),
                                                 ("x-forwarded-for", "2.2.2.2")])
    head.append_to("X-Forwarded-For", "3.3.3.3")
    assert head.headers == [("Host", "a"), ("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 3.3.3.3")]
    head = RequestHead("GET", "/", "HTTP/1.1", [("Host", "a")])
    head.append_to("X-Forwarded-For", "3.3.3.3")
    assert head.get("x-forwarded-for") == "3.3.3.3"


def test_parsed_keep_alive_follows_the_connection_header():
    cases = [("HTTP/1.1", "close", False), ("HTTP/1.1", "Close", False), ("HTTP/1.1", "keep-alive", True),
             ("HTTP/1.0", "keep-alive", True), ("HTTP/1.0", "Keep-Alive", True), ("HTTP/1.0", None, False),
             ("HTTP/1.1", "X-Foo, close", False), ("HTTP/1.0", "X-Foo, keep-alive", True), ("HTTP/1.1", None, True)]
    for version, connection, keep_alive in cases:
        line = f"Connection: {connection}\r\n" if connection else ""
        event, _, _ = parse_one(True, f"GET / {version}\r\nHost: a\r\n{line}\r\n".encode())
        assert event.keep_alive == keep_alive, (version, connection)


def test_encoded_request_head_parses_back_as_http11_with_framing_lines():
    head = RequestHead("PUT", "/a?b=c", "HTTP/1.0", [("Host", "h"), ("X-Odd", "caf\xe9")])
    data = encode_request_head(head, chunked=True, connection="close")
    assert data.startswith(b"PUT /a?b=c HTTP/1.1\r\n") and data.endswith(b"\r\n\r\n")
    event, _, _ = parse_one(True, data + b"0\r\n\r\n")
    assert event.head.headers == [("Host", "h"), ("X-Odd", "caf\xe9"), ("Transfer-Encoding", "chunked"),
                                  ("Connection", "close")]
    assert event.framing == -1 and not event.keep_alive


def test_encoded_response_head_without_headers_and_with_default_reason():
    assert encode_response_head(ResponseHead(204, "", "HTTP/1.1", [])) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert encode_response_head(ResponseHead(299, "", "HTTP/1.1", [])) == b"HTTP/1.1 299 Unknown\r\n\r\n"


def test_encode_chunk_frames_hex_length():
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_simple_response_is_complete_and_parseable():
    data = simple_response(502, b"gone\n", headers=[("X-Request-Id", "r1")], close=True)
    event, body, rest = parse_one(False, data)
    assert event.head.status == 502 and event.head.reason == "Bad Gateway" and body == b"gone\n"
    assert event.head.get("x-request-id") == "r1" and not event.keep_alive and rest[-1] is END
    assert simple_response(200, b"", version="HTTP/1.0").startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Connection: keep-alive" in simple_response(200, b"", version="HTTP/1.0")


def test_http_error_carries_status_and_message():
    error = HTTPError(431, "too big")
    assert error.status == 431 and error.message == "too big" and "431" in str(error)
