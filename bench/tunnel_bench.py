"""End-to-end tunnel benchmark: wrk and curl through `tun2g server` + `tun2g client`, against direct nginx.

    python3 bench/tunnel_bench.py [--quick] [--profile]

Every figure is compared with the direct path measured in the same run; the
table is printed and written to bench/results/latest.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import tunnel_common as tc

CONNECTIONS = (1, 16, 64, 256)
DOMAIN, UPLOAD_DOMAIN, USER = "bench.test", "upload.bench.test", "bench"
DOWNLOAD_NAME, TRANSFER_SIZE = "download.bin", 100 * tc.MIB
READY_TIMEOUT = 30.0
RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = secrets.token_hex(24)  # imported into this run's private store; hex never starts with "-"

# Go tun2 on a 2-core machine, ratios to direct nginx (docs/protocol.md#reference-figures).
GO_RPS_RATIO = {1: (0.18, 0.18), 16: (0.089, 0.085), 64: (0.086, 0.082), 256: (0.078, 0.075)}
GO_LATENCY_MS = {1: (0.30, 1.85), 16: (2.3, 7.3), 64: (9.5, 25), 256: (40, 110)}
GO_DOWNLOAD_RATIO, GO_UPLOAD_RATIO, GO_KIB_PER_IDLE_TUNNEL = (0.25, 0.14), 0.05, 170


@dataclass
class PathResults:
    """What one path (direct, plain tunnel, TLS tunnel) measured."""

    wrk: dict = field(default_factory=dict)  # connections -> WrkResult
    download: float = 0.0  # bytes/s
    upload: float = 0.0
    cpu_us_per_request: dict = field(default_factory=dict)  # ("server"/"client", connections) -> µs
    notes: list = field(default_factory=list)
    failed: str = ""  # why this path could not be measured


class Tunnel:
    """A `tun2g server` plus CLI clients for the hello/download domain (nginx) and the upload domain (sink)."""

    def __init__(self, workdir: Path, storage: str, tls: bool, cert: Path | None, backends: dict[str, int]):
        self.tls, self.cert = tls, cert
        self.http_port, self.tunnel_port, self.admin_port = tc.free_port(), tc.free_port(), tc.free_port()
        tag = "tls" if tls else "plain"
        argv = ["server", "--http", f"127.0.0.1:{self.http_port}", "--tunnel", f"127.0.0.1:{self.tunnel_port}",
                "--admin", f"127.0.0.1:{self.admin_port}", "--storage", storage, "--no-access-log",
                "--log-level", "warning"]
        argv += ["--tls-cert", str(cert), "--tls-key", str(cert.with_name("tun2g-dev-key.pem"))] if tls \
            else ["--plain-tunnel"]
        self.server = tc.Service(f"tun2g server ({tag})", tc.tun2g_argv(*argv), workdir / f"server-{tag}.log",
                                 env=tc.child_env())
        self.clients = []
        self.services = [self.server]
        try:
            tc.wait_until(lambda: self.server.check_alive() or tc.port_open(self.admin_port), READY_TIMEOUT,
                          f"the {tag} server's admin API")
            for domain, port in backends.items():
                client = tc.Service(f"tun2g client {domain} ({tag})",
                                    tc.tun2g_argv("client", *self.client_args(domain), "--backend",
                                                  f"http://127.0.0.1:{port}", "--log-level", "warning"),
                                    workdir / f"client-{tag}-{domain}.log", env=tc.child_env())
                self.clients.append(client)
                self.services.append(client)
                tc.wait_for_backends(self.admin_port, domain, 1, READY_TIMEOUT, watch=self.services)
        except BaseException:
            self.stop()
            raise

    def client_args(self, domain: str) -> list[str]:
        tls_args = ["--ca", str(self.cert)] if self.tls else ["--plain"]
        return ["--server", f"127.0.0.1:{self.tunnel_port}", "--token", TOKEN, "--domain", domain, *tls_args]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def measure_wrk(results: PathResults, port: int, duration: float, processes: dict | None = None) -> None:
    """wrk at every connection count; with `processes` (name -> pid), also their CPU time per request."""
    tc.run_wrk(port, DOMAIN, 16, min(duration, 1.0))  # warm-up: pools, greenlets, caches
    for connections in CONNECTIONS:
        before = {name: _cpu_seconds(pid) for name, pid in (processes or {}).items()}
        result = tc.run_wrk(port, DOMAIN, connections, duration)
        results.wrk[connections] = result
        for name, pid in (processes or {}).items():
            results.cpu_us_per_request[name, connections] = ((_cpu_seconds(pid) - before[name]) * 1e6
                                                             / max(result.requests, 1))
        if result.errors:
            results.notes.append(f"{connections} connections: {result.errors}")
        print(f"  {connections:>3} connections: {result.requests_per_s:>9.0f} req/s, p50 {result.p50_ms:.2f} ms, "
              f"p99 {result.p99_ms:.2f} ms {result.errors}", flush=True)


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure_transfers(results: PathResults, download_port: int, upload_port: int, upload_file: Path,
                      repeats: int) -> None:
    """Median curl speed over `repeats` 100 MiB downloads and uploads; checks that every byte arrived."""
    downloads, uploads = [], []
    for _ in range(repeats):
        down = tc.curl_download(download_port, DOMAIN, f"/{DOWNLOAD_NAME}")
        if down.status != 200 or down.size != TRANSFER_SIZE:
            results.notes.append(f"download: status {down.status}, {down.size} of {TRANSFER_SIZE} bytes")
        downloads.append(down.bytes_per_s)
        up = tc.curl_upload(upload_port, UPLOAD_DOMAIN, "/upload", upload_file)
        if up.status != 200 or up.body != f"received {TRANSFER_SIZE}":
            results.notes.append(f"upload: status {up.status}, sink says {up.body!r}")
        uploads.append(up.bytes_per_s)
    results.download, results.upload = statistics.median(downloads), statistics.median(uploads)
    print(f"  download {results.download / 1e6:.0f} MB/s, upload {results.upload / 1e6:.0f} MB/s", flush=True)


@dataclass
class IdleMemory:
    """The server's RSS with one idle TLS tunnel and with `count` of them."""

    rss_one: int = 0
    rss_many: int = 0
    count: int = 0

    @property
    def kib_per_tunnel(self) -> float:
        return (self.rss_many - self.rss_one) / (self.count - 1) / 1024


