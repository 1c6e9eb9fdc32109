"""Property tests (hypothesis) over the sans-I/O pieces: head parser, header rules, path confinement,
Auth JSON reader, domain normaliser. Bounded (deadline, example counts) to run in a few seconds in CI;
for a longer run: HYPOTHESIS_PROFILE=long python3 -m pytest tests/http/test_fuzz.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tun2g.control import AuthFormatError, JSONObjectReader
from tun2g.http.heads import HTTPError, PROTECTED, forwardable_headers
from tun2g.http.parser import END, HeadEvent, MessageParser
from tun2g.http.pool import BackendPool, remove_dot_segments
from tun2g.storage import StorageError, normalize_domain

pytestmark = pytest.mark.pure

settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
NAMES = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "X-A", "Upgrade", "TE",
                         "Keep-Alive", "Cookie", "X-Forwarded-For"]) | TOKEN
VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30).map(str.strip)


def events_of(data: bytes, pieces: list[int]) -> list:
    parser = MessageParser(True)
    offset = 0
    for size in pieces:
        if offset + size >= len(data):
            break
        parser.receive_data(data[offset:offset + size])  # never b"" here: that is EOF
        offset += size
    if not parser.finished and offset < len(data):
        parser.receive_data(data[offset:])
    return list(parser.events)


def outcome(events: list) -> list[str]:
    """The events as they mean: a body split across reads comes as several pieces, joined here."""
    joined: list = []
    for event in events:
        if type(event) is bytes and joined and type(joined[-1]) is bytes:
            joined[-1] += event
        else:
            joined.append(event)
    return [repr(event) for event in joined]


@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=12))
def test_the_request_parser_never_raises_on_arbitrary_bytes(data, pieces):
    for event in events_of(data, pieces):  # only events: heads, bodies, markers, HTTPError instances
        assert isinstance(event, (HeadEvent, bytes, HTTPError)) or event in (END,) or repr(event) in (
            "CLOSED",) or type(event).__name__ == "Upgraded"


METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS"])
TARGETS = st.sampled_from(["/", "/a?b", "http://x.test/p", "HTTPS://y.test:8443", "*", "http://u@x/", "x",
                           "http:///nohost", "/%2e%2e/a"])


@given(METHODS, TARGETS, st.lists(st.tuples(NAMES, VALUES), max_size=8), st.binary(max_size=40),
       st.lists(st.integers(1, 32), max_size=6))
@example("GET", "http://x.test/p", [("Host", "00000"), ("Content-Length", "2"), ("000000000000", "000")],
         b"\x00\x00", [1, 1, 18, 32, 32])  # a body split across reads: two pieces, the same bytes (seen in CI)
def test_parsed_heads_are_origin_form_with_one_host_whatever_the_split(method, target, headers, tail, pieces):
    raw = f"{method} {target} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n" + tail
    whole = events_of(raw, [])
    split = events_of(raw, pieces)
    assert outcome(whole) == outcome(split)  # the split never changes the outcome
    for event in whole:
        if isinstance(event, HeadEvent):
            head = event.head
            assert head.target.startswith("/") or (head.target == "*" and head.method == "OPTIONS")
            assert len(head.get_all("host")) <= 1


@given(st.lists(st.tuples(NAMES, VALUES), max_size=12), st.lists(NAMES, max_size=5))
def test_forwardable_headers_keeps_framing_and_host_and_drops_hop_by_hop(headers, connection_names):
    given_headers = headers + [("Connection", ", ".join(connection_names))]
    kept = forwardable_headers(given_headers)
    kept_names = {name.lower() for name, _ in kept}
    for name, value in headers:
        if name.lower() in ("content-length", "host"):
            assert (name, value) in kept
    assert not kept_names & {"connection", "transfer-encoding", "te", "upgrade", "keep-alive", "trailer"}
    named = {n.lower() for n in connection_names} - PROTECTED - {"close", "keep-alive", "upgrade"}
    assert not kept_names & named
    assert all(name.lower() != "content-length" for name, _ in forwardable_headers(given_headers, keep_length=False))


SEGMENTS = st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", ".%2e", "%2f", "..%2f", "\\",
                                     "..;", "%252e%252e", "x.js", "%41"]), max_size=8)


@given(SEGMENTS, st.sampled_from(["http://b:1/public/", "http://b:1/public", "http://b:1/p/q/"]))
def test_join_path_never_leaves_the_prefix(segments, url):
    pool = BackendPool(url)
    target = "/" + "/".join(segments)
    try:
        joined = pool.join_path(target)
    except HTTPError as exc:
        assert exc.status == 400
        return
    prefix = pool.path_prefix.rstrip("/") + "/"
    normalised, climbed = remove_dot_segments(joined.split("?")[0].replace("%2E", ".").replace("%2e", "."))
    assert normalised.startswith(prefix) or normalised + "/" == prefix
    assert not climbed


@given(st.binary(max_size=300))
def test_the_auth_reader_only_returns_dicts_or_raises_auth_format_error(data):
    reader = JSONObjectReader(8192)
    try:
        value = reader.feed(data)
    except AuthFormatError:
        return
    assert value is None or isinstance(value, dict)


@given(st.integers(17, 3000), st.sampled_from([b"[", b"{\"a\":"]))
def test_the_auth_reader_refuses_any_deep_nesting(depth, opener):
    with pytest.raises(AuthFormatError):
        JSONObjectReader(1 << 20).feed(b'{"a":' + opener * depth)


LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"


@given(st.text(max_size=80))
def test_normalize_domain_output_is_strict_ldh_and_idempotent(text):
    try:
        domain = normalize_domain(text)
    except StorageError:
        return
    if domain.startswith("["):
        return
    assert len(domain) <= 253
    for label in domain.split("."):
        assert 1 <= len(label) <= 63 and set(label) <= set(LABEL_CHARS)
        assert not label.startswith("-") and not label.endswith("-")
    assert normalize_domain(domain) == domain


@given(st.lists(st.text(alphabet=LABEL_CHARS, min_size=1, max_size=10), min_size=1, max_size=4),
       st.sampled_from(["\n", "\r", "\t", "\x00", "\x7f", "\x85"]), st.integers(0, 40))
def test_normalize_domain_refuses_control_characters_anywhere(labels, control, where):
    name = ".".join(labels)
    where = min(where, len(name))
    with pytest.raises(StorageError):
        normalize_domain(name[:where] + control + name[where:])
