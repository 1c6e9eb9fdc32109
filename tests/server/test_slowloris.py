"""The public port cannot be exhausted: whole-head and idle deadlines, per-address and total caps with a fast 503,
and at the fd limit a legitimate request still gets through (a real `tun2g server` process with a low limit).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import gevent
import psutil
import pytest

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import DOMAIN, RunningClient, wait_until
from tests.server.support import bounded_deployment, connect, get, read_response, read_until_closed
from tun2g.client import ClientConfig
from tun2g.storage import open_storage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bounded(tmp_path, data_dir):
    made = []

    def make(**bounds):
        deployment = bounded_deployment(tmp_path, data_dir, **bounds)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.running.stop()


def test_a_head_trickled_byte_by_byte_is_cut_at_the_header_timeout(bounded):
    deployment = bounded(header_timeout=0.6)
    port = deployment.running.http_address[1]
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        answer = b""
        for byte in b"X-Slow: " + b"a" * 200:  # one byte every 50 ms: each recv is quick, the head never ends
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            gevent.sleep(0.05)
            if time.monotonic() - started > 5:
                break
        answer = read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert elapsed < 3, elapsed


def test_a_silent_connection_is_closed_quietly(bounded):
    deployment = bounded(header_timeout=0.3)
    with connect(deployment.running.http_address[1]) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # nothing sent, nothing to answer
        assert time.monotonic() - started < 3
    wait_until(lambda: deployment.running.front.connections == 0, timeout=5, message="the connection forgotten")


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(bounded):
    deployment = bounded(header_timeout=5, idle_timeout=0.4)
    with connect(deployment.running.http_address[1]) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        head, _body = read_response(sock)  # the no-backends 502, kept alive
        assert head.startswith(b"HTTP/1.1 502") and b"close" not in head.lower()
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 3, elapsed


def test_a_second_request_on_a_connection_gets_its_own_head_deadline(bounded):
    deployment = bounded(header_timeout=0.5, idle_timeout=5)
    with connect(deployment.running.http_address[1]) as sock:
        for _ in range(3):  # each one well within the deadline, though together they last longer than it
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            head, _body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 502")
            gevent.sleep(0.3)  # idle between requests: counts against the idle timeout, not the head's


def test_connections_over_the_per_address_cap_get_a_fast_503(bounded):
    deployment = bounded(max_connections_per_ip=5, header_timeout=30)
    port = deployment.running.http_address[1]
    held = [connect(port, "127.0.0.2") for _ in range(5)]
    try:
        wait_until(lambda: deployment.running.front.connections_from("127.0.0.2") == 5, timeout=5,
                   message="five connections held")
        started = time.monotonic()
        with connect(port, "127.0.0.2") as extra:
            extra.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"Retry-After: 1" in answer
        assert time.monotonic() - started < 2
        # Another address is not affected.
        status, _head, _body = get(port, DOMAIN, source_ip="127.0.0.1")
        assert status == 502  # no backends: served, not refused
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: deployment.running.front.connections == 0, timeout=5, message="connections forgotten")


def test_connections_over_the_total_cap_get_a_fast_503(bounded):
    deployment = bounded(max_connections=6, header_timeout=30)
    port = deployment.running.http_address[1]
    held = [connect(port, f"127.0.0.{10 + i}") for i in range(6)]
    try:
        wait_until(lambda: deployment.running.front.connections == 6, timeout=5, message="six connections held")
        with connect(port, "127.0.0.1") as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: deployment.running.front.connections == 0, timeout=5, message="connections forgotten")
    assert get(port, DOMAIN)[0] == 502  # room again


# --- a real server process at a low fd limit ----------------------------------------------------------

FD_LIMIT = 256
SLOWLORIS = 2000


def _raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"this test opens {needed} sockets; the fd limit here is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture
def low_fd_server(tmp_path, data_dir, backend, start_client):
    """Factory: `tun2g server` under RLIMIT_NOFILE=256 with extra flags, and a connected in-process client."""
    procs = []

    def start(*flags: str):
        http_port, tunnel_port, admin_port = free_port(), free_port(), free_port()
        storage = f"sqlite:///{tmp_path / 'store.sqlite3'}"
        log_path = tmp_path / f"server-{len(procs)}.log"
        log_file = open(log_path, "wb")
        env = env_without_proxies()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_repo_root()), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tun2g.cli", "server", "--http", f"127.0.0.1:{http_port}",
             "--tunnel", f"127.0.0.1:{tunnel_port}", "--plain-tunnel", "--admin", f"127.0.0.1:{admin_port}",
             "--storage", storage, "--no-access-log", "--header-timeout", "1", *flags],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)))
        procs.append((proc, log_file))
        wait_for_port(http_port, timeout=20)
        store = open_storage(storage)
        try:
            store.add_route(DOMAIN, "alice")
            _info, token = store.create_token("alice", scopes=("connect",))
        finally:
            store.close()
        start_client(ClientConfig(server_addr=f"127.0.0.1:{tunnel_port}", token=token, domain=DOMAIN,
                                  backend_url=backend[0], plain=True, backoff_initial=0.05, backoff_max=0.5))
        return http_port, log_path, proc.pid

    yield start
    for proc, log_file in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log_file.close()


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def _open_slowloris(port: int, count: int, sources: list[str]) -> list:
    """`count` connections that each send the start of a head and then nothing (they are never closed by us)."""
    socks = []

    def one(i: int) -> None:
        try:
            sock = connect(port, sources[i % len(sources)], timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ")
        except OSError:
            return  # refused at the backlog: also fine for an attacker
        socks.append(sock)

    gevent.joinall([gevent.spawn(one, i) for i in range(count)], timeout=60)
    return socks


def _legitimate_request_succeeds(port: int, within: float) -> float:
    """Seconds until a GET through the tunnel answers 200 (503s and resets count as not yet)."""
    started = time.monotonic()
    while True:
        try:
            status, _head, body = get(port, DOMAIN, timeout=5)
            if status == 200:
                assert body == b"hello from backend\n"
                return time.monotonic() - started
        except (OSError, AssertionError):
            pass
        if time.monotonic() - started > within:
            raise AssertionError(f"no 200 within {within} s")
        gevent.sleep(0.1)


def test_slowloris_from_one_address_does_not_starve_the_others(low_fd_server):
    _raise_own_fd_limit(SLOWLORIS + 512)
    # Heads may take 30 s here: the attack is still in place when the legitimate request comes.
    port, _log, pid = low_fd_server("--max-connections-per-ip", "100", "--header-timeout", "30")
    socks = _open_slowloris(port, SLOWLORIS, ["127.0.0.2"])
    try:
        assert len(socks) > FD_LIMIT  # more than the server could ever hold
        assert psutil.Process(pid).num_fds() > 100  # it holds the 100 allowed ...
        took = _legitimate_request_succeeds(port, within=10)  # ... and serves another address at once
        assert took < 1.0, f"a legitimate request waited {took:.2f} s behind the per-address cap"
        assert psutil.Process(pid).num_fds() < FD_LIMIT
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_from_many_addresses_saturates_the_cap_not_the_fds(low_fd_server):
    _raise_own_fd_limit(SLOWLORIS + 512)
    port, log_path, _pid = low_fd_server()
    socks = _open_slowloris(port, SLOWLORIS, [f"127.0.1.{i}" for i in range(1, 21)])
    try:
        # Either refused at once (503: the total cap, below the fd limit) or served once the
        # held heads run out of time: never a hang, and no accept failure at all.
        _legitimate_request_succeeds(port, within=15)
    finally:
        for sock in socks:
            sock.close()
    text = log_path.read_text()
    assert "Traceback" not in text
    assert "fd_limit" in text and f"soft={FD_LIMIT}" in text


def test_at_the_fd_limit_accept_failures_are_one_line_and_service_recovers(low_fd_server):
    _raise_own_fd_limit(SLOWLORIS + 512)
    port, log_path, _pid = low_fd_server("--max-connections", "0", "--max-connections-per-ip", "0")
    socks = _open_slowloris(port, 600, [f"127.0.2.{i}" for i in range(1, 11)])
    try:
        wait_until(lambda: "accept_failed" in log_path.read_text(), timeout=10, message="the fd limit reached")
        _legitimate_request_succeeds(port, within=20)
    finally:
        for sock in socks:
            sock.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.count("accept_failed") <= 5, text.count("accept_failed")  # rate-limited: one per 10 s
