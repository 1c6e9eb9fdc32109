"""Cluster benchmark: requests/s through HAProxy to a backend on the same node vs on another node (forwarded).

    python3 bench/cluster_bench.py [--quick] [--connections 16] [--keep]

One run starts its own redis-server, nginx, three `tun2g server` nodes on
that Redis, one `tun2g client` (on node n1, serving nginx) and one HAProxy
with three frontends: "local" balances to n1 only (the backend is there),
"remote" to n2 only (n2 forwards every request to n1 over the signed hop),
"balanced" round-robins over n1..n3 (two requests in three forwarded).
Direct nginx is measured in the same run as the baseline. Redis commands per
proxied request come from INFO commandstats before/after each wrk run
net of the commands the idle cluster sends anyway (registry refreshes), measured
over a quiet window of the same length; registry lookups are shown apart.
Targets: remote >= 80% of local requests/s; registry lookups per request 0
on the local path and <= 1 (cached) on the forwarded one.

    python3 bench/cluster_bench.py --scaling [--quick]

Scale-out, same run: HAProxy round-robin over the first 1, 2 or 3 nodes, with
the client (`--sessions K`) on K of them: (N, K) = (1, 1), (2, 2), (3, 3) and
(3, 2). Reports req/s, the fraction of requests forwarded (the nodes'
tun2g_hop_forwards_total), and CPU per request on each balanced node (psutil,
user + system): on a machine with cores to spare req/s scales with N; on a
small shared one, CPU per request per node is what predicts it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

import tunnel_common as tc
from common import BENCH_ADMIN_TOKEN, format_table
from tun2g.cluster.hop import WINDOW

DOMAIN, USER, SECRET = "bench.test", "bench", "cluster-bench-secret"
NODES = ("n1", "n2", "n3")
HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend local
    bind 127.0.0.1:{local}
    default_backend only_n1
frontend remote
    bind 127.0.0.1:{remote}
    default_backend only_n2
frontend balanced
    bind 127.0.0.1:{balanced}
    default_backend all_nodes
backend only_n1
    server n1 127.0.0.1:{n1}
backend only_n2
    server n2 127.0.0.1:{n2}
backend all_nodes
    balance roundrobin
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
    server n3 127.0.0.1:{n3}
frontend first1
    bind 127.0.0.1:{first1}
    default_backend only_n1
frontend first2
    bind 127.0.0.1:{first2}
    default_backend n1_n2
frontend first3
    bind 127.0.0.1:{first3}
    default_backend all_nodes
backend n1_n2
    balance roundrobin
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
"""
SCALING = ((1, 1), (2, 2), (3, 2), (3, 3))  # (nodes behind HAProxy, client sessions), grouped by sessions


@dataclass
class Point:
    """One measured path."""

    name: str
    wrk: tc.WrkResult
    redis_per_request: float
    lookups_per_request: float
    cpu_us: dict[str, float]  # CPU per request of each process of the path (user + system), microseconds


