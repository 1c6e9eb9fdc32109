"""The policy ground floor, socket-free: units, CIDR lists, credentials, header rules, buckets, the parser."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings, strategies as st

from tun2g.policy import (AddressRules, Credentials, HeaderRules, KeyedBuckets, Policy, PolicyError, TokenBucket,
                          hash_bearer, hash_password, lease_size, parse_authorization, parse_network, retry_after)
from tun2g.policy.headers import PROTECTED, HeaderRuleError
from tun2g.policy.units import UnitError, parse_duration, parse_rate, parse_size

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("text, size", [("512", 512), ("16K", 16384), ("10M", 10 << 20), ("1g", 1 << 30),
                                        ("2KiB", 2048), (7, 7)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("500ms", 0.5), ("2m", 120), ("1.5", 1.5), (3, 3)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, rate", [("10/s", 10), ("600/m", 10), ("5/10s", 0.5), ("3600/h", 1), (2, 2)])
def test_rates(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("parse, bad", [(parse_size, "0"), (parse_size, "-1"), (parse_size, "10X"), (parse_size, True),
                                        (parse_duration, "0s"), (parse_duration, "soon"), (parse_duration, float("nan")),
                                        (parse_rate, "0/s"), (parse_rate, "ten"), (parse_rate, "1/0s")])
def test_bad_units_are_refused(parse, bad):
    with pytest.raises(UnitError):
        parse(bad)


@given(st.text(max_size=40))
def test_unit_parsers_never_fail_otherwise(text):
    for parse in (parse_size, parse_duration, parse_rate):
        try:
            parse(text)
        except UnitError:
            pass


def test_address_rules_v4_v6_deny_beats_allow_and_mapped_addresses():
    rules = AddressRules([parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")], [parse_network("10.6.0.0/16")])
    assert rules.admits("10.1.2.3") and rules.admits("2001:db8::1") and rules.admits("::ffff:10.1.2.3")
    assert not rules.admits("10.6.1.1") and not rules.admits("192.0.2.1") and not rules.admits("not an ip")
    assert AddressRules([], [parse_network("::1")]).admits("garbage")  # deny-only: nothing to match
    for _ in range(3):
        assert not rules.admits("10.6.1.1")  # cached verdicts agree


def test_address_rules_ignore_an_ipv6_zone():
    rules = AddressRules([parse_network("fe80::/10")], [parse_network("fe80::dead/128")])
    assert rules.admits("fe80::1%eth0") and rules.admits("fe80::1%2")
    assert not rules.admits("fe80::dead%eth0")
    assert not rules.admits("2001:db8::1%eth0") and not rules.admits("%eth0") and not rules.admits("10.0.0.1%x")


def test_address_cache_is_bounded():
    rules = AddressRules([parse_network("10.0.0.0/8")])
    for index in range(10000):
        rules.admits(f"192.0.{index // 256 % 256}.{index % 256}")
    assert len(rules._known) <= 4096


def test_authorization_parsing_of_hostile_values():
    good = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    assert parse_authorization(good) == ("basic", "alice", "pa:ss")
    assert parse_authorization("Bearer abc") == ("bearer", "abc", "")
    for value in ("", "Basic", "Basic ###", "Basic " + base64.b64encode(b"\xff:x").decode(), "Bearer a b",
                  "Basic " + base64.b64encode(b":pw").decode(), "Negotiate x", "Bearer " + "x" * 5000):
        assert parse_authorization(value) is None, value


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_authorization_parser_never_raises(value):
    parse_authorization(value)


def test_credentials_hashed_checked_and_verdicts_bounded():
    stored = hash_password("pw")
    assert "pw" not in stored.split("$")
    credentials = Credentials({"alice": stored}, frozenset({hash_bearer("tok")}))
    basic = "Basic " + base64.b64encode(b"alice:pw").decode()
    assert credentials.admits(basic) and credentials.admits("Bearer tok")
    assert not credentials.admits("Bearer tok2") and not credentials.admits(None)
    assert not credentials.admits("Basic " + base64.b64encode(b"mallory:pw").decode())
    for index in range(5000):
        credentials.admits(f"Bearer junk{index}")
    assert len(credentials._verdicts) <= 4096
    assert credentials.admits(basic)


def test_header_rules_apply_and_refuse_injection_and_protected_names():
    rules = HeaderRules.build({"X-A": "1"}, ["x-b"])
    assert rules.apply([("x-a", "old"), ("X-B", "2"), ("X-C", "3")]) == [("X-C", "3"), ("X-A", "1")]
    for value in ("a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", " edge"):
        with pytest.raises(HeaderRuleError):
            HeaderRules.build({"X-A": value}, [])
    for name in sorted(PROTECTED) + ["X-Tun2g-Anything", "Bad Name", "A:B", ""]:
        with pytest.raises(HeaderRuleError):
            HeaderRules.build({name: "v"}, [])
        with pytest.raises(HeaderRuleError):
            HeaderRules.build({}, [name])


def test_token_bucket_and_keyed_buckets():
    bucket = TokenBucket(2.0, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert retry_after(0.01) == 1 and retry_after(1.2) == 2
    keyed = KeyedBuckets(1.0, 1, max_keys=10)
    for index in range(50):
        keyed.get(str(index), 0.0)
    assert len(keyed) == 10
    assert lease_size(10, 10, 0.1) == 1 and lease_size(1000, 1000, 0.1) == 100 and lease_size(1000, 5, 0.1) == 5


def test_policy_errors_name_the_source_and_the_key():
    cases = {"rate": "ten", "allow": ["10.0.0.0/33"], "basic_auth": {"alice": "plain"}, "bearer": ["nohash"],
             "max_body": "big", "timeout": -1, "error_pages": {"200": "x"}, "request_headers": {"set": {"Host": "x"}},
             "colour": "red", "burst": 0}
    for key, value in cases.items():
        data = {key: value, "rate": "1/s"} if key == "burst" else {key: value}
        with pytest.raises(PolicyError) as caught:
            Policy.from_mapping(data, "tun2g.toml")
        assert caught.value.key == key and str(caught.value).startswith(f"tun2g.toml: {key}: ")
    with pytest.raises(PolicyError):
        Policy.from_mapping(["not", "a", "table"], "x")  # type: ignore[arg-type]


def test_error_page_files_are_read_through_the_callers_io():
    policy = Policy.from_mapping({"error_page_files": {"502": "down.html"}}, "t", read_file=lambda path: f"<{path}>")
    assert policy.error_pages == {502: "<down.html>"}
    with pytest.raises(PolicyError):
        Policy.from_mapping({"error_page_files": {"502": "down.html"}}, "t")


_HEADER_NAME = st.from_regex(r"X-[A-Za-z0-9]{1,10}", fullmatch=True)
_HEADER_VALUE = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9 ;=/.,-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_POLICIES = st.fixed_dictionaries({}, optional={
    "allow": st.lists(st.sampled_from(["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "::1"]), max_size=4),
    "deny": st.lists(st.sampled_from(["10.6.0.0/16", "fe80::/10"]), max_size=2),
    "max_body": st.integers(1, 1 << 40), "max_head": st.sampled_from(["16K", "1M", 4000]),
    "timeout": st.floats(0.001, 3600), "rate": st.floats(0.01, 10000), "rate_per_ip": st.sampled_from(["5/s", "60/m"]),
    "bearer": st.lists(st.text(min_size=1, max_size=10).map(hash_bearer), max_size=3),
    "request_headers": st.fixed_dictionaries({"set": st.dictionaries(_HEADER_NAME, _HEADER_VALUE, max_size=3),
                                              "remove": st.lists(_HEADER_NAME, max_size=3)}),
    "error_pages": st.dictionaries(st.sampled_from(["401", "403", "429", "502"]), st.text(max_size=50), max_size=2),
})


@settings(max_examples=200, deadline=None)
@given(_POLICIES)
def test_as_mapping_round_trips(data):
    policy = Policy.from_mapping(data, "gen")
    again = Policy.from_mapping(policy.as_mapping(), "again")
    assert again.as_mapping() == policy.as_mapping()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["rate", "allow", "max_body", "timeout", "request_headers", "error_pages",
                                        "bearer", "basic_auth", "burst"]),
                       st.one_of(st.none(), st.text(max_size=10), st.integers(), st.floats(), st.lists(st.text(max_size=5)),
                                 st.dictionaries(st.text(max_size=5), st.text(max_size=5))), max_size=4))
def test_the_parser_raises_only_policy_errors(data):
    try:
        Policy.from_mapping(data, "fuzz")
    except PolicyError:
        pass
