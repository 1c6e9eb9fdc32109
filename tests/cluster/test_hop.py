"""The node-to-node hop signature: accepted once fresh and exact, refused otherwise."""

import pytest

from tun2g.cluster.hop import HopRefused, sign, verify

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


SECRET = b"cluster-secret"
REQUEST = dict(method="GET", host="app.test", target="/x?y=1", request_id="r1", forwarded_for="10.0.0.9")


def signed(**changes):
    fields = dict(REQUEST, **changes)
    return sign(SECRET, origin="node-a", timestamp=1000, **fields)


def test_a_fresh_exact_signature_is_accepted():
    hop = verify(SECRET, signed(), now=1010, **REQUEST)
    assert (hop.origin, hop.timestamp) == ("node-a", 1000)


@pytest.mark.parametrize("field,value", [("method", "POST"), ("host", "evil.test"), ("target", "/admin"),
                                         ("request_id", "r2"), ("forwarded_for", "1.2.3.4")])
def test_any_changed_field_breaks_the_signature(field, value):
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(SECRET, signed(), now=1000, **dict(REQUEST, **{field: value}))


def test_another_secret_is_refused():
    with pytest.raises(HopRefused, match="bad hop signature"):
        verify(b"other", signed(), now=1000, **REQUEST)


def test_a_stale_or_future_timestamp_is_refused():
    with pytest.raises(HopRefused, match="clock"):
        verify(SECRET, signed(), now=1031, **REQUEST)
    with pytest.raises(HopRefused, match="clock"):
        verify(SECRET, signed(), now=969, **REQUEST)


@pytest.mark.parametrize("value", ["", "v1", "v2;node=a;ts=1000;sig=00", "v1;node=a;ts=x;sig=00", "v1;ts=1000;sig=0"])
def test_malformed_headers_are_refused(value):
    with pytest.raises(HopRefused):
        verify(SECRET, value, now=1000, **REQUEST)


def test_a_node_without_secret_accepts_nothing_and_cannot_sign():
    with pytest.raises(HopRefused, match="no cluster secret"):
        verify(b"", signed(), now=1000, **REQUEST)
    with pytest.raises(ValueError):
        sign(b"", origin="a", timestamp=1, **REQUEST)
