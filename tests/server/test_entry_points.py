"""Every entry point into the server's one Router and one request pipeline gives the same answers.

The four entry points:

* ``native``: the server's own public HTTP front (tun2g.server.front), over a socket;
* ``wsgi``: ``WSGIFront(server)`` mounted in gevent.pywsgi, over a socket;
* ``round_trip``: ``server.round_trip(head, body)``, mostly through the requests adapter
  (``session.mount("http://", server.adapter())``), in this process;
* ``hop``: node b's native front for a tunnel connected to node a: b forwards the request
  to a over a signed hop (two nodes on one Redis).

All four run on the same two-node cluster: node a holds the tunnels and serves the native,
WSGI and round_trip entry points; node b is the hop's entry. Each case's expectation is
written once, independently of the entry point, so passing everywhere means answering
identically. The asymmetries that are documented behaviour, each asserted as such:

* a 101 upgrade is spliced by ``native`` and ``hop``; ``round_trip`` returns a
  StreamedResponse with status 101 whose read() gives the raw bytes after the switch (there
  is nothing to write them back with); ``wsgi`` under gevent.pywsgi, which cannot hand its
  connection over, answers the 501 ``upgrade_unsupported`` page;
* ``round_trip`` has no public peer, so it adds no address to X-Forwarded-For;
* ``round_trip`` gives a body without Content-Length as a stream that simply ends (a Python
  object has no wire framing); the socket fronts send it chunked;
* ``round_trip`` has no client waiting for ``100 Continue``: the body goes out with the head.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import subprocess
import sys

import gevent
import pytest
import requests
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from tests.fixtures.backends import pattern_bytes, pattern_digest
from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g import pages
from tun2g.http import RequestHead
from tun2g.server.wsgi import WSGIFront

ENTRY_POINTS = ["native", "wsgi", "round_trip", "hop"]
SOCKET_ENTRIES = {"native", "wsgi", "hop"}
UNROUTED = "nobody.test"
PUBLIC_XFF = "203.0.113.7"
BIG = 4 * 1024 * 1024 + 12345  # several MB, not a multiple of any buffer size
TIMEOUT = 30


# -- the backends ---------------------------------------------------------------------------------


class EchoApp:
    """Answers with what it received (method, path, headers, the body's digest); /download/N streams N bytes."""

    def __init__(self):
        self.seen = []        # paths, in arrival order
        self.release = Event()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        self.seen.append(path)
        if path.startswith("/download/"):
            size = int(path.rsplit("/", 1)[1])
            start_response("200 OK", [("Content-Type", "application/octet-stream")])  # no length: chunked
            return pattern_bytes(size)
        if path == "/hold":
            self.release.wait(TIMEOUT)
        digest, length = hashlib.sha256(), 0
        while piece := environ["wsgi.input"].read(65536):
            digest.update(piece)
            length += len(piece)
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if environ.get("CONTENT_LENGTH"):
            headers["Content-Length"] = environ["CONTENT_LENGTH"]
        body = json.dumps({"method": environ["REQUEST_METHOD"], "path": path, "headers": headers,
                           "sha256": digest.hexdigest(), "length": length}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def read_head(sock) -> tuple[int, dict, bytes]:
    """One response head read byte by byte (nothing after it is consumed): (status, headers, raw)."""
    raw = b""
    while not raw.endswith(b"\r\n\r\n"):
        piece = sock.recv(1)
        assert piece, f"EOF inside a response head: {raw!r}"
        raw += piece
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, raw


def recv_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        assert piece, f"EOF after {data!r}"
        data += piece
    return data


GREETING = b"switched to tun2g-echo\n"


def _upgrade_handler(sock, _address):
    """Answers 101 (Upgrade: tun2g-echo), sends a greeting, then echoes raw bytes until EOF."""
    read_request_head(sock)
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tun2g-echo\r\n\r\n" + GREETING)
    while data := sock.recv(65536):
        sock.sendall(data)


def read_request_head(sock) -> bytes:
    raw = b""
    while b"\r\n\r\n" not in raw:
        piece = sock.recv(4096)
        if not piece:
            break
        raw += piece
    return raw


class Killer:
    """A backend that SIGKILLs the tunnel client process serving it, then never answers."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.hits = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _address):
        read_request_head(sock)
        self.hits += 1
        self.process.send_signal(signal.SIGKILL)
        sock.settimeout(TIMEOUT)
        try:
            while sock.recv(65536):  # until the dead client's connection closes
                pass
        except OSError:
            pass


# -- the deployment and the four entry points -----------------------------------------------------


class Answer:
    """What a client of an entry point got, reduced to what must be the same everywhere."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    @property
    def request_id(self) -> str | None:
        return self.one("X-Request-Id")

    @property
    def framing(self) -> str:
        """'length' (Content-Length matching the body), 'chunked', or 'unframed' (a stream that just ends)."""
        if (self.one("Transfer-Encoding") or "").lower() == "chunked":
            assert self.one("Content-Length") is None
            return "chunked"
        length = self.one("Content-Length")
        if length is not None:
            assert int(length) == len(self.body)
            return "length"
        return "unframed"

    def echo(self) -> dict:
        assert self.one("Content-Type") == "application/json", (self.status, self.headers, self.body[:300])
        return json.loads(self.body)


class Setup:
    def __init__(self, entry, a, b, app, echo_url, upgrade_url, start_client, wsgi_port):
        self.entry, self.a, self.b, self.app = entry, a, b, app
        self.echo_url, self.upgrade_url = echo_url, upgrade_url
        self._start_client = start_client
        self.wsgi_port = wsgi_port
        self.processes: list[subprocess.Popen] = []
        self.session = requests.Session()
        self.session.mount("http://", a.server.adapter())

    # the tunnels, all on node a

    def connect(self, backend_url: str | None = None):
        """An in-process tunnel client on node a, once every node sees it."""
        before = self._count()
        client = self._start_client(self.a.client_config(self.a.grant(), backend_url or self.echo_url))
        self.wait_tunnels(before + 1)
        return client

    def connect_process(self, backend_url: str) -> subprocess.Popen:
        """A real `tun2g client` process on node a (a test may SIGKILL it)."""
        before = self._count()
        command = [sys.executable, "-m", "tun2g.cli", "client", "--server", self.a.tunnel_addr, "--token",
                   self.a.grant(), "--domain", DOMAIN, "--backend", backend_url, "--plain", "--no-reconnect",
                   "--log-level", "warning"]
        self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               env=env_without_proxies()))
        self.wait_tunnels(before + 1)
        return self.processes[-1]

    def _count(self) -> int:
        return len(self.a.server.get_backends_for_domain(DOMAIN))

    def wait_tunnels(self, count: int) -> None:
        wait_until(lambda: self._count() == count and
                   [x.node for x in self.b.server.get_backends_for_domain(DOMAIN)] == ["a"] * count,
                   timeout=15, message=f"{count} tunnel(s) on a, listed on b")

    # the entry point under test

    @property
    def port(self) -> int:
        return {"native": self.a.running.http_address[1], "wsgi": self.wsgi_port,
                "hop": self.b.running.http_address[1]}[self.entry]

    def request(self, method: str, path: str, headers: dict | None = None, body=None, host: str = DOMAIN) -> Answer:
        headers = {"Host": host, **(headers or {})}
        if self.entry == "round_trip":
            response = self.session.request(method, f"http://{host}{path}", headers=headers, data=body,
                                            stream=True, timeout=TIMEOUT)
            content = b"".join(response.iter_content(65536))
            return Answer(response.status_code, list(response.raw.headers), content)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked=body is not None
                         and not isinstance(body, bytes))
            response = conn.getresponse()
            return Answer(response.status, response.getheaders(), response.read())
        finally:
            conn.close()

    def raw(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self):
        self.session.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