def measure_idle_memory(workdir: Path, storage: str, cert: Path, nginx_port: int, count: int,
                        settle: float) -> IdleMemory:
    """Server RSS with 1 and with `count` idle TLS tunnels, held by bench/idle_clients.py in one process."""
    tunnel = Tunnel(workdir, storage, tls=True, cert=cert, backends={})
    helper = None
    try:
        helper = tc.Service("idle clients", [sys.executable, str(Path(__file__).with_name("idle_clients.py")),
                                             *tunnel.client_args(DOMAIN), "--backend",
                                             f"http://127.0.0.1:{nginx_port}", "--count", "1"],
                            workdir / "idle-clients.log", env=tc.child_env(), stdin=subprocess.PIPE)
        memory = IdleMemory(count=count)
        server = psutil.Process(tunnel.server.pid)
        for total in (1, count):
            if total > 1:
                helper.proc.stdin.write(f"{total}\n".encode())
                helper.proc.stdin.flush()
            tc.wait_for_backends(tunnel.admin_port, DOMAIN, total, 180, watch=[tunnel.server, helper])
            time.sleep(settle)  # a measurement window: let health pings and lazy buffers happen once
            rss = server.memory_info().rss
            if total == 1:
                memory.rss_one = rss
            else:
                memory.rss_many = rss
            print(f"  {total} idle TLS tunnel(s): server RSS {rss / tc.MIB:.1f} MiB", flush=True)
        return memory
    finally:
        if helper is not None:
            helper.stop()
        tunnel.stop()


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base and value else "-"


