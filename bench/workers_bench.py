"""`tun2g server --workers 2` against `--workers 1`, interleaved in one run: req/s, CPU per request, handovers.

    python3 bench/workers_bench.py                       # 256 connections, 3 rounds of 5 s
    python3 bench/workers_bench.py --connections 64 --rounds 5 --seconds 3
    python3 bench/workers_bench.py --close --connections 16   # a new connection per request

Each setup is one server (plain tunnel, no access log) in front of one nginx, with two
tun2g clients for the bench's domain; under `--workers 2` the clients are placed one per
worker (a client landing next to the other is restarted until they spread), and a third setup,
`2 workers, 1 client`, has every connection accepted by the other worker handed over (against
`1 worker, 1 client`). CPU per
request is the server's (supervisor and workers) and the clients', from psutil, per wrk request;
the handover share is the connections handed over (the workers' `handovers` log lines) per
connection wrk opened. On a 2-core machine wrk and nginx compete with the workers for the cores.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import tunnel_common as tc

DOMAIN, USER = "bench.test", "bench"
TOKEN = "cd" * 24


def health(port: int) -> dict:
    """The health answer of whichever worker accepts a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /_tun2g/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def placement(port: int, probes: int = 40) -> dict[str, int]:
    """node -> tunnels, as seen by `probes` new connections."""
    seen: dict[str, int] = {}
    for _ in range(probes):
        answer = health(port)
        seen[answer["node"]] = answer["tunnels"]
    return seen


