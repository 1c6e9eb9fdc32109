"""TCP tunnel throughput and connection setup rate, through `tun2g server` + `tun2g client` vs direct.

    python3 bench/tcp_bench.py            # 512 MiB per transfer, 5 s of connection setup (~1 minute)
    python3 bench/tcp_bench.py --quick    # 128 MiB, 2 s

One run starts a local service process (a sink for uploads, a source for
downloads, an echo for the setup rate: plain Python sockets, so "direct" is
the raw-socket ceiling of this machine for this peer), a `tun2g server` with
a plain tunnel and a TCP route, and a `tun2g client` serving that route from
the local service; then measures direct and through the tunnel in the same run
and prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunnel_common import free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 256 * 1024

SERVICE = r'''
import socket, sys, threading
mode_port = {}
def serve(listener, handler):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
def sink(conn):
    while conn.recv(1 << 20): pass
    conn.sendall(b"k"); conn.close()
def source(conn):
    size = int(conn.recv(32).decode())
    block = b"x" * (256 * 1024)
    while size > 0:
        conn.sendall(block[:min(size, len(block))]); size -= len(block)
    conn.close()
def echo(conn):
    data = conn.recv(1)
    conn.sendall(data); conn.close()
ports = []
for handler in (sink, source, echo):
    listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1024)
    ports.append(listener.getsockname()[1])
    threading.Thread(target=serve, args=(listener, handler), daemon=True).start()
print(" ".join(map(str, ports)), flush=True)
sys.stdin.read()
'''


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Wait for a listener on 127.0.0.1:`port` (the shared helpers' poll, with a deadline)."""
    wait_until(lambda: port_open(port), timeout, f"a listener on port {port}")


def upload(port: int, size: int) -> float:
    block = b"u" * CHUNK
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        while sent < size:
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"k", "the sink did not confirm"
    return size / (time.perf_counter() - started) / 1e6


def download(port: int, size: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(str(size).encode().ljust(32))
        got = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got += len(data)
    assert got >= size, f"got {got} of {size} bytes"
    return size / (time.perf_counter() - started) / 1e6


def setup_rate(port: int, seconds: float) -> float:
    count, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"e")
            assert sock.recv(1) == b"e"
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = (128 if args.quick else 512) * 1024 * 1024
    seconds = 2.0 if args.quick else 5.0
    sys.path.insert(0, str(ROOT))
    from tun2g.storage import SQLiteStorage
    from tun2g.storage.tcp_route import new_tcp_route

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as workdir:
        env["TUN2G_DATA_DIR"] = workdir
        try:
            service = subprocess.Popen([sys.executable, "-c", SERVICE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
            processes.append(service)
            sink, source, echo = map(int, service.stdout.readline().split())  # type: ignore[union-attr]
            store = SQLiteStorage(f"{workdir}/store.sqlite3")
            public = {name: free_port() for name in ("sink", "source", "echo")}
            for port in public.values():
                store.add_tcp_route(new_tcp_route(f"tcp:127.0.0.1:{port}", "bench", time.time()))
            store.add_route("bench.test", "bench")
            _info, token = store.create_token("bench")
            store.close()
            tunnel = free_port()
            cli = [sys.executable, "-m", "tun2g.cli"]
            processes.append(subprocess.Popen(
                [*cli, "server", "--http", f"127.0.0.1:{free_port()}", "--tunnel", f"127.0.0.1:{tunnel}",
                 "--plain-tunnel", "--admin", f"127.0.0.1:{free_port()}", "--storage",
                 f"sqlite:///{workdir}/store.sqlite3", "--log-level", "warning", "--no-access-log"],
                env=env, stderr=subprocess.DEVNULL))
            wait_port(tunnel)
            for port in public.values():
                wait_port(port)
            processes.append(subprocess.Popen(
                [*cli, "client", "--server", f"127.0.0.1:{tunnel}", "--plain", "--token", token, "--domain",
                 "bench.test", "--backend", "http://127.0.0.1:9", "--no-inspect", "-q", "--log-level", "error",
                 "--tcp", f"{public['sink']}=127.0.0.1:{sink}", "--tcp", f"{public['source']}=127.0.0.1:{source}",
                 "--tcp", f"{public['echo']}=127.0.0.1:{echo}"], env=env, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 15
            while True:  # the client is up once the echo answers through the tunnel
                try:
                    setup_rate(public["echo"], 0.01)
                    break
                except (OSError, AssertionError):
                    if time.monotonic() > deadline:
                        raise SystemExit("the tunnel did not come up in 15 s")
                    time.sleep(0.1)  # a start-up poll with a deadline
            rows = [
                ("upload MB/s (1 connection)", upload(sink, size), upload(public["sink"], size)),
                ("download MB/s (1 connection)", download(source, size), download(public["source"], size)),
                ("connections/s (connect, 1-byte echo, close)", setup_rate(echo, seconds),
                 setup_rate(public["echo"], seconds)),
            ]
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(f"\nTCP tunnel vs direct ({size >> 20} MiB per transfer, {seconds:g} s of setups; plain tunnel, loopback)\n")
    print("| measure | direct (raw sockets) | through tun2g | tunnel/direct |")
    print("|---|---|---|---|")
    for name, direct, tunnelled in rows:
        print(f"| {name} | {direct:,.0f} | {tunnelled:,.0f} | {tunnelled / direct:.3f} |")


if __name__ == "__main__":
    main()