def build_table(direct: PathResults, plain: PathResults, tls: PathResults, idle: IdleMemory | None) -> str:
    """One row per measure; each tunnel gets a value column and a ratio-to-direct column."""
    headers = ["measure", "direct", "tun2g plain", "plain/direct", "tun2g TLS", "TLS/direct", "Go plain / TLS"]
    tunnels = (plain, tls)

    def row(label, show, base, compare, go):
        cells = [label, show(direct) if base is not None else "-"]
        for path in tunnels:
            if path.failed:
                cells += ["failed", ""]
            else:
                cells += [show(path), compare(path) if base is not None else ""]
        return cells + [go]

    rows = []
    for c in CONNECTIONS:
        base = direct.wrk[c]
        rows.append(row(f"req/s, {c} conn", lambda r: f"{r.wrk[c].requests_per_s:,.0f}", base,
                        lambda r: ratio(r.wrk[c].requests_per_s, base.requests_per_s),
                        "{} / {}".format(*GO_RPS_RATIO[c])))
        rows.append(row(f"p50 / p99 ms, {c} conn", lambda r: f"{r.wrk[c].p50_ms:.2f} / {r.wrk[c].p99_ms:.2f}", base,
                        lambda r: f"p50 {r.wrk[c].p50_ms - base.p50_ms:+.2f} ms",
                        "{} / {} (plain)".format(*GO_LATENCY_MS[c])))
    size = f"{TRANSFER_SIZE // tc.MIB} MiB"
    rows.append(row(f"download {size}, MB/s", lambda r: f"{r.download / 1e6:,.0f}", direct,
                    lambda r: ratio(r.download, direct.download), "{} / {}".format(*GO_DOWNLOAD_RATIO)))
    rows.append(row(f"upload {size}, MB/s", lambda r: f"{r.upload / 1e6:,.0f}", direct,
                    lambda r: ratio(r.upload, direct.upload), f"~{GO_UPLOAD_RATIO}"))
    for c in (1, 64):
        for name, go in (("server", 140), ("client", 190)):
            rows.append(row(f"{name} CPU µs/request, {c} conn",
                            lambda r: f"{r.cpu_us_per_request.get((name, c), 0):.0f}", None, None, f"~{go}"))
    if idle:
        rows.append(["server RSS, 1 idle TLS tunnel", "-", "", "", f"{idle.rss_one / tc.MIB:.1f} MiB", "",
                     "7.7 MB (no tunnel)"])
        rows.append([f"server RSS, {idle.count} idle TLS tunnels", "-", "", "",
                     f"{idle.rss_many / tc.MIB:.1f} MiB", "", "40-46 MB at 200"])
        rows.append(["KiB per idle TLS tunnel", "-", "", "", f"{idle.kib_per_tunnel:.1f}", "",
                     f"~{GO_KIB_PER_IDLE_TUNNEL}"])
    return tc.format_table(headers, rows)


def targets(plain: PathResults, direct: PathResults, idle: IdleMemory | None) -> str:
    """The quoted Go reference, and the goal this run can judge on its own; Go in the same run: peers_bench."""
    memory_goal = (f"{'MET' if idle.kib_per_tunnel <= 64 else 'NOT MET'} ({idle.kib_per_tunnel:.1f})" if idle
                   else "not measured")
    r64 = "-" if plain.failed else f"{plain.wrk[64].requests_per_s / direct.wrk[64].requests_per_s:.3f}"
    return "\n".join([
        "Quoted Go tun2 figures (docs/protocol.md#reference-figures, another run on another day, so no verdict is "
        "drawn from them): 64 conn ~5-9% of direct req/s, 1 conn ~16-18% "
        "(+0.24 ms median); 100 MiB download 25% of direct plain / 14% TLS; uploads ~5%; "
        "~170 KiB server RSS per idle TLS tunnel; ~140 µs server and ~190 µs client CPU per request.",
        f"This run: plain tunnel at 64 conn {r64} of direct. For verdicts against Go and an nginx chain measured "
        f"in the same run: python3 bench/peers_bench.py. Goal <= 64 KiB per idle tunnel: {memory_goal}."])


