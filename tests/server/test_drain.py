"""SIGTERM drains: the requests in flight finish (a download and an upload), then the process exits 0.

Real processes: `tun2g server` and `tun2g client` subprocesses, a slow backend, requests through the
public port. The server tells its tun2g client to move (docs/protocol.md#control-messages); the client,
on its own SIGTERM, says LEAVING and the server closes its session once the requests are answered.
"""

import http.server
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import wait_until

CHUNKS, CHUNK = 8, 4096
PAUSE = 0.2  # between chunks: the exchange lasts ~1.6 s, long enough to signal in the middle


class SlowBackend(http.server.BaseHTTPRequestHandler):
    """GET streams CHUNKS pieces slowly; POST reads a body and answers its length. ``started`` fires on each."""

    protocol_version = "HTTP/1.1"
    started = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(CHUNKS * CHUNK))
        self.end_headers()
        for _ in range(CHUNKS):
            self.wfile.write(b"d" * CHUNK)
            self.wfile.flush()
            self.started.set()
            time.sleep(PAUSE)  # the backend's pace, not synchronisation

    def do_POST(self):
        self.started.set()
        size = 0
        while True:  # chunked
            length = int(self.rfile.readline().strip(), 16)
            if length == 0:
                self.rfile.readline()
                break
            size += len(self.rfile.read(length))
            self.rfile.readline()
        body = str(size).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_backend():
    SlowBackend.started = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowBackend)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


@pytest.fixture
def tunnel(tmp_path, slow_backend):
    """(server, client, http_port): a server with a connected tun2g client for app.localhost."""
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    for name in ("REDIS_URL", "TUN2G_STORAGE"):
        env.pop(name, None)
    http_port, tunnel_port = free_port(), free_port()
    server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                    f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0", "--plain-tunnel"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = None
    try:
        wait_for_port(tunnel_port)
        subprocess.run(tun2g("route", "add", "app.localhost", "--user", "me"), env=env, check=True,
                       capture_output=True, timeout=30)
        token = subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=env, check=True,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        client = subprocess.Popen(tun2g("client", "--server", f"127.0.0.1:{tunnel_port}", "--plain", "--domain",
                                        "app.localhost", "--backend", slow_backend, "--no-inspect"),
                                  env=env | {"TUN2G_TOKEN": token}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert "connecting to" in client.stdout.readline()
        assert "connected as app.localhost" in client.stdout.readline()
        yield server, client, http_port
    finally:
        for process in (client, server):
            if process is not None:
                process.kill()
                process.wait(10)


def _slow_upload():
    for _ in range(CHUNKS):
        yield b"u" * CHUNK
        time.sleep(PAUSE)  # the uploader's pace


@pytest.mark.parametrize("signalled", ["server", "client"])
@pytest.mark.parametrize("direction", ["download", "upload"])
def test_sigterm_lets_the_request_in_flight_finish(tunnel, signalled, direction):
    server, client, http_port = tunnel
    url = f"http://127.0.0.1:{http_port}/file"
    outcome = {}

    def request():
        try:
            if direction == "download":
                response = requests.get(url, headers={"Host": "app.localhost"}, timeout=30)
            else:
                response = requests.post(url, headers={"Host": "app.localhost"}, data=_slow_upload(), timeout=30)
            outcome["response"] = response
        except requests.RequestException as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=request)
    caller.start()
    assert SlowBackend.started.wait(10), "the request did not reach the backend"
    target = server if signalled == "server" else client
    target.send_signal(signal.SIGTERM)
    caller.join(30)
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert response.status_code == 200, response.text
    if direction == "download":
        assert response.content == b"d" * CHUNKS * CHUNK
    else:
        assert response.text == str(CHUNKS * CHUNK)
    assert target.wait(20) == 0
    assert "Traceback" not in target.stderr.read()
    if signalled == "client":  # the server lives on, and no longer routes to the client that left
        wait_until(lambda: requests.get(url, headers={"Host": "app.localhost"}, timeout=5).status_code == 502,
                   message="the server to answer 502 once the only client left")
