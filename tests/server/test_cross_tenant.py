"""Cross-tenant smuggling and response-queue poisoning on the node-to-node hop (issue 9, item 1).

Two nodes on one Redis, two tenants (two users, two domains, two tunnel clients with
their own backends) both served by node a; visitors come in at node b, whose requests
for either site go over b's kept-alive hop connections to a. The attacker's request
names ``Content-Length`` in ``Connection`` and carries, as its body, a request for the
other tenant's site: it must reach the first tenant's backend as a body, intact, and
never the other tenant's backend; no visitor may receive another visitor's response.
"""

from __future__ import annotations

import socket

import gevent
import pytest
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from tests.fixtures.tunnel import wait_until
from tun2g.http import MessageReader

A, B = "alpha.test", "beta.test"


class TenantApp:
    """A tenant's backend: records every request (method, path, Host, body) and names itself in answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str, str, str, bytes]] = []
        self.release = Event()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read()
        path = environ["PATH_INFO"]
        self.seen.append((environ["REQUEST_METHOD"], path, environ.get("HTTP_HOST", ""), body))
        if path == "/slow":
            self.release.wait(10)
        answer = f"tenant {self.name} {path} {len(body)}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(answer))),
                                  ("X-Tenant", self.name)])
        return [answer]

    def paths(self) -> list[str]:
        return [path for _method, path, _host, _body in self.seen]


@pytest.fixture
def tenant_backends():
    servers = []

    def start(name: str) -> tuple[str, TenantApp]:
        app = TenantApp(name)
        server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", app

    yield start
    for server in servers:
        server.stop(timeout=1)


@pytest.fixture
def two_tenants(cluster_node, tenant_backends, start_client):
    """Nodes a and b; tenants alpha (alice) and beta (bob), both tunnelled to node a."""
    a, b = cluster_node("a"), cluster_node("b")
    apps = {}
    for domain, user, name in ((A, "alice", "alpha"), (B, "bob", "beta")):
        url, app = tenant_backends(name)
        apps[name] = app
        start_client(a.client_config(a.grant(domain, user), url, domain=domain))
    wait_until(lambda: sorted(x.domain for x in b.server.get_all_backends()) == [A, B],
               message="both tenants' backends listed on b")
    return a, b, apps["alpha"], apps["beta"]


def exchange(url: str, raw: bytes, method: str = "GET") -> tuple[int, dict, bytes]:
    """Send raw request bytes on a new connection; the first response (status, headers, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(raw)
        reader = MessageReader(sock)
        head = reader.read_final_response_head(method)
        body = b""
        while piece := reader.read_body():
            body += piece
            assert len(body) < 1 << 20
        return head.status, {k.lower(): v for k, v in head.headers}, body


def smuggling_request(host: str, inner: bytes) -> bytes:
    return (f"POST /upload HTTP/1.1\r\nHost: {host}\r\nConnection: close, Content-Length\r\n"
            f"Content-Length: {len(inner)}\r\n\r\n").encode() + inner


def test_a_body_naming_content_length_in_connection_stays_a_body_across_the_hop(two_tenants):
    _a, b, alpha, beta = two_tenants
    inner = f"GET /smuggled HTTP/1.1\r\nHost: {B}\r\n\r\n".encode()
    for _ in range(3):  # the hop connection is kept alive between visitors: smuggle, then reuse it
        status, headers, body = exchange(b.http_url, smuggling_request(A, inner))
        assert status == 200 and headers["x-tenant"] == "alpha"
        assert body == f"tenant alpha /upload {len(inner)}\n".encode()
        status, headers, body = exchange(b.http_url, f"GET /own HTTP/1.1\r\nHost: {B}\r\n\r\n".encode())
        assert (status, headers["x-tenant"], body) == (200, "beta", b"tenant beta /own 0\n")
    assert ("POST", "/upload", A, inner) in alpha.seen  # forwarded intact, as a body
    assert "/smuggled" not in beta.paths() and "/smuggled" not in alpha.paths()
    assert beta.paths() == ["/own"] * 3


def test_a_slow_smuggled_request_cannot_poison_the_next_visitors_response(two_tenants):
    _a, b, alpha, beta = two_tenants
    inner = f"GET /slow HTTP/1.1\r\nHost: {A}\r\n\r\n".encode()
    for round_ in range(3):
        alpha.release.clear()
        status, headers, _body = exchange(b.http_url, smuggling_request(A, inner))
        assert (status, headers["x-tenant"]) == (200, "alpha")
        # The next visitor, of the other site, while a smuggled /slow would still be pending on the hop.
        path = f"/victim-{round_}"
        victim = gevent.spawn(exchange, b.http_url, f"GET {path} HTTP/1.1\r\nHost: {B}\r\n\r\n".encode())
        wait_until(lambda: victim.ready() or "/slow" in alpha.paths(), message="the victim served, or /slow held")
        alpha.release.set()  # a smuggled /slow now answers: its answer must reach nobody
        status, headers, body = victim.get(timeout=10)
        assert (status, headers.get("x-tenant"), body) == (200, "beta", f"tenant beta {path} 0\n".encode())
    assert "/slow" not in alpha.paths()
    assert beta.paths() == [f"/victim-{n}" for n in range(3)]


def test_connection_cannot_remove_host_or_framing_standalone(cluster_node, tenant_backends, start_client):
    node = cluster_node("solo")
    url, alpha = tenant_backends("alpha")
    start_client(node.client_config(node.grant(A, "alice"), url, domain=A))
    inner = f"GET /smuggled HTTP/1.1\r\nHost: {A}\r\n\r\n".encode()
    raw = (f"POST /upload HTTP/1.1\r\nHost: {A}\r\nConnection: Content-Length, Host, Transfer-Encoding\r\n"
           f"Content-Length: {len(inner)}\r\n\r\n").encode() + inner
    status, _headers, body = exchange(node.http_url, raw)
    assert (status, body) == (200, f"tenant alpha /upload {len(inner)}\n".encode())  # not lost
    chunked = (f"POST /chunks HTTP/1.1\r\nHost: {A}\r\nConnection: transfer-encoding\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()
    status, _headers, body = exchange(node.http_url, chunked)
    assert (status, body) == (200, b"tenant alpha /chunks 5\n")
    assert [(m, p, h, body) for m, p, h, body in alpha.seen] == [("POST", "/upload", A, inner),
                                                                ("POST", "/chunks", A, b"hello")]