class Cluster:
    """Redis, three nodes, a client on n1 and HAProxy, all in `workdir`."""

    def __init__(self, workdir: Path, nginx_port: int, stack: ExitStack, sessions: int = 1):
        self.redis_port = tc.free_port()
        redis_service = tc.Service("redis", [tc.require_binary("redis-server"), "--port", str(self.redis_port),
                                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                             "--dir", str(workdir)], workdir / "redis.log")
        stack.callback(redis_service.stop)
        tc.wait_until(lambda: redis_service.check_alive() or tc.port_open(self.redis_port), 10, "redis-server")
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        tc.tun2g_run("route", "add", DOMAIN, "--user", USER, "--storage", self.redis_url)
        token = tc.create_token(self.redis_url, USER)
        self.http_ports, self.admin_ports, tunnel_ports = {}, {}, {}
        self.services = [redis_service]
        self.nodes: dict[str, tc.Service] = {}
        self.nginx_port = nginx_port
        self.started = time.monotonic()  # before any node: see settle()
        for node in NODES:
            http_port, tunnel_port, admin_port = tc.free_port(), tc.free_port(), tc.free_port()
            self.http_ports[node], self.admin_ports[node], tunnel_ports[node] = http_port, admin_port, tunnel_port
            service = tc.Service(node, tc.tun2g_argv(
                "server", "--http", f"127.0.0.1:{http_port}", "--tunnel", f"127.0.0.1:{tunnel_port}",
                "--plain-tunnel", "--admin", f"127.0.0.1:{admin_port}", "--storage", self.redis_url,
                "--node-id", node, "--cluster-secret", SECRET, "--no-access-log", "--log-level", "warning"),
                workdir / f"{node}.log", env=tc.child_env())
            stack.callback(service.stop)
            self.services.append(service)
            self.nodes[node] = service
        for node in NODES:
            tc.wait_until(lambda: self._alive() or tc.port_open(self.admin_ports[node]), 30, f"node {node}")
        self._client_argv = tc.tun2g_argv(
            "client", "--server", f"127.0.0.1:{tunnel_ports['n1']}", "--plain", "--token", token,
            "--domain", DOMAIN, "--backend", f"http://127.0.0.1:{nginx_port}", "--log-level", "warning")
        self._workdir = workdir
        self.client: tc.Service | None = None
        stack.callback(lambda: self.client.stop() if self.client is not None else None)
        self.use_client(sessions)
        self.frontends = {"local": tc.free_port(), "remote": tc.free_port(), "balanced": tc.free_port(),
                          "first1": tc.free_port(), "first2": tc.free_port(), "first3": tc.free_port()}
        config = workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(**self.frontends, **self.http_ports))
        haproxy = tc.Service("haproxy", [tc.require_binary("haproxy"), "-db", "-f", str(config)],
                             workdir / "haproxy.log")
        stack.callback(haproxy.stop)
        self.services.append(haproxy)
        self.haproxy = haproxy
        for port in self.frontends.values():
            tc.wait_until(lambda: self._alive() or tc.port_open(port), 10, "haproxy")
        self.redis = redis.Redis(port=self.redis_port)

    def use_client(self, sessions: int) -> None:
        """(Re)start the tunnel client with `sessions` sessions (entry n1) and wait until each is listed."""
        if self.client is not None:
            self.client.stop(timeout=30)
            self.services.remove(self.client)
        self.client = tc.Service(f"client-k{sessions}", [*self._client_argv, "--sessions", str(sessions)],
                                 self._workdir / f"client-k{sessions}.log", env=tc.child_env())
        self.services.append(self.client)
        for node in NODES:  # every node sees the backends (the others' through Redis)
            tc.wait_until(lambda: self._alive() or len(tc.admin_backends(self.admin_ports[node], DOMAIN)) == sessions,
                          30, f"{sessions} backend(s) listed on {node}", interval=0.1)

    def settle(self) -> None:
        """Wait until every node is past its first 2 x WINDOW seconds, when it claims each hop nonce in Redis
        too (tun2g.cluster.hop.NonceMemory.may_predate): what follows measures nodes in their steady state."""
        left = self.started + 2 * WINDOW + 1 - time.monotonic()
        if left > 0:
            print(f"waiting {left:.0f} s for the nodes' steady state (no Redis call per hop)", flush=True)
            time.sleep(left)  # a fixed period of the nodes' lives, not synchronisation

    def _alive(self) -> bool:
        for service in self.services:
            service.check_alive()
        return False

    def processes(self) -> dict[str, tc.Service]:
        """The processes a request may cross, by name: the nodes, the tunnel client and HAProxy."""
        assert self.client is not None
        return {**self.nodes, "client": self.client, "haproxy": self.haproxy}

    def commandstats(self) -> dict:
        return {name.removeprefix("cmdstat_"): values["calls"]
                for name, values in self.redis.info("commandstats").items()}


def commands_since(cluster: Cluster, before: dict) -> dict:
    after = cluster.commandstats()
    return {command: calls - before.get(command, 0) for command, calls in after.items() if command != "info"}


def idle_commands_per_second(cluster: Cluster, seconds: float) -> float:
    """Redis commands the nodes send with no traffic at all (registry refreshes, pub/sub pings)."""
    before = cluster.commandstats()
    time.sleep(seconds)  # measuring the background rate over a quiet window, not synchronising
    return sum(commands_since(cluster, before).values()) / seconds


