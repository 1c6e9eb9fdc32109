"""forward_exchange over real sockets: real clients (requests, http.client, curl) -> test proxy -> real backends."""

import hashlib
import http.client
import json
import os
import socket
import subprocess

import pytest
import requests
from gevent.event import Event

from tests.fixtures.net import env_without_proxies, require_binary
from tun2g.http import DownstreamError, MessageReader, UpstreamError, forward_exchange

from .support import read_request, wait_for


def echo_app(environ, start_response):
    """Answers with what it received: method, target, headers, body size and sha256."""
    digest, size = hashlib.sha256(), 0
    while chunk := environ["wsgi.input"].read(65536):
        digest.update(chunk)
        size += len(chunk)
    target = environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
    info = {"method": environ["REQUEST_METHOD"], "target": target, "size": size, "sha256": digest.hexdigest(),
            "remote_port": environ["REMOTE_PORT"],
            "headers": {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}}
    data = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [] if environ["REQUEST_METHOD"] == "HEAD" else [data]


@pytest.fixture
def session():
    with requests.Session() as s:
        s.trust_env = False  # no proxy variables from the environment
        yield s


@pytest.fixture
def echo_proxy(wsgi_backend, proxy_to):
    return proxy_to(wsgi_backend(echo_app))


def url(proxy, path="/"):
    return f"http://127.0.0.1:{proxy.port}{path}"


def test_get_head_post_with_keep_alive_reuse_both_sides(echo_proxy, session):
    got = session.get(url(echo_proxy, "/a?b=c"), headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1",
                                                          "X-End": "2"})
    assert got.status_code == 200 and got.headers["X-Proxied"] == "1"
    info = got.json()
    assert info["method"] == "GET" and info["target"] == "/a?b=c" and info["headers"]["x-end"] == "2"
    assert "x-hop" not in info["headers"] and "connection" not in info["headers"]
    head = session.head(url(echo_proxy, "/h"))
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 0
    posted = session.post(url(echo_proxy, "/p"), data=b"x" * 100_000)
    assert posted.json()["size"] == 100_000 and posted.json()["sha256"] == hashlib.sha256(b"x" * 100_000).hexdigest()
    again = session.get(url(echo_proxy, "/again"))
    assert echo_proxy.connections == 1  # the public connection was kept alive throughout
    assert again.json()["remote_port"] == info["remote_port"]  # and so was the backend connection
    assert all(r.keep_alive and r.upstream_reusable for r in echo_proxy.results)


