"""Churn with real processes: tunnel clients SIGKILLed and restarted under load, no request lost.

One `tun2g server` (plain tunnel, SQLite in tmp_path), three `tun2g client` processes for the
same domain, a backend process, and a killer greenlet that SIGKILLs a random client every
1-2 s and starts it again (it waits until all three are connected before the next kill, so at
least two always are). Phase 1: 10,000 GETs over 8 keep-alive connections, every one must be a
200 with its own body (a GET caught by a dying tunnel is replayed on another). Phase 2: POSTs
whose chunked body is sent slowly, so kills land mid-body: each must be a 200 with exactly its
body echoed, or a clean 502 with its X-Request-Id (a streamed body cannot be replayed) -- never
a wrong body, a reset without an answer, or a hang.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
import requests
from gevent.event import Event
from gevent.pool import Pool

from tests.fixtures.cluster import ADMIN_TOKEN
from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import wait_until
from tun2g.storage import SQLiteStorage

DOMAIN = "churn.test"
CLIENTS = 3
WORKERS = 8
GETS = 10_000  # at least; more while the killer has struck fewer than MIN_GET_KILLS times
MIN_GET_KILLS = 5
POST_WORKERS = 8
POSTS_PER_WORKER = 25
POST_PIECES, POST_PIECE_SIZE, POST_GAP = 12, 4096, 0.03  # ~0.4 s per body: kills land mid-body
REQUEST_TIMEOUT = 15

BACKEND = r"""
import sys
from gevent import monkey; monkey.patch_all()
import socket
from gevent.pywsgi import WSGIHandler, WSGIServer

class OneWrite(WSGIHandler):
    # Head and body in one send (gevent sends them apart): a client killed while relaying a small
    # response has then relayed either nothing (the GET is replayed) or all of it.

    def _write_with_headers(self, data):
        self.headers_sent = True
        self.finalize_headers()
        towrite = bytearray(b"HTTP/1.1 ") + self.status + b"\r\n"
        for header, value in self.response_headers:
            towrite += header + b": " + value + b"\r\n"
        self._sendall(towrite + b"\r\n" + data)

def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read()
    else:
        body = environ["PATH_INFO"].encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return [body]

