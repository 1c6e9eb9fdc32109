"""The server's admin HTTP API: backends, kill, status (JSON), for `tun2g backends` / `tun2g kill`;
`/metrics` (Prometheus text) and `/inspect` (captured exchanges, for `tun2g inspect`); `POST /reload`
reads the config file again (as SIGHUP does; 400 with the error when the new file cannot be used).

It listens on its own address (loopback by default), apart from public
traffic. Every request must pass, in this order:

1. a Host header naming the listen address (`127.0.0.1:PORT`, `localhost:PORT`,
   `[::1]:PORT` or the bound address; on a wildcard bind, any IP literal with
   the port), else 403: a web page whose name was rebound to 127.0.0.1 still
   sends its own name, so DNS rebinding gets nowhere;
2. `Authorization: Bearer <admin token>`, else 401 (the token is always set:
   --admin-token, or the one `tun2g server` keeps in its data dir);
3. for changes (any method but GET/HEAD), `Content-Type: application/json`,
   else 415: a cross-site form or `text/plain` fetch cannot send that without
   a CORS preflight, which this API never grants.
`/metrics` needs the token too (it names every domain; Prometheus sends it with
`authorization: {credentials: ...}`); only `/health` is open.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from typing import Callable
from urllib.parse import unquote

from tun2g.config import ConfigChange, ConfigError
from tun2g.errors import ConfigurationError, NoSuchBackend
from tun2g.metrics import CONTENT_TYPE
from tun2g.storage import StorageError
from tun2g.storage.routing import normalize_route_key
from tun2g.server.server import Server

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            415: "Unsupported Media Type", 503: "Service Unavailable"}


class AdminAPI:
    """A WSGI app over a Server, for a listener bound at `address` (host, port)."""

    def __init__(self, server: Server, admin_token: str, address: tuple, *,
                 reload: Callable[[], ConfigChange] | None = None) -> None:
        """`reload`: reads the config file again and applies it (None: POST /reload answers 404)."""
        if not admin_token:
            raise ConfigurationError("the admin API needs a token (--admin-token, or the data dir's admin-token)")
        self.server = server
        self.admin_token = admin_token
        self.started = time.time()
        self.reload = reload
        self._allowed_hosts, self._any_ip_literal, self._port = allowed_hosts(address)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/health" and environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            page = self.server.health()  # no token needed: it says nothing but alive / draining
            start_response(f"{page.status} {page.reason}", [("Content-Type", page.content_type),
                                                            ("Content-Length", str(len(page.body))),
                                                            ("Cache-Control", "no-store")])
            return [page.body]
        host = environ.get("HTTP_HOST", "")
        if not self._host_allowed(host):
            return _json(start_response, 403, {"error": f"Host {host!r} is not this admin API's address; "
                                                        f"use http://127.0.0.1:{self._port}"})
        if not self._authorized(environ):
            return _json(start_response, 401, {"error": "admin token missing or wrong: pass --admin-token, or run "
                                                        "the command where the server keeps its data dir "
                                                        "(it reads the admin-token file there)"})
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if method not in ("GET", "HEAD") and not _is_json(environ.get("CONTENT_TYPE", "")):
            return _json(start_response, 415, {"error": "changes need Content-Type: application/json"})
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
        if method == "POST" and path == "/reload" and self.reload is not None:
            try:
                change = self.reload()
            except ConfigError as exc:
                return _json(start_response, 400, {"error": str(exc), "note": "the settings in force are unchanged"})
            return _json(start_response, 200, change.to_dict())
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
                                                    "try GET /backends, POST /backends/ID/kill, GET /status, POST /reload, "
                                                    "GET /health, GET /metrics, GET /inspect?domain=D"})

    def _inspect(self, start_response, query: dict) -> list:
        inspector = self.server.inspector
        if inspector is None:
            return _json(start_response, 404, {"error": "capture is off on this server (tun2g server --no-inspect)"})
        domain = unquote(query.get("domain", ""))
        try:
            domain = normalize_route_key(domain)  # a route: host, *.host or host/prefix
            limit = int(query.get("limit", "50"))
        except (StorageError, ValueError) as exc:
            return _json(start_response, 400, {"error": f"GET /inspect?domain=ROUTE[&limit=N][&after=ID]: {exc}"})
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
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header.startswith("Bearer "):
            return False
        supplied = header[len("Bearer "):].strip()
        return hmac.compare_digest(supplied.encode(), self.admin_token.encode())

    def _host_allowed(self, host: str) -> bool:
        host = host.strip().lower()
        if host in self._allowed_hosts:
            return True
        if not self._any_ip_literal:
            return False
        name, sep, port = host.rpartition(":")
        if not sep or port != str(self._port):
            return False
        try:
            ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        except ValueError:
            return False
        return not (":" in name and not name.startswith("["))


def allowed_hosts(address: tuple) -> tuple[frozenset, bool, int]:
    """(the Host values accepted, whether any IP literal with the port is (a wildcard bind), the port)."""
    bound, port = address[0], int(address[1])
    bound_name = f"[{bound}]" if ":" in bound else bound
    names = {*LOOPBACK_NAMES, bound_name.lower()}
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:
        hosts |= names  # a client leaves the default port out
    wildcard = bound in ("0.0.0.0", "::", "")
    return frozenset(hosts), wildcard, port


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _json(start_response, status: int, payload) -> list:
    body = json.dumps(payload, indent=1).encode() + b"\n"
    start_response(f"{status} {_REASONS[status]}", [("Content-Type", "application/json"),
                                                   ("Cache-Control", "no-store"),
                                                   ("Content-Length", str(len(body)))])
    return [body]
