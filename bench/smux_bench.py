"""smux over loopback TCP: tun2g.smux against Go xtaci/smux 1.5.16 and a raw-socket baseline.

    python3 bench/smux_bench.py              # v1, 1 GiB per point, median of 3 (~1.5 minutes)
    python3 bench/smux_bench.py --version 2 --mib 128 --repeat 5

Every point runs two processes: a listening end and a dialling end (the
dialler is the smux client and opens the streams). Python ends are
bench/smux_bench_peers.py; Go ends are tests/go/smuxpeer, built from Debian's
golang-github-xtaci-smux-dev.

Bulk table: the source writes --mib MiB split over 1 or 64 streams; the sink
times from its first accepted stream to the last EOF.

    raw socket (Python)  one TCP connection per stream; its 1-connection figure
                         is the ceiling every "vs raw" ratio divides by (smux
                         carries all its streams over one connection)
    Python -> Python     tun2g.smux on both ends
    Python -> Go / Go -> Python / Go -> Go

Small-message table (what a tunnel does per HTTP request): 64-byte round
trips on one stream, and streams opened, echoed (64 B) and closed per second,
one at a time and 64 at a time (raw: a new TCP connection each time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import MIB, GoPeerUnavailable, PeerProcess, format_table, ratio, start_go_peer, start_python

PEERS = Path(__file__).resolve().parent / "smux_bench_peers.py"
WRITE_CHUNK = 64 * 1024
POINT_TIMEOUT = 120.0
RTT_COUNT, CHURN_COUNT, CHURN_PARALLEL_COUNT = 5000, 2000, 6400


@dataclass
class Case:
    name: str
    listener: str  # "raw", "python" or "go"
    dialler: str


# The dialler opens the streams: it is the source in bulk points and the
# client of the echoing listener in small-message points.
CASES = [
    Case("raw socket (Python)", "raw", "raw"),
    Case("Python -> Python", "python", "python"),
    Case("Python -> Go", "go", "python"),
    Case("Go -> Python", "python", "go"),
    Case("Go -> Go", "go", "go"),
]


def start_end(kind: str, role: str, version: int, dial: int | None = None, **options) -> PeerProcess:
    """One end: `role` is a smux_bench_peers role; Go's smuxpeer gets the equivalent mode."""
    if kind == "go":
        where = ["--dial", f"127.0.0.1:{dial}"] if dial else ["--listen", "127.0.0.1:0"]
        mode, extra = {
            "sink": ("sink", ["--streams", options.get("streams", 1)]),
            "source": ("source", ["--streams", options.get("streams", 1), "--bytes", options.get("bytes", 0),
                                  "--write-chunk", WRITE_CHUNK]),
            "echo": ("echo", []),
            "rtt": ("rtt", ["--count", options.get("count", 1), "--sizes", options.get("size", 64)]),
            "churn": ("check", ["--streams", options.get("count", 1), "--parallel", options.get("parallel", 1),
                                "--sizes", options.get("size", 64)]),
        }[role]
        return start_go_peer("smuxpeer", *where, "--version", version, "--mode", mode, *extra)
    args = ["--kind", "raw" if kind == "raw" else "smux", "--role", role, "--version", version]
    if dial:
        args += ["--dial", dial]
    for name, value in options.items():
        args += [f"--{name}", value]
    return start_python(PEERS, *args)


def run_point(case: Case, listener_role: str, dialler_role: str, result_pattern: str, version: int,
              **options):
    """Start the listener, then the dialler; the match of `result_pattern` in the reporting end's output."""
    listener = start_end(case.listener, listener_role, version, **options)
    dialler = None
    try:
        port = int(listener.wait_for(r"READY port=(\d+)").group(1))
        dialler = start_end(case.dialler, dialler_role, version, dial=port, **options)
        reporter = listener if listener_role == "sink" else dialler
        return reporter.wait_for(result_pattern, timeout=POINT_TIMEOUT)
    finally:
        for end in (dialler, listener):
            if end is not None:
                end.stop()


def bulk_mbps(case: Case, streams: int, total: int, version: int) -> float:
    per_stream = total // streams
    match = run_point(case, "sink", "source", r"RESULT bytes=(\d+) .*mbps=([\d.]+)", version,
                      streams=streams, bytes=per_stream)
    if int(match.group(1)) != per_stream * streams:
        raise RuntimeError(f"{case.name}: the sink got {match.group(1)} bytes, expected {per_stream * streams}")
    return float(match.group(2))


def round_trip_us(case: Case, version: int) -> float:
    match = run_point(case, "echo", "rtt", r"RTT count=\d+ seconds=[\d.]+ us=([\d.]+)", version,
                      count=RTT_COUNT, size=64)
    return float(match.group(1))


