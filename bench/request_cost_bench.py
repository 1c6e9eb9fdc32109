"""A/B cost of one proxied request: this working tree against a git revision, interleaved in one run.

    python3 bench/request_cost_bench.py --against HEAD          # uncommitted changes vs the last commit
    python3 bench/request_cost_bench.py --against HEAD~3 --tls --rounds 5 --seconds 3
    python3 bench/request_cost_bench.py --against abc123~ --candidate abc123   # what one commit changed
    python3 bench/request_cost_bench.py --modes off,metrics,capture      # one tree, metrics/capture on and off
    python3 bench/request_cost_bench.py --modes off,routes               # 1 route vs 1,000 routes loaded

Both trees (`--candidate` defaults to the working tree) run their own `tun2g server` + `tun2g client` (plain tunnel, or TLS
with --tls) in front of one nginx. Each round runs wrk at every connection
count against each tree in turn (the order reversed every other round), so load
from elsewhere on the machine hits both alike; the table gives medians over the
rounds of req/s and of the server's and the client's CPU µs per request (the
steadier figure). A second table pairs the trees round by round: each tree's
figures over the first tree's in the same round, their median and range. Drift
between rounds cancels there, so it is the figure to quote.

With `--modes`, the working tree (or `--candidate`) runs once per mode instead:
`off` (--no-metrics --no-inspect), `metrics` (--no-inspect), `capture` (metrics,
and the route marked `tun2g route inspect DOMAIN on`, so every request is captured), `routes`
(as `off`, with 1,000 more routes in the store: hosts, wildcards and path prefixes, some on the
bench's own host, so its requests take the prefix scan; docs/routing.md),
`policies` (off, with 1,000 edge policies stored for other routes: the lookup misses) and
`policy` (off, 1,000 policies, one of them on DOMAIN: an allow list, a header set, a body limit) and
`log` (off, with the access log on; the servers log to a file). `--access-log` turns it on in every tree.

    python3 bench/request_cost_bench.py --modes off,routes,policies,policy
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psutil

import tunnel_common as tc

DOMAIN, USER = "bench.test", "bench"
TOKEN = "ab" * 24  # hex: never parsed as an option


def export_revision(revision: str, target: Path) -> Path:
    """The tun2g package as of `revision`, unpacked under `target` (the shared working tree is not touched)."""
    archive = subprocess.run(["git", "archive", revision, "tun2g"], cwd=tc.REPO_ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target)
    return target


class TreeTunnel:
    """A server and one client for DOMAIN, both importing tun2g from `source`."""

    def __init__(self, name: str, source: Path, workdir: Path, storage: str, tls: bool, cert: Path,
                 nginx_port: int, server_args: tuple[str, ...] = (), access_log: bool = False):
        self.name = name
        env = tc.child_env()
        env["PYTHONPATH"] = str(source)
        # `python -m` puts its working directory first on sys.path: run in `source`, or the
        # repository's own tun2g would shadow the exported one.
        imported = subprocess.run([sys.executable, "-c", "import tun2g; print(tun2g.__file__)"], env=env,
                                  cwd=source, capture_output=True, text=True, check=True).stdout.strip()
        if not imported.startswith(str(source)):
            raise RuntimeError(f"{name}: tun2g imports from {imported}, not from {source}")
        self.http_port, tunnel_port, admin_port = tc.free_port(), tc.free_port(), tc.free_port()
        argv = ["server", "--http", f"127.0.0.1:{self.http_port}", "--tunnel", f"127.0.0.1:{tunnel_port}",
                "--admin", f"127.0.0.1:{admin_port}", "--storage", storage,
                "--access-log" if access_log else "--no-access-log",
                "--log-level", "info" if access_log else "warning", *server_args]
        argv += ["--tls-cert", str(cert), "--tls-key", str(cert.with_name("tun2g-dev-key.pem"))] if tls \
            else ["--plain-tunnel"]
        run = [sys.executable, "-m", "tun2g.cli"]
        self.server = tc.Service(f"{name} server", run + argv, workdir / f"{name}-server.log", env=env, cwd=source)
        self.services = [self.server]
        try:
            tc.wait_until(lambda: self.server.check_alive() or tc.port_open(admin_port), 30, f"{name} admin API")
            client_tls = ["--ca", str(cert)] if tls else ["--plain"]
            self.client = tc.Service(f"{name} client", run + [
                "client", "--server", f"127.0.0.1:{tunnel_port}", "--token", TOKEN, "--domain", DOMAIN,
                *client_tls, "--backend", f"http://127.0.0.1:{nginx_port}", "--log-level", "warning"],
                workdir / f"{name}-client.log", env=env, cwd=source)
            self.services.append(self.client)
            tc.wait_for_backends(admin_port, DOMAIN, 1, 30, watch=self.services)
        except BaseException:
            self.stop()
            raise

    def measure(self, connections: int, seconds: float) -> tuple[float, float, float]:
        """(req/s, server µs/request, client µs/request) of one wrk run."""
        processes = [psutil.Process(self.server.pid), psutil.Process(self.client.pid)]
        before = [_cpu(p) for p in processes]
        result = tc.run_wrk(self.http_port, DOMAIN, connections, seconds)
        if result.errors:
            raise RuntimeError(f"{self.name}, {connections} connections: {result.errors}")
        requests = max(result.requests, 1)
        server, client = ((_cpu(p) - b) * 1e6 / requests for p, b in zip(processes, before))
        return result.requests_per_s, server, client

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# 1,000 routes besides DOMAIN: 400 hosts, 300 wildcards, 290 path routes on other hosts, 10 on DOMAIN itself.
_MORE_ROUTES = """
import sys
from tun2g.storage import open_storage
storage = open_storage(sys.argv[1])
for i in range(400):
    storage.add_route(f"app{i}.routes.test", "bench")
