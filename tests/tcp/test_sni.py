"""The ClientHello SNI and ALPN peek: real hellos from Python's ssl, fragmented records, hostile and random input."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.tcp.sni import MAX_HELLO_SIZE, MAX_RECORDS_SIZE, ClientHelloError, peek_server_name

pytestmark = pytest.mark.pure


@functools.lru_cache(maxsize=None)
def real_hello(name: str | None = "db.example.com", alpn: tuple[str, ...] = ()) -> bytes:
    """What Python's ssl sends first (made once per name: a handshake start costs milliseconds)."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake completed without a server")


def _records(handshake: bytes, sizes: list[int]) -> bytes:
    """The handshake bytes split into TLS records of the given sizes (the rest in one last record)."""
    out, offset = b"", 0
    for size in sizes + [len(handshake)]:
        piece = handshake[offset:offset + size]
        if not piece:
            break
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
        offset += len(piece)
    return out


def _hello(extensions: bytes, *, suites: bytes = b"\x13\x01", compression: bytes = b"\x00") -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + len(suites).to_bytes(2, "big") + suites
    body += len(compression).to_bytes(1, "big") + compression + len(extensions).to_bytes(2, "big") + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _sni(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes((kind,)) + len(name).to_bytes(2, "big") + name for kind, name in names)
    data = len(entries).to_bytes(2, "big") + entries
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


def test_a_real_hello_gives_its_name_and_every_prefix_asks_for_more():
    hello = real_hello()
    assert peek_server_name(hello).server_name == "db.example.com"
    for cut in range(len(hello)):
        peek = peek_server_name(hello[:cut])
        assert not peek.complete and cut < peek.needed <= len(hello)


def test_a_hello_without_sni_is_complete_with_no_name():
    assert peek_server_name(real_hello(None)) .server_name is None
    bare = _hello(b"")[:-2]  # no extensions block at all (TLS 1.2 allows it)
    bare = b"\x01" + (len(bare) - 4).to_bytes(3, "big") + bare[4:]
    assert peek_server_name(_records(bare, [])).server_name is None


@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40))
@settings(max_examples=200, deadline=None)
def test_a_hello_fragmented_over_many_records_is_reassembled(sizes):
    handshake = real_hello()[5:]
    assert peek_server_name(_records(handshake, sizes)).server_name == "db.example.com"


def _alpn(*names: bytes, list_length: int | None = None) -> bytes:
    entries = b"".join(len(name).to_bytes(1, "big") + name for name in names)
    length = len(entries) if list_length is None else list_length
    data = length.to_bytes(2, "big") + entries
    return b"\x00\x10" + len(data).to_bytes(2, "big") + data


def test_a_real_hello_gives_its_alpn_protocols_in_order():
    assert peek_server_name(real_hello()).alpn == ()
    peek = peek_server_name(real_hello("shop.example", ("acme-tls/1",)))
    assert peek.server_name == "shop.example" and peek.alpn == (b"acme-tls/1",)
    assert peek_server_name(real_hello("shop.example", ("h2", "http/1.1"))).alpn == (b"h2", b"http/1.1")