def churn_per_second(case: Case, parallel: int, count: int, version: int) -> float:
    pattern = r"(?:CHURN count=(\d+)|CHECK ok=(\d+) failed=0 ids=\S*) seconds=([\d.]+)"
    match = run_point(case, "echo", "churn", pattern, version, count=count, parallel=parallel, size=64)
    return count / float(match.group(3))


def measure(points: dict[str, list], repeat: int) -> dict[str, list[float]]:
    """Median of `repeat` runs of every point function, {case: [point, ...]}.

    The runs go round-robin over all cases, so a burst of load from elsewhere on
    the machine hits every case alike instead of skewing one of them.
    """
    samples = {name: [[] for _ in functions] for name, functions in points.items()}
    skipped = set()
    for _ in range(repeat):
        for name, functions in points.items():
            if name in skipped:
                continue
            try:
                for index, point in enumerate(functions):
                    samples[name][index].append(point())
            except GoPeerUnavailable as error:
                print(f"skipping {name}: {error}", file=sys.stderr)
                skipped.add(name)
    results = {name: [statistics.median(runs) for runs in per_point]
               for name, per_point in samples.items() if name not in skipped}
    for name, values in results.items():
        print(f"  {name}: " + ", ".join(f"{value:.0f}" for value in values), file=sys.stderr, flush=True)
    return results


def bulk_table(results: dict, counts: list[int]) -> str:
    raw, go = results.get(CASES[0].name), results.get(CASES[-1].name)
    ceiling = raw[0] if raw else None
    headers = (["case"] + [f"{n} stream{'s' * (n > 1)} MB/s" for n in counts]
               + [f"{n} vs raw 1-conn" for n in counts] + [f"{n} vs Go<->Go" for n in counts])
    rows = [[name] + [f"{v:.0f}" for v in values] + [ratio(v, ceiling) for v in values]
            + [ratio(v, go[i] if go else None) for i, v in enumerate(values)]
            for name, values in results.items()]
    return format_table(headers, rows)


def small_table(results: dict) -> str:
    go = results.get(CASES[-1].name)
    headers = ["case", "64 B round trip us", "streams/s, 1 at a time", "streams/s, 64 at a time",
               "round trip vs Go<->Go", "streams/s vs Go<->Go (1 / 64)"]
    rows = []
    for name, (rtt, churn_one, churn_many) in results.items():
        rows.append([name, f"{rtt:.1f}", f"{churn_one:.0f}", f"{churn_many:.0f}",
                     ratio(go[0], rtt) if go else "-",  # lower is better: Go's time over ours
                     f"{ratio(churn_one, go[1] if go else None)} / {ratio(churn_many, go[2] if go else None)}"])
    return format_table(headers, rows)


def targets(bulk: dict) -> str:
    raw, go = bulk.get(CASES[0].name), bulk.get(CASES[-1].name)
    lines = ["targets (other processes on the machine move every figure; rerun when it is idle):"]
    python_single = bulk.get("Python -> Python", [None])[0]
    if python_single and raw:
        share = python_single / raw[0]
        lines.append(f"  one Python stream >= 50% of raw socket: {share:.0%} ({'met' if share >= 0.5 else 'MISSED'})")
    for name in ("Python -> Go", "Go -> Python"):
        if name in bulk and go:
            shares = [v / g for v, g in zip(bulk[name], go)]
            verdict = "met" if min(shares) >= 1 / 3 else "MISSED"
            lines.append(f"  {name} >= Go<->Go / 3: " + ", ".join(f"{s:.2f}" for s in shares) + f" ({verdict})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB sent per bulk point (default 1024)")
    parser.add_argument("--streams", type=int, default=64, help="the many-streams bulk column (default 64)")
    parser.add_argument("--version", type=int, choices=[1, 2], default=1, help="smux protocol version")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point; the median is shown (default 3)")
    parser.add_argument("--skip-small", action="store_true", help="only the bulk table")
    args = parser.parse_args(argv)

    started = time.monotonic()
    counts = [1, args.streams]
    bulk = measure({case.name: [lambda case=case, n=n: bulk_mbps(case, n, args.mib * MIB, args.version)
                                for n in counts] for case in CASES}, args.repeat)
    small = {} if args.skip_small else measure(
        {case.name: [lambda case=case: round_trip_us(case, args.version),
                     lambda case=case: churn_per_second(case, 1, CHURN_COUNT, args.version),
                     lambda case=case: churn_per_second(case, 64, CHURN_PARALLEL_COUNT, args.version)]
         for case in CASES}, args.repeat)

    print(f"\nsmux v{args.version} over loopback TCP, median of {args.repeat} "
          f"({time.monotonic() - started:.0f} s in all)\n")
    print(f"Bulk, {args.mib} MiB per point:\n")
    print(bulk_table(bulk, counts))
    if small:
        print(f"\nSmall messages ({RTT_COUNT} round trips; {CHURN_COUNT} and {CHURN_PARALLEL_COUNT} streams):\n")
        print(small_table(small))
    print()
    print(targets(bulk))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
