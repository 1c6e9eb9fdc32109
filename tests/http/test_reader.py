"""MessageReader over a real socket pair: body pieces, non-blocking takes, raw bytes after a protocol switch."""

import socket

import pytest

from tun2g.http import CHUNKED, SMALL_BODY, HTTPError, MessageReader, fed_response_ready


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_body_pieces_respect_max_chunk_and_end_is_seen_with_the_last_piece(pair):
    ours, theirs = pair
    theirs.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789GET /next HTTP/1.1\r\n\r\n")
    reader = MessageReader(ours)
    head = reader.read_request_head()
    assert head.method == "POST" and reader.framing == 10 and not reader.body_complete
    assert reader.read_body(max_chunk=4) == b"0123"
    assert reader.read_body(max_chunk=4) == b"4567"
    assert reader.read_body(max_chunk=4) == b"89" and reader.body_complete
    assert reader.read_body() == b""
    assert reader.read_request_head().target == "/next" and reader.body_complete and reader.idle
    theirs.close()
    assert reader.read_request_head() is None and reader.messages_read == 2


def test_take_ready_body_never_waits(pair):
    ours, theirs = pair
    theirs.sendall(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n")
    reader = MessageReader(ours)
    reader.read_request_head()
    assert reader.framing == CHUNKED
    assert reader.take_ready_body() == b"abcde" and not reader.body_complete
    assert reader.take_ready_body() == b""  # nothing more has arrived: returns at once
    theirs.sendall(b"0\r\n\r\n")
    assert reader.read_body() == b"" and reader.body_complete


def test_reading_the_next_head_before_the_body_is_a_programming_error(pair):
    ours, theirs = pair
    theirs.sendall(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    reader = MessageReader(ours)
    reader.read_request_head()
    with pytest.raises(RuntimeError, match="body"):
        reader.read_request_head()


def test_raw_bytes_after_an_upgrade_are_handed_over(pair):
    ours, theirs = pair
    theirs.sendall(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw-bytes")
    reader = MessageReader(ours)
    reader.read_request_head()
    assert reader.upgrade and reader.body_complete and reader.switched_protocols
    assert reader.take_buffered() == b"raw-bytes" and reader.take_buffered() == b""
    with pytest.raises(HTTPError):
        reader.read_request_head()


def test_truncated_response_body_raises_and_interim_heads_are_returned(pair):
    ours, theirs = pair
    theirs.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    theirs.close()
    reader = MessageReader(ours)
    assert reader.read_response_head("POST").status == 100 and reader.body_complete
    assert reader.read_response_head("POST").status == 200
    assert reader.read_body() == b"abc"
    with pytest.raises(HTTPError, match="before the end"):
        reader.read_body()


def test_response_on_a_closed_connection_raises(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(HTTPError, match="closed before a response"):
        MessageReader(ours).read_response_head("GET")


class _Unread:
    """A socket that must never be read: a fed reader answers from what it was fed."""

    def recv(self, size):
        raise AssertionError("read the socket although the message was fed whole")

    def settimeout(self, timeout):
        pass


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("cut", range(1, len(RESPONSE)))
def test_a_fed_response_is_complete_only_once_whole_and_is_then_read_without_the_socket(cut):
    reader = MessageReader(_Unread())
    reader.expect_response("GET")
    reader.feed(RESPONSE[:cut])
    assert not reader.complete
    head_parsed = reader.next_event is not None
    assert head_parsed == (cut >= RESPONSE.index(b"\r\n\r\n") + 4)
    reader.feed(RESPONSE[cut:])
    assert reader.complete
    head = reader.read_final_response_head("GET")
    assert head.status == 200 and reader.take_ready_body() == b"hello" and reader.body_complete
    assert reader.idle and reader.next_event is None


@pytest.mark.parametrize("cut", range(RESPONSE.index(b"\r\n\r\n") + 4, len(RESPONSE)))
def test_a_fed_response_cut_by_eof_is_complete_but_not_whole_so_no_callback_waits_on_it(cut):
    # The bug this catches: a body cut by EOF left `complete` false for ever, and a callback reader
    # (which sees the fd readable again and again at EOF) waited on it, spinning.
    reader = MessageReader(_Unread())
    reader.expect_response("GET")
    reader.feed(RESPONSE[:cut])
    assert not reader.complete and fed_response_ready(reader) is None
    reader.feed(b"")
    assert reader.complete and not reader.whole
    assert fed_response_ready(reader) is False  # handed to the greenlet relay, which reports the cut


def test_fed_response_ready_takes_only_small_final_framed_responses():
    def verdict(data: bytes, method: str = "GET"):
        reader = MessageReader(_Unread())
        reader.expect_response(method)
        reader.feed(data)
        return fed_response_ready(reader)

    assert verdict(RESPONSE) is True
    assert verdict(b"HTTP/1.1 204 No Content\r\n\r\n") is True
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD") is True
    assert verdict(b"HTTP/1.1 100 Continue\r\n\r\n") is False  # interim: the greenlet relays it
    assert verdict(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n") is False
    assert verdict(b"HTTP/1.0 200 OK\r\n\r\nuntil close") is False
    assert verdict(f"HTTP/1.1 200 OK\r\nContent-Length: {SMALL_BODY + 1}\r\n\r\n".encode()) is False
    assert verdict(f"HTTP/1.1 200 OK\r\nContent-Length: {SMALL_BODY}\r\n\r\n".encode()) is None
    assert verdict(b"garbage\r\n\r\n") is False
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Le") is None


def test_a_fed_reader_reports_bytes_past_the_response_errors_and_the_end():
    junk = MessageReader(_Unread())
    junk.expect_response("GET")
    junk.feed(RESPONSE + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nevil")  # a second answer, unasked
    assert junk.complete
    junk.read_final_response_head("GET")
    assert junk.take_ready_body() == b"hello" and not junk.idle  # the pool must not keep this connection
    broken = MessageReader(_Unread())
    broken.expect_response("GET")
    broken.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert broken.complete and isinstance(broken.next_event, HTTPError)
    with pytest.raises(HTTPError):
        broken.read_final_response_head("GET")
    closed = MessageReader(_Unread())
    closed.expect_response("GET")
    closed.feed(b"")
    assert closed.complete  # EOF before any response: the reader raises it as a 502's cause
    with pytest.raises(HTTPError):
        closed.read_final_response_head("GET")


def test_a_reader_fed_before_any_read_reads_requests_and_a_head_response_has_no_body():
    requests = MessageReader(_Unread())
    requests.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert requests.read_request_head().target == "/a" and requests.body_complete
    assert requests.next_event is not None  # the pipelined one, already parsed
    assert requests.read_request_head().target == "/b"
    head = MessageReader(_Unread())
    head.expect_response("HEAD")
    head.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert head.complete and head.read_final_response_head("HEAD").get("Content-Length") == "5"
    assert head.body_complete and head.idle
