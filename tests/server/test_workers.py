"""`tun2g server --workers N`: real supervisor and worker processes sharing the public and tunnel ports.

A connection accepted by the worker without the tunnel is handed (its descriptor, over a Unix
socket) to the worker holding it; a killed worker is replaced and its client served again; SIGTERM
drains them all and exits 0. The handover socket takes only the supervisor's workers, one bounded
message with one TCP socket at a time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.fixtures.net import env_without_proxies, free_port
from tests.fixtures.tunnel import wait_until
from tests.server.support import read_response

DOMAIN = "app.localhost"


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


class Workers:
    """A `tun2g server --workers 2` process, its log file and the ports it serves."""

    def __init__(self, tmp_path: Path, *extra: str, env: dict | None = None) -> None:
        self.env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
        for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_WORKERS"):
            self.env.pop(name, None)
        self.env |= env or {}
        self.http_port, self.tunnel_port = free_port(), free_port()
        self.log_path = tmp_path / "server.log"
        self.process = subprocess.Popen(
            tun2g("server", "--http", f"127.0.0.1:{self.http_port}", "--tunnel", f"127.0.0.1:{self.tunnel_port}",
                  "--admin", "127.0.0.1:0", "--plain-tunnel", "--workers", "2", "--log-level", "debug",
                  "--grace-period", "5", *extra),
            env=self.env, stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"))
        self.clients: list[subprocess.Popen] = []
        wait_until(lambda: len(self.ready()) >= 2, timeout=60, message="both workers to start")

    def log(self) -> str:
        return self.log_path.read_text()

    def ready(self) -> dict[int, int]:
        """worker index -> pid of its latest start."""
        return {int(index): int(pid) for index, pid in re.findall(r"event=worker_ready worker=(\d+) pid=(\d+)",
                                                                  self.log())}

    def count(self, event: str) -> int:
        return len(re.findall(rf"event={event}\b", self.log()))

    def directory(self) -> str:
        return re.search(r"event=supervisor .*?dir=(\S+)", self.log()).group(1)

    def grant(self) -> str:
        subprocess.run(tun2g("route", "add", DOMAIN, "--user", "me"), env=self.env, check=True,
                       capture_output=True, timeout=30)
        return subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=self.env, check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def client(self, backend_url: str) -> subprocess.Popen:
        client = subprocess.Popen(tun2g("client", "--server", f"127.0.0.1:{self.tunnel_port}", "--plain",
                                        "--domain", DOMAIN, "--backend", backend_url, "--no-inspect", "--quiet"),
                                  env=self.env | {"TUN2G_TOKEN": self.grant()}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.clients.append(client)
        return client

    def get(self, path: str = "/") -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", headers={"Host": DOMAIN}, timeout=10)

    def served(self) -> bool:
        try:
            return self.get().status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        for process in (*self.clients, self.process):
            if process.poll() is None:
                process.kill()
            process.wait(15)
        for pid in self.ready().values():  # a worker whose supervisor was killed drains on its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def workers(tmp_path):
    deployment = Workers(tmp_path)
    try:
        yield deployment
    finally:
        deployment.close()


def _health(sock: socket.socket) -> dict:
    """The accepting worker's own health answer, on a kept-alive connection."""
    sock.sendall(b"GET /_tun2g/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def _worker_holding_none(workers: Workers) -> socket.socket:
    """A kept-alive public connection accepted by a worker that holds no tunnel."""
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", workers.http_port), timeout=10)
        if _health(sock)["tunnels"] == 0:
            return sock
        sock.close()
    raise AssertionError("200 connections all landed on the worker with the tunnel")


def test_a_request_landing_on_the_wrong_worker_is_served(workers, backend):
    url, _app = backend
    workers.client(url)
    wait_until(workers.served, timeout=30, message="the tunnel to serve")
    # A kept-alive connection on the worker without the tunnel: its next request goes over with its head.
    sock = _worker_holding_none(workers)
    with sock:
        sock.sendall(f"GET /headers HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["headers"]["Host"] == DOMAIN
    assert workers.count("handed_over") >= 1 and workers.count("taken_over") >= 1
    # Fresh connections whose first request lands there go over unread (MSG_PEEK): all are served.
    before = workers.count("handed_over")
    for _ in range(200):  # until one lands on the worker without the tunnel (about half of them do)
        response = workers.get("/bytes/100000")
        assert response.status_code == 200 and len(response.content) == 100000
        if workers.count("handed_over") > before:
            break
    assert workers.count("handed_over") > before, "200 fresh connections all landed on the tunnel's worker"


def test_a_killed_worker_is_replaced_and_its_client_served_again(workers, backend):
    url, _app = backend
    workers.client(url)
    wait_until(workers.served, timeout=30, message="the tunnel to serve")
    holder = None
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", workers.http_port), timeout=10) as sock:
            health = _health(sock)
        if health["tunnels"] == 1:
            holder = int(health["node"].rsplit("-", 1)[1])
            break
    assert holder is not None, "no connection reached the worker holding the tunnel"
    index = {pid: index for index, pid in workers.ready().items()}[holder]
    os.kill(holder, signal.SIGKILL)
    wait_until(lambda: workers.ready()[index] != holder, timeout=30, message="the worker to be replaced")
    assert workers.count("worker_exited") == 1
    wait_until(workers.served, timeout=60, message="the client to reconnect and be served")
    for _ in range(10):
        assert workers.get().status_code == 200


def test_sigterm_drains_every_worker_and_exits_0(workers, backend):
    url, _app = backend
    workers.client(url)
    wait_until(workers.served, timeout=30, message="the tunnel to serve")
    pids = list(workers.ready().values())
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(30) == 0
    for pid in pids:
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
                   timeout=15, message=f"worker {pid} to exit")
    assert not os.path.exists(workers.directory())


def test_the_go_client_works_with_workers(workers, backend, go_peer):
    url, _app = backend
    peer = go_peer("tun2client", "--server", f"127.0.0.1:{workers.tunnel_port}", "--token", workers.grant(),
                   "--domain", DOMAIN, "--backend", url)
    peer.wait_for(r"AUTH-SENT")
    wait_until(workers.served, timeout=30, message="the Go client to serve")
    sock = _worker_holding_none(workers)
    with sock:
        sock.sendall(f"GET /bytes/200000 HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 200000
    for _ in range(20):
        assert workers.get().status_code == 200


def test_the_handover_socket_takes_only_the_supervisors_workers(workers, backend):
    directory = workers.directory()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    paths = sorted(Path(directory).glob("w*.sock"))
    assert len(paths) == 2
    refused = workers.count("handover_refused")
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:  # same uid, not a worker
            sock.settimeout(10)
            sock.connect(str(path))
            with socket.create_connection(("127.0.0.1", workers.http_port)) as tcp:
                try:
                    socket.send_fds(sock, [b"C"], [tcp.fileno()])
                except OSError:
                    pass  # closed already
                try:
                    assert sock.recv(16) == b""  # closed, nothing served
                except ConnectionResetError:
                    pass  # closed with our message unread
    wait_until(lambda: workers.count("handover_refused") == refused + 2, message="both refusals")
    assert workers.count("taken_over") == 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_connections_to_the_wrong_worker_leaks_no_fds(workers, backend):
    url, _app = backend
    workers.client(url)
    wait_until(workers.served, timeout=30, message="the tunnel to serve")
    for _ in range(5):
        assert workers.served()  # the handover connections between the workers are open now
    pids = list(workers.ready().values())
    baseline = {pid: _fds(pid) for pid in pids}
    request = f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    for round_ in range(3):
        socks = [socket.create_connection(("127.0.0.1", workers.http_port), timeout=10) for _ in range(100)]
        for number, sock in enumerate(socks):
            if number % 3 == 0:
                sock.sendall(request)                    # served (handed over, or here)
            elif number % 3 == 1:
                sock.sendall(request[:20])               # a head that never ends: closed by the visitor
            else:
                sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")  # garbage: refused
        for number, sock in enumerate(socks):
            if number % 3 == 0:
                head, _body = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200"), head
            sock.close()
    assert workers.count("handed_over") >= 1
    wait_until(lambda: all(_fds(pid) <= baseline[pid] + 2 for pid in pids), timeout=30,
               message=f"fd counts back to {baseline}")


def test_with_redis_each_worker_is_a_cluster_node_and_forwarded_requests_are_served(tmp_path, redis_server,
                                                                                    backend):
    url, _app = backend
    cluster = {"TUN2G_STORAGE": redis_server.url, "TUN2G_CLUSTER_SECRET": "s" * 32}
    (tmp_path / "a").mkdir()
    workers = Workers(tmp_path / "a", "--node-id", "edge", env=cluster)
    other_port = free_port()
    other = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{other_port}", "--tunnel", "none", "--admin",
                                   "127.0.0.1:0", "--node-id", "other"),
                             env=workers.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers.client(url)
        wait_until(workers.served, timeout=30, message="the tunnel to serve")

        def forwarded() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{other_port}/", headers={"Host": DOMAIN},
                                    timeout=10).status_code == 200
            except requests.RequestException:
                return False

        wait_until(forwarded, timeout=30, message="the other node to forward to the workers' node")
        for _ in range(20):  # each hop lands on either worker; the one that did not sign for it hands it over
            assert forwarded()
        assert re.search(r"node=edge-w[01]\b", workers.log())
    finally:
        other.kill()
        other.wait(15)
        workers.close()


