"""`tun2g client` as a person runs it: the public URL on connect, a line per request, --quiet, debug logs."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import gevent
import requests
from gevent.queue import Empty, Queue

from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import DOMAIN
from tun2g.server import tunnel as tunnel_module


class CLIClient:
    """A `tun2g client` process whose stdout and stderr lines are read as they come."""

    def __init__(self, deployment, token: str, backend_url: str, *args: str) -> None:
        command = [sys.executable, "-m", "tun2g.cli", "client", "--server", deployment.tunnel_addr, "--token", token,
                   "--domain", DOMAIN, "--backend", backend_url, "--plain", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env_without_proxies())
        self.out: Queue = Queue()
        self.err: list[str] = []
        self.lines: list[str] = []
        self._readers = [gevent.spawn(self._read, self.process.stdout, self.out.put),
                         gevent.spawn(self._read, self.process.stderr, self.err.append)]

    @staticmethod
    def _read(pipe, put) -> None:
        for raw in iter(pipe.readline, b""):
            put(raw.decode(errors="replace").rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """The first new stdout line matching ``pattern`` (lines before it are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.out.get(timeout=max(left, 0.001))
            except Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; stdout so far: "
                                     f"{self.lines}; stderr: {self.err[-10:]}") from None
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def drain(self, timeout: float) -> list[str]:
        """Stdout lines that arrive within ``timeout``."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.out.get(timeout=left))
            except Empty:
                break
        self.lines += got
        return got

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        gevent.joinall(self._readers, timeout=5)


def _get(deployment, path: str) -> requests.Response:
    return requests.get(deployment.http_url + path, headers={"Host": DOMAIN}, timeout=10)


def test_the_client_prints_its_public_url_and_a_line_per_request(plain_deployment, backend):
    url, _app = backend
    client = CLIClient(plain_deployment, plain_deployment.grant(), url, "--inspect", "127.0.0.1:0")
    try:
        inspector = client.expect(r"inspector at (http://127\.0\.0\.1:\d+/)").group(1)
        client.expect(rf"connected as {re.escape(DOMAIN)} via .* -> {re.escape(url)} .*; serving http://{re.escape(DOMAIN)}$")
        assert _get(plain_deployment, "/status/404").status_code == 404
        assert _get(plain_deployment, "/hello?q=1").status_code == 200
        client.expect(r"^GET /status/404 404 \d+\.\d ms$")
        client.expect(r"^GET /hello\?q=1 200 \d+\.\d ms$")
        # the inspector of that process saw both, and its /metrics counted them
        listed = requests.get(inspector + "api/requests", timeout=5).json()["requests"]
        assert [r["path"] for r in listed] == ["/hello?q=1", "/status/404"]
        metrics = requests.get(inspector + "metrics", timeout=5).text
        assert 'tun2g_client_requests_total{status_class="2xx"} 1.0' in metrics
        assert 'tun2g_client_requests_total{status_class="4xx"} 1.0' in metrics
    finally:
        client.stop()


def test_quiet_prints_no_status_lines(plain_deployment, backend):
    url, app = backend
    client = CLIClient(plain_deployment, plain_deployment.grant(), url, "--quiet", "--no-inspect")
    try:
        deadline = time.monotonic() + 10
        while not plain_deployment.server.get_all_backends():
            assert time.monotonic() < deadline, f"the client never connected: {client.err}"
            gevent.sleep(0.02)  # polling another process's state, bounded by the deadline
        assert _get(plain_deployment, "/hello").status_code == 200
        assert app.seen_paths.count("/hello") == 1
        assert client.drain(0.5) == []
    finally:
        client.stop()
    assert client.lines == []


def test_debug_logs_the_life_of_a_stream(plain_deployment, backend, monkeypatch):
    monkeypatch.setattr(tunnel_module, "IDLE_STREAM_SECONDS", 0.2)  # the server ends its kept stream soon
    url, _app = backend
    client = CLIClient(plain_deployment, plain_deployment.grant(), url, "--log-level", "debug", "--no-inspect")
    try:
        client.expect("; serving http://")
        assert _get(plain_deployment, "/hello").status_code == 200
        client.expect(r"^GET /hello 200")
        deadline = time.monotonic() + 5
        while not any("event=stream_closed" in line for line in client.err):
            assert time.monotonic() < deadline, client.err
            gevent.sleep(0.02)  # bounded poll of another process's log
        events = [re.search(r"event=(\w+)", line).group(1) for line in client.err if "event=" in line]
        life = [e for e in events if e in ("stream_opened", "request", "response", "stream_closed")]
        assert life[-4:] == ["stream_opened", "request", "response", "stream_closed"]
        response_line = next(line for line in client.err if "event=response" in line)
        assert "status=200" in response_line and "path=/hello" in response_line
    finally:
        client.stop()


def test_a_taken_inspector_port_is_said_in_one_line_and_the_tunnel_still_serves(plain_deployment, backend):
    url, _app = backend
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        client = CLIClient(plain_deployment, plain_deployment.grant(), url, "--inspect", f"127.0.0.1:{port}")
        try:
            client.expect(rf"inspector not started: cannot listen on 127\.0\.0\.1:{port}")
            client.expect("; serving http://")
            assert _get(plain_deployment, "/hello").status_code == 200
            client.expect(r"^GET /hello 200")
        finally:
            client.stop()
