"""Idle cost of tunnels: server RSS per idle TLS tunnel and CPU over a steady window, at 1,000 and 10,000.

    python3 bench/idle_bench.py [--counts 1000,10000] [--window 60] [--against REV] [--keep]

One `tun2g server` process (TLS tunnel port, the CLI as users run it) and one
helper process (bench/idle_clients.py) holding every tunnel as a
`tun2g.client.Client`. The store gets one user per 64 tunnels and one token per
16 (the server's default session caps). For each count, ascending: grow to it,
wait until every tunnel is registered (admin API), settle, then measure the
server's RSS and its CPU time over `--window` seconds, and count the registered
tunnels at the start and the end of the window (all must stay registered). KiB
per tunnel is (RSS at N - RSS at 1) / (N - 1). `--against REV` runs the server
from the tun2g package of a git revision instead (same clients), for a
before/after in one sitting. Results: printed and written to
bench/results/idle-latest.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

import tunnel_common as tc
from request_cost_bench import export_revision

PER_TOKEN, PER_USER = 16, 64  # ServerConfig.max_sessions_per_token / _per_user defaults
RESULTS = Path(__file__).resolve().parent / "results"
SETTLE = 5.0  # after the last registration: lazy buffers, first keepalives and pings happen once


@dataclass
class IdlePoint:
    """One count of idle tunnels, measured."""

    count: int
    rss: int  # server RSS, bytes, at the start of the window
    rss_end: int
    server_cpu: float  # % of one core over the window
    client_cpu: float
    registered_start: int
    registered_end: int
    connect_seconds: float


def raise_fd_limit(wanted: int) -> None:
    """Lift this process's soft open-files limit (the children inherit it) towards `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def make_credentials(storage_url: str, count: int, path: Path) -> None:
    """Users, routes and tokens for `count` tunnels within the session caps; one "token domain" line per tunnel."""
    from tun2g.storage import open_storage

    storage = open_storage(storage_url)
    lines = []
    token = domain = ""
    for index in range(count):
        if index % PER_USER == 0:
            user = f"idle{index // PER_USER}"
            domain = f"{user}.idle.test"
            storage.add_route(domain, user)
        if index % PER_TOKEN == 0:
            _info, token = storage.create_token(user, scopes=("connect",))
        lines.append(f"{token} {domain}\n")
    path.write_text("".join(lines))


def registered(admin_port: int) -> int:
    """Tunnels the server lists as backends."""
    return len(tc.admin_backends(admin_port))


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(server: psutil.Process, clients: psutil.Process, admin_port: int, count: int, window: float,
            connect_seconds: float) -> IdlePoint:
    """RSS, CPU over `window` s and the registered tunnels at both ends of it."""
    start_registered = registered(admin_port)
    rss = server.memory_info().rss
    server_before, client_before, started = cpu_seconds(server), cpu_seconds(clients), time.monotonic()
    time.sleep(window)  # the measurement window itself
    elapsed = time.monotonic() - started
    server_cpu = (cpu_seconds(server) - server_before) / elapsed * 100
    client_cpu = (cpu_seconds(clients) - client_before) / elapsed * 100
    return IdlePoint(count=count, rss=rss, rss_end=server.memory_info().rss, server_cpu=server_cpu,
                     client_cpu=client_cpu, registered_start=start_registered,
                     registered_end=registered(admin_port), connect_seconds=connect_seconds)


