"""The request inspector's JSON and SSE API, driven with real requests through a real tunnel."""

from __future__ import annotations

import json
import time

import gevent
import requests
from gevent.queue import Queue

from tests.client.support import XSS
from tun2g.client.inspector import BODY_CAP, REDACTED, Inspector, Record
from tun2g.http import RequestHead


def test_a_request_through_the_tunnel_appears_live_within_a_second(inspected):
    events = requests.get(inspected.ui + "/api/events", stream=True, timeout=5)
    assert events.headers["Content-Type"] == "text/event-stream"
    lines = events.iter_lines(decode_unicode=True)
    assert next(lines).startswith("retry:")  # subscribed: the hello event is on its way
    started = time.monotonic()
    assert inspected.get("/hello?x=1").status_code == 200
    seen = None
    with gevent.Timeout(1.0, AssertionError("no SSE event within a second")):
        for line in lines:
            if line.startswith("data:") and "/hello" in line:
                seen = json.loads(line[5:])
                break
    events.close()
    assert time.monotonic() - started < 1.0
    assert seen["method"] == "GET" and seen["path"] == "/hello?x=1" and seen["status"] == 200
    listed = inspected.api("/api/requests")["requests"]
    assert [r["path"] for r in listed] == ["/hello?x=1"]
    detail = inspected.api(f"/api/requests/{seen['id']}")
    assert detail["response_body"] == {"kind": "text", "text": "hello /hello\n", "size": 13, "captured": 13,
                                       "truncated": False}
    assert ["Host", "app.test"] in detail["request_headers"]
    assert ["Content-Type", "text/plain"] in detail["response_headers"]
    assert detail["duration_ms"] >= 0 and detail["response_size"] == 13


def test_secrets_and_the_tunnel_token_are_redacted(inspected):
    inspected.get("/secret", headers={"Authorization": "Bearer hunter2", "Cookie": "sid=abc",
                                      "Proxy-Authorization": "Basic eA==",
                                      "X-Debug": f"token={inspected.token}"})
    record, = inspected.wait_for("/secret")
    raw = requests.get(f"{inspected.ui}/api/requests/{record['id']}", timeout=5).text
    for secret in ("hunter2", "sid=abc", "eA==", "internal-secret", inspected.token, "server-secret"):
        assert secret not in raw
    detail = json.loads(raw)
    request_headers = dict(detail["request_headers"])
    assert request_headers["Authorization"] == request_headers["Cookie"] == REDACTED
    assert "Proxy-Authorization" not in request_headers  # hop-by-hop: the server drops it; redacted if it came
    assert request_headers["X-Debug"] == f"token={REDACTED}"
    response_headers = dict(detail["response_headers"])
    assert response_headers["Set-Cookie"] == response_headers["X-Tun2g-Note"] == REDACTED
    # the SSE summaries and the list carry no headers at all
    assert "hunter2" not in requests.get(inspected.ui + "/api/requests", timeout=5).text


def test_bodies_are_capped_and_rendered_by_kind(inspected):
    big = 3 * BODY_CAP + 17
    assert len(inspected.get(f"/big/{big}").content) == big  # the client gets it all
    inspected.post("/json", data=b"x" * (BODY_CAP + 5))
    inspected.post("/json", json={"a": 1})
    inspected.get("/binary")
    records = {r["path"]: r for r in inspected.wait_for("/binary")}
    records.update({r["path"]: r for r in inspected.inspector.records()})
    detail = inspected.api(f"/api/requests/{records[f'/big/{big}']['id']}")
    body = detail["response_body"]
    assert body["kind"] == "text" and body["truncated"] and body["captured"] == BODY_CAP == len(body["text"])
    assert body["size"] == big == detail["response_size"]
    posts = [inspected.api(f"/api/requests/{r['id']}") for r in inspected.inspector.records(path="/json")]
    small, large = posts  # newest first
    assert small["request_body"]["kind"] == "json" and small["request_body"]["text"] == '{\n  "a": 1\n}'
    assert small["response_body"]["kind"] == "json" and '"items": [\n' in small["response_body"]["text"]
    assert small["replayable"]
    assert large["request_body"]["truncated"] and large["request_body"]["captured"] == BODY_CAP
    assert large["request_size"] == BODY_CAP + 5 and not large["replayable"]
    binary = inspected.api(f"/api/requests/{records['/binary']['id']}")["response_body"]
    assert binary["kind"] == "binary" and binary["size"] == 1024
    assert binary["text"].startswith("00000000  00 01 02 03")


