"""The sans-I/O parser over bytes: any split of the wire gives the same messages; errors map to statuses."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.http import CHUNKED, UNTIL_CLOSE, HTTPError
from tun2g.http.parser import CLOSED, END, HeadEvent, MessageParser, Upgraded

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
HEADERS = st.lists(st.tuples(TOKEN.map(lambda t: "X-" + t), VALUE), max_size=6)
BODY = st.binary(max_size=3000)


@st.composite
def requests(draw):
    """(wire bytes, expected (method, target, headers, body)) of one request, Content-Length or chunked."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]))
    target = "/" + draw(TOKEN)
    headers = [("Host", "h.test")] + draw(HEADERS)
    body = draw(BODY)
    chunked = draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 700), max_size=8))
        wire_body, rest = b"", body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                wire_body += b"%x\r\n%b\r\n" % (len(piece), piece)
        if rest:
            wire_body += b"%X\r\n%b\r\n" % (len(rest), rest)
        wire_body += b"0\r\n\r\n"
    elif body or method in ("POST", "PUT"):
        headers.append(("Content-Length", str(len(body))))
        wire_body = body
    else:
        body = wire_body = b""
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + wire_body, (method, target, headers, body)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def messages_of(parser: MessageParser, pieces: list[bytes], eof: bool = True):
    """Feed pieces (then EOF) and fold the events into [(head, framing, body)], plus the last event."""
    for piece in pieces:
        parser.receive_data(piece)
    if eof:
        parser.receive_data(b"")
    out, last = [], None
    for event in parser.events:
        if type(event) is HeadEvent:
            out.append([event.head, event.framing, b""])
        elif type(event) is bytes:
            out[-1][2] += event
        last = event
    return out, last


@settings(max_examples=150, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4), st.lists(st.integers(0, 100_000), max_size=12))
def test_pipelined_requests_parse_the_same_however_the_bytes_are_split(reqs, cuts):
    wire = b"".join(data for data, _ in reqs)
    messages, last = messages_of(MessageParser(True), split(wire, cuts))
    assert last is CLOSED
    assert len(messages) == len(reqs)
    for (head, framing, body), (_, (method, target, headers, expected_body)) in zip(messages, reqs):
        assert (head.method, head.target, head.version, head.headers) == (method, target, "HTTP/1.1", headers)
        assert body == expected_body
        assert framing == (CHUNKED if head.chunked else len(expected_body))


@st.composite
def responses(draw):
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    headers = draw(HEADERS)
    body = b"" if status in (204, 304) else draw(BODY)
    chunked = draw(st.booleans())
    if chunked and status not in (204, 304):
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        wire_body = body
    head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + wire_body, (status, headers, body)


@settings(max_examples=150, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=4), BODY, st.lists(st.integers(0, 100_000), max_size=12))
def test_keep_alive_responses_then_one_until_close_parse_the_same_however_split(resps, tail_body, cuts):
    tail = b"HTTP/1.0 200 OK\r\nX-Last: 1\r\n\r\n" + tail_body
    wire = b"".join(data for data, _ in resps) + tail
    messages, last = messages_of(MessageParser(False), split(wire, cuts))
    assert last is CLOSED
    assert len(messages) == len(resps) + 1
    for (head, _, body), (_, (status, headers, expected)) in zip(messages, resps):
        assert (head.status, head.reason, head.headers, body) == (status, "Whatever", headers, expected)
    head, framing, body = messages[-1]
    assert (head.version, framing, body) == ("HTTP/1.0", UNTIL_CLOSE, tail_body)


def feed(is_request, data, method="GET", eof=False):
    parser = MessageParser(is_request)
    parser.request_method = method
    parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    return list(parser.events)


def test_interim_responses_come_before_the_final_one():
    events = feed(False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    statuses = [e.head.status for e in events if type(e) is HeadEvent]
    assert statuses == [100, 103, 200]
    assert events[-2:] == [b"ok", END]


def test_head_response_has_no_body_despite_content_length_and_parser_restarts():
    parser = MessageParser(False)
    parser.request_method = "HEAD"
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [type(e) for e in parser.events] == [HeadEvent, type(END)]
    assert parser.events[0].keep_alive and parser.events[0].framing == 0
    parser.events.clear()
    parser.request_method = "GET"
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert list(parser.events)[1:] == [b"abc", END]


def test_head_response_followed_by_stray_bytes_is_not_reusable():
    events = feed(False, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody", method="HEAD")
    assert not events[0].keep_alive and events[1] is END


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    events = feed(False, b"HTTP/1.1 %d X\r\nContent-Length: 9\r\n\r\n" % status)
    assert events[0].framing == 0 and events[1:] == [END]


def test_upgrade_request_yields_raw_rest():
    events = feed(True, b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert events[0].upgrade and events[1] is END and events[2] == Upgraded(b"\x81\x05hello")


def test_switching_protocols_response_yields_raw_rest():
    events = feed(False, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW")
    assert events[0].upgrade and events[0].head.status == 101 and events[2] == Upgraded(b"RAW")


def test_upgrade_request_with_a_body_is_declined_and_parsed_as_plain_http():
    events = feed(True, b"POST / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
    assert not events[0].upgrade and events[0].framing == CHUNKED
    assert events[1:3] == [b"abc", END] and events[3].head.target == "/next"


def error_of(events) -> HTTPError:
    assert isinstance(events[-1], HTTPError), events
    return events[-1]


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
])
def test_bad_requests_map_to_statuses(data, status):
    assert error_of(feed(True, data)).status == status


def test_oversized_head_is_refused_before_it_completes():
    parser = MessageParser(True, max_head_size=1000)
    for _ in range(3):
        parser.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 400)
    assert error_of(list(parser.events)).status == 431 and parser.finished
    parser.receive_data(b"more")  # ignored once finished
    assert len(parser.events) == 1


def test_small_head_within_limit_after_a_large_body_in_the_same_feed_is_accepted():
    body = b"b" * 5000
    data = b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + body + b"GET /2 HTTP/1.1\r\nX: y\r\n\r\n"
    parser = MessageParser(True, max_head_size=1000)
    parser.receive_data(data)
    assert [e.head.target for e in parser.events if type(e) is HeadEvent] == ["/", "/2"]


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a",
    b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
])
def test_eof_inside_a_request_is_an_error(data):
    assert error_of(feed(True, data, eof=True)).status == 400


def test_eof_between_messages_is_clean():
    events = feed(True, b"GET / HTTP/1.1\r\n\r\n", eof=True)
    assert events[-2:] == [END, CLOSED]


def test_error_after_a_good_message_keeps_the_good_one_first():
    events = feed(True, b"GET /ok HTTP/1.1\r\n\r\nNOT HTTP\r\n\r\n")
    assert events[0].head.target == "/ok" and events[1] is END and error_of(events).status == 400


def test_http10_request_keep_alive_and_version():
    events = feed(True, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert events[0].head.version == "HTTP/1.0" and events[0].keep_alive
    assert not feed(True, b"GET / HTTP/1.0\r\n\r\n")[0].keep_alive


def test_chunked_trailers_do_not_leak_into_the_head():
    events = feed(True, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\nHost: evil\r\nX-Trailer: t\r\n\r\n")
    assert events[0].head.headers == [("Host", "h"), ("Transfer-Encoding", "chunked")]
    assert events[1:] == [b"abc", END]