def run(workdir: Path, counts: list[int], window: float, source: Path | None) -> tuple[IdlePoint, list[IdlePoint]]:
    """The server (from `source`, or this tree) and the helper; (the 1-tunnel point, one point per count)."""
    storage = f"sqlite:///{workdir / 'idle.db'}"
    credentials = workdir / "credentials.txt"
    make_credentials(storage, max(counts), credentials)
    tc.tun2g_run("cert", "--out", str(workdir), "--host", "127.0.0.1", "--host", "localhost")
    cert = workdir / "tun2g-dev-cert.pem"
    http_port, tunnel_port, admin_port = tc.free_port(), tc.free_port(), tc.free_port()
    env = tc.child_env()
    cwd = tc.REPO_ROOT
    if source is not None:
        env["PYTHONPATH"] = str(source)
        cwd = source  # `python -m` puts its working directory first on sys.path
    argv = tc.tun2g_argv("server", "--http", f"127.0.0.1:{http_port}", "--tunnel", f"127.0.0.1:{tunnel_port}",
                         "--admin", f"127.0.0.1:{admin_port}", "--storage", storage, "--no-access-log",
                         "--log-level", "warning", "--tls-cert", str(cert),
                         "--tls-key", str(cert.with_name("tun2g-dev-key.pem")))
    with ExitStack() as stack:
        server = tc.Service("tun2g server", argv, workdir / "server.log", env=env, cwd=cwd)
        stack.callback(server.stop)
        tc.wait_until(lambda: server.check_alive() or tc.port_open(admin_port), 30, "the server's admin API")
        helper = tc.Service("idle clients", [sys.executable, str(Path(__file__).with_name("idle_clients.py")),
                                             "--server", f"127.0.0.1:{tunnel_port}", "--ca", str(cert),
                                             "--credentials", str(credentials),
                                             "--backend", "http://127.0.0.1:9", "--count", "1",
                                             "--connect-timeout", "900"],
                            workdir / "idle-clients.log", env=tc.child_env(), stdin=subprocess.PIPE)
        stack.callback(helper.stop, 30)
        server_process, client_process = psutil.Process(server.pid), psutil.Process(helper.pid)
        points = []
        for count in [1, *counts]:
            started = time.monotonic()
            if count > 1:
                helper.proc.stdin.write(f"{count}\n".encode())
                helper.proc.stdin.flush()
            tc.wait_until(lambda: server.check_alive() or helper.check_alive() or registered(admin_port) >= count,
                          900, f"{count} registered tunnels", interval=5.0)
            connect_seconds = time.monotonic() - started
            time.sleep(SETTLE)  # the settling period, not synchronisation
            point = measure(server_process, client_process, admin_port, count, window if count > 1 else 10,
                            connect_seconds)
            points.append(point)
            print(f"  {count:>6} tunnels: server RSS {point.rss / tc.MIB:.1f} MiB, CPU {point.server_cpu:.1f} % "
                  f"(clients {point.client_cpu:.1f} %), registered {point.registered_start} -> "
                  f"{point.registered_end}, connected in {connect_seconds:.0f} s", flush=True)
        return points[0], points[1:]


def table(one: IdlePoint, points: list[IdlePoint]) -> str:
    headers = ["idle TLS tunnels", "registered start / end", "server RSS MiB", "KiB per tunnel",
               "server CPU % of a core", "clients CPU %", "connect s"]
    rows = [["1", f"{one.registered_start} / {one.registered_end}", f"{one.rss / tc.MIB:.1f}", "-",
             f"{one.server_cpu:.2f}", f"{one.client_cpu:.2f}", f"{one.connect_seconds:.0f}"]]
    for point in points:
        per_tunnel = (point.rss - one.rss) / (point.count - 1) / 1024
        rows.append([f"{point.count:,}", f"{point.registered_start} / {point.registered_end}",
                     f"{point.rss / tc.MIB:.1f}", f"{per_tunnel:.1f}", f"{point.server_cpu:.2f}",
                     f"{point.client_cpu:.2f}", f"{point.connect_seconds:.0f}"])
    return tc.format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000", help="comma-separated tunnel counts, ascending")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady idling measured per count")
    parser.add_argument("--against", metavar="REV", help="run the server from this git revision's tun2g")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) and say where")
    args = parser.parse_args()
    counts = sorted(int(count) for count in args.counts.split(","))
    raise_fd_limit(2 * max(counts) + 1024)
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        workdir = tc.temporary_workdir(stack, "tun2g-idle-", args.keep)
        source = export_revision(args.against, workdir / "tree") if args.against else None
        print(f"server from {args.against or 'this working tree'}", flush=True)
        one, points = run(workdir, counts, args.window, source)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = (f"# tun2g idle tunnels ({stamp}, server from {args.against or 'the working tree'}, "
              f"{args.window:g} s windows, {psutil.cpu_count()} cores, load average {load_before:.1f} before and "
              f"{os.getloadavg()[0]:.1f} after)\n\n{table(one, points)}\n\n"
              "Goals: at most 32 KiB of server RSS per idle TLS tunnel, at most 2 % of a core for 1,000, "
              "every tunnel registered to the end.\n")
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle-latest.md").write_text(report)


if __name__ == "__main__":
    main()