@pytest.fixture(params=ENTRY_POINTS)
def setup(request, cluster_node, start_client):
    a, b = cluster_node("a"), cluster_node("b")
    app = EchoApp()
    echo = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    echo.start()
    upgrade_backend = StreamServer(("127.0.0.1", 0), _upgrade_handler)
    upgrade_backend.start()
    front = WSGIServer(("127.0.0.1", 0), WSGIFront(a.server), log=None, error_log=None)
    front.start()
    result = Setup(request.param, a, b, app, f"http://127.0.0.1:{echo.server_port}",
                   f"http://127.0.0.1:{upgrade_backend.server_port}", start_client, front.server_port)
    try:
        yield result
    finally:
        app.release.set()
        result.close()
        for server in (front, upgrade_backend, echo):
            server.stop(timeout=1)


# -- the cases ------------------------------------------------------------------------------------


def expected_forwarded_for(entry: str) -> str:
    """As the backend sees it: a public peer's own X-Forwarded-For is not believed (no trusted proxy is
    configured) and is replaced by the peer; round_trip, an in-process caller, keeps what it sent and adds
    no peer; then the tunnel client's own hop from the server (127.0.0.1)."""
    return ", ".join([PUBLIC_XFF] if entry == "round_trip" else ["127.0.0.1"]) + ", 127.0.0.1"


