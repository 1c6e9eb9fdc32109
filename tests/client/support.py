"""Shared by the inspector tests: a backend that counts what it serves, and a tunnel with an inspector."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
import requests
from gevent.pywsgi import WSGIServer

from tests.fixtures.tunnel import DOMAIN
from tun2g.client.inspector import Inspector
from tun2g.client.telemetry import ClientMetrics

XSS = '<img src=x onerror="window.__xss=1">'


class CountingBackend:
    """Counts requests per path; remembers the headers and body of the last one to each path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self.last_body: dict[str, bytes] = {}

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        self.hits[path] += 1
        self.last_headers[path] = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                                   if k.startswith("HTTP_")}
        self.last_body[path] = environ["wsgi.input"].read()
        if path.startswith("/json"):
            body = json.dumps({"ok": True, "items": [1, 2, 3], "echo": self.last_body[path].decode()}).encode()
            kind = "application/json"
        elif path.startswith("/big/"):
            body = b"x" * int(path.rsplit("/", 1)[1])
            kind = "text/plain"
        elif path.startswith("/binary"):
            body = bytes(range(256)) * 4
            kind = "application/octet-stream"
        elif path.startswith("/xss"):
            body = XSS.encode()
            kind = "text/html"
        else:
            body = b"hello " + path.encode() + b"\n"
            kind = "text/plain"
        start_response("201 Created" if path.startswith("/created") else "200 OK",
                       [("Content-Type", kind), ("Content-Length", str(len(body))),
                        ("Set-Cookie", "session=server-secret"), ("X-Tun2g-Note", "internal-secret"),
                        ("X-Reply", XSS)])
        return [body]


@pytest.fixture
def counting_backend():
    app = CountingBackend()
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.stop(timeout=1)


@dataclass
class Inspected:
    deployment: object
    app: CountingBackend
    inspector: Inspector
    metrics: ClientMetrics
    token: str

    @property
    def ui(self) -> str:
        return self.inspector.url.rstrip("/")

    def get(self, path: str, **kwargs) -> requests.Response:
        """A public request through the tunnel."""
        headers = {"Host": DOMAIN, **kwargs.pop("headers", {})}
        return requests.get(self.deployment.http_url + path, headers=headers, timeout=10, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        headers = {"Host": DOMAIN, **kwargs.pop("headers", {})}
        return requests.post(self.deployment.http_url + path, headers=headers, timeout=10, **kwargs)

    def api(self, path: str) -> dict:
        response = requests.get(self.ui + path, timeout=5)
        response.raise_for_status()
        return response.json()

    def wait_for(self, path: str, count: int = 1, timeout: float = 1.0) -> list[dict]:
        """The summaries of requests to ``path`` once there are ``count`` (bounded by ``timeout``)."""
        found: list[dict] = []

        def seen() -> bool:
            found[:] = [r for r in self.inspector.records() if r["path"] == path]
            return len(found) >= count

        assert self.inspector.wait_for(seen, timeout), f"{path} not captured {count}x within {timeout} s"
        return found


@pytest.fixture
def inspected(plain_deployment, counting_backend, start_client):
    """A tunnel whose client runs an inspector on 127.0.0.1 (a free port)."""
    url, app = counting_backend
    token = plain_deployment.grant()
    metrics = ClientMetrics()
    inspector = Inspector(secrets=[token], metrics=metrics)
    inspector.listen("127.0.0.1", 0)
    running = start_client(plain_deployment.client_config(token, url), inspector=inspector, metrics=metrics)
    client = running.client
    inspector.set_status(lambda: {"state": client.state, "public_urls": client.public_urls, "backend": url,
                                  "requests_served": client.requests_served})
    try:
        yield Inspected(plain_deployment, app, inspector, metrics, token)
    finally:
        inspector.close()
