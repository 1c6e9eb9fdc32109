"""Hostile request heads against a real server's public port and tunnel port (issue 9, items 2, 11, 12).

Each test feeds the bad bytes to a real socket of a running tun2g server and checks
the answer (a clean 4xx, or a closed control stream), the log line, and that no
traceback was logged.
"""

from __future__ import annotations

import io
import json
import socket

import pytest
import structlog
from gevent.pywsgi import WSGIServer

from tests.fixtures.tunnel import DOMAIN
from tun2g import smux
from tun2g.control import decode_reply
from tun2g.http import MessageReader
from tun2g.log import configure, flush


@pytest.fixture
def capture_logs():
    """capture_logs() -> lines(): the key=value log lines written from then on (call it after a
    server started: ServerSetup configures logging itself). Logging is restored afterwards."""
    buffer = io.StringIO()

    def lines():
        flush()  # access lines are buffered (tun2g.log): write them out first
        return buffer.getvalue().splitlines()

    def start():
        configure("info", stream=buffer)
        return lines

    yield start
    structlog.reset_defaults()


@pytest.fixture
def server_with_log(cluster_node, backend, start_client, capture_logs):
    """One node (access log on) with a tunnel for app.test; (node, app, log lines)."""
    node = cluster_node("solo", access_log=True, log_level="info")
    url, app = backend
    start_client(node.client_config(node.grant(), url))
    return node, app, capture_logs()


def raw_exchange(port: int, data: bytes, method: str = "GET") -> tuple[int, bytes, bytes]:
    """(status, body, whatever followed until EOF) for ``data`` sent on a new public connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(data)
        reader = MessageReader(sock)
        head = reader.read_final_response_head(method)
        body = b""
        while piece := reader.read_body():
            body += piece
        rest = b""
        if not reader.keep_alive:
            while len(rest) < 65536 and (piece := sock.recv(65536)):
                rest += piece
        return head.status, body, rest


def no_traceback(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text and "HttpParserCallbackError" not in text and "RecursionError" not in text


def test_duplicate_host_is_a_400(server_with_log):
    node, app, log_lines = server_with_log
    status, body, _ = raw_exchange(node.running.http_address[1],
                                   f"GET /dup HTTP/1.1\r\nHost: {DOMAIN}\r\nHost: other.test\r\n\r\n".encode())
    assert status == 400 and b"Host" in body
    assert "/dup" not in app.seen_paths
    lines = log_lines()
    assert any("request_refused" in line and "status=400" in line for line in lines), lines
    no_traceback(lines)


def test_an_upgrade_with_a_body_then_a_bad_request_is_a_clean_400(server_with_log):
    node, app, log_lines = server_with_log
    port = node.running.http_address[1]
    data = (f"GET /ws HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            f"Content-Length: 5\r\n\r\nhello").encode() + b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(data)
        reader = MessageReader(sock)
        first = reader.read_final_response_head("GET")
        while reader.read_body():
            pass
        assert first.status == 200  # the upgrade is declined, the request served with its body
        second = reader.read_final_response_head("GET")
        assert second.status == 501  # the bad request's own refusal: a transfer coding we do not support
    lines = log_lines()
    assert any("request_refused" in line and "status=501" in line for line in lines), lines
    no_traceback(lines)


def test_malformed_chunked_body_gets_a_400_and_an_access_log_line(server_with_log):
    node, app, log_lines = server_with_log
    data = (f"POST /sink HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"5\r\nhello\r\nZZ\r\n").encode()
    status, body, _ = raw_exchange(node.running.http_address[1], data, "POST")
    assert status == 400
    lines = log_lines()
    access = [line for line in lines if "event=request" in line and "path=/sink" in line]
    assert access and "status=400" in access[0], lines
    no_traceback(lines)


class VhostApp:
    """A backend with name-based virtual hosts: only "app.test" is meant to be public."""

    def __init__(self):
        self.seen = []

    def __call__(self, environ, start_response):
        host = environ.get("HTTP_HOST", "")
        self.seen.append((host, environ["PATH_INFO"]))
        body = b"INTERNAL ADMIN\n" if host.startswith("internal") else b"public site\n"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def test_an_absolute_form_target_routes_on_its_authority_and_never_reaches_another_vhost(cluster_node,
                                                                                           start_client):
    node = cluster_node("solo")
    app = VhostApp()
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        start_client(node.client_config(node.grant(), f"http://127.0.0.1:{server.server_port}"))
        port = node.running.http_address[1]
        status, body, _ = raw_exchange(port, f"GET http://internal.test/admin HTTP/1.1\r\nHost: {DOMAIN}\r\n"
                                             f"Connection: close\r\n\r\n".encode())
        assert status == 502 and b"INTERNAL" not in body  # routed on internal.test: no tunnel for it
        status, body, _ = raw_exchange(port, f"GET HTTP://{DOMAIN.upper()}/x?q=1 HTTP/1.1\r\nHost: internal.test\r\n"
                                             f"Connection: close\r\n\r\n".encode())
        assert (status, body) == (200, b"public site\n")  # the authority wins over Host, origin-form upstream
        assert app.seen == [(DOMAIN.upper(), "/x")]
    finally:
        server.stop(timeout=1)


def open_control(tunnel_port: int):
    """A raw smux client session on the tunnel port and the control stream the server opens."""
    sock = socket.create_connection(("127.0.0.1", tunnel_port), timeout=10)
    session = smux.Session(sock, client=True)
    return session, session.accept_stream(timeout=10)


@pytest.mark.parametrize("payload", [b'{"token":' + b"[" * 1500, b'{"a":' * 1500,
                                     b'{"token":"t","domain":' + b"[" * 20 + b"]" * 20 + b"}"],
                         ids=["arrays-1500", "objects-1500", "arrays-20-closed"])
def test_deeply_nested_auth_json_is_a_clean_refusal(cluster_node, capture_logs, payload):
    node = cluster_node("solo", log_level="info")
    log_lines = capture_logs()
    session, control = open_control(node.running.tunnel_address[1])
    try:
        control.sendall(payload)
        control.settimeout(10)
        line = b""
        while not line.endswith(b"\n") and len(line) < 8192:
            piece = control.recv(8192)
            if not piece:
                break
            line += piece
        reply = decode_reply(line.strip())
        assert reply["ok"] is False and "nested" in reply["error"]
    finally:
        session.close()
    lines = log_lines()
    assert any("auth_rejected" in line and "nested" in line for line in lines), lines
    no_traceback(lines)