def test_filters_by_path_and_status(inspected):
    inspected.get("/one")
    inspected.post("/created/two")
    inspected.wait_for("/created/two")
    assert [r["path"] for r in inspected.api("/api/requests?path=two")["requests"]] == ["/created/two"]
    assert [r["path"] for r in inspected.api("/api/requests?status=2xx")["requests"]] == ["/created/two", "/one"]
    assert [r["path"] for r in inspected.api("/api/requests?status=201")["requests"]] == ["/created/two"]
    assert inspected.api("/api/requests?status=4xx")["requests"] == []


def test_replay_resends_the_original_request_and_is_captured_as_a_replay(inspected):
    inspected.post("/json/echo", data=b"payload", headers={"Authorization": "Bearer hunter2",
                                                          "Content-Type": "text/plain"})
    record, = inspected.wait_for("/json/echo")
    response = requests.post(f"{inspected.ui}/api/requests/{record['id']}/replay", json={}, timeout=5)
    assert response.status_code == 200, response.text
    replay = response.json()
    assert inspected.app.hits["/json/echo"] == 2
    assert inspected.app.last_headers["/json/echo"]["authorization"] == "Bearer hunter2"  # the original, unredacted
    assert inspected.app.last_body["/json/echo"] == b"payload"
    assert replay["replay_of"] == record["id"] and replay["status"] == 200
    assert json.loads(replay["response_body"]["text"])["echo"] == "payload"
    assert dict(replay["request_headers"])["Authorization"] == REDACTED
    assert [r["replay_of"] for r in inspected.api("/api/requests")["requests"]] == [record["id"], None]
    # edited: another method, path, header and body; a header left "[redacted]" keeps its original value
    edits = {"method": "PUT", "path": "/json/edited", "body": "changed",
             "headers": [["Authorization", REDACTED], ["X-Edited", "yes"], ["Content-Type", "text/plain"]]}
    edited = requests.post(f"{inspected.ui}/api/requests/{record['id']}/replay", json=edits, timeout=5).json()
    assert edited["method"] == "PUT" and edited["path"] == "/json/edited" and edited["status"] == 200
    assert inspected.app.last_body["/json/edited"] == b"changed"
    assert inspected.app.last_headers["/json/edited"]["authorization"] == "Bearer hunter2"
    assert inspected.app.last_headers["/json/edited"]["x-edited"] == "yes"


def test_replay_of_a_body_over_the_cap_is_refused(inspected):
    inspected.post("/json/large", data=b"y" * (BODY_CAP + 1))
    record, = inspected.wait_for("/json/large")
    response = requests.post(f"{inspected.ui}/api/requests/{record['id']}/replay", json={}, timeout=5)
    assert response.status_code == 409 and "cap" in response.json()["error"]
    assert inspected.app.hits["/json/large"] == 1


def test_only_loopback_host_headers_are_answered(inspected):
    port = inspected.inspector.address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert requests.get(inspected.ui + "/api/requests", headers={"Host": host}, timeout=5).status_code == 200
    for host in (f"evil.example:{port}", "127.0.0.1", f"localhost.evil.example:{port}", f"127.0.0.1:{port + 1}"):
        response = requests.get(inspected.ui + "/api/requests", headers={"Host": host}, timeout=5)
        assert response.status_code == 403, host
        assert "rebinding" in response.json()["error"]
    assert requests.get(inspected.ui + "/", headers={"Host": f"evil.example:{port}"}, timeout=5).status_code == 403


