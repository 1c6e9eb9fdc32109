"""Server-side capture for the operator's inspector: opt-in per route, redacted, capped, never in the way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import gevent
import pytest
import requests
from click.testing import CliRunner

from tests.fixtures.backends import pattern_bytes
from tests.fixtures.metrics import scrape, value
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cli import main
from tun2g.server.inspect import BODY_CAP, REDACTED, Inspector, MemoryCaptures


def get(deployment, path="/", **kwargs):
    headers = {"Host": DOMAIN, **kwargs.pop("headers", {})}
    return requests.get(deployment.http_url + path, headers=headers, timeout=10, **kwargs)


def inspected(deployment, limit=50, domain=DOMAIN) -> dict:
    response = requests.get(f"{deployment.admin_url}/inspect", headers=deployment.admin_headers, params={"domain": domain, "limit": limit}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def inspected_tunnel(plain_deployment, backend, start_client):
    """A tunnel for app.test whose route has capture on (and the server has noticed)."""
    url, app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    plain_deployment.storage.set_route_inspect(DOMAIN, True)
    wait_until(lambda: plain_deployment.server.inspector.enabled(DOMAIN), timeout=5, message="capture switched on")
    return plain_deployment, app


def _headers(record: dict, which: str) -> dict:
    return {name.lower(): value for name, value in record[which]}


def test_captured_exchanges_are_listed_newest_first_with_secrets_redacted(inspected_tunnel):
    deployment, _app = inspected_tunnel
    assert get(deployment, "/headers", headers={"Authorization": "Bearer top-secret", "Cookie": "sid=42",
                                                "X-Tun2g-Token": "x", "X-Custom": "kept"}).status_code == 200
    assert get(deployment, "/set-cookie").status_code == 200
    assert get(deployment, "/status/404").status_code == 404
    wait_until(lambda: len(inspected(deployment)["records"]) == 3, timeout=5, message="three captures stored")
    payload = inspected(deployment)
    assert payload["inspected"] is True
    newest, cookie, first = payload["records"]
    assert [r["path"] for r in payload["records"]] == ["/status/404", "/set-cookie", "/headers"]
    assert (newest["status"], newest["method"], newest["node"]) == (404, "GET", deployment.server.config.node_id)
    request_headers = _headers(first, "request_headers")
    assert request_headers["authorization"] == REDACTED and request_headers["cookie"] == REDACTED
    assert request_headers["x-tun2g-token"] == REDACTED and request_headers["x-custom"] == "kept"
    assert request_headers["x-forwarded-for"] == "127.0.0.1"
    assert _headers(cookie, "response_headers")["set-cookie"] == REDACTED
    assert "top-secret" not in json.dumps([r["request_headers"] + r["response_headers"] for r in payload["records"]])
    assert "s3cr3t" not in json.dumps(cookie)
    # What the backend saw is in the captured response body, so there the secret is, unredacted, by design:
    assert "Bearer top-secret" in first["response_body"]["data"]
    assert first["client_ip"] == "127.0.0.1" and first["ms"] > 0 and first["bytes_out"] > 0
    assert _headers(first, "response_headers")["x-request-id"] == first["request_id"]
    assert inspected(deployment, limit=1)["records"] == [newest]


def test_bodies_are_kept_up_to_the_cap_as_they_stream(inspected_tunnel):
    deployment, _app = inspected_tunnel
    upload = b"".join(pattern_bytes(BODY_CAP + 5000))
    response = requests.post(deployment.http_url + "/sink", data=upload, headers={"Host": DOMAIN}, timeout=10)
    assert response.json()["length"] == len(upload)
    download = get(deployment, f"/bytes/{BODY_CAP * 4}")
    assert len(download.content) == BODY_CAP * 4
    wait_until(lambda: len(inspected(deployment)["records"]) == 2, timeout=5, message="two captures")
    got, sent = inspected(deployment)["records"]
    assert sent["request_body"]["size"] == len(upload)
    assert sent["request_body"]["kept"] == BODY_CAP and sent["request_body"]["truncated"] is True
    assert sent["request_body"]["encoding"] == "base64"  # the pattern is binary
    import base64

    assert base64.b64decode(sent["request_body"]["data"]) == upload[:BODY_CAP]
    assert json.loads(sent["response_body"]["data"])["length"] == len(upload)  # small text bodies as they are
    assert got["response_body"]["size"] == BODY_CAP * 4 and got["response_body"]["kept"] == BODY_CAP
    assert got["bytes_out"] > BODY_CAP * 4


def test_routes_without_the_flag_are_not_captured(plain_deployment, backend, start_client):
    url, _app = backend
    start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    assert get(plain_deployment).status_code == 200
    payload = inspected(plain_deployment)
    assert payload == {"domain": DOMAIN, "inspected": False, "records": []}
    assert value(scrape(plain_deployment.admin_url, token=plain_deployment.running.admin_token), "tun2g_inspect_captures_total", outcome="queued") == 0


def test_switching_capture_off_stops_it(inspected_tunnel):
    deployment, _app = inspected_tunnel
    assert get(deployment).status_code == 200
    deployment.storage.set_route_inspect(DOMAIN, False)
    wait_until(lambda: not deployment.server.inspector.enabled(DOMAIN), timeout=5, message="capture switched off")
    assert get(deployment).status_code == 200
    wait_until(lambda: deployment.server.inspector.queued == 0, timeout=5, message="the writer idle")
    assert len(inspected(deployment)["records"]) == 1


def test_tun2g_inspect_prints_the_captures_as_json(inspected_tunnel):
    deployment, _app = inspected_tunnel
    assert get(deployment, "/headers", headers={"Authorization": "Bearer top-secret"}).status_code == 200
    wait_until(lambda: inspected(deployment)["records"], timeout=5, message="a capture")
    result = CliRunner().invoke(main, ["inspect", DOMAIN, "--admin", deployment.admin_url, "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["path"] for r in records] == ["/headers"]
    assert _headers(records[0], "request_headers")["authorization"] == REDACTED
    table = CliRunner().invoke(main, ["inspect", DOMAIN, "--admin", deployment.admin_url])
    assert table.exit_code == 0 and "GET" in table.output and "/headers" in table.output and "200" in table.output


def test_tun2g_inspect_follow_prints_new_captures_and_stops_cleanly_on_ctrl_c(inspected_tunnel):
    deployment, _app = inspected_tunnel
    process = subprocess.Popen([sys.executable, "-m", "tun2g.cli", "inspect", DOMAIN, "--admin",
                                deployment.admin_url, "--follow", "--json", "--interval", "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = gevent.spawn(lambda: [lines.append(line) for line in process.stdout])
        for path in ("/one", "/two"):
            assert get(deployment, path).status_code == 200
        wait_until(lambda: len(lines) >= 2, timeout=15, message="two followed captures")
        assert [json.loads(line)["path"] for line in lines[:2]] == ["/one", "/two"]  # oldest first, like tail -f
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        reader.join(5)
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_a_full_queue_drops_captures_at_once_instead_of_blocking():
    counted: list[str] = []
    inspector = Inspector(MemoryCaptures(), queue_size=2, on_outcome=counted.append)  # its writer not running
    inspector.set_domains([DOMAIN])
    started = time.monotonic()
    results = [inspector.offer(DOMAIN, {"path": f"/{n}"}) for n in range(50)]
    assert time.monotonic() - started < 0.5  # never waits for room
    assert results == [True, True] + [False] * 48
    assert inspector.dropped == 48 and counted.count("dropped") == 48 and counted.count("queued") == 2
    inspector.start()
    wait_until(lambda: inspector.queued == 0, timeout=5, message="the writer draining")
    assert [r["path"] for r in inspector.read(DOMAIN)] == ["/1", "/0"]
    inspector.close()


def test_the_drops_are_exported_as_a_metric(inspected_tunnel):
    deployment, _app = inspected_tunnel
    assert get(deployment).status_code == 200
    wait_until(lambda: value(scrape(deployment.admin_url, token=deployment.running.admin_token), "tun2g_inspect_captures_total", outcome="stored") == 1,
               timeout=5, message="the capture stored")
    samples = scrape(deployment.admin_url, token=deployment.running.admin_token)
    assert value(samples, "tun2g_inspect_captures_total", outcome="queued") == 1
    assert ("tun2g_inspect_captures_total", (("outcome", "dropped"),)) in samples


def test_the_wsgi_front_captures_bodies_too(inspected_tunnel):
    """Through WSGIFront the record is offered once the caller has read the body, with both bodies capped."""
    import base64

    from gevent.pywsgi import WSGIServer

    from tun2g.server.wsgi import WSGIFront

    deployment, _app = inspected_tunnel
    server = WSGIServer(("127.0.0.1", 0), WSGIFront(deployment.server), log=None, error_log=None)
    server.start()
    try:
        front = f"http://127.0.0.1:{server.server_port}"
        upload = b"".join(pattern_bytes(BODY_CAP + 300))
        response = requests.post(front + "/sink", data=upload, headers={"Host": DOMAIN}, timeout=10)
        assert response.json()["length"] == len(upload)
        download = requests.get(front + f"/bytes/{BODY_CAP * 2}", headers={"Host": DOMAIN}, timeout=10)
        assert len(download.content) == BODY_CAP * 2
        wait_until(lambda: len(inspected(deployment)["records"]) == 2, timeout=5, message="two captures")
    finally:
        server.stop(timeout=1)
    got, sent = inspected(deployment)["records"]
    assert sent["request_body"]["size"] == len(upload) and sent["request_body"]["kept"] == BODY_CAP
    assert base64.b64decode(sent["request_body"]["data"]) == upload[:BODY_CAP]
    assert json.loads(sent["response_body"]["data"])["length"] == len(upload)
    assert got["response_body"]["size"] == BODY_CAP * 2 and got["response_body"]["kept"] == BODY_CAP
    assert got["response_body"]["truncated"] is True and got["bytes_out"] >= BODY_CAP * 2
    assert sent["bytes_in"] > len(upload)  # head and body, counted as they went up


@pytest.mark.pure
def test_memory_captures_are_bounded_over_all_domains():
    """Many inspected domains cannot hold more than max_records records in all (each may carry 2 x 16 KiB)."""
    store = MemoryCaptures(ring_size=50, max_domains=100, max_records=120)
    for n in range(10_000):
        store.append(f"d{n % 40}.test", {"path": f"/{n}"})
    assert store.held == 120
    assert sum(len(store.read(f"d{d}.test", 1000)) for d in range(40)) == 120
    newest = store.read(f"d{9_999 % 40}.test", 1)
    assert newest[0]["path"] == "/9999"  # the newest records are the ones kept
    for n in range(500):
        store.append(f"many{n}.test", {"path": "/"})
    assert store.held == 100 and len(store.read("d0.test", 10)) == 0  # 100 domains at most, the oldest gone


def test_a_wildcard_route_captures_the_names_under_it(plain_deployment, backend, start_client):
    """Capture follows the route a request matched: `route inspect '*.wild.test' on` captures a.wild.test."""
    url, _app = backend
    storage = plain_deployment.storage
    token = plain_deployment.grant("*.wild.test")
    start_client(plain_deployment.client_config(token, url, domain="*.wild.test"))
    storage.set_route_inspect("*.wild.test", True)
    wait_until(lambda: plain_deployment.server.inspector.enabled("*.wild.test"), timeout=5,
               message="capture switched on")
    response = requests.get(plain_deployment.http_url + "/headers", headers={"Host": "a.wild.test"}, timeout=10)
    assert response.status_code == 200
    wait_until(lambda: len(inspected(plain_deployment, domain="*.wild.test")["records"]) == 1, timeout=5,
               message="the capture stored under the wildcard route")
    record = inspected(plain_deployment, domain="*.wild.test")["records"][0]
    assert record["path"] == "/headers"
    assert inspected(plain_deployment, domain="a.wild.test")["records"] == []