class NoDelay(WSGIServer):
    def handle(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(sock, address)

NoDelay(("127.0.0.1", int(sys.argv[1])), app, log=None, error_log=None, handler_class=OneWrite).serve_forever()
"""


class Processes:
    """Every process the test starts; all SIGKILLed at the end, pass or fail."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_name: str) -> subprocess.Popen:
        with open(self.directory / log_name, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env_without_proxies())
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
        for process in self.started:
            process.wait(10)


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


class Churn:
    """The server, the backend, three clients and the killer."""

    def __init__(self, processes: Processes, tmp_path: Path):
        self.processes = processes
        store = tmp_path / "store.sqlite3"
        storage = SQLiteStorage(store)
        storage.add_route(DOMAIN, "churner")
        _info, self.token = storage.create_token("churner", scopes=("connect",))
        storage.close()
        self.http_port, self.tunnel_port, self.admin_port, backend_port = (free_port() for _ in range(4))
        self.server_log = tmp_path / "server.log"
        processes.start([sys.executable, "-m", "tun2g.cli", "server", "--http", f"127.0.0.1:{self.http_port}",
                         "--tunnel", f"127.0.0.1:{self.tunnel_port}", "--plain-tunnel",
                         "--admin", f"127.0.0.1:{self.admin_port}", "--admin-token", ADMIN_TOKEN,
                         "--storage", f"sqlite:///{store}",
                         "--log-level", "info"], "server.log")
        processes.start([sys.executable, "-c", BACKEND, str(backend_port)], "backend.log")
        for port in (self.http_port, self.tunnel_port, self.admin_port, backend_port):
            wait_for_port(port, timeout=20)
        self.backend_url = f"http://127.0.0.1:{backend_port}"
        self.clients = [self._client(i) for i in range(CLIENTS)]
        self.wait_all_connected()
        self.kills = 0
        self._stop = Event()
        self._killer: gevent.Greenlet | None = None

    def _client(self, index: int) -> subprocess.Popen:
        return self.processes.start([sys.executable, "-m", "tun2g.cli", "client", "--server",
                                     f"127.0.0.1:{self.tunnel_port}", "--token", self.token, "--domain", DOMAIN,
                                     "--backend", self.backend_url, "--plain", "--log-level", "warning"],
                                    f"client{index}.log")

    def connected(self) -> int:
        listed = requests.get(f"http://127.0.0.1:{self.admin_port}/backends",
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5).json()
        return sum(1 for backend in listed if backend["domain"] == DOMAIN and backend["usable"])

    def wait_all_connected(self, timeout: float = 30) -> None:
        wait_until(lambda: self.connected() == CLIENTS, timeout=timeout, interval=0.05,
                   message=f"{CLIENTS} tunnel clients connected")

    # the killer

    def start_killing(self) -> None:
        self._stop.clear()
        self._killer = gevent.spawn(self._kill_loop)

    def stop_killing(self) -> None:
        self._stop.set()
        self._killer.get(timeout=60)  # re-raises the killer's failure, if any

    def _kill_loop(self) -> None:
        while not self._stop.wait(random.uniform(1.0, 2.0)):  # the kill pace, not a synchronisation
            self.wait_all_connected()  # so that two stay connected while one dies
            index = random.randrange(CLIENTS)
            self.clients[index].send_signal(signal.SIGKILL)
            self.clients[index].wait(10)
            self.kills += 1
            self.clients[index] = self._client(index)

    def log_counts(self, offset: int) -> tuple[dict, int]:
        """Server log counts from byte `offset` on: tunnels failed under a request, 502s logged; and the new end."""
        data = self.server_log.read_bytes()
        text = data[offset:].decode(errors="replace")
        counts = {"backend_failed": text.count("event=backend_failed"),
                  "deregistered": text.count("event=deregistered"),
                  "registered": text.count("event=registered"),
                  "logged_502": len(re.findall(r"event=request .*status=502", text))}
        return counts, len(data)


@pytest.fixture
def churn(processes, tmp_path):
    deployment = Churn(processes, tmp_path)
    yield deployment
    if deployment._killer is not None:
        deployment._killer.kill()  # before `processes` kills everything: it must start no more clients


def _get_worker(port: int, worker: int, count: int, failures: list, latencies: list, more=lambda: False) -> int:
    """`count` GETs, then more while `more()` says so (a fast machine finishes before the killer has been busy)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    done = 0
    try:
        i = 0
        while i < count or more():
            i += 1
            path = f"/get/{worker}/{i}"
            started = time.monotonic()
            try:
                conn.request("GET", path, headers={"Host": DOMAIN})
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                failures.append((path, "exception", repr(exc)))
                conn.close()  # http.client reconnects on the next request
                continue
            latencies.append(time.monotonic() - started)
            done += 1
            if response.status != 200 or body != path.encode() + b"\n":
                failures.append((path, response.status, response.getheader("X-Request-Id"), body[:200]))
            if response.will_close:
                conn.close()
    finally:
        conn.close()
    return done


def _slow_post(port: int, request_id: str) -> tuple:
    """One POST with a slow chunked body, answer read while the body is still going (full duplex)."""
    pieces = [(f"{request_id}:{n}:".encode() + os.urandom(POST_PIECE_SIZE // 2).hex().encode())[:POST_PIECE_SIZE]
              for n in range(POST_PIECES)]
    expected = b"".join(pieces)
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_body():
        try:
            _send_body()
        except OSError:
            pass  # the server answered (a 502) and closed: the reader reports what came back

    def _send_body():
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n"
                     f"X-Request-Id: {request_id}\r\nConnection: close\r\n\r\n".encode())
        for piece in pieces:
            gevent.sleep(POST_GAP)  # pacing the upload, so that a kill can land mid-body
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")

    sender = gevent.spawn(send_body)
    try:
        with gevent.Timeout(REQUEST_TIMEOUT * 2, False):
            try:
                response = http.client.HTTPResponse(sock, method="POST")
                response.begin()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                return ("no answer", request_id, repr(exc), sender.exception and repr(sender.exception))
            if response.status == 200 and body == expected:
                return ("ok",)
            if response.status == 502 and response.getheader("X-Request-Id") == request_id:
                return ("502",)
            return ("wrong", request_id, response.status, response.getheader("X-Request-Id"),
                    len(body), len(expected), body[:120])
        return ("hang", request_id)
    finally:
        sender.kill()
        sock.close()


@pytest.mark.timeout(300)  # 25-55 s on a loaded 2-core machine; generous for slower ones
def test_churn_gets_are_never_lost_and_posts_end_cleanly(churn, record_property):
    started = time.monotonic()
    _, offset = churn.log_counts(0)

    # Phase 1: 10,000 GETs on keep-alive connections while clients die and come back.
    failures, latencies = [], []
    churn.start_killing()
    pool = Pool(WORKERS)
    per_worker = GETS // WORKERS
    deadline = time.monotonic() + 120

    def more() -> bool:  # keep going until the killer has struck a few times (bounded)
        return churn.kills < MIN_GET_KILLS and time.monotonic() < deadline

    jobs = [pool.spawn(_get_worker, churn.http_port, w, per_worker, failures, latencies, more)
            for w in range(WORKERS)]
    pool.join(timeout=300, raise_error=True)
    get_kills = churn.kills
    get_seconds = time.monotonic() - started
    answered = sum(job.get() for job in jobs)
    get_log, offset = churn.log_counts(offset)

    # Phase 2: slow streamed POSTs; kills land mid-body.
    phase2_started = time.monotonic()
    outcomes = []

    def post_worker(worker: int):
        for i in range(POSTS_PER_WORKER):
            outcomes.append(_slow_post(churn.http_port, f"churn-post-{worker}-{i}"))

    posters = Pool(POST_WORKERS)
    for w in range(POST_WORKERS):
        posters.spawn(post_worker, w)
    posters.join(timeout=300, raise_error=True)
    churn.stop_killing()
    post_kills = churn.kills - get_kills
    post_seconds = time.monotonic() - phase2_started
    post_log, offset = churn.log_counts(offset)

    tally = {kind: sum(1 for o in outcomes if o[0] == kind) for kind in ("ok", "502", "wrong", "no answer", "hang")}
    report = {
        "gets_answered": answered, "gets_non_200": len(failures), "get_kills": get_kills,
        "get_seconds": round(get_seconds, 1), "get_rate": round(answered / get_seconds),
        "get_p99_ms": round(sorted(latencies)[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
        "get_server_log": get_log,
        "posts": len(outcomes), "post_outcomes": tally, "post_kills": post_kills,
        "post_seconds": round(post_seconds, 1), "post_server_log": post_log,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    print("\nchurn:", report)
    for key, value in report.items():
        record_property(key, value)

    assert get_kills >= MIN_GET_KILLS, "the killer must have been busy during the GETs"
    assert failures == [], f"{len(failures)} GETs were not a 200 with their own body, e.g. {failures[:5]}"
    assert answered >= GETS
    assert post_kills >= 3, "the killer must have been busy during the POSTs"
    bad = [o for o in outcomes if o[0] not in ("ok", "502")]
    assert bad == [], f"{len(bad)} POSTs got neither their body back nor a clean 502, e.g. {bad[:5]}"
    assert tally["ok"] > 0
