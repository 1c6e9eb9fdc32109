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


SENT = [("Host", "a.test"), ("x-forwarded-for", "1.1.1.1"), ("X-Forwarded-Proto", "http"), ("X-Tun2g-Hop", "forged"),
        ("X-Forwarded-Host", "orig.test"), ("X-Request-Id", "theirs"), ("X-Forwarded-For", "2.2.2.2, 3.3.3.3"),
        ("Forwarded", "for=1.1.1.1"), ("X-Real-IP", "1.1.1.1")]


def test_from_a_trusted_proxy_forwarded_for_is_extended_and_proto_host_kept_but_the_hop_header_dropped():
    head = RequestHead("GET", "/", "HTTP/1.1", list(SENT))
    prepare_request(head, request_id="r2", peer_ip="10.0.0.9", scheme="https", trusted=True)
    assert head.get_all("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]
    assert head.get_all("X-Forwarded-Proto") == ["http"] and head.get_all("X-Forwarded-Host") == ["orig.test"]
    assert head.get("Forwarded") == "for=1.1.1.1" and head.get("X-Real-IP") == "1.1.1.1"
    assert head.get_all("X-Request-Id") == ["r2"] and head.get("X-Tun2g-Hop") is None


def test_from_a_public_peer_every_forwarding_header_is_ours():
    head = RequestHead("GET", "/", "HTTP/1.1", list(SENT))
    prepare_request(head, request_id="r3", peer_ip="10.0.0.9", scheme="https")
    assert head.headers == [("Host", "a.test"), ("X-Forwarded-For", "10.0.0.9"), ("X-Forwarded-Proto", "https"),
                            ("X-Forwarded-Host", "a.test"), ("X-Request-Id", "r3")]


def test_connection_keeps_its_options_and_loses_the_names_it_listed():
    head = RequestHead("GET", "/", "HTTP/1.1", [("Host", "a.test"), ("Connection", "Upgrade, X-Forwarded-For, X-Hop"),
                                                ("Upgrade", "websocket"), ("X-Hop", "1"), ("Content-Length", "0")])
    prepare_request(head, request_id="r4", peer_ip="10.0.0.9", scheme="http")
    assert head.get("Connection") == "Upgrade" and head.get("Upgrade") == "websocket" and head.get("X-Hop") is None
    assert head.get("X-Forwarded-For") == "10.0.0.9" and head.get("Content-Length") == "0"


def test_a_connection_header_naming_framing_or_host_leaves_them():
    head = RequestHead("POST", "/", "HTTP/1.1", [("Host", "a.test"), ("Connection", "close, Content-Length, Host"),
                                                 ("Content-Length", "5")])
    prepare_request(head, request_id="r5", peer_ip="10.0.0.9", scheme="http")
    assert head.get("Content-Length") == "5" and head.get("Host") == "a.test" and head.get("Connection") == "close"



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
