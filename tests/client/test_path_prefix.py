"""--backend http://host/public/: no public target reaches outside /public/ (issue 9, item 5).

A real server, a real tunnel client and a real backend that records every path it
is asked for; targets that climb above the prefix get a clean 400 page.
"""

from __future__ import annotations

import socket

import pytest
from gevent.pywsgi import WSGIServer

from tests.fixtures.tunnel import DOMAIN
from tun2g.http import MessageReader


class RecordingApp:
    def __init__(self):
        self.paths = []

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        query = environ.get("QUERY_STRING")
        self.paths.append(f"{path}?{query}" if query else path)
        body = b"SECRET ADMIN\n" if "/admin" in path and not path.startswith("/public/") else f"public {path}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture
def prefixed(cluster_node, start_client):
    app = RecordingApp()
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    node = cluster_node("solo")
    start_client(node.client_config(node.grant(), f"http://127.0.0.1:{server.server_port}/public/"))
    yield node, app
    server.stop(timeout=1)


def get(node, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", node.running.http_address[1]), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        reader = MessageReader(sock)
        head = reader.read_final_response_head("GET")
        body = b""
        while piece := reader.read_body():
            body += piece
        return head.status, body


ESCAPES = ["/../admin", "/%2e%2e/admin", "/%2E%2E/admin", "/.%2e/admin", "/%2e./admin", "/a/../../admin",
           "//../admin", "/a//..//../admin", "/..%2fadmin", "/a%2F..%2F..%2Fadmin", "/..%5cadmin", "/%252e%252e/admin",
           "/..;/admin", "/x/%2e%2e/%2e%2e/admin?q=1", "/\\..\\admin"]


@pytest.mark.parametrize("target", ESCAPES)
def test_a_target_climbing_above_the_prefix_is_a_400_and_never_reaches_the_backend(prefixed, target):
    node, app = prefixed
    status, body = get(node, target)
    assert status == 400 and b"climbs above" in body and b"Traceback" not in body
    assert app.paths == []


@pytest.mark.parametrize("target, seen", [
    ("/a/../b", "/public/b"), ("/%2e/x", "/public/x"), ("/a/./b/", "/public/a/b/"), ("/x/..", "/public/"),
    ("/static/app.js?v=1", "/public/static/app.js?v=1"), ("/%7Euser", "/public/~user"),
])
def test_dot_segments_inside_the_prefix_are_resolved_before_joining(prefixed, target, seen):
    node, app = prefixed
    status, _body = get(node, target)
    assert status == 200
    assert app.paths == [seen]
