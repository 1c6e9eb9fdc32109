"""The access log's cost per line, in one run: the structlog path every other line takes vs `AccessLog`.

    python3 bench/access_log_bench.py [--lines 100000]

Both write to /dev/null through tun2g.log's sink, as `tun2g server` writes to stderr: the structlog
call is how each request was logged before (processors, a write and a flush per line); `AccessLog`
caches the timestamp per second and buffers lines (one write per FLUSH_BYTES or FLUSH_SECONDS).
The end-to-end figure is `bench/request_cost_bench.py --modes off,log`.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - puts the repository on sys.path

from tun2g.log import AccessLog, configure, flush, get_logger

FIELDS = dict(method="GET", host="bench.test", path="/api/items?page=2", status=200, ms=0.42,
              client_ip="127.0.0.1", bytes_in=0, bytes_out=13, request_id="6f1c2a9e4b7d4e21a0c3f5b8",
              backend="be-3f2a9c")


def per_line(run, lines: int) -> float:
    started = time.perf_counter()
    run(lines)
    flush()
    return (time.perf_counter() - started) * 1e6 / lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with open("/dev/null", "w") as null:
        configure("info", stream=null)
        log, access = get_logger("tun2g.server.pipeline"), AccessLog("tun2g.server.pipeline")

        def structlog_lines(n: int) -> None:
            for _ in range(n):
                log.info("request", **FIELDS)

        def access_lines(n: int) -> None:
            f = FIELDS
            for _ in range(n):
                access.request(f["method"], f["host"], f["path"], f["status"], f["ms"], f["client_ip"],
                               f["bytes_in"], f["bytes_out"], f["request_id"], f["backend"])

        rounds = {"structlog (before)": [], "AccessLog": []}
        for _ in range(3):  # interleaved: load elsewhere hits both alike
            rounds["structlog (before)"].append(per_line(structlog_lines, args.lines))
            rounds["AccessLog"].append(per_line(access_lines, args.lines))
        configure("info")
    print("| path | µs per line (median of 3) |\n|---|---|")
    for name, figures in rounds.items():
        print(f"| {name} | {sorted(figures)[1]:.2f} |")


if __name__ == "__main__":
    main()