class Setup:
    """One server (`workers` processes) and `clients` clients for DOMAIN."""

    close = False  # wrk sends Connection: close

    def __init__(self, name: str, workdir: Path, storage: str, nginx_port: int, workers: int, clients: int) -> None:
        self.name, self.workers = name, workers
        self.http_port, self.tunnel_port = tc.free_port(), tc.free_port()
        env = tc.child_env()
        self.server = tc.Service(f"{name} server", tc.tun2g_argv(
            "server", "--http", f"127.0.0.1:{self.http_port}", "--tunnel", f"127.0.0.1:{self.tunnel_port}",
            "--admin", "127.0.0.1:0", "--storage", storage, "--plain-tunnel", "--no-access-log",
            "--grace-period", "1", "--workers", str(workers)), workdir / f"{name}-server.log", env=env)
        self.clients: list[tc.Service] = []
        self.services = [self.server]
        self._client_argv = tc.tun2g_argv("client", "--server", f"127.0.0.1:{self.tunnel_port}", "--token", TOKEN,
                                          "--domain", DOMAIN, "--plain", "--backend",
                                          f"http://127.0.0.1:{nginx_port}", "--log-level", "warning", "--quiet",
                                          "--no-inspect")
        self._workdir = workdir
        self.connections_opened = 0
        try:
            tc.wait_until(lambda: self.server.check_alive() or tc.port_open(self.tunnel_port), 60, f"{name} up")
            for number in range(clients):
                self._place(number)
        except BaseException:
            self.stop()
            raise

    def _tunnels(self) -> int:
        return sum(placement(self.http_port, 20).values())

    def _place(self, number: int) -> None:
        """Start client `number`; with several workers, until it lands on a worker holding fewer than the rest."""
        for _attempt in range(30):
            client = tc.Service(f"{self.name} client{number}", self._client_argv,
                                self._workdir / f"{self.name}-client{number}.log", env=tc.child_env())
            tc.wait_until(lambda: client.check_alive() or self._tunnels() >= number + 1, 30, "the client to register")
            counts = placement(self.http_port)
            if self.workers == 1 or number == 0 or max(counts.values()) <= 1:
                self.clients.append(client)
                self.services.append(client)
                return
            client.stop()
            tc.wait_until(lambda: self._tunnels() == number, 30, "the extra client to leave")
        raise RuntimeError(f"{self.name}: the clients did not spread over the workers")

    def processes(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        server = psutil.Process(self.server.pid)
        return [server, *server.children()], [psutil.Process(c.pid) for c in self.clients]

    def handed_over(self) -> int:
        """Connections handed over so far, from each worker's latest `handovers` line."""
        latest: dict[str, int] = {}
        for worker, count in re.findall(r"event=handovers worker=(\d+) handed_over=(\d+)",
                                        self.server.log_path.read_text(errors="replace")):
            latest[worker] = int(count)
        return sum(latest.values())

    def measure(self, connections: int, seconds: float) -> tuple[float, float, float, int]:
        """(req/s, server µs/request, clients µs/request, handovers during the run) of one wrk run."""
        servers, clients = self.processes()
        before_s, before_c = sum(map(_cpu, servers)), sum(map(_cpu, clients))
        handed = self.handed_over()
        result = run_wrk(self.http_port, connections, seconds, self.close)
        if result.errors:
            raise RuntimeError(f"{self.name}: {result.errors}")
        requests = max(result.requests, 1)
        self.connections_opened += requests if self.close else 0
        server = (sum(map(_cpu, servers)) - before_s) * 1e6 / requests
        client = (sum(map(_cpu, clients)) - before_c) * 1e6 / requests
        time.sleep(6)  # the workers log their handover counts every 5 s: a reading, not synchronisation
        return result.requests_per_s, server, client, self.handed_over() - handed

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def run_wrk(port: int, connections: int, seconds: float, close: bool) -> tc.WrkResult:
    """wrk at `connections` (with `close`: a new connection per request, each one peeked and maybe handed over)."""
    if not close:
        return tc.run_wrk(port, DOMAIN, connections, seconds)
    argv = [tc.require_binary("wrk"), "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
            "--timeout", "10s", "-H", f"Host: {DOMAIN}", "-H", "Connection: close", f"http://127.0.0.1:{port}/"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr}{result.stdout}")
    return tc.parse_wrk(result.stdout)


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--close", action="store_true",
                        help="a new connection per request (Connection: close): the cost of peeking and handing over")
    args = parser.parse_args()
    Setup.close = args.close
    with tempfile.TemporaryDirectory(prefix="tun2g-workers-bench-") as directory:
        workdir = Path(directory)
        storage = f"sqlite:///{workdir / 'bench.sqlite3'}"
        tc.tun2g_run("token", "import", "--user", USER, "--secret", TOKEN, "--storage", storage)
        tc.tun2g_run("route", "add", DOMAIN, "--user", USER, "--storage", storage)
        nginx_port = tc.free_port()
        nginx = tc.start_nginx(workdir, nginx_port, "unused")
        setups: list[Setup] = []
        try:
            setups = [Setup("1 worker, 2 clients", workdir, storage, nginx_port, 1, 2),
                      Setup("1 worker, 1 client", workdir, storage, nginx_port, 1, 1),
                      Setup("2 workers, 2 clients", workdir, storage, nginx_port, 2, 2),
                      Setup("2 workers, 1 client", workdir, storage, nginx_port, 2, 1)]
            results: dict[str, list[tuple[float, float, float, int]]] = {setup.name: [] for setup in setups}
            for round_ in range(args.rounds):
                for setup in setups:
                    results[setup.name].append(setup.measure(args.connections, args.seconds))
                    print(f"round {round_ + 1} {setup.name}: {results[setup.name][-1]}", file=sys.stderr)
        finally:
            for setup in setups:
                setup.stop()
            nginx.stop()
    opened = {setup.name: setup.connections_opened or args.connections * args.rounds for setup in setups}
    base = statistics.median(r[0] for r in results[setups[0].name])
    rows = []
    for name, runs in results.items():
        rps = statistics.median(r[0] for r in runs)
        rows.append([name, f"{rps:,.0f}", f"{rps / base:.2f}", f"{statistics.median(r[1] for r in runs):.0f}",
                     f"{statistics.median(r[2] for r in runs):.0f}",
                     f"{sum(r[3] for r in runs) / opened[name]:.2f}"])
    print(f"{args.connections} connections{' (Connection: close)' if args.close else ''}, {args.rounds} rounds of {args.seconds:g} s, medians "
          f"({psutil.cpu_count()} cores)")
    print(tc.format_table(["setup", "req/s", "vs 1 worker", "server µs/req", "clients µs/req",
                           "handed over per connection"], rows))


if __name__ == "__main__":
    main()