def case_200_with_body(s: Setup):
    s.connect()
    answer = s.request("GET", "/echo/ok?x=1", {"X-Request-Id": "e2e-ok-1", "X-Forwarded-For": PUBLIC_XFF})
    assert answer.status == 200
    assert answer.framing == "length"
    assert answer.request_id == "e2e-ok-1"
    seen = answer.echo()
    assert (seen["method"], seen["path"], seen["length"]) == ("GET", "/echo/ok", 0)
    assert seen["headers"]["Host"] == DOMAIN
    assert seen["headers"]["X-Request-Id"] == "e2e-ok-1"
    assert seen["headers"]["X-Forwarded-For"] == expected_forwarded_for(s.entry)
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert seen["headers"]["X-Forwarded-Host"] == DOMAIN
    assert "X-Tun2G-Hop" not in seen["headers"]  # the hop's signature never reaches the backend
    # A GET without a body reaches the backend as one (RFC 9112 section 6.3: no length, no chunking).
    assert {"Transfer-Encoding", "Content-Length"} & set(seen["headers"]) == set(), seen["headers"]

    unnamed = s.request("GET", "/echo/unnamed")  # no X-Request-Id sent: one is made, the same both ways
    assert unnamed.status == 200 and unnamed.request_id
    assert unnamed.echo()["headers"]["X-Request-Id"] == unnamed.request_id
    assert "X-Forwarded-For" in unnamed.echo()["headers"]  # at least the tunnel client's hop

    if s.entry == "round_trip":  # the adapter is a thin layer: server.round_trip itself answers alike
        response = s.a.server.round_trip(RequestHead("GET", "/echo/direct", "HTTP/1.1",
                                                     [("Host", DOMAIN), ("X-Request-Id", "e2e-ok-2")]))
        direct = Answer(response.status, list(response.headers), b"".join(response))
        assert (direct.status, direct.framing, direct.request_id) == (200, "length", "e2e-ok-2")
        assert direct.echo()["headers"]["X-Forwarded-For"] == "127.0.0.1"  # only the tunnel client's hop


def case_502_no_backends(s: Setup):
    # For the hop entry point node b answers: no node holds a tunnel for the Host, nothing is forwarded.
    s.connect()  # a tunnel for another Host changes nothing
    answer = s.request("GET", "/", {"X-Request-Id": "e2e-none-1"}, host=UNROUTED)
    assert answer.status == 502
    assert answer.request_id == "e2e-none-1"
    assert answer.one("Content-Type") == "text/html; charset=utf-8"
    assert answer.framing == "length"
    assert answer.body == pages.no_backends(UNROUTED, "e2e-none-1").body
    unnamed = s.request("GET", "/", host=UNROUTED)
    assert unnamed.status == 502 and unnamed.request_id
    assert unnamed.body == pages.no_backends(UNROUTED, unnamed.request_id).body


def _hold_a_request_on(s: Setup) -> gevent.Greenlet:
    """Keep one request in flight on the tunnel(s) connected so far, so least-loaded routing picks a newer one."""
    native = s.a.http_url
    held = gevent.spawn(requests.get, native + "/hold", headers={"Host": DOMAIN}, timeout=TIMEOUT)
    wait_until(lambda: "/hold" in s.app.seen, message="the held request to reach the backend")
    return held


def case_tunnel_dies_only_tunnel(s: Setup):
    killer = Killer()
    try:
        killer.process = s.connect_process(killer.url)
        answer = s.request("GET", "/die", {"X-Request-Id": "e2e-die-1"})
        assert killer.hits == 1
        assert answer.status == 502, answer.body[:300]
        assert answer.request_id == "e2e-die-1"
        assert answer.framing == "length"
        assert answer.one("Content-Type") == "text/html; charset=utf-8"
        assert b"request ID e2e-die-1" in answer.body
    finally:
        killer.server.stop(timeout=1)


def case_tunnel_dies_retried_on_another(s: Setup):
    killer = Killer()
    try:
        s.connect()                      # the healthy tunnel, busy with one held request...
        held = _hold_a_request_on(s)
        killer.process = s.connect_process(killer.url)  # ...so the idle dying one is picked first
        answer = s.request("GET", "/die", {"X-Request-Id": "e2e-die-2"})
        assert killer.hits == 1, "the request went to the dying tunnel first"
        assert answer.status == 200, answer.body[:300]  # a GET is replayed on the live tunnel
        assert answer.request_id == "e2e-die-2"
        seen = answer.echo()
        assert seen["path"] == "/die" and seen["headers"]["X-Request-Id"] == "e2e-die-2"
        s.app.release.set()
        assert held.get(timeout=TIMEOUT).status_code == 200
    finally:
        killer.server.stop(timeout=1)


