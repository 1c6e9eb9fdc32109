"""Forwarding headers from the public are not believed: X-Forwarded-*, Forwarded, X-Real-IP.

A visitor may lie in every header. (The backend sees X-Forwarded-For as
"<visitor>, <tun2g server>": the tunnel client adds the hop it received the
request from, as Go's ReverseProxy does.) Only a configured trusted proxy (a balancer
in front, `--trusted-proxy CIDR`) may say who the client is; and no visitor can
make the proxy's own headers vanish by naming them in Connection. A caller may
choose its request id (as Heroku's router allows) only as a plain token.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.fixtures.tunnel import DOMAIN, _start

SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "bank.example"),
    ("Forwarded", "for=6.6.6.6;proto=https"), ("X-Real-IP", "6.6.6.6"), ("X-Request-Id", "chosen-by-visitor"),
]


@pytest.mark.parametrize("request_id", ["<script>alert(1)</script>", "a" * 129, "two words", "x\ty"])
def test_a_request_id_that_is_no_plain_token_is_replaced(connected, request_id):
    seen, response_headers = _seen_by_backend(connected, [("X-Request-Id", request_id)])
    assert seen["X-Request-Id"] != request_id and len(seen["X-Request-Id"]) == 32
    assert response_headers["X-Request-Id"] == seen["X-Request-Id"]


def _raw_get(http_address, headers: list[tuple[str, str]], path: str = "/headers") -> tuple[str, dict, bytes]:
    """Send one GET with exactly these headers; returns (status line, response headers, body)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {DOMAIN}", *(f"{name}: {value}" for name, value in headers),
             "Connection: close" if not any(n.lower() == "connection" for n, _ in headers) else "", "", ""]
    request = "\r\n".join(line for line in lines[:-2] if line) + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", http_address[1]), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    return status, dict(line.split(": ", 1) for line in header_lines), body


def _seen_by_backend(deployment, headers) -> tuple[dict, dict]:
    status, response_headers, body = _raw_get(deployment.running.http_address, headers)
    assert status.startswith("HTTP/1.1 200"), status
    return json.loads(body)["headers"], response_headers


@pytest.fixture
def connected(plain_deployment, backend, start_client):
    url, _app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    return plain_deployment


def test_a_visitor_cannot_choose_its_address_scheme_or_host(connected):
    seen, response_headers = _seen_by_backend(connected, SPOOFED)
    assert seen["X-Forwarded-For"] == "127.0.0.1, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == DOMAIN
    assert "Forwarded" not in seen and "X-Real-Ip" not in seen
    assert seen["X-Request-Id"] == "chosen-by-visitor" == response_headers["X-Request-Id"]


@pytest.mark.parametrize("named", ["X-Forwarded-For, X-Request-Id", "x-forwarded-proto, X-FORWARDED-HOST",
                                   "keep-alive, X-Forwarded-For"])
def test_naming_the_proxy_headers_in_connection_does_not_remove_them(connected, named):
    seen, _ = _seen_by_backend(connected, [("Connection", f"close, {named}")])
    assert seen["X-Forwarded-For"] == "127.0.0.1, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http" and seen["X-Forwarded-Host"] == DOMAIN
    assert len(seen["X-Request-Id"]) == 32


def test_a_header_the_visitor_names_in_connection_is_removed_but_not_framing_or_host(connected):
    seen, _ = _seen_by_backend(connected, [("Connection", "close, X-Private, Host, Content-Length"),
                                           ("X-Private", "hop-only"), ("X-Public", "end-to-end")])
    assert "X-Private" not in seen and seen["X-Public"] == "end-to-end"
    assert seen["Host"] == DOMAIN


@pytest.fixture
def behind_a_trusted_balancer(tmp_path, data_dir, backend, start_client):
    deployment = _start(tmp_path, data_dir, plain=True, trusted_proxies=("127.0.0.0/8",))
    url, _app = backend
    start_client(deployment.client_config(deployment.grant(), url))
    yield deployment
    deployment.running.stop()


def test_a_trusted_proxy_speaks_for_its_client(behind_a_trusted_balancer):
    seen, response_headers = _seen_by_backend(behind_a_trusted_balancer, SPOOFED)
    assert seen["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https" and seen["X-Forwarded-Host"] == "bank.example"
    assert seen["Forwarded"] == "for=6.6.6.6;proto=https" and seen["X-Real-Ip"] == "6.6.6.6"
    assert seen["X-Request-Id"] == "chosen-by-visitor" == response_headers["X-Request-Id"]


def test_a_bad_trusted_proxy_value_is_refused_naming_the_flag():
    from click.testing import CliRunner

    from tun2g.cli import main

    result = CliRunner().invoke(main, ["server", "--trusted-proxy", "10.0.0.0/8x"])
    assert result.exit_code == 2
    assert "--trusted-proxy" in result.output and "10.0.0.0/8x" in result.output
    assert "Traceback" not in result.output


def test_behind_a_trusted_proxy_the_client_address_is_its_last_untrusted_hop(behind_a_trusted_balancer):
    from tun2g.http import RequestHead

    pipeline = behind_a_trusted_balancer.server.pipeline
    head = RequestHead("GET", "/", "HTTP/1.1", [("Host", DOMAIN), ("X-Forwarded-For", "6.6.6.6, 203.0.113.9"),
                                               ("X-Forwarded-For", "127.0.0.5")])
    assert pipeline.client_address(head, "127.0.0.1") == "203.0.113.9"
    assert pipeline.client_address(head, "198.51.100.1") == "198.51.100.1"  # an untrusted peer speaks for itself


def test_login_limits_count_a_bare_address_and_an_ipv6_one_by_their_own_bucket():
    from tun2g.server.login_limit import source_key

    assert source_key("203.0.113.9") == source_key("203.0.113.9:5555") == "203.0.113.9"
    assert source_key("2001:db8::1") == source_key("2001:db8::2:4444") == "2001:db8::/64"
