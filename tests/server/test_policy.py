"""Edge policy end to end: a real server, a real tunnel client and backend, requests and raw sockets as clients."""

from __future__ import annotations

import base64
import subprocess
import sys
import time

import pytest
import requests

from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import DOMAIN, wait_until
from tests.server.support import StuckBackend, connect, header, read_response, read_until_closed
from tun2g.policy import Policy, hash_bearer, hash_password

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def edge(plain_deployment, backend, start_client):
    """(deployment, set_policy(mapping), url): a tunnel for DOMAIN and a way to give it a policy at once."""
    url, _app = backend
    deployment = plain_deployment
    start_client(deployment.client_config(deployment.grant(), url))

    def set_policy(data: dict) -> None:
        deployment.storage.set_policy(DOMAIN, Policy.from_mapping(data, "test").as_mapping())
        deployment.server.policies.refresh(deployment.storage)

    return deployment, set_policy, deployment.http_url


def _get(url, path="/", **kwargs):
    headers = {"Host": DOMAIN, **kwargs.pop("headers", {})}
    return requests.get(url + path, headers=headers, timeout=10, **kwargs)


def test_basic_auth_401_without_credentials_and_200_with(edge):
    _deployment, set_policy, url = edge
    set_policy({"basic_auth": {"alice": hash_password("s3cret")}})
    refused = _get(url)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == f'Basic realm="{DOMAIN}"'
    assert refused.headers["X-Request-Id"] in refused.text
    assert _get(url, auth=("alice", "wrong")).status_code == 401
    assert _get(url, auth=("bob", "s3cret")).status_code == 401
    assert _get(url, auth=("alice", "s3cret")).status_code == 200


def test_bearer_token_and_malformed_authorization_headers(edge):
    _deployment, set_policy, url = edge
    set_policy({"bearer": [hash_bearer("a-long-random-bearer-token")]})
    assert _get(url, headers={"Authorization": "Bearer a-long-random-bearer-token"}).status_code == 200
    for value in ("Bearer", "Bearer wrong", "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode(),
                  "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Digest x", "Bearer " + "a" * 10000,
                  "Bearer a-long-random-bearer-token extra"):
        assert _get(url, headers={"Authorization": value}).status_code in (401, 431), value


def test_denied_address_and_a_spoofed_forwarded_for_get_403(edge):
    _deployment, set_policy, url = edge
    set_policy({"deny": ["127.0.0.0/8"]})
    assert _get(url).status_code == 403
    set_policy({"allow": ["10.0.0.0/8", "2001:db8::/32"]})
    # An untrusted peer claiming an allowed address: its X-Forwarded-For is not believed.
    spoofed = _get(url, headers={"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3", "Forwarded": "for=10.1.2.3"})
    assert spoofed.status_code == 403
    set_policy({"allow": ["127.0.0.0/8"]})
    assert _get(url).status_code == 200