def test_replay_requires_a_json_content_type(inspected):
    inspected.get("/csrf")
    record, = inspected.wait_for("/csrf")
    url = f"{inspected.ui}/api/requests/{record['id']}/replay"
    for kwargs in ({"data": {"a": "b"}}, {"data": "{}", "headers": {"Content-Type": "text/plain"}}, {"data": "{}"}):
        response = requests.post(url, timeout=5, **kwargs)
        assert response.status_code == 415, kwargs
    assert requests.get(url, timeout=5).status_code == 404
    assert inspected.app.hits["/csrf"] == 1
    assert requests.post(url, data="{}", headers={"Content-Type": "application/json; charset=utf-8"},
                         timeout=5).status_code == 200
    assert inspected.app.hits["/csrf"] == 2


def test_metrics_count_what_the_client_served(inspected):
    for _ in range(3):
        inspected.get("/counted")
    inspected.get(f"/big/{1000}")
    inspected.wait_for("/big/1000")
    response = requests.get(inspected.ui + "/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples['tun2g_client_requests_total{status_class="2xx"}'] == 4
    assert samples["tun2g_client_request_duration_seconds_count"] == 4
    assert samples['tun2g_client_bytes_total{direction="out"}'] > 3 * 13 + 1000
    assert samples["tun2g_client_connected"] == 1
    assert samples["tun2g_client_inspector_captures_dropped_total"] == 0


def test_an_inspector_nobody_reads_keeps_the_newest_exchanges_undigested(plain_deployment, counting_backend,
                                                                         start_client):
    url, app = counting_backend
    token = plain_deployment.grant()
    inspector = Inspector(ring_size=3)  # not listening: no page, nothing pushed
    start_client(plain_deployment.client_config(token, url), inspector=inspector)
    for n in range(10):
        response = requests.get(plain_deployment.http_url + f"/n{n}", headers={"Host": "app.test"}, timeout=5)
        assert response.status_code == 200
    assert app.hits.total() == 10 and inspector.captured == 10 and inspector.dropped == 0
    assert not any(isinstance(entry, Record) for entry in inspector._records)  # nothing digested yet
    assert [record["path"] for record in inspector.records()] == ["/n9", "/n8", "/n7"]  # digested when read
    assert inspector.record(10).public["path"] == "/n9" and inspector.record(7) is None


def test_finish_never_waits_and_a_page_that_does_not_read_gets_a_bounded_backlog():
    inspector = Inspector(ring_size=50, live_backlog=4)
    inspector._subscribers.append(Queue(maxsize=1))  # an open page that reads nothing
    started = time.monotonic()
    for n in range(10_000):  # no yield in between: the pushing greenlet cannot drain the backlog
        capture = inspector.begin(RequestHead("GET", f"/{n}"))
        inspector.finish(capture, 200)
    assert time.monotonic() - started < 2
    assert len(inspector._live) == 4 and inspector.dropped == 10_000 - 4  # pushes skipped, counted
    assert len(inspector.records()) == 50 and inspector.captured == 10_000  # still listed: the newest 50


def test_a_capture_that_cannot_be_rendered_is_left_out_and_the_others_still_listed():
    inspector = Inspector(secrets=["tok"])
    good = inspector.begin(RequestHead("GET", "/ok"))
    inspector.finish(good, 200)
    bad = inspector.begin(RequestHead("GET", "/bad"))
    bad.request_headers = [("X-Odd", 5)]  # not text: redacting it raises
    inspector.finish(bad, 200)
    assert [record["path"] for record in inspector.records()] == ["/ok"]
    assert inspector.record(bad.id) is None and inspector.record(good.id).public["path"] == "/ok"


def test_xss_in_a_path_and_headers_is_only_data_in_the_api(inspected):
    inspected.get("/xss/" + requests.utils.quote(XSS), headers={"X-Evil": XSS})
    assert inspected.inspector.wait_for(lambda: bool(inspected.inspector.records()), 1.0)
    record, = inspected.inspector.records()
    assert record["path"] == "/xss/" + requests.utils.quote(XSS)
    detail = requests.get(f"{inspected.ui}/api/requests/{record['id']}", timeout=5)
    assert detail.headers["Content-Type"] == "application/json"
    assert detail.headers["X-Content-Type-Options"] == "nosniff"
    assert dict(detail.json()["request_headers"])["X-Evil"] == XSS


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_client_byte_counters_move_while_a_download_streams(plain_deployment, start_client):
    """Scraped mid-download, tun2g_client_bytes_total already counts the part of the body sent."""
    from gevent.event import Event
    from gevent.server import StreamServer

    from tests.fixtures.backends import read_head
    from tun2g.client.telemetry import ClientMetrics

    first, rest = b"a" * 200_000, b"b" * 50_000
    go_on = Event()

    def handle(sock, _address):
        try:
            read_head(sock)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(first) + len(rest)) + first)
            go_on.wait(20)
            sock.sendall(rest)
        finally:
            sock.close()

    backend = StreamServer(("127.0.0.1", 0), handle)
    backend.start()
    metrics = ClientMetrics()
    inspector = Inspector(metrics=metrics)
    inspector.listen("127.0.0.1", 0)
    try:
        start_client(plain_deployment.client_config(plain_deployment.grant(), f"http://127.0.0.1:{backend.server_port}"),
                     inspector=inspector, metrics=metrics)
        download = requests.get(plain_deployment.http_url + "/big", headers={"Host": "app.test"}, stream=True,
                                timeout=10)
        received = b""
        while len(received) < len(first):  # exactly the first part: a read past it would wait for the rest
            piece = download.raw.read(min(65536, len(first) - len(received)))
            assert piece, "the download ended early"
            received += piece
        samples = _samples(requests.get(inspector.url + "metrics", timeout=5).text)
        assert not go_on.is_set()  # still streaming: the backend holds the rest
        assert samples['tun2g_client_bytes_total{direction="out"}'] >= len(first)
        assert samples['tun2g_client_bytes_total{direction="in"}'] > 0
        assert samples.get('tun2g_client_requests_total{status_class="2xx"}', 0) == 0  # not finished yet
        go_on.set()
        received += download.raw.read()
        assert received == first + rest
        assert inspector.wait_for(lambda: bool(inspector.records()), 2.0)
        samples = _samples(requests.get(inspector.url + "metrics", timeout=5).text)
        assert samples['tun2g_client_bytes_total{direction="out"}'] >= len(first) + len(rest)
        assert samples['tun2g_client_requests_total{status_class="2xx"}'] == 1
    finally:
        inspector.close()
        backend.stop(timeout=1)


def test_a_replay_to_a_dripping_backend_ends_at_its_deadline():
    """A backend sending a byte per read timeout cannot hold a replay past its one deadline."""
    from gevent.server import StreamServer

    from tests.fixtures.backends import read_head
    from tun2g.client.inspector import Capture
    from tun2g.http import BackendPool

    def drip(sock, _address):
        try:
            read_head(sock)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(200):
                sock.sendall(b"x")
                gevent.sleep(0.1)  # the drip itself: each byte well inside any per-read timeout
        except OSError:
            pass
        finally:
            sock.close()

    backend = StreamServer(("127.0.0.1", 0), drip)
    backend.start()
    pool = BackendPool(f"http://127.0.0.1:{backend.server_port}")
    inspector = Inspector(pool, replay_timeout=1.0)
    try:
        record = inspector._add(Capture(RequestHead("GET", "/drip", "HTTP/1.1", [("Host", "x")])))
        started = time.monotonic()
        replayed = inspector.replay(record, {})
        assert time.monotonic() - started < 3
        assert replayed.public["error"].startswith("backend:") and "1 s" in replayed.public["error"]
    finally:
        pool.close()
        backend.stop(timeout=1)