def measure(cluster: Cluster | None, name: str, port: int, connections: int, duration: float,
            idle_rate: float = 0.0) -> Point:
    """wrk one path; Redis commands per request net of the idle background rate."""
    before = cluster.commandstats() if cluster else {}
    processes = cluster.processes() if cluster else {}
    cpu_before = {who: cpu_seconds(service) for who, service in processes.items()}
    started = time.monotonic()
    result = tc.run_wrk(port, DOMAIN, connections, duration)
    if cluster is None:
        return Point(name, result, 0.0, 0.0, {})
    delta = commands_since(cluster, before)
    requests = max(1, result.requests)
    background = idle_rate * (time.monotonic() - started)
    cpu = {who: (cpu_seconds(service) - cpu_before[who]) / requests * 1e6 for who, service in processes.items()}
    return Point(name, result, max(0.0, sum(delta.values()) - background) / requests,
                 delta.get("zrangebyscore", 0) / requests, cpu)


def hop_forwards(cluster: Cluster) -> float:
    """Requests forwarded so far by all nodes (tun2g_hop_forwards_total, every outcome)."""
    total = 0.0
    for port in cluster.admin_ports.values():
        text = tc.http_get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {BENCH_ADMIN_TOKEN}"})
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                     if line.startswith("tun2g_hop_forwards_total"))
    return total


def cpu_seconds(service: tc.Service) -> float:
    times = psutil.Process(service.pid).cpu_times()
    return times.user + times.system


@dataclass
class ScalePoint:
    """One (nodes, sessions) configuration through HAProxy."""

    nodes: int
    sessions: int
    wrk: tc.WrkResult
    forwarded: float  # fraction of requests that crossed two nodes
    cpu_us: list[float]  # CPU per request on each balanced node, microseconds
    client_us: float  # CPU per request of the tunnel client process (all its sessions)

    @property
    def capacity(self) -> float:
        """req/s the configuration would reach with a core per process: the busiest one saturates first."""
        return 1e6 / max(*self.cpu_us, self.client_us)


def measure_scaling(cluster: Cluster, nodes: int, sessions: int, connections: int, duration: float) -> ScalePoint:
    balanced = [cluster.nodes[name] for name in NODES[:nodes]]
    assert cluster.client is not None
    hops, cpu, client = hop_forwards(cluster), [cpu_seconds(node) for node in balanced], cpu_seconds(cluster.client)
    result = tc.run_wrk(cluster.frontends[f"first{nodes}"], DOMAIN, connections, duration)
    requests = max(1, result.requests)
    return ScalePoint(nodes, sessions, result, (hop_forwards(cluster) - hops) / requests,
                      [(cpu_seconds(node) - before) / requests * 1e6 for node, before in zip(balanced, cpu)],
                      (cpu_seconds(cluster.client) - client) / requests * 1e6)


