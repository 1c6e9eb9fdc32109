"""Routing public requests through a tunnel: status passthrough, headers, the 502 page."""

import json
import socket
import subprocess

import gevent
import requests

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g import pages


def get(deployment, path="/", host=DOMAIN, **kwargs):
    headers = {"Host": host, **kwargs.pop("headers", {})}
    return requests.get(deployment.http_url + path, headers=headers, timeout=10, **kwargs)


def test_200_passes_through(tunnel):
    deployment, _app, _client = tunnel
    response = get(deployment)
    assert response.status_code == 200
    assert response.text == "hello from backend\n"
    assert response.headers["X-Backend"] == "test"


def test_500_passes_through(tunnel):
    deployment, _app, _client = tunnel
    response = get(deployment, "/status/500")
    assert response.status_code == 500 and response.text == "status 500\n"


def test_host_is_case_insensitive_and_port_ignored(tunnel):
    deployment, _app, _client = tunnel
    assert get(deployment, host="APP.Test").status_code == 200
    assert get(deployment, host="app.test:28080").status_code == 200


def test_backend_sees_original_host_and_forwarding_headers(tunnel):
    deployment, _app, _client = tunnel
    response = get(deployment, "/headers?x=1", headers={"X-Request-Id": "req-42", "User-Agent": "probe/1"})
    seen = response.json()
    headers = seen["headers"]
    assert headers["Host"] == DOMAIN
    assert headers["X-Forwarded-For"].startswith("127.0.0.1")
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == DOMAIN
    assert headers["X-Request-Id"] == "req-42"
    assert headers["User-Agent"] == "probe/1"
    assert seen["query"] == "x=1"
    assert response.headers["X-Request-Id"] == "req-42"


def test_request_id_generated_when_absent(tunnel):
    deployment, _app, _client = tunnel
    response = get(deployment, "/headers")
    generated = response.headers["X-Request-Id"]
    assert len(generated) >= 16
    assert response.json()["headers"]["X-Request-Id"] == generated


def test_no_backend_gives_the_original_502_page_without_echoing_secrets(plain_deployment):
    response = get(plain_deployment, host="nobody.test",
                   headers={"X-Request-Id": "abc", "Cookie": "session=secret", "Authorization": "Bearer x"})
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.content == pages.no_backends("nobody.test", "abc").body
    assert int(response.headers["Content-Length"]) == 175 + len("nobody.test") + len("abc")
    assert "Cookie" not in response.headers and "Authorization" not in response.headers
    assert "Set-Cookie" not in response.headers


def test_502_page_escapes_the_host(plain_deployment):
    response = get(plain_deployment, host="<script>x</script>")
    assert response.status_code == 502
    assert b"<script>" not in response.content


def test_curl_http_1_0_and_head(tunnel):
    deployment, _app, _client = tunnel
    out = subprocess.run(["curl", "-s", "-0", "-i", "-H", f"Host: {DOMAIN}", deployment.http_url + "/"],
                         capture_output=True, timeout=20, check=True).stdout
    assert out.startswith(b"HTTP/1.0 200") or out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b"hello from backend\n")
    head = subprocess.run(["curl", "-s", "-I", "-H", f"Host: {DOMAIN}", deployment.http_url + "/bytes/1000"],
                          capture_output=True, timeout=20, check=True).stdout
    assert b"200" in head.split(b"\r\n")[0] and b"Content-Length: 1000" in head


def test_keep_alive_connection_serves_many_requests(tunnel):
    deployment, _app, _client = tunnel
    with requests.Session() as session:
        for index in range(20):
            response = session.get(deployment.http_url + f"/status/{200 + index % 2}", headers={"Host": DOMAIN},
                                   timeout=10)
            assert response.status_code == 200 + index % 2


def test_200_concurrent_requests_over_one_tunnel(tunnel):
    deployment, _app, _client = tunnel

    def fetch(index):
        response = get(deployment, f"/bytes/{1000 + index}")
        return response.status_code, len(response.content)

    jobs = [gevent.spawn(fetch, index) for index in range(200)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert [job.value for job in jobs] == [(200, 1000 + index) for index in range(200)]
    assert len(deployment.server.get_all_backends()) == 1


def test_least_loaded_tunnel_is_chosen(deployment, backend, start_client):
    url, app = backend
    token = deployment.grant()
    start_client(deployment.client_config(token, url))
    start_client(deployment.client_config(token, url))
    wait_until(lambda: len(deployment.server.get_all_backends()) == 2, message="two tunnels")
    slow = gevent.spawn(get, deployment, "/wait")
    wait_until(lambda: sum(b.requests_in_flight for b in deployment.server.get_all_backends()) == 1,
               message="the slow request in flight")
    busy = next(b.id for b in deployment.server.get_all_backends() if b.requests_in_flight)
    for _ in range(10):
        assert get(deployment).status_code == 200
    served = {b.id: b.requests_served for b in deployment.server.get_all_backends()}
    assert served[busy] == 0, "requests must go to the idle tunnel while the other is busy"
    app.release.set()
    assert slow.get(timeout=10).status_code == 200


def test_admin_api_lists_and_kills(tunnel):
    deployment, _app, client = tunnel
    listed = requests.get(deployment.admin_url + "/backends", headers=deployment.admin_headers, timeout=5).json()
    assert [row["domain"] for row in listed] == [DOMAIN]
    assert json.loads(json.dumps(listed))[0]["phi"] >= 0
    missing = requests.post(deployment.admin_url + "/backends/nope/kill", json={},
                            headers=deployment.admin_headers, timeout=5)
    assert missing.status_code == 404 and "no such backend" in missing.json()["error"]
    client.connected.clear()
    killed = requests.post(deployment.admin_url + f"/backends/{listed[0]['id']}/kill", json={},
                           headers=deployment.admin_headers, timeout=5)
    assert killed.status_code == 200
    client.wait_connected()


def _raw_exchange(deployment, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", deployment.running.http_address[1]), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                return received
            received += piece


def test_malformed_and_oversized_heads_get_a_clear_4xx_and_the_tunnel_stays(tunnel):
    deployment, _app, _client = tunnel
    assert _raw_exchange(deployment, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert _raw_exchange(deployment, huge).startswith(b"HTTP/1.1 431 ")
    assert get(deployment).status_code == 200
    assert len(deployment.server.get_all_backends()) == 1