def measure_tunnel(workdir: Path, storage: str, tls: bool, cert: Path, nginx_port: int, sink_port: int,
                   upload_file: Path, duration: float, repeats: int, profile: bool) -> PathResults:
    """Everything through one tunnel kind; a failure is recorded in the result, not raised."""
    kind = "tls" if tls else "plain"
    print(f"through the tunnel, {'TLS' if tls else 'plain TCP'}", flush=True)
    result = PathResults()
    tunnel = None
    try:
        tunnel = Tunnel(workdir, storage, tls, cert, {DOMAIN: nginx_port, UPLOAD_DOMAIN: sink_port})
        _check_hello(tunnel.http_port)
        pids = {"server": tunnel.server.pid, "client": tunnel.clients[0].pid}
        measure_wrk(result, tunnel.http_port, duration, pids)
        measure_transfers(result, tunnel.http_port, tunnel.http_port, upload_file, repeats)
        if profile:
            tc.profile_processes(pids, lambda: tc.run_wrk(tunnel.http_port, DOMAIN, 64, 10),
                                 RESULTS / f"profile-{kind}")
        for service in tunnel.services:
            service.check_alive()
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        result.failed = str(exc)
        result.notes.append(f"failed: {exc}")
        print(f"  failed: {exc}", flush=True)
    finally:
        if tunnel is not None:
            tunnel.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per wrk point and one transfer of each kind")
    parser.add_argument("--idle", type=int, default=0,
                        help="idle TLS tunnels for a memory figure, at most 16 (one token; the per-token session "
                             "cap); 0: skip. bench/idle_bench.py measures idle cost at 1,000 and 10,000 tunnels")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy the server and client under wrk at 64 connections")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) and say where")
    args = parser.parse_args()
    duration, repeats, settle = (2.0, 1, 2.0) if args.quick else (5.0, 3, 6.0)

    load_before = os.getloadavg()[0]  # other work on these 2 cores moves every figure: say how busy it was
    workdir = Path(tempfile.mkdtemp(prefix="tun2g-bench-"))
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            print(f"logs and files in {workdir}")
        download = tc.make_file(workdir / DOWNLOAD_NAME, TRANSFER_SIZE)
        nginx_port, sink_port = tc.free_port(), tc.free_port()
        stack.callback(tc.start_nginx(workdir, nginx_port, DOWNLOAD_NAME).stop)
        stack.callback(tc.start_upload_sink(workdir, sink_port).stop)
        storage = f"sqlite:///{workdir / 'bench.db'}"
        tc.tun2g_run("token", "import", "--user", USER, "--secret", TOKEN, "--storage", storage)
        for domain in (DOMAIN, UPLOAD_DOMAIN):
            tc.tun2g_run("route", "add", domain, "--user", USER, "--storage", storage)
        tc.tun2g_run("cert", "--out", str(workdir), "--host", "127.0.0.1", "--host", "localhost")
        cert = workdir / "tun2g-dev-cert.pem"

        print("direct (nginx, upload sink)", flush=True)
        direct = PathResults()
        measure_wrk(direct, nginx_port, duration)
        measure_transfers(direct, nginx_port, sink_port, download, repeats)
        paths = {tls: measure_tunnel(workdir, storage, tls, cert, nginx_port, sink_port, download, duration,
                                     repeats, args.profile) for tls in (False, True)}
        idle = None
        if args.idle > 1:
            print("idle TLS tunnels", flush=True)
            try:
                idle = measure_idle_memory(workdir, storage, cert, nginx_port, args.idle, settle)
            except (RuntimeError, TimeoutError, OSError) as exc:
                direct.notes.append(f"idle TLS tunnels: {exc}")
                print(f"  failed: {exc}", flush=True)

    table = build_table(direct, paths[False], paths[True], idle)
    notes = [f"- {name}: {note}" for name, result in (("direct", direct), ("plain", paths[False]),
                                                      ("TLS", paths[True])) for note in result.notes]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = "\n\n".join(filter(None, [
        f"# tun2g tunnel benchmark ({stamp}, {'quick, ' if args.quick else ''}{duration:g} s per wrk point, "
        f"{psutil.cpu_count()} cores, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after)",
        table, targets(paths[False], direct, idle),
        "Problems seen:\n" + "\n".join(notes) if notes else ""]))
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(report + "\n")
    print(f"\nwritten to {RESULTS / 'latest.md'}")


def _check_hello(port: int) -> None:
    """One request through the tunnel must return nginx's exact body before we time anything."""
    body = tc.http_get(f"http://127.0.0.1:{port}/", {"Host": DOMAIN})
    if body != tc.HELLO_BODY:
        raise RuntimeError(f"the tunnel returned {body!r}, expected {tc.HELLO_BODY!r}")


if __name__ == "__main__":
    main()
