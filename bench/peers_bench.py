"""tun2g against its peers, all in one run: direct nginx, an nginx two-hop chain, tun2g, the Go tun2.

    python3 bench/peers_bench.py                          # ~8 minutes: every system, 1/16/64/256 connections
    python3 bench/peers_bench.py --rounds 1 --seconds 2   # a quick look
    python3 bench/peers_bench.py --against a25cae5        # also an older revision's tun2g: before/after
    python3 bench/peers_bench.py --systems direct,chain,tun2g,go --connections 1,64

One nginx (`return 200 "hello, world\\n"`) is the backend of every system:

- `direct`: wrk to that nginx;
- `chain`: nginx -> nginx -> backend, two more nginx processes proxying with keep-alive upstreams
  (`proxy_http_version 1.1`, `keepalive 64`): the best a two-hop path costs in C;
- `greenlet-chain`, `callback-chain`: the Python floors of any two-hop design, two relay processes
  in a row (bench/http_layer_bench.py's relays: one recv and one send each way, no HTTP work), with a
  greenlet per connection, or from event-loop callbacks;
- `callback-http-chain`: the floor of any two-hop design that reads HTTP: the callback relays, with
  httptools (llhttp, C) parsing every request and response that passes (target, headers, where it ends);
- `http-chain`: two processes of tun2g.http's own proxy path in a row (MessageReader, forward_exchange,
  BackendPool, a greenlet per connection): tun2g's HTTP layer with no tunnel, routing or policy;
- `tun2g`, `tun2g-tls`: `tun2g server` + `tun2g client` of this working tree, plain and TLS tunnel,
  access log on (the default, as users run it; the server logs to a file);
  `tun2g-nolog`, `tun2g-tls-nolog`: the same with `--no-access-log`;
- `go`, `go-tls`: the Go tun2 server and client the test suite builds (tests/go/tun2server, tun2client);
- with `--against REV`: `REV`, `REV-tls` (and `-nolog`): that revision's tun2g, exported with git archive.

Every round runs wrk at each connection count against every system in turn (the order rotating
each round), so load from elsewhere on the machine hits all alike; the table gives medians over the
rounds. CPU µs per request are per process, read from /proc/<pid>/stat (utime + stime, the
process and its children: an nginx master's workers) before and after each wrk run. The verdicts
at the end compare figures of this run only. The table is printed and written to
bench/results/peers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

import request_cost_bench as rcb
import tunnel_common as tc
from common import GoPeerUnavailable, start_go_peer

DOMAIN = rcb.DOMAIN
RESULTS = Path(__file__).resolve().parent / "results"
ALL_SYSTEMS = ("direct", "chain", "greenlet-chain", "callback-chain", "callback-http-chain", "http-chain",
               "tun2g", "tun2g-tls", "tun2g-nolog", "tun2g-tls-nolog", "go", "go-tls")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CHAIN_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 100000000;
    upstream next {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
        }}
    }}
}}
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children, from /proc/<pid>/stat (seconds)."""
    total = 0.0
    try:
        pids = [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15 of stat(5)
    return total


class System:
    """Something wrk can load on `port` with Host DOMAIN, and the processes whose CPU is counted."""

    def __init__(self, name: str, port: int, processes: dict[str, int], stop=None, restart=None):
        self.name, self.port, self.processes, self._stop = name, port, processes, stop
        self.restart = restart  # a function starting it afresh (the Go peers: a dropped tunnel ends them)
        self.said = lambda: ""  # what its processes last said, for a failure's note


    def measure(self, connections: int, seconds: float) -> dict:
        """One wrk run: req/s, p50/p99 ms and CPU µs per request of each process."""
        before = {role: cpu_seconds(pid) for role, pid in self.processes.items()}
        result = tc.run_wrk(self.port, DOMAIN, connections, seconds)
        if result.errors:
            raise RuntimeError(f"{self.name}, {connections} connections: {result.errors}")
        requests = max(result.requests, 1)
        cpu = {role: (cpu_seconds(pid) - before[role]) * 1e6 / requests for role, pid in self.processes.items()}
        return {"rps": result.requests_per_s, "p50": result.p50_ms, "p99": result.p99_ms, "cpu": cpu}

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()


def start_chain(workdir: Path, backend_port: int) -> System:
    """Two nginx proxies in a row in front of the backend."""
    binary = tc.require_binary("nginx")
    middle_port, front_port = tc.free_port(), tc.free_port()
    services = []
    for name, port, upstream in (("middle", middle_port, backend_port), ("front", front_port, middle_port)):
        conf = workdir / f"nginx-{name}.conf"
        conf.write_text(CHAIN_CONF.format(dir=workdir, name=name, port=port, upstream=upstream))
        service = tc.Service(f"nginx {name}", [binary, "-c", str(conf), "-p", str(workdir)],
                             workdir / f"nginx-{name}.log")
        services.append(service)
        tc.wait_until(lambda: service.check_alive() or tc.port_open(port), 10, f"nginx {name} on {port}")
    return System("chain", front_port, {"front": services[1].pid, "middle": services[0].pid},
                  lambda: [service.stop() for service in reversed(services)])


RELAY_FLAGS = {"greenlet-chain": "--serve-greenlet-relay", "callback-chain": "--serve-callback-relay",
               "callback-http-chain": "--serve-callback-http-relay", "http-chain": "--serve-proxy"}
FLOOR_WORK = {"greenlet-chain": "no HTTP work at all", "callback-chain": "no HTTP work at all",
              "callback-http-chain": "httptools parsing only", "http-chain": "tun2g.http's proxy, no tunnel"}


def start_relay_chain(name: str, workdir: Path, backend_port: int) -> System:
    """Two of bench/http_layer_bench.py's relays in a row in front of the backend (small answers only)."""
    relay = Path(__file__).with_name("http_layer_bench.py")
    middle_port, front_port = tc.free_port(), tc.free_port()
    services = []
    for role, port, upstream in (("middle", middle_port, backend_port), ("front", front_port, middle_port)):
        service = tc.Service(f"{name} {role}", [sys.executable, str(relay), RELAY_FLAGS[name], str(port),
                                                 str(upstream)], workdir / f"{name}-{role}.log")
        services.append(service)
        tc.wait_until(lambda: service.check_alive() or tc.port_open(port), 10, f"{name} {role} on {port}")
    return System(name, front_port, {"front": services[1].pid, "middle": services[0].pid},
                  lambda: [service.stop() for service in reversed(services)])


def start_tun2g(name: str, source: Path, workdir: Path, tls: bool, cert: Path, backend_port: int,
                access_log: bool) -> System:
    """A tun2g server + client of the tree at `source`."""
    storage = rcb._storage(workdir / f"bench-{name}.db", source)
    tunnel = rcb.TreeTunnel(name, source, workdir, storage, tls, cert, backend_port, access_log=access_log)
    return System(name, tunnel.http_port, {"server": tunnel.server.pid, "client": tunnel.client.pid}, tunnel.stop)


def start_go(name: str, tls: bool, cert: Path, backend_port: int) -> System:
    """The Go tun2 server and client (tests/go), one token and domain."""
    tls_server = ["--cert", str(cert), "--key", str(cert.with_name("tun2g-dev-key.pem"))] if tls else []
    # The original drops a tunnel whose 1 s health ping fails; a loaded machine must not end the run.
    server = start_go_peer("tun2server", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--token", rcb.TOKEN,
                           "--domain", DOMAIN, "--ping-interval", "1h", *tls_server)
    peers = [server]
    try:
        ready = server.wait_for(r"READY tunnel=(\d+) http=(\d+)", timeout=30)
        tls_client = ["--tls", "--ca", str(cert)] if tls else []
        client = start_go_peer("tun2client", "--server", f"127.0.0.1:{ready.group(1)}", "--token", rcb.TOKEN,
                               "--domain", DOMAIN, "--backend", f"http://127.0.0.1:{backend_port}", *tls_client)
        peers.append(client)
        server.wait_for(r"REGISTERED domain=", timeout=30)
    except BaseException:
        for peer in peers:
            peer.stop()
        raise
    system = System(name, int(ready.group(2)), {"server": server.proc.pid, "client": client.proc.pid},
                    lambda: [peer.stop() for peer in reversed(peers)])
    system.said = lambda: f" (Go server: {server.lines[-1:]} {server.stderr[-200:]!r})"
    return system


def median_of(samples: list[dict]) -> dict:
    """Medians of every figure over the rounds."""
    return {"rps": statistics.median(s["rps"] for s in samples),
            "p50": statistics.median(s["p50"] for s in samples),
            "p99": statistics.median(s["p99"] for s in samples),
            "cpu": {role: statistics.median(s["cpu"][role] for s in samples) for role in samples[0]["cpu"]}}


def machine() -> str:
    """On what this ran: CPU model, cores, load."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; "
            f"load average at the end {load}")


def table(results: dict, names: list[str], counts: list[int]) -> str:
    base = {c: results.get(("direct", c)) for c in counts}
    chain = {c: results.get(("chain", c)) for c in counts}
    go = {c: results.get(("go", c)) for c in counts}
    go_tls = {c: results.get(("go-tls", c)) for c in counts}
    rows = ["| system | conn | req/s | x direct | x chain | x Go | p50 ms | p99 ms | CPU µs/req per process | sum |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]

    def ratio(value, other) -> str:
        return f"{value / other['rps']:.3f}" if other else "-"
    for c in counts:
        for name in names:
            r = results.get((name, c))
            if r is None:
                continue
            peer = go_tls[c] if name.endswith(("-tls", "-tls-nolog")) else go[c]
            cpu = " + ".join(f"{role} {us:.0f}" for role, us in r["cpu"].items())
            rows.append(f"| {name} | {c} | {r['rps']:.0f} | {ratio(r['rps'], base[c])} | "
                        f"{ratio(r['rps'], chain[c]) if name != 'chain' else '-'} | "
                        f"{ratio(r['rps'], peer) if not name.startswith('go') else '-'} | "
                        f"{r['p50']:.2f} | {r['p99']:.2f} | {cpu} | {sum(r['cpu'].values()):.0f} |")
    return "\n".join(rows)


def verdicts(results: dict, counts: list[int]) -> list[str]:
    """issue 16's goals, each against figures of this run."""
    lines = []

    def cpu(name, c):
        r = results.get((name, c))
        return sum(r["cpu"].values()) if r else None
    for name in ("tun2g", "tun2g-tls"):
        ours, chain = cpu(name, 64), cpu("chain", 64)
        if ours and chain:
            verdict = "MET" if ours <= 2 * chain else "NOT MET"
            lines.append(f"- {name}, 64 conn: server + client CPU {ours:.0f} µs/req <= 2x the nginx chain's "
                         f"{chain:.0f}: {verdict} ({ours / chain:.1f}x)")
    for floor in RELAY_FLAGS:
        theirs, chain = cpu(floor, 64), cpu("chain", 64)
        if theirs and chain:
            lines.append(f"- {floor}, 64 conn ({FLOOR_WORK[floor]}): {theirs:.0f} µs/req, {theirs / chain:.1f}x "
                         f"the nginx chain's CPU")
    one = results.get(("tun2g", 1))
    direct, go = results.get(("direct", 1)), results.get(("go", 1))
    if one and direct:
        added = one["p50"] - direct["p50"]
        lines.append(f"- tun2g, 1 conn: added p50 {added:.2f} ms over direct <= 0.25 ms: "
                     f"{'MET' if added <= 0.25 else 'NOT MET'}")
    if one and go:
        lines.append(f"- tun2g, 1 conn: req/s >= 1.3x Go's: {'MET' if one['rps'] >= 1.3 * go['rps'] else 'NOT MET'} "
                     f"({one['rps'] / go['rps']:.2f}x)")
    for c in counts:
        ours, theirs = results.get(("tun2g", c)), results.get(("go", c))
        if ours and theirs and c != 1:
            lines.append(f"- tun2g, {c} conn: {ours['rps'] / theirs['rps']:.2f}x Go's req/s, CPU "
                         f"{cpu('tun2g', c):.0f} vs Go's {cpu('go', c):.0f} µs/req")
    log_on, log_off = results.get(("tun2g", 64)), results.get(("tun2g-nolog", 64))
    if log_on and log_off:
        added = log_on["cpu"]["server"] - log_off["cpu"]["server"]
        lines.append(f"- the access log at 64 conn (log on vs off, one figure each: noisy on a busy machine): "
                     f"{added:+.0f} µs/req of server CPU, {log_on['rps'] / log_off['rps'] - 1:+.1%} req/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated, of " + ", ".join(ALL_SYSTEMS))
    parser.add_argument("--against", default=None, help="also run this git revision's tun2g (plain and TLS)")
    parser.add_argument("--connections", default="1,16,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.md")
    args = parser.parse_args()
    counts = [int(n) for n in args.connections.split(",")]
    wanted = args.systems.split(",")
    unknown = set(wanted) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ALL_SYSTEMS)}")

    systems: list[System] = []
    notes: list[str] = []
    with ExitStack() as stack:
        workdir, backend_port, cert = rcb.workspace(stack, "tun2g-peers-")
        trees = [("tun2g", tc.REPO_ROOT)]
        if args.against:
            trees.append((args.against.replace("/", "_"), rcb.export_revision(args.against, workdir / "against")))

        def add(system: System) -> None:
            stack.callback(system.stop)
            systems.append(system)
        for name in wanted:
            if name == "direct":
                add(System("direct", backend_port, {}))
            elif name == "chain":
                add(start_chain(workdir, backend_port))
            elif name in RELAY_FLAGS:
                add(start_relay_chain(name, workdir, backend_port))
            elif name.startswith("tun2g"):
                tls, log = "-tls" in name, not name.endswith("-nolog")
                for label, source in trees:
                    add(start_tun2g(label + name[len("tun2g"):], source, workdir, tls, cert, backend_port, log))
            else:
                def go(name=name) -> System:
                    system = start_go(name, name == "go-tls", cert, backend_port)
                    system.restart = go
                    return system
                try:
                    add(go())
                except GoPeerUnavailable as exc:
                    notes.append(f"- {name} skipped: {exc}")
                    print(f"  {name} skipped: {exc}", file=sys.stderr)
        for system in systems:
            tc.run_wrk(system.port, DOMAIN, 16, 1.0)  # warm-up
        samples: dict = {}
        failed: set[str] = set()
        restarted: set[str] = set()
        started = time.monotonic()
        for round_number in range(args.rounds):
            order = systems[round_number % len(systems):] + systems[:round_number % len(systems)]
            for connections in counts:
                for index, system in enumerate(order):
                    if system.name in failed:
                        continue
                    try:
                        figures = system.measure(connections, args.seconds)
                    except RuntimeError as exc:  # wrk saw errors
                        notes.append(f"- {system.name} failed in round {round_number + 1}: {exc}{system.said()}")
                        print(f"  {notes[-1]}", flush=True)
                        if system.restart is None or system.name in restarted:
                            failed.add(system.name)  # left out from here on
                            continue
                        restarted.add(system.name)  # once: started afresh, the point measured again
                        system.stop()
                        fresh = system.restart()
                        stack.callback(fresh.stop)
                        systems[systems.index(system)] = order[index] = fresh
                        system = fresh
                        try:
                            figures = system.measure(connections, args.seconds)
                        except RuntimeError as again:
                            failed.add(system.name)
                            notes.append(f"- {system.name} failed again after a restart: {again}")
                            continue
                    samples.setdefault((system.name, connections), []).append(figures)
                    cpu = " ".join(f"{role} {us:.0f}" for role, us in figures["cpu"].items())
                    print(f"  round {round_number + 1}, {connections:>3} conn, {system.name}: {figures['rps']:7.0f} "
                          f"req/s, p50 {figures['p50']:.2f} ms, CPU µs/req {cpu}", flush=True)
        took = time.monotonic() - started
    results = {key: median_of(values) for key, values in samples.items()}
    names = [system.name for system in systems]
    report = "\n".join([
        f"Medians of {args.rounds} interleaved rounds, {args.seconds:g} s of wrk per point ({took / 60:.0f} min), "
        f"on {machine()}.", "", table(results, names, counts), "", *verdicts(results, counts), *notes])
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