def test_chunked_request_body_reaches_backend_whole(echo_proxy, session):
    pieces = [os.urandom(n) for n in (1, 5000, 70_000, 3)]
    got = session.post(url(echo_proxy), data=iter(pieces))  # a generator: requests sends chunked
    assert got.json()["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert got.json()["headers"].get("transfer-encoding") == "chunked"


def test_chunked_response_is_rechunked_and_http10_client_gets_until_close(wsgi_backend, proxy_to):
    def chunked_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one,", b"two,", b"three"])  # no length: pywsgi answers HTTP/1.1 with chunked
    proxy = proxy_to(wsgi_backend(chunked_app))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked" and response.read() == b"one,two,three"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = read_until_close(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head and body == b"one,two,three"


def read_until_close(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_until_close_response_becomes_chunked_for_http11(raw_backend, proxy_to):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nstreamed until close")
    proxy = proxy_to(raw_backend(handler))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked" and response.read() == b"streamed until close"
    conn.request("GET", "/second")  # the public connection stays usable after an until-close upstream
    assert conn.getresponse().read() == b"streamed until close"
    assert [r.upstream_reusable for r in proxy.results] == [False, False]


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_keep_the_connection_usable(wsgi_backend, proxy_to, status):
    def app(environ, start_response):
        start_response(f"{status} X", [("ETag", '"e"')])
        return []
    proxy = proxy_to(wsgi_backend(app))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for _ in range(2):
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == status and response.read() == b"" and response.getheader("ETag") == '"e"'
    assert proxy.connections == 1


def test_expect_100_continue_upload_with_curl_gets_the_real_final_response(echo_proxy, tmp_path):
    curl = require_binary("curl")
    upload = tmp_path / "upload.bin"
    data = os.urandom(3 * 1024 * 1024)
    upload.write_bytes(data)
    done = subprocess.run([curl, "-sS", "-v", "-T", str(upload), "-H", "Expect: 100-continue",
                           url(echo_proxy, "/up")], capture_output=True, timeout=20, env=env_without_proxies())
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(b"HTTP/1.1 100 Continue") == 1 and b"HTTP/1.1 200 OK" in done.stderr
    info = json.loads(done.stdout)
    assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert echo_proxy.results[-1].status == 200


def test_103_early_hints_then_final_response(raw_backend, proxy_to):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # not expected by the client: swallowed
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    proxy = proxy_to(raw_backend(handler))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert b"100 Continue" not in data and data.endswith(b"\r\n\r\nok")


def test_pipelined_requests_are_answered_in_order(echo_proxy):
    with socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader = MessageReader(sock)
        bodies = []
        for _ in range(3):
            assert reader.read_response_head("GET").status == 200
            body = b""
            while not reader.body_complete:
                body += reader.read_body()
            bodies.append(json.loads(body))
    assert [b["target"] for b in bodies] == ["/1", "/2", "/3"] and bodies[1]["size"] == 3


def test_streamed_response_pieces_are_flushed_as_they_come(raw_backend, proxy_to):
    release, sent_last = Event(), Event()

    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\ndata: 1\r\n")
        wait_for(release, "the client to see the first piece")
        sent_last.set()
        sock.sendall(b"7\r\ndata: 2\r\n0\r\n\r\n")
    proxy = proxy_to(raw_backend(handler))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/events")
    response = conn.getresponse()
    assert response.read1(100) == b"data: 1"
    assert not sent_last.is_set()
    release.set()
    assert response.read() == b"data: 2"


def test_websocket_upgrade_echoes_both_ways(raw_backend, proxy_to):
    websocket = pytest.importorskip("websocket")
    proxy = proxy_to(raw_backend(websocket_echo))
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/ws", timeout=5)
    try:
        ws.send("hello")
        assert ws.recv() == "hello"
        blob = os.urandom(200_000)
        ws.send_binary(blob)
        assert ws.recv() == blob
    finally:
        ws.close()
    wait_for(proxy.connection_done, "the proxy to finish the spliced connection")
    assert proxy.results[-1].upgraded and proxy.results[-1].status == 101


def websocket_echo(sock):
    """A minimal RFC 6455 echo server: handshake, then unmask and echo text/binary frames until close."""
    import base64
    reader, head, _ = read_request(sock)
    accept = base64.b64encode(hashlib.sha1(head.get("Sec-WebSocket-Key").encode()
                                           + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    sock.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode())
    buffer = reader.take_buffered()

    def need(n):
        nonlocal buffer
        while len(buffer) < n:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            buffer += data
        out, buffer = buffer[:n], buffer[n:]
        return out

    try:
        while True:
            first, second = need(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(need(2), "big")
            elif length == 127:
                length = int.from_bytes(need(8), "big")
            mask = need(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(need(length)))
            opcode = first & 0x0F
            if length < 126:
                header = bytes([0x80 | opcode, length])
            elif length < 65536:
                header = bytes([0x80 | opcode, 126]) + length.to_bytes(2, "big")
            else:
                header = bytes([0x80 | opcode, 127]) + length.to_bytes(8, "big")
            sock.sendall(header + payload)
            if opcode == 0x8:
                return
    except EOFError:
        return


def test_upgrade_half_close_is_relayed(raw_backend, proxy_to):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n")
        received = read_until_close(sock)  # until the client's half-close arrives
        sock.sendall(b"got:" + received)
    proxy = proxy_to(raw_backend(handler))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\nearly")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        sock.sendall(b"-late")
        sock.shutdown(socket.SHUT_WR)
        rest = head.split(b"\r\n\r\n", 1)[1] + read_until_close(sock)
    assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: raw" in head
    assert rest == b"got:early-late"


@pytest.mark.slow
def test_64_mib_each_way_streams_with_bounded_memory(wsgi_backend, proxy_to, session):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    block = os.urandom(65536)
    blocks = 1024
    expected = hashlib.sha256(block * blocks).hexdigest()
    peak = [0]

    def sample():
        peak[0] = max(peak[0], process.memory_info().rss)

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            return echo_app_sampling(environ, start_response, sample)
        start_response("200 OK", [("Content-Length", str(len(block) * blocks))])
        return (sample() or block for _ in range(blocks))
    proxy = proxy_to(wsgi_backend(app))
    baseline = process.memory_info().rss
    uploaded = session.post(url(proxy), data=(block for _ in range(blocks)))
    assert uploaded.json()["sha256"] == expected
    download = session.get(url(proxy), stream=True)
    digest = hashlib.sha256()
    for piece in download.iter_content(65536):
        digest.update(piece)
        sample()
    assert digest.hexdigest() == expected
    assert peak[0] - baseline < 32 * 1024 * 1024, "a 64 MiB body must not be held in memory"


def echo_app_sampling(environ, start_response, sample):
    digest = hashlib.sha256()
    while chunk := environ["wsgi.input"].read(65536):
        digest.update(chunk)
        sample()
    data = json.dumps({"sha256": digest.hexdigest()}).encode()
    start_response("200 OK", [("Content-Length", str(len(data)))])
    return [data]


def test_backend_refusing_gives_502(proxy_to, session):
    from tests.fixtures.net import free_port
    proxy = proxy_to(free_port())
    got = session.get(url(proxy))
    assert got.status_code == 502 and b"backend unreachable" in got.content


@pytest.mark.parametrize("reply", [b"", b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Le"])
def test_backend_dying_or_garbling_before_the_head_gives_502(raw_backend, proxy_to, session, reply):
    def handler(sock):
        read_request(sock)
        sock.sendall(reply)
    proxy = proxy_to(raw_backend(handler))
    got = session.get(url(proxy))
    assert got.status_code == 502 and got.content.startswith(b"bad gateway")
    assert isinstance(proxy.errors[-1], UpstreamError)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_backend_dying_mid_body_truncates_the_client_response(raw_backend, proxy_to, framing):
    def handler(sock):
        read_request(sock)
        if framing == "length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"a" * 1000 + b"\r\n")
    proxy = proxy_to(raw_backend(handler))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    wait_for(proxy.connection_done, "the proxy to drop the public connection")
    assert proxy.results[-1].keep_alive is False and not proxy.results[-1].upstream_reusable


def test_backend_answering_early_without_reading_the_upload(raw_backend, proxy_to):
    def handler(sock):
        reader, head, _ = read_headers_only(sock)
        sock.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        read_until_close(sock)
    proxy = proxy_to(raw_backend(handler))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"z" * 1000)
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in data and data.endswith(b"too big!")


def read_headers_only(sock):
    reader = MessageReader(sock)
    return reader, reader.read_request_head(), None


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
])
def test_bad_requests_are_refused_before_reaching_the_backend(echo_proxy, data, status):
    with socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=5) as sock:
        sock.sendall(data)
        reply = read_until_close(sock)
    assert reply.startswith(b"HTTP/1.1 %d " % status) and echo_proxy.results == []


def test_client_vanishing_mid_upload_ends_the_exchange(raw_backend, proxy_to):
    backend_saw_end = Event()

    def handler(sock):
        read_headers_only(sock)
        read_until_close(sock)  # the proxy must close its side once the client is gone
        backend_saw_end.set()
    proxy = proxy_to(raw_backend(handler))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"z" * 100_000)
    sock.close()
    wait_for(backend_saw_end, "the backend connection to be closed")
    wait_for(proxy.connection_done, "the proxy to finish the public connection")
    assert isinstance(proxy.errors[-1], DownstreamError)


def test_curl_get_and_post(echo_proxy):
    curl = require_binary("curl")
    done = subprocess.run([curl, "-sS", "--data-binary", "hello", url(echo_proxy, "/c")], capture_output=True,
                          timeout=10, env=env_without_proxies())
    assert done.returncode == 0 and json.loads(done.stdout)["sha256"] == hashlib.sha256(b"hello").hexdigest()



def test_unrequested_switching_protocols_is_a_bad_gateway(raw_backend, proxy_to, session):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: evil\r\n\r\n")
    proxy = proxy_to(raw_backend(handler))
    got = session.get(url(proxy))
    assert got.status_code == 502 and b"did not ask" in got.content


def test_http10_keep_alive_client_and_backend_closing_after_each_response(raw_backend, proxy_to):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    proxy = proxy_to(raw_backend(handler))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        reader = MessageReader(sock)
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = reader.read_response_head("GET")
            assert head.get("Connection") == "keep-alive" and reader.read_body() == b"hello"
    assert proxy.connections == 1
    assert [(r.keep_alive, r.upstream_reusable) for r in proxy.results] == [(True, False), (True, False)]



class CountingWrites:
    """A real socket whose writes are counted (forward_exchange takes any socket-like object)."""

    def __init__(self, sock):
        self.sock, self.writes = sock, []

    def send(self, data):
        self.writes.append(bytes(data))
        return self.sock.send(data)

    def sendall(self, data):
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def recv(self, size):
        return self.sock.recv(size)


def test_small_messages_cross_each_hop_in_one_write(raw_backend):
    def handler(sock):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong")
    port = raw_backend(handler)
    client, public = socket.socketpair()
    upstream = CountingWrites(socket.create_connection(("127.0.0.1", port)))
    downstream = CountingWrites(public)
    client.sendall(b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping")
    reader = MessageReader(downstream)
    result = forward_exchange(reader.read_request_head(), reader, upstream, downstream)
    assert result.status == 200 and result.keep_alive
    assert len(upstream.writes) == 1 and upstream.writes[0].endswith(b"\r\n\r\nping")
    assert len(downstream.writes) == 1 and downstream.writes[0].endswith(b"\r\n\r\npong")
    for sock in (client, public, upstream.sock):
        sock.close()


def test_close_upstream_asks_the_upstream_to_close_and_keeps_the_client_connection():
    import gevent

    public, ours = socket.socketpair()
    upstream_ours, upstream_theirs = socket.socketpair()
    try:
        public.sendall(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
        reader = MessageReader(ours)
        head = reader.read_request_head()
        exchange = gevent.spawn(forward_exchange, head, reader, upstream_ours, ours, close_upstream=True)
        _, sent_up, _ = read_request(upstream_theirs)
        assert sent_up.get_all("Connection") == ["close"]
        upstream_theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        result = exchange.get(timeout=5)
        assert result.status == 200 and result.keep_alive and not result.upstream_reusable
        response = MessageReader(public).read_response_head("GET")
        assert response.status == 200 and response.get("Connection") is None  # the client's connection stays open
    finally:
        for sock in (public, ours, upstream_ours, upstream_theirs):
            sock.close()