def test_a_trusted_proxy_names_the_client(tmp_path, data_dir, backend, start_client):
    from tests.fixtures.tunnel import _start

    deployment = _start(tmp_path, data_dir, plain=True, trusted_proxies=("127.0.0.0/8",))
    try:
        start_client(deployment.client_config(deployment.grant(), backend[0]))
        deployment.storage.set_policy(DOMAIN, {"allow": ["10.0.0.0/8"]})
        deployment.server.policies.refresh(deployment.storage)
        assert _get(deployment.http_url, headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
        assert _get(deployment.http_url, headers={"X-Forwarded-For": "192.0.2.1"}).status_code == 403
    finally:
        deployment.running.stop()


def test_request_body_limit_413_for_content_length_and_cut_chunked(edge):
    deployment, set_policy, url = edge
    set_policy({"max_body": "1K"})
    assert requests.post(url + "/sink", data=b"x" * 1024, headers={"Host": DOMAIN}, timeout=10).status_code == 200
    assert requests.post(url + "/sink", data=b"x" * 1025, headers={"Host": DOMAIN}, timeout=10).status_code == 413
    port = deployment.running.http_address[1]
    with connect(port) as sock:
        sock.sendall(f"POST /sink HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(4):  # 400 bytes each: the limit passes within the third chunk
            sock.sendall(b"190\r\n" + b"y" * 400 + b"\r\n")
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    rid = header(data.partition(b"\r\n\r\n")[0], "X-Request-Id")
    assert rid and rid.encode() in data


def test_head_size_limit_431(edge):
    _deployment, set_policy, url = edge
    set_policy({"max_head": "1K"})
    assert _get(url).status_code == 200
    assert _get(url, headers={"X-Big": "z" * 2000}).status_code == 431


def test_route_timeout_504_from_a_hung_backend(plain_deployment, start_client):
    stuck = StuckBackend()
    try:
        deployment = plain_deployment
        start_client(deployment.client_config(deployment.grant(), stuck.url))
        deployment.storage.set_policy(DOMAIN, {"timeout": "0.5s"})
        deployment.server.policies.refresh(deployment.storage)
        started = time.monotonic()
        response = _get(deployment.http_url, "/hang")
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert 0.4 < elapsed < 5, elapsed  # the global response timeout is 60 s
    finally:
        stuck.stop()


def test_rate_limit_429_with_retry_after(edge):
    _deployment, set_policy, url = edge
    set_policy({"rate": "2/s", "burst": 3})
    statuses = [_get(url).status_code for _ in range(6)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:], statuses
    refused = _get(url)
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 2


def test_rate_limit_per_client_address(edge):
    _deployment, set_policy, url = edge
    set_policy({"rate_per_ip": "1/m", "burst_per_ip": 1})
    port = int(url.rsplit(":", 1)[1])
    from tests.server.support import get

    assert get(port, DOMAIN, source_ip="127.0.0.2")[0] == 200
    assert get(port, DOMAIN, source_ip="127.0.0.2")[0] == 429
    assert get(port, DOMAIN, source_ip="127.0.0.3")[0] == 200  # another address has its own bucket


def test_header_rules_both_ways_and_protected_headers_stay(edge):
    _deployment, set_policy, url = edge
    set_policy({"request_headers": {"set": {"X-Edge": "yes"}, "remove": ["X-Secret"]},
                "response_headers": {"set": {"Strict-Transport-Security": "max-age=60"}, "remove": ["X-Backend"]}})
    seen = _get(url, "/headers", headers={"X-Secret": "hide me", "X-Edge": "forged"})
    headers = seen.json()["headers"]
    assert headers["X-Edge"] == "yes" and "X-Secret" not in headers
    assert headers["X-Forwarded-For"].startswith("127.0.0.1")  # ours, as before (the client appends its own)
    plain = _get(url)
    assert plain.headers["Strict-Transport-Security"] == "max-age=60"
    assert "X-Backend" not in plain.headers and plain.headers["X-Request-Id"]


def test_custom_error_page_with_the_request_id(edge):
    _deployment, set_policy, url = edge
    set_policy({"deny": ["0.0.0.0/0", "::/0"], "error_pages": {"403": "<h1>Go away</h1><p>ref {{request_id}}</p>"}})
    refused = _get(url)
    assert refused.status_code == 403
    assert refused.text == f"<h1>Go away</h1><p>ref {refused.headers['X-Request-Id']}</p>"
    assert refused.headers["Content-Type"].startswith("text/html")


def test_the_cli_sets_a_policy_that_applies_within_a_second(edge, tmp_path):
    deployment, _set_policy, url = edge
    page = tmp_path / "401.html"
    page.write_text("<p>who are you? {{request_id}}</p>")
    argv = [sys.executable, "-m", "tun2g.cli", "policy", "set", DOMAIN, "--basic-auth", "alice:pw",
            "--error-page", f"401={page}", "--storage", deployment.storage_url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env_without_proxies())
    assert result.returncode == 0, result.stderr
    set_at = time.monotonic()
    wait_until(lambda: _get(url).status_code == 401, timeout=3, message="the new policy")
    assert time.monotonic() - set_at < 2.0  # polled every 0.5 s: within a second, with slack for a loaded CI
    assert "who are you?" in _get(url).text
    bad = subprocess.run(argv[:6] + ["--timeout", "soon", "--storage", deployment.storage_url],
                         capture_output=True, text=True, timeout=30, env=env_without_proxies())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--timeout" in bad.stderr
    rm = subprocess.run([sys.executable, "-m", "tun2g.cli", "policy", "rm", DOMAIN, "--storage",
                         deployment.storage_url], capture_output=True, text=True, timeout=30,
                        env=env_without_proxies())
    assert rm.returncode == 0
    wait_until(lambda: _get(url).status_code == 200, timeout=3, message="the policy removed")


def test_round_trip_front_applies_the_same_policy(edge):
    deployment, set_policy, _url = edge
    set_policy({"basic_auth": {"alice": hash_password("pw")}})
    session = requests.Session()
    session.mount("http://", deployment.server.adapter())
    assert session.get(f"http://{DOMAIN}/", timeout=10).status_code == 401
    assert session.get(f"http://{DOMAIN}/", auth=("alice", "pw"), timeout=10).status_code == 200


def test_many_policies_load_and_a_route_without_one_is_untouched(edge):
    deployment, set_policy, url = edge
    for index in range(300):
        deployment.storage.set_policy(f"site{index}.test", {"rate": "1/s", "deny": ["10.0.0.0/8"]})
    deployment.server.policies.refresh(deployment.storage)
    assert len(deployment.server.policies) == 300
    assert all(_get(url).status_code == 200 for _ in range(5))