@given(st.lists(st.binary(min_size=1, max_size=255), min_size=1, max_size=20), st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_alpn_list_is_read_back_with_or_before_the_name(names, alpn_first):
    sni, alpn = _sni((0, b"a.example")), _alpn(*names)
    peek = peek_server_name(_records(_hello(alpn + sni if alpn_first else sni + alpn), []))
    assert peek.server_name == "a.example" and peek.alpn == tuple(names)


ACME_ENTRY = b"\x0aacme-tls/1"


def test_parse_only_if_skips_a_hello_without_the_bytes_and_reads_one_with_them():
    skipped = peek_server_name(real_hello(), parse_only_if=ACME_ENTRY)
    assert skipped.complete and not skipped.parsed and skipped.alpn == () and skipped.server_name is None
    read = peek_server_name(real_hello("shop.example", ("acme-tls/1",)), parse_only_if=ACME_ENTRY)
    assert read.parsed and read.alpn == (b"acme-tls/1",) and read.server_name == "shop.example"
    hello = real_hello("shop.example", ("acme-tls/1",))
    for cut in range(len(hello)):
        assert not peek_server_name(hello[:cut], parse_only_if=ACME_ENTRY).complete


@given(st.lists(st.integers(min_value=1, max_value=16), max_size=60))
@settings(max_examples=200, deadline=None)
def test_parse_only_if_finds_the_bytes_across_record_boundaries(sizes):
    handshake = real_hello("shop.example", ("acme-tls/1",))[5:]
    peek = peek_server_name(_records(handshake, sizes), parse_only_if=ACME_ENTRY)
    assert peek.parsed and peek.alpn == (b"acme-tls/1",)


def test_names_are_lower_cased_and_lose_a_trailing_dot():
    assert peek_server_name(_records(_hello(_sni((0, b"DB.Example.COM."))), [])).server_name == "db.example.com"


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n\r\n", "no TLS handshake"),
    (b"\x16\x02\x00\x00\x10" + b"\x00" * 16, "not a TLS record"),
    (b"\x16\x03\x01\x00\x00", "empty"),
    (b"\x16\x03\x01\xff\xff", "exceed"),                                # a huge record: refused at once
    (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "ClientHello of"),          # a huge hello length
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),       # a ServerHello
    (_records(_hello(_sni((0, b"a.example"), (0, b"b.example"))), []), "more than one host_name"),
    (_records(_hello(_sni((0, b"a.example")) + _sni((0, b"b.example"))), []), "twice"),
    (_records(_hello(_sni((0, b"bad name!"))), []), "not a host name"),
    (_records(_hello(_sni((0, b"10.0.0.1:443"))), []), "not a host name"),
    (_records(_hello(_sni((0, "bücher.example".encode()))), []), "not ASCII"),
    (_records(_hello(b"", suites=b"\x13\x01\x13"), []), "odd"),
    (_records(_hello(_alpn()), []), "bad length"),                     # RFC 7301: at least one protocol
    (_records(_hello(_alpn(b"")), []), "bad length"),                  # ... and no empty name
    (_records(_hello(_alpn(b"h2", list_length=9)), []), "ends early"),
    (_records(_hello(_alpn(b"h2", list_length=2)), []), "stray bytes"),
    (_records(_hello(_alpn(b"h2") + _alpn(b"acme-tls/1")), []), "twice"),
    (_records(_hello(b"", compression=b""), []), "bad length"),
    (_records(_hello(b"\x00\x00\x00\x09\x00"), []), "ends early"),
    (_records(_hello(b""), [10])[:15] + b"\x17\x03\x03\x00\x01\x00", "non-handshake"),
])
def test_hostile_input_is_refused_with_a_reason(data, why):
    with pytest.raises(ClientHelloError, match=why):
        peek_server_name(data)


def test_limits_are_those_documented():
    assert MAX_HELLO_SIZE == 16384 and MAX_RECORDS_SIZE < 17000


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_raise_anything_but_a_client_hello_error(data):
    try:
        peek = peek_server_name(data)
    except ClientHelloError:
        return
    assert peek.complete or peek.needed > len(data)
    assert peek.needed <= MAX_RECORDS_SIZE


@given(st.integers(min_value=0, max_value=600), st.binary(min_size=1, max_size=8))
@settings(max_examples=500, deadline=None)
@pytest.mark.parametrize("alpn", [(), ("acme-tls/1",), ("h2", "http/1.1")])
def test_a_real_hello_with_bytes_flipped_is_refused_or_read_never_crashes(alpn, position, junk):
    hello = bytearray(real_hello("db.example.com", alpn))
    position %= len(hello)
    hello[position:position + len(junk)] = junk
    try:
        full = peek_server_name(bytes(hello))
    except ClientHelloError:
        return
    skipped = peek_server_name(bytes(hello), parse_only_if=ACME_ENTRY)  # the same bytes, or not parsed
    assert skipped == full or (not skipped.parsed and b"acme-tls/1" not in full.alpn)