def test_workers_that_cannot_start_stop_the_supervisor_with_their_one_line_error(tmp_path):
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    result = subprocess.run(tun2g("server", "--workers", "2", "--storage", f"redis://127.0.0.1:{free_port()}/0",
                                  "--http", f"127.0.0.1:{free_port()}", "--tunnel", f"127.0.0.1:{free_port()}",
                                  "--admin", "127.0.0.1:0", "--plain-tunnel"),
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tun2g server:")]
    assert errors and all("Redis" in line for line in errors), result.stderr  # each worker says it once
    assert "Traceback" not in result.stderr and "worker_exited" not in result.stderr


def test_https_connections_go_to_the_worker_holding_their_name_before_the_handshake(tmp_path, backend):
    import ssl

    from tests.fixtures.certs import ThrowawayCA

    url, _app = backend
    https_port = free_port()
    workers = Workers(tmp_path, "--https", f"127.0.0.1:{https_port}")
    try:
        ca = ThrowawayCA.create()
        chain, key = ca.issue(DOMAIN)
        (tmp_path / "chain.pem").write_text(chain)
        (tmp_path / "key.pem").write_text(key)
        subprocess.run(tun2g("cert", "add", DOMAIN, "--cert", str(tmp_path / "chain.pem"), "--key",
                             str(tmp_path / "key.pem")), env=workers.env, check=True, capture_output=True, timeout=60)
        workers.client(url)
        context = ssl.create_default_context(cafile=str(ca.write_root(tmp_path)))

        def fetch() -> bytes:
            with socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                    tls.sendall(f"GET /headers HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
                    return read_response(tls)[0]

        def served() -> bool:
            try:
                return fetch().startswith(b"HTTP/1.1 200")
            except (OSError, AssertionError):
                return False

        wait_until(served, timeout=30, message="HTTPS to serve (certificate loaded, tunnel up)")
        for _ in range(200):  # until one lands on the worker without the tunnel (about half of them do)
            assert fetch().startswith(b"HTTP/1.1 200")
            if workers.count("handed_over"):
                break
        assert workers.count("handed_over") >= 1, "200 TLS connections all landed on the tunnel's worker"
    finally:
        workers.close()


def test_workers_from_the_config_file_and_sighup_reloads_every_worker(tmp_path):
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_WORKERS"):
        env.pop(name, None)
    config = tmp_path / "tun2g.toml"
    config.write_text(f'workers = 2\nhttp = "127.0.0.1:{free_port()}"\ntunnel = "127.0.0.1:{free_port()}"\n'
                      f'admin = "127.0.0.1:0"\nplain-tunnel = true\nping-interval = 5.0\n')
    log_path = tmp_path / "server.log"
    server = subprocess.Popen(tun2g("server", "--config", str(config)), env=env, stdout=subprocess.DEVNULL,
                              stderr=log_path.open("w"))
    try:
        wait_until(lambda: log_path.read_text().count("event=worker_ready") == 2, timeout=60,
                   message="both workers to start")
        config.write_text(config.read_text().replace("ping-interval = 5.0", "ping-interval = 7.0"))
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: log_path.read_text().count("event=config_reloaded") == 2, timeout=30,
                   message="each worker to reload")
        assert server.poll() is None and "worker_exited" not in log_path.read_text()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(15)


@pytest.mark.parametrize("flag", ["--kcp", "--http none"])
def test_combinations_that_cannot_work_are_refused_in_one_line(tmp_path, flag):
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)}
    public = (["--kcp", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}"] if flag == "--kcp"
              else ["--http", "none", "--https", f"127.0.0.1:{free_port()}"])
    result = subprocess.run(tun2g("server", "--workers", "2", *public, "--admin", "127.0.0.1:0"),
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0] and flag in lines[0], result.stderr


