"""The public front's request preparation: proxy headers, and request ids (unique, uuid-sized, per worker)."""

import os
import re

import pytest

from tun2g.server.pipeline import prepare_request
from tun2g.requestid import new_request_id
from tun2g.http import RequestHead

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_prepare_request_adds_the_proxy_headers():
    head = RequestHead("GET", "/", "HTTP/1.1", [("Host", "a.test"), ("Accept", "*/*")])
    prepare_request(head, request_id="r1", peer_ip="10.0.0.9", scheme="https")
    assert head.headers == [("Host", "a.test"), ("Accept", "*/*"), ("X-Forwarded-For", "10.0.0.9"),
                            ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "a.test"), ("X-Request-Id", "r1")]


def test_prepare_request_extends_forwarded_for_keeps_sent_proto_and_host_and_drops_the_hop_header():
    head = RequestHead("GET", "/", "HTTP/1.1", [
        ("Host", "a.test"), ("x-forwarded-for", "1.1.1.1"), ("X-Forwarded-Proto", "http"), ("X-Tun2g-Hop", "forged"),
        ("X-Forwarded-Host", "orig.test"), ("X-Request-Id", "theirs"), ("X-Forwarded-For", "2.2.2.2, 3.3.3.3")])
    prepare_request(head, request_id="r2", peer_ip="10.0.0.9", scheme="https")
    assert head.get_all("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]
    assert head.get_all("X-Forwarded-Proto") == ["http"] and head.get_all("X-Forwarded-Host") == ["orig.test"]
    assert head.get_all("X-Request-Id") == ["r2"] and head.get("X-Tun2g-Hop") is None


def test_request_ids_are_unique_32_hex_digits():
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)


def test_a_forked_worker_draws_its_own_prefix():
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave without running pytest's teardown
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    parent_id = new_request_id()
    assert len(child_id) == 32
    assert child_id[:20] != parent_id[:20]
