"""Certificates in both stores: stored, replaced, listed without keys, removed; the revision moves each time."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.certs import ThrowawayCA
from tun2g.storage.certificates import InvalidCertificate, candidate_names, certificate_info, normalize_cert_name


@pytest.fixture(scope="module")
def ca():
    return ThrowawayCA.create()


def test_store_replace_list_remove(storage_factory, ca):
    writer, reader = storage_factory(), storage_factory()  # two handles, as a command and a server would be
    before = reader.certificate_revision()
    first = certificate_info("App.Test", *ca.issue("app.test"), "static", time.time())
    writer.put_certificate(first)
    assert reader.certificate_revision() != before
    second = certificate_info("app.test", *ca.issue("app.test"), "node-b", time.time())
    writer.put_certificate(second)
    loaded = reader.load_certificates()
    assert [c.info.name for c in loaded] == ["app.test"]
    assert loaded[0].key_pem == second.key_pem and loaded[0].chain_pem == second.chain_pem
    [info] = reader.list_certificates()
    assert info == second.info and "key" not in str(info.as_json()).lower()
    revision = reader.certificate_revision()
    assert writer.remove_certificate("app.test") and not writer.remove_certificate("app.test")
    assert reader.certificate_revision() != revision and reader.list_certificates() == []


@pytest.mark.pure
def test_candidate_names_exact_then_one_label_wildcard():
    assert candidate_names("A.Example.COM.") == ("a.example.com", "*.example.com")
    assert candidate_names("example.com") == ("example.com",)  # no wildcard for a bare registered name
    assert candidate_names("") == ()


@pytest.mark.pure
@pytest.mark.parametrize("name", ["*", "*.", "a..b", "x" * 300, "**.a.com", "a.*.com"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidCertificate):
        normalize_cert_name(name)


@pytest.mark.pure
def test_a_wildcard_certificate_serves_a_name_under_it(ca):
    assert certificate_info("one.wild.test", *ca.issue("*.wild.test"), "static", 0).info.name == "one.wild.test"
    with pytest.raises(InvalidCertificate):
        certificate_info("two.one.wild.test", *ca.issue("*.wild.test"), "static", 0)