# -- the handover messages themselves, on a real socket pair in this process ----------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("case", ["oversized", "two_fds", "no_fd", "not_tcp", "wrong_kind"])
def test_a_malformed_handover_message_ends_the_link_and_closes_what_it_carried(tmp_path, case):
    import gevent

    from tun2g.server.workers import HANDOVER_MAX, WorkerLink

    control, _other = socket.socketpair()
    link = WorkerLink(0, control, str(tmp_path), {}, grace=1.0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * HANDOVER_MAX)  # room for the oversized one
    listener = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(listener.getsockname())
    read_end, write_end = os.pipe()
    baseline = _open_fds()
    serving = gevent.spawn(link.take_handovers, theirs)
    message, fds = {
        "oversized": ([b"C" + b"x" * HANDOVER_MAX], [tcp.fileno()]),
        "two_fds": ([b"C"], [tcp.fileno(), tcp.fileno()]),
        "no_fd": ([b"C" + b"GET / HTTP/1.1\r\n\r\n"], []),
        "not_tcp": ([b"C"], [read_end]),
        "wrong_kind": ([b"X"], [tcp.fileno()]),
    }[case]
    socket.send_fds(ours, message, fds)
    serving.join(10)
    assert serving.dead
    assert ours.recv(16) == b""  # the link was closed
    assert link.refused == 1 and link.taken_over == 0
    ours.close()
    assert _open_fds() <= baseline - 1  # every descriptor the message carried is closed, and our end
    for sock in (tcp, listener, control, _other):
        sock.close()
    os.close(read_end)
    os.close(write_end)


def test_a_handover_within_the_bounds_is_taken(tmp_path):
    import gevent

    from tun2g.server.workers import WorkerLink

    control, _other = socket.socketpair()
    link = WorkerLink(0, control, str(tmp_path), {}, grace=1.0)  # no front yet: the connection is closed
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    serving = gevent.spawn(link.take_handovers, theirs)
    socket.send_fds(ours, [b"C" + b"GET / HTTP/1.1\r\n\r\n"], [tcp.fileno()])
    tcp.close()  # the worker's copy is the only one left
    assert accepted.recv(16) == b""  # taken, then closed by the link without a front
    ours.close()
    serving.join(10)
    assert link.taken_over == 1 and link.refused == 0
    for sock in (accepted, listener, control, _other):
        sock.close()