for i in range(300):
    storage.add_route(f"*.tenant{i}.test", "bench")
for i in range(290):
    storage.add_route(f"site{i}.paths.test/api{i % 7}", "bench", strip=i % 2 == 0)
for i in range(10):
    storage.add_route(f"bench.test/prefix{i}", "bench")
storage.close()
"""


_POLICIES = """
import sys
from tun2g.storage import open_storage
store = open_storage(sys.argv[1])
for index in range(1000):
    store.set_policy(f"site{index}.bench.test", {"allow": ["10.0.0.0/8"], "rate": "10/s", "max_body": "1M"})
if sys.argv[2] == "own":
    store.set_policy(sys.argv[3], {"allow": ["127.0.0.0/8", "::1"], "max_body": "10M",
                                   "request_headers": {"set": {"X-Edge": "bench"}, "remove": []}})
store.close()
"""


def _store_policies(storage: str, source: Path, own: bool) -> None:
    env = tc.child_env()
    env["PYTHONPATH"] = str(source)
    subprocess.run([sys.executable, "-c", _POLICIES, storage, "own" if own else "others", DOMAIN], env=env,
                   cwd=source, capture_output=True, check=True, timeout=120)


def _storage(path: Path, source: Path = tc.REPO_ROOT, inspect: bool = False, more_routes: bool = False) -> str:
    """A fresh SQLite store with the bench's token and route, made by `source`'s own tun2g (an older tree
    cannot open a newer schema), its capture switched on if `inspect`."""
    storage = f"sqlite:///{path}"
    env = tc.child_env()
    env["PYTHONPATH"] = str(source)
    commands = [("token", "import", "--user", USER, "--secret", TOKEN), ("route", "add", DOMAIN, "--user", USER)]
    if inspect:
        commands.append(("route", "inspect", DOMAIN, "on"))
    for command in commands:
        subprocess.run([sys.executable, "-m", "tun2g.cli", *command, "--storage", storage], env=env, cwd=source,
                       capture_output=True, check=True, timeout=30)
    if more_routes:
        subprocess.run([sys.executable, "-c", _MORE_ROUTES, storage], env=env, cwd=source, check=True, timeout=120)
    return storage


def workspace(stack: ExitStack, prefix: str) -> tuple[Path, int, Path]:
    """A temporary directory, an nginx backend in it and a dev certificate, all undone by `stack`:
    (directory, nginx port, certificate)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    nginx_port = tc.free_port()
    stack.callback(tc.start_nginx(workdir, nginx_port, "unused").stop)
    tc.tun2g_run("cert", "--out", str(workdir), "--host", "127.0.0.1", "--host", "localhost")
    return workdir, nginx_port, workdir / "tun2g-dev-cert.pem"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision to compare with (tree A)")
    parser.add_argument("--candidate", default=None, help="git revision to measure (tree B; default: the working tree)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--tls", action="store_true", help="TLS tunnels instead of plain TCP")
    parser.add_argument("--access-log", action="store_true", help="servers log every request (as by default)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated of off, metrics, capture, routes: one tree in each mode (see above)")
    args = parser.parse_args()
    counts = [int(n) for n in args.connections.split(",")]

    with ExitStack() as stack:
        workdir, nginx_port, cert = workspace(stack, "tun2g-ab-")
        tunnels = []
        if args.modes:
            source = export_revision(args.candidate, workdir / "b") if args.candidate else tc.REPO_ROOT
            for mode in args.modes.split(","):
                flags = {"off": ("--no-metrics", "--no-inspect"), "metrics": ("--no-inspect",), "capture": (),
                         "routes": ("--no-metrics", "--no-inspect"),
                         "policies": ("--no-metrics", "--no-inspect"), "policy": ("--no-metrics", "--no-inspect"),
                         "log": ("--no-metrics", "--no-inspect")}[mode]
                own = _storage(workdir / f"bench-{mode}.db", source, inspect=mode == "capture",
                               more_routes=mode == "routes")
                if mode in ("policies", "policy"):
                    _store_policies(own, source, own=mode == "policy")
                tunnel = TreeTunnel(mode, source, workdir, own, args.tls, cert, nginx_port, flags,
                                    access_log=args.access_log or mode == "log")
                stack.callback(tunnel.stop)
                tunnels.append((mode, tunnel))
        else:
            trees = {args.against: export_revision(args.against, workdir / "a")}
            if args.candidate:
                trees[args.candidate] = export_revision(args.candidate, workdir / "b")
            else:
                trees["working tree"] = tc.REPO_ROOT
            for name, source in trees.items():
                label = name.replace("/", "_").replace(" ", "_")
                storage = _storage(workdir / f"bench-{label}.db", source)
                tunnel = TreeTunnel(label, source, workdir, storage, args.tls, cert, nginx_port,
                                    access_log=args.access_log)
                stack.callback(tunnel.stop)
                tunnels.append((name, tunnel))
        for _, tunnel in tunnels:
            tc.run_wrk(tunnel.http_port, DOMAIN, 16, 1.0)  # warm-up
        samples: dict = {}
        for round_number in range(args.rounds):
            for connections in counts:
                for name, tunnel in (tunnels if round_number % 2 == 0 else tunnels[::-1]):
                    figures = tunnel.measure(connections, args.seconds)
                    samples.setdefault((name, connections), []).append(figures)
                    print(f"  round {round_number + 1}, {connections:>3} conn, {name}: {figures[0]:7.0f} req/s, "
                          f"server {figures[1]:5.1f} µs, client {figures[2]:5.1f} µs", flush=True)

    kind = "TLS" if args.tls else "plain"
    print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each, {kind} tunnel")
    print(f"| {'tree':<14} | conn |   req/s | server µs/req | client µs/req |")
    print(f"|{'-' * 16}|------|---------|---------------|---------------|")
    for connections in counts:
        for name, _ in tunnels:
            rps, server, client = (statistics.median(column) for column in zip(*samples[name, connections]))
            print(f"| {name:<14} | {connections:>4} | {rps:7.0f} | {server:13.1f} | {client:13.1f} |")
    if len(tunnels) > 1:
        print(paired_ratios(samples, [name for name, _ in tunnels], counts))


def paired_ratios(samples: dict, names: list[str], counts: list[int]) -> str:
    """Each tree against the first, round by round: a round's trees ran back to back, so their ratio shrugs off
    the drift between rounds that moves the medians above (on these machines, 10-20% in an hour). The median of
    the rounds' ratios, and their lowest and highest."""
    base = names[0]
    lines = [f"\nratios to {base}, paired by round: median (lowest-highest)",
             "| tree           | conn | req/s              | server CPU         | client CPU         |",
             "|----------------|------|--------------------|--------------------|--------------------|"]
    for connections in counts:
        for name in names[1:]:
            pairs = list(zip(samples[base, connections], samples[name, connections]))
            cells = []
            for column in range(3):
                ratios = sorted(b[column] / a[column] for a, b in pairs if a[column] > 0)
                cells.append(f"{statistics.median(ratios):.3f} ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else "-")
            lines.append(f"| {name:<14} | {connections:>4} | {cells[0]:<18} | {cells[1]:<18} | {cells[2]:<18} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
