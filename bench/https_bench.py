"""Public HTTPS against public HTTP, same server, same run: wrk req/s and server CPU µs per request.

    python3 bench/https_bench.py [--duration S]

One `tun2g server` with --http and --https (SQLite store, the certificate for
`localhost` added with `tun2g cert add`), one `tun2g client` to nginx. wrk
keeps its connections alive, so the HTTPS figures are the steady cost of TLS
records; `handshakes/s` adds new connections one after another, full versus
resumed (a TLS 1.2 session given back, as a browser reconnecting does).
"""

from __future__ import annotations

import argparse
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

import tunnel_common as tc

DOMAIN, USER = "localhost", "bench"  # wrk sends the URL's host as SNI: a name that resolves
CONNECTIONS = (1, 64)


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_wrk(url: str, connections: int, duration: float) -> tc.WrkResult:
    argv = [tc.require_binary("wrk"), "-t", "1" if connections < 2 else "2", "-c", str(connections),
            "-d", f"{duration:g}s", "--latency", "--timeout", "10s", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr}{result.stdout}")
    return tc.parse_wrk(result.stdout)


def handshakes_per_s(port: int, ca: Path, resume: bool, seconds: float) -> float:
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is known right after the handshake
    count, elapsed = handshakes(port, context, resume, seconds)
    return count / elapsed


def handshakes(port: int, context: ssl.SSLContext, resume: bool, seconds: float) -> tuple[int, float]:
    """New connections one after another for `seconds` (at least one): (handshakes, seconds taken)."""
    session, count, started = None, 0, time.monotonic()
    while count == 0 or time.monotonic() - started < seconds:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                context.wrap_socket(raw, server_hostname=DOMAIN, session=session if resume else None) as tls:
            session = tls.session
            if resume and count and not tls.session_reused:
                raise RuntimeError("the session was not resumed")
        count += 1
    return count, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk point")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tun2g-https-bench-") as tmp:
        workdir = Path(tmp)
        storage = f"sqlite:///{workdir / 'store.sqlite3'}"
        nginx_port = tc.free_port()
        services = [tc.start_nginx(workdir, nginx_port, "download.bin")]
        try:
            tc.tun2g_run("cert", "dev", "--out", str(workdir), "--host", DOMAIN)
            cert, key = workdir / "tun2g-dev-cert.pem", workdir / "tun2g-dev-key.pem"
            tc.tun2g_run("cert", "add", DOMAIN, "--cert", str(cert), "--key", str(key), "--storage", storage)
            tc.tun2g_run("route", "add", DOMAIN, "--user", USER, "--storage", storage)
            token = secrets.token_hex(24)  # imported: hex never starts with "-"
            tc.tun2g_run("token", "import", "--user", USER, "--secret", token, "--storage", storage)
            http_port, https_port, tunnel_port, admin_port = (tc.free_port() for _ in range(4))
            server = tc.Service("tun2g server", tc.tun2g_argv(
                "server", "--http", f"127.0.0.1:{http_port}", "--https", f"127.0.0.1:{https_port}",
                "--tunnel", f"127.0.0.1:{tunnel_port}", "--plain-tunnel", "--admin", f"127.0.0.1:{admin_port}",
                "--admin-token", "bench", "--storage", storage, "--no-access-log", "--log-level", "warning"),
                workdir / "server.log", env=tc.child_env())
            services.append(server)
            tc.wait_until(lambda: server.check_alive() or tc.port_open(admin_port), 30, "the server")
            client = tc.Service("tun2g client", tc.tun2g_argv(
                "client", "--server", f"127.0.0.1:{tunnel_port}", "--plain", "--token", token, "--domain", DOMAIN,
                "--backend", f"http://127.0.0.1:{nginx_port}", "--no-inspect", "--quiet", "--log-level", "warning"),
                workdir / "client.log", env=tc.child_env())
            services.append(client)
            tc.wait_until(lambda: client.check_alive() or _answers(http_port), 30, "the tunnel")
            rows = []
            for scheme, port in (("http", http_port), ("https", https_port)):
                url = f"{scheme}://{DOMAIN}:{port}/"
                run_wrk(url, 16, 1.0)  # warm-up
                for connections in CONNECTIONS:
                    before = _cpu(server.pid)
                    result = run_wrk(url, connections, args.duration)
                    cpu_us = (_cpu(server.pid) - before) * 1e6 / max(result.requests, 1)
                    rows.append((scheme, connections, result.requests_per_s, cpu_us, result.p50_ms))
            full = handshakes_per_s(https_port, cert, resume=False, seconds=2)
            resumed = handshakes_per_s(https_port, cert, resume=True, seconds=2)
        finally:
            for service in reversed(services):
                service.stop()
    base = {c: r for s, c, *r in rows if s == "http"}
    print("| public port | conns | req/s | vs HTTP | server CPU µs/req | p50 ms |")
    print("|---|---|---|---|---|---|")
    for scheme, connections, rps, cpu_us, p50 in rows:
        print(f"| {scheme} | {connections} | {rps:,.0f} | {rps / base[connections][0]:.2f} | {cpu_us:.0f} | {p50:.2f} |")
    print(f"\nnew connections one after another: full handshakes {full:,.0f}/s, resumed {resumed:,.0f}/s")


def _answers(port: int) -> bool:
    """The tunnel serves: nginx's page comes back through it (urllib raises on a 502)."""
    try:
        tc.http_get(f"http://127.0.0.1:{port}/", {"Host": DOMAIN}, timeout=2)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
