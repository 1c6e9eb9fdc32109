"""The server's admin HTTP API: backends, kill, status (JSON), for `tun2g backends` / `tun2g kill`;
`/metrics` (Prometheus text) and `/inspect` (captured exchanges, for `tun2g inspect`).

It listens on its own address (loopback by default), apart from public
traffic, and requires `Authorization: Bearer <admin token>` when a token is set:
`/metrics` too (it names every domain; Prometheus sends the token with
`authorization: {credentials: ...}`), only `/health` is open.
"""

from __future__ import annotations

import hmac
import json
import time
from urllib.parse import unquote

from tun2g.errors import NoSuchBackend
from tun2g.metrics import CONTENT_TYPE
from tun2g.storage import StorageError, normalize_domain
from tun2g.server.server import Server


class AdminAPI:
    """A WSGI app over a Server."""

    def __init__(self, server: Server, admin_token: str | None = None) -> None:
        self.server = server
        self.admin_token = admin_token
        self.started = time.time()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/health" and environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            page = self.server.health()  # no token needed: it says nothing but alive / draining
            start_response(f"{page.status} {page.reason}", [("Content-Type", page.content_type),
                                                            ("Content-Length", str(len(page.body))),
                                                            ("Cache-Control", "no-store")])
            return [page.body]
        if not self._authorized(environ):
            return _json(start_response, 401, {"error": "admin token required: pass --admin-token"})
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        query = dict(part.split("=", 1) for part in environ.get("QUERY_STRING", "").split("&") if "=" in part)
        if method == "GET" and path == "/backends":
            return _json(start_response, 200, [b.to_dict() for b in self._backends(query)])
        if method == "POST" and path.startswith("/backends/") and path.endswith("/kill"):
            backend_id = path[len("/backends/"):-len("/kill")]
            try:
                self.server.kill_backend(backend_id)
            except NoSuchBackend as exc:
                return _json(start_response, 404, {"error": str(exc)})
            return _json(start_response, 200, {"killed": backend_id})
        if method == "GET" and path == "/metrics" and self.server.metrics is not None:
            body = self.server.metrics.exposition()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
            return [body]
        if method == "GET" and path == "/inspect":
            return self._inspect(start_response, query)
        if method == "GET" and path == "/status":
            backends = self.server.get_all_backends()
            return _json(start_response, 200, {
                "node": self.server.config.node_id, "uptime": round(time.time() - self.started, 1),
                "backends": len(backends), "domains": len({b.domain for b in backends}),
                "requests_in_flight": sum(b.requests_in_flight for b in backends)})
        return _json(start_response, 404, {"error": f"no admin endpoint {method} {path}; "
                                                    "try GET /backends, POST /backends/ID/kill, GET /status, "
                                                    "GET /health, GET /metrics, GET /inspect?domain=D"})

    def _inspect(self, start_response, query: dict) -> list:
        inspector = self.server.inspector
        if inspector is None:
            return _json(start_response, 404, {"error": "capture is off on this server (tun2g server --no-inspect)"})
        domain = unquote(query.get("domain", ""))
        try:
            domain = normalize_domain(domain)
            limit = int(query.get("limit", "50"))
        except (StorageError, ValueError) as exc:
            return _json(start_response, 400, {"error": f"GET /inspect?domain=D[&limit=N][&after=ID]: {exc}"})
        try:
            records = inspector.read(domain, limit, unquote(query["after"]) if query.get("after") else None)
        except Exception as exc:  # Redis down or the like: say so, in JSON, as the other endpoints do
            return _json(start_response, 503, {"error": f"cannot read captures: {exc}"})
        return _json(start_response, 200, {"domain": domain, "inspected": inspector.enabled(domain),
                                           "records": records})

    def _backends(self, query: dict) -> list:
        if "domain" in query:
            return self.server.get_backends_for_domain(query["domain"])
        if "user" in query:
            return self.server.get_backends_for_user(query["user"])
        return self.server.get_all_backends()

    def _authorized(self, environ) -> bool:
        if not self.admin_token:
            return True
        supplied = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(supplied.encode(), self.admin_token.encode())


def _json(start_response, status: int, payload) -> list:
    body = json.dumps(payload, indent=1).encode() + b"\n"
    reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}
    start_response(f"{status} {reasons[status]}", [("Content-Type", "application/json"),
                                                  ("Content-Length", str(len(body)))])
    return [body]
