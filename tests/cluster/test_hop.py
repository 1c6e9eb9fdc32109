"""The node-to-node hop signature: accepted once fresh, exact and addressed here, refused otherwise."""

import pytest

from tun2g.cluster.hop import HopRefused, NonceMemory, framing_of, sign, verify

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


SECRET = b"cluster-secret"
REQUEST = dict(method="GET", host="app.test", target="/x?y=1", request_id="r1", forwarded_for="10.0.0.9",
               framing="0")
NONCE = "0123456789abcdef0123456789abcdef"


def signed(**changes):
    fields = dict(REQUEST, **changes)
    return sign(SECRET, origin="node-a", to="node-b", timestamp=1_000_000, nonce=NONCE, **fields)


def test_a_fresh_exact_signature_is_accepted():
    hop = verify(SECRET, signed(), receiver="node-b", now=1005, **REQUEST)
    assert (hop.origin, hop.timestamp, hop.nonce) == ("node-a", 1_000_000, NONCE)


@pytest.mark.parametrize("field,value", [("method", "POST"), ("host", "evil.test"), ("target", "/admin"),
                                         ("request_id", "r2"), ("forwarded_for", "1.2.3.4"),
                                         ("framing", "17"), ("framing", "chunked")])
def test_any_changed_field_breaks_the_signature(field, value):
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(SECRET, signed(), receiver="node-b", now=1000, **dict(REQUEST, **{field: value}))


def test_a_changed_nonce_breaks_the_signature():
    tampered = signed().replace(f"nonce={NONCE}", "nonce=" + "f" * 32)
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(SECRET, tampered, receiver="node-b", now=1000, **REQUEST)


def test_a_hop_addressed_to_another_node_is_refused():
    with pytest.raises(HopRefused, match="addressed to node 'node-b'"):
        verify(SECRET, signed(), receiver="node-c", now=1000, **REQUEST)
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(SECRET, signed().replace("to=node-b", "to=node-c"), receiver="node-c", now=1000, **REQUEST)


def test_another_secret_is_refused():
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(b"other", signed(), receiver="node-b", now=1000, **REQUEST)


def test_a_stale_or_future_timestamp_is_refused():
    with pytest.raises(HopRefused, match="clock"):
        verify(SECRET, signed(), receiver="node-b", now=1010.5, **REQUEST)
    with pytest.raises(HopRefused, match="clock"):
        verify(SECRET, signed(), receiver="node-b", now=989.5, **REQUEST)


@pytest.mark.parametrize("value", ["", "v2", "v1;node=a;ts=1000;sig=00", f"v2;node=a;to=node-b;ts=x;nonce={NONCE};sig=0",
                                   "v2;node=a;to=node-b;ts=1000000;sig=00", "v3;node=a;to=node-b;ts=1;nonce=1;sig=0"])
def test_malformed_and_old_headers_are_refused(value):
    with pytest.raises(HopRefused):
        verify(SECRET, value, receiver="node-b", now=1000, **REQUEST)


def test_the_old_v1_format_is_refused_by_name():
    with pytest.raises(HopRefused, match="unsupported hop version 'v1'"):
        verify(SECRET, "v1;node=a;ts=1000;sig=00", receiver="node-b", now=1000, **REQUEST)


def test_a_node_without_secret_accepts_nothing_and_cannot_sign():
    with pytest.raises(HopRefused, match="no cluster secret"):
        verify(b"", signed(), receiver="node-b", now=1000, **REQUEST)
    with pytest.raises(ValueError):
        sign(b"", origin="a", to="b", timestamp=1, **REQUEST)


def test_each_signature_gets_its_own_nonce():
    one = sign(SECRET, origin="a", to="b", timestamp=1, **REQUEST)
    two = sign(SECRET, origin="a", to="b", timestamp=1, **REQUEST)
    assert one != two


def test_framing_names_the_body_length_or_chunked():
    assert framing_of(None, False) == framing_of(0, False) == "0"
    assert framing_of(12, False) == "12"
    assert framing_of(None, True) == "chunked"


def test_the_nonce_memory_accepts_each_nonce_once_within_its_window_and_stays_bounded():
    memory = NonceMemory(window=10, limit=4)
    assert memory.first_use("n1", now=0) and not memory.first_use("n1", now=19)
    assert memory.first_use("n1", now=21)  # past 2 x window: the timestamp check refuses it anyway
    for index, nonce in enumerate(("n2", "n3", "n4")):
        assert memory.first_use(nonce, now=22 + index)
    with pytest.raises(HopRefused, match="too many"):
        memory.first_use("n5", now=25)
    assert memory.first_use("n5", now=45) and len(memory) <= 4  # the expired ones were forgotten


def test_only_hops_signed_up_to_two_windows_after_the_memory_began_need_the_cluster_wide_check():
    memory = NonceMemory(window=10, started=1_000.0)
    assert memory.may_predate(990_000)  # signed before this process: an earlier one may have seen it
    assert memory.may_predate(1_019_999)  # the earlier process's clock may have run a window ahead
    assert not memory.may_predate(1_020_000)  # no earlier process could have accepted it