def case_101_upgrade(s: Setup):
    s.connect(s.upgrade_url)
    ask = {"Host": DOMAIN, "Connection": "Upgrade", "Upgrade": "tun2g-echo", "X-Request-Id": "e2e-up-1"}
    if s.entry == "round_trip":
        # Documented: a StreamedResponse with status 101; read() gives the raw bytes after the switch.
        response = s.a.server.round_trip(RequestHead("GET", "/ws", "HTTP/1.1", list(ask.items())))
        try:
            answer = Answer(response.status, list(response.headers), b"")
            assert answer.status == 101
            assert answer.one("Upgrade") == "tun2g-echo"
            assert answer.request_id == "e2e-up-1"
            received = b""
            while len(received) < len(GREETING):
                piece = response.read(65536)
                assert piece, f"the switched stream ended after {received!r}"
                received += piece
            assert received == GREETING
        finally:
            response.close()
        return
    sock = s.raw()
    try:
        sock.sendall(("GET /ws HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in ask.items()) + "\r\n").encode())
        status, headers, _raw = read_head(sock)
        if s.entry == "wsgi":
            # Documented: gevent.pywsgi cannot hand its connection over, so the switch is refused with
            # the upgrade_unsupported page rather than left hanging.
            page = pages.upgrade_unsupported()
            assert status == 501
            assert headers.get("content-type") == [page.content_type]
            body = recv_exactly(sock, int(headers["content-length"][0]))
            assert body == page.body
            assert headers.get("x-request-id") == ["e2e-up-1"], "X-Request-Id on every answer, this one too"
            return
        assert status == 101
        assert headers.get("upgrade") == ["tun2g-echo"]
        assert headers.get("x-request-id") == ["e2e-up-1"]
        assert recv_exactly(sock, len(GREETING)) == GREETING
        for message in (b"ping through the splice", b"x" * 100000):
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message
    finally:
        sock.close()


def case_100_continue(s: Setup):
    s.connect()
    body = b"".join(pattern_bytes(300000))
    if s.entry == "round_trip":
        # No client waits for 100 Continue here: the body goes out with the head, and the backend's
        # interim answer is skipped by the round trip.
        answer = s.request("POST", "/echo/continue", {"Expect": "100-continue", "X-Request-Id": "e2e-100-1",
                                                        "Content-Type": "application/octet-stream"}, body)
    else:
        sock = s.raw()
        try:
            sock.sendall(f"POST /echo/continue HTTP/1.1\r\nHost: {DOMAIN}\r\nExpect: 100-continue\r\n"
                         f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
                         f"X-Request-Id: e2e-100-1\r\n\r\n".encode())
            status, _headers, raw = read_head(sock)  # the body is held back until this arrives
            assert status == 100, raw
            sock.sendall(body)
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            answer = Answer(response.status, response.getheaders(), response.read())
        finally:
            sock.close()
    assert answer.status == 200
    assert answer.request_id == "e2e-100-1"
    seen = answer.echo()
    assert (seen["method"], seen["length"], seen["sha256"]) == ("POST", len(body), hashlib.sha256(body).hexdigest())


def case_streamed_request_body(s: Setup):
    s.connect()
    answer = s.request("POST", "/echo/upload", {"X-Request-Id": "e2e-up-big"}, pattern_bytes(BIG))
    assert answer.status == 200 and answer.request_id == "e2e-up-big"
    seen = answer.echo()
    assert (seen["length"], seen["sha256"]) == (BIG, pattern_digest(BIG))
    assert seen["headers"].get("Transfer-Encoding", "").lower() == "chunked"  # streamed all the way


def case_streamed_response_body(s: Setup):
    s.connect()
    answer = s.request("GET", f"/download/{BIG}", {"X-Request-Id": "e2e-down-big"})
    assert answer.status == 200 and answer.request_id == "e2e-down-big"
    assert answer.one("Content-Type") == "application/octet-stream"
    # A body of unknown length: chunked on the wire; round_trip's stream simply ends.
    assert answer.framing == ("unframed" if s.entry == "round_trip" else "chunked")
    assert len(answer.body) == BIG and hashlib.sha256(answer.body).hexdigest() == pattern_digest(BIG)


CASES = {name.removeprefix("case_"): function for name, function in list(globals().items())
         if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_every_entry_point_answers_alike(setup, case):
    """The same request gives the same status, headers that matter and body through every entry point.

    Asymmetries (see the module docstring), asserted as the documented behaviour where they occur:
    a 101 upgrade is spliced by the native front and the hop, returned as a 101 StreamedResponse
    whose read() gives the switched bytes by round_trip, and answered with the 501
    upgrade_unsupported page by the WSGI front under gevent.pywsgi (no socket handover);
    round_trip adds no public peer to X-Forwarded-For, gives a length-less body as a plain
    stream, and sends an Expect: 100-continue body with its head.
    """
    CASES[case](setup)