def start_cluster(args: argparse.Namespace, stack: ExitStack, prefix: str) -> Cluster:
    """nginx and the Cluster in a new temporary directory (kept with --keep), stopped by `stack`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if args.keep:
        print(f"logs in {workdir}")
    else:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    nginx_port = tc.free_port()
    stack.callback(tc.start_nginx(workdir, nginx_port, "unused.bin").stop)
    print("starting redis, 3 nodes, a client on n1, haproxy ...", flush=True)
    return Cluster(workdir, nginx_port, stack)


def scaling(args: argparse.Namespace, duration: float) -> int:
    """The --scaling run: req/s, forwarded fraction and CPU per request per node for each of SCALING."""
    points: list[ScalePoint] = []
    with ExitStack() as stack:
        cluster = start_cluster(args, stack, "tun2g-cluster-scaling-")
        cluster.settle()
        for nodes, sessions in SCALING:
            if cluster.client is None or not cluster.client.name.endswith(f"k{sessions}"):
                print(f"client with --sessions {sessions}", flush=True)
                cluster.use_client(sessions)
            tc.run_wrk(cluster.frontends[f"first{nodes}"], DOMAIN, args.connections, 1)  # warm
            print(f"wrk -c {args.connections} via haproxy over {nodes} node(s), K = {sessions}", flush=True)
            points.append(measure_scaling(cluster, nodes, sessions, args.connections, duration))
    base = points[0].wrk.requests_per_s
    rows = [[f"{p.nodes} node{'s' if p.nodes > 1 else ''}, K = {p.sessions}", f"{p.wrk.requests_per_s:,.0f}",
             f"{p.wrk.requests_per_s / base:.2f}", f"{p.forwarded:.2f}",
             " / ".join(f"{us:.0f}" for us in p.cpu_us), f"{sum(p.cpu_us):.0f}", f"{p.client_us:.0f}",
             f"{p.capacity:,.0f}", f"{p.wrk.p99_ms:.2f}", p.wrk.errors or "-"] for p in points]
    print()
    print(f"tun2g cluster scale-out, {args.connections} connections, {duration:g} s per configuration, "
          f"{psutil.cpu_count()} cores")
    print(format_table(["configuration", "req/s", "vs 1 node", "forwarded", "CPU µs/req per node", "nodes' sum",
                        "client µs/req", "req/s, a core each", "p99 ms", "errors"], rows))
    print("(CPU per request, user + system, on each balanced node and in the one client process; the last column\n"
          " is 1e6 / the busiest process's figure: what the configuration reaches with a core per process)")
    return 0


def table(points: list[Point], local: Point) -> str:
    rows = [["path", "req/s", "vs local", "p50 ms", "p99 ms", "CPU µs/req per process", "tun2g sum",
             "Redis cmds/req (net)", "lookups/req", "errors"]]
    for point in points:
        busy = {who: us for who, us in point.cpu_us.items() if us >= 1}  # an idle node's timers are not the path's
        rows.append([point.name, f"{point.wrk.requests_per_s:,.0f}",
                     f"{point.wrk.requests_per_s / local.wrk.requests_per_s:.2f}", f"{point.wrk.p50_ms:.2f}",
                     f"{point.wrk.p99_ms:.2f}", " + ".join(f"{who} {us:.0f}" for who, us in busy.items()) or "-",
                     f"{sum(us for who, us in busy.items() if who != 'haproxy'):.0f}" if busy else "-",
                     f"{point.redis_per_request:.4f}", f"{point.lookups_per_request:.5f}", point.wrk.errors or "-"])
    return format_table(rows[0], rows[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per wrk run instead of 10 s")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each path is shown")
    parser.add_argument("--scaling", action="store_true", help="req/s, forwarded fraction and CPU per request "
                                                               "with 1, 2, 3 nodes and K = N or 2 (see above)")
    args = parser.parse_args()
    duration = 3.0 if args.quick else 8.0
    if args.scaling:
        return scaling(args, duration)
    with ExitStack() as stack:
        cluster = start_cluster(args, stack, "tun2g-cluster-bench-")
        nginx_port = cluster.nginx_port
        for port in cluster.frontends.values():  # warm every path (connections, lookup caches)
            tc.run_wrk(port, DOMAIN, args.connections, 1)
        cluster.settle()
        points = [measure(None, "direct nginx", nginx_port, args.connections, duration)]
        idle_rate = idle_commands_per_second(cluster, duration)
        runs = {name: [] for name in ("local", "remote", "balanced")}
        for round_number in range(args.rounds):  # interleaved, so drift on a shared machine hits all paths alike
            for name in runs:
                print(f"round {round_number + 1}: wrk -c {args.connections} via haproxy -> {name}", flush=True)
                runs[name].append(measure(cluster, name, cluster.frontends[name], args.connections, duration,
                                          idle_rate))
        points += [max(found, key=lambda point: point.wrk.requests_per_s) for found in runs.values()]
        for service in cluster.services:
            service.check_alive()
    local, remote = points[1], points[2]
    ratio = remote.wrk.requests_per_s / local.wrk.requests_per_s
    print()
    print(f"tun2g cluster, {args.connections} connections, best of {args.rounds} x {duration:g} s per path "
          f"(local: backend on the node HAProxy picks; remote: forwarded n2 -> n1)")
    print(table(points, local))
    print(f"(idle cluster background: {idle_rate:.1f} Redis commands/s, subtracted above)")
    print()
    print(f"target remote >= 0.80 x local req/s: {'MET' if ratio >= 0.8 else 'NOT MET'} ({ratio:.2f})")
    print(f"target lookups/request local == 0: {'MET' if local.lookups_per_request == 0 else 'NOT MET'}; "
          f"remote <= 1: {'MET' if remote.lookups_per_request <= 1 else 'NOT MET'} "
          f"({remote.lookups_per_request:.5f}, cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
