"""Bodies stream both ways, never whole in memory; 1xx and Upgrade are handled."""

import hashlib
import os
import subprocess

import gevent
import psutil
import pytest
import requests
import websocket

from tests.fixtures.backends import pattern_bytes, pattern_digest
from tests.fixtures.tunnel import DOMAIN


def test_streaming_response_arrives_piece_by_piece(tunnel):
    deployment, app, _client = tunnel
    response = requests.get(deployment.http_url + "/stream", headers={"Host": DOMAIN}, stream=True, timeout=10)
    pieces = response.iter_lines()
    assert next(pieces) == b"first piece", "the first piece must arrive while the backend still holds the rest"
    app.release.set()
    assert next(pieces) == b"last piece"


@pytest.mark.parametrize("path", ["/bytes/8388608", "/chunked/8388608"])
def test_download_content_length_and_chunked(tunnel, path):
    deployment, _app, _client = tunnel
    response = requests.get(deployment.http_url + path, headers={"Host": DOMAIN}, timeout=30)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == pattern_digest(8388608)


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_content_length_and_chunked(tunnel, chunked):
    deployment, _app, _client = tunnel
    size = 8 * 1024 * 1024
    body = pattern_bytes(size) if chunked else b"".join(pattern_bytes(size))
    response = requests.post(deployment.http_url + "/sink", data=body, headers={"Host": DOMAIN}, timeout=30)
    assert response.json() == {"sha256": pattern_digest(size), "length": size}


def test_expect_100_continue_upload_gets_the_real_response(tunnel, tmp_path):
    deployment, _app, _client = tunnel
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"".join(pattern_bytes(3 * 1024 * 1024)))
    out = subprocess.run(["curl", "-s", "-i", "-H", f"Host: {DOMAIN}", "-H", "Expect: 100-continue",
                          "--data-binary", f"@{upload}", deployment.http_url + "/sink"],
                         capture_output=True, timeout=30, check=True).stdout
    final = out.split(b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 100"), out[:200]
    assert any(part.startswith(b"HTTP/1.1 200") for part in final)
    assert out.endswith(f'"length": {3 * 1024 * 1024}}}'.encode())
    assert pattern_digest(3 * 1024 * 1024).encode() in out


def test_websocket_passes_through_both_ways(deployment, websocket_backend, start_client):
    token = deployment.grant()
    start_client(deployment.client_config(token, websocket_backend))
    port = deployment.running.http_address[1]
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/chat", host=DOMAIN, timeout=10)  # one Host header
    try:
        for message in ("hello", "x" * 100, "bye"):
            ws.send(message)
            assert ws.recv() == message
    finally:
        ws.close()
    assert len(deployment.server.get_all_backends()) == 1, "the tunnel survives the WebSocket"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_gib_each_way_with_flat_memory(tunnel):
    deployment, _app, _client = tunnel
    size = 1024 * 1024 * 1024
    process = psutil.Process(os.getpid())
    baseline = process.memory_info().rss
    peak = [baseline]

    def sample():
        while True:
            peak[0] = max(peak[0], process.memory_info().rss)
            gevent.sleep(0.1)  # a sampling cadence, not synchronisation

    sampler = gevent.spawn(sample)
    try:
        response = requests.get(deployment.http_url + f"/bytes/{size}", headers={"Host": DOMAIN},
                                stream=True, timeout=60)
        digest, total = hashlib.sha256(), 0
        for piece in response.iter_content(1 << 20):
            digest.update(piece)
            total += len(piece)
        assert total == size and digest.hexdigest() == pattern_digest(size)
        upload = requests.post(deployment.http_url + "/sink", data=pattern_bytes(size), headers={"Host": DOMAIN},
                               timeout=120)
        assert upload.json() == {"sha256": pattern_digest(size), "length": size}
    finally:
        sampler.kill()
    # Server, client and backend share this process: the whole GiB passing through
    # twice must not show up in its memory.
    assert peak[0] - baseline < 64 * 1024 * 1024, f"memory grew by {(peak[0] - baseline) >> 20} MiB"
