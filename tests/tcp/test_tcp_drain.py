"""SIGTERM drains TCP connections too: an open public TCP connection keeps flowing until it ends
(at most the grace period), on the client and on the server, and the process then exits 0.

Real processes: a `tun2g server` on SQLite and a `tun2g client --tcp PORT=...` in front of an
echo service in this test; the connection is a plain socket to the server's public TCP port.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tests.fixtures.tunnel import wait_until


def tun2g(*args: str) -> list[str]:
    return [sys.executable, "-m", "tun2g.cli", *args]


@pytest.fixture
def echo_port():
    """A threaded echo service (each connection echoes until its peer closes)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def tcp_tunnel(tmp_path, echo_port):
    """(server, client, public port, client log path, grace) with the client serving the port; grace via TUN2G_GRACE_PERIOD."""
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path), "TUN2G_GRACE_PERIOD": "20"}
    for name in ("REDIS_URL", "TUN2G_STORAGE"):
        env.pop(name, None)
    started = []

    def start(grace: float = 20.0):
        env["TUN2G_GRACE_PERIOD"] = str(grace)
        tunnel_port, public = free_port(), free_port()
        server_log = tmp_path / "server.log"
        server = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{free_port()}", "--tunnel",
                                        f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0", "--plain-tunnel",
                                        "--tcp-bind", "127.0.0.1"),
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(server_log, "wb"))
        started.append(server)
        wait_for_port(tunnel_port, timeout=15)
        for args in (("route", "add", "app.localhost", "--user", "me"),
                     ("route", "add", f"tcp:0.0.0.0:{public}", "--user", "me")):
            subprocess.run(tun2g(*args), env=env, check=True, capture_output=True, timeout=30)
        token = subprocess.run(tun2g("token", "create", "--user", "me", "--quiet"), env=env, check=True,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        client_log = tmp_path / "client.log"
        client = subprocess.Popen(tun2g("client", "--server", f"127.0.0.1:{tunnel_port}", "--plain", "--domain",
                                        "app.localhost", "--backend", "http://127.0.0.1:9", "--no-inspect",
                                        "--sessions", "1", "--tcp", f"{public}=127.0.0.1:{echo_port}"),
                                  env=env | {"TUN2G_TOKEN": token}, stdout=subprocess.DEVNULL,
                                  stderr=open(client_log, "wb"))
        started.append(client)
        wait_for_port(public, timeout=15)
        wait_until(lambda: "tcp_registered" in server_log.read_text(errors="replace"), timeout=15,
                   message="the client serving the port")
        return server, client, public, client_log, server_log

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        piece = sock.recv(65536)
        if not piece:
            break
        got += piece
    return got


@pytest.mark.parametrize("signalled", ["client", "server"])
def test_sigterm_waits_for_an_open_tcp_connection_then_exits_0(tcp_tunnel, signalled):
    server, client, public, client_log, server_log = tcp_tunnel()
    target, log = (client, client_log) if signalled == "client" else (server, server_log)
    with socket.create_connection(("127.0.0.1", public), timeout=10) as sock:
        assert _echo(sock, b"before") == b"before"
        target.send_signal(signal.SIGTERM)
        wait_until(lambda: "event=draining" in log.read_text(errors="replace"), timeout=20,
                   message=f"the {signalled} draining")
        # Draining: the connection in flight still carries bytes both ways, and the process waits for it.
        for round_ in range(3):
            assert _echo(sock, b"during %d" % round_) == b"during %d" % round_, _tails(server_log, client_log)
        assert target.poll() is None, _tails(server_log, client_log)
        if signalled == "server":  # no new connections on the draining server's TCP port
            wait_until(lambda: _refused(public), timeout=20, message="the TCP listener closed")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(64) == b"", _tails(server_log, client_log)
    assert target.wait(30) == 0, _tails(server_log, client_log)
    assert "Traceback" not in log.read_text(errors="replace"), _tails(server_log, client_log)


def _tails(*logs) -> str:
    """The end of each process's log, for a failure message."""
    return "\n".join(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:] for path in logs)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_a_tcp_connection_open_past_the_grace_period_does_not_hold_the_client(tcp_tunnel):
    server, client, public, client_log, _server_log = tcp_tunnel(grace=1.0)
    with socket.create_connection(("127.0.0.1", public), timeout=10) as sock:
        assert _echo(sock, b"held") == b"held"
        started = time.monotonic()
        client.send_signal(signal.SIGTERM)
        assert client.wait(20) == 0
        took = time.monotonic() - started
    assert 0.9 < took < 15, took  # the grace (1 s), then out, whatever the open connection does
