"""smux bulk throughput over loopback TCP: tun2g.smux against Go xtaci/smux and a raw-socket ceiling.

    python3 bench/smux_bench.py              # v1, 256 MiB per point, 1 and 64 streams, median of 3 (~40 s)
    python3 bench/smux_bench.py --version 2 --mib 128 --repeat 5

Each case runs a sink (which listens and times from its first accepted stream
to the last EOF) and a source (which dials, opens the streams and writes
--mib MiB in total, split evenly) as two separate processes:

    raw socket     Python sockets, one TCP connection per stream; its 1-connection
                   figure is the ceiling every "vs raw" ratio divides by (smux
                   carries all its streams over one connection)
    Python->Python tun2g.smux on both ends
    Python->Go     tun2g.smux source, Go smuxpeer sink
    Go->Python     Go smuxpeer source, tun2g.smux sink
    Go->Go         Go smuxpeer on both ends: the reference

`peer ...` runs one Python end (used by the benchmark itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    # A Python end is a gevent program: patch before anything imports socket or threading.
    from gevent import monkey
    monkey.patch_all()

from common import (MIB, GoPeerUnavailable, PeerProcess, format_table, ratio, start_go_peer,  # noqa: E402
                    start_python)

SCRIPT = Path(__file__).resolve()
WRITE_CHUNK = 64 * 1024
READ_BUFFER = 256 * 1024
CASE_TIMEOUT = 120.0


# ------------------------------------------------------------------ the Python ends

def run_peer(argv: list[str]) -> int:
    """One Python end of a case, in its own process (gevent-patched)."""
    parser = argparse.ArgumentParser(prog="smux_bench.py peer")
    parser.add_argument("--kind", choices=["smux", "raw"], required=True)
    parser.add_argument("--role", choices=["source", "sink"], required=True)
    parser.add_argument("--dial", type=int, help="port on 127.0.0.1 to connect to (else listen)")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=0, help="source: bytes per stream")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    if args.kind == "raw":
        return _raw_sink(args) if args.role == "sink" else _raw_source(args)
    return _smux_peer(args)


def _say(line: str) -> None:
    print(line, flush=True)


def _report(total: int, streams: int, started: float) -> None:
    seconds = time.monotonic() - started
    _say(f"RESULT bytes={total} streams={streams} seconds={seconds:.3f} mbps={total / seconds / 1e6:.1f}")


def _listener():
    import socket
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    _say(f"READY port={listener.getsockname()[1]}")
    return listener


def _nodelay(sock):
    import socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _drain(conn) -> int:
    """Read `conn` (socket or smux stream) to EOF; the byte count."""
    buffer = memoryview(bytearray(READ_BUFFER))
    total = 0
    while count := conn.recv_into(buffer):
        total += count
    return total


def _fill(conn, size: int) -> None:
    chunk = bytes(i % 251 for i in range(WRITE_CHUNK))
    view = memoryview(chunk)
    while size > 0:
        conn.sendall(view[:min(size, WRITE_CHUNK)])
        size -= WRITE_CHUNK


def _raw_sink(args) -> int:
    import gevent
    listener = _listener()
    conns = [_nodelay(listener.accept()[0])]
    started = time.monotonic()
    conns += [_nodelay(listener.accept()[0]) for _ in range(args.streams - 1)]
    jobs = [gevent.spawn(_drain, conn) for conn in conns]
    gevent.joinall(jobs, raise_error=True)
    _report(sum(job.value for job in jobs), args.streams, started)
    return 0


def _raw_source(args) -> int:
    import socket

    import gevent

    def one() -> None:
        with _nodelay(socket.create_connection(("127.0.0.1", args.dial))) as conn:
            _fill(conn, args.bytes)
            conn.shutdown(socket.SHUT_WR)
            _drain(conn)  # the sink closes after reading everything

    gevent.joinall([gevent.spawn(one) for _ in range(args.streams)], raise_error=True)
    return 0


def _smux_peer(args) -> int:
    import socket

    import gevent
    from tun2g.smux import Config, Session

    if args.dial:
        sock = socket.create_connection(("127.0.0.1", args.dial))
    else:
        sock = _listener().accept()[0]
    session = Session(sock, client=bool(args.dial), config=Config(version=args.version))
    if args.role == "sink":
        streams = [session.accept_stream()]
        started = time.monotonic()
        jobs = [gevent.spawn(_drain, streams[0])]
        for _ in range(args.streams - 1):
            jobs.append(gevent.spawn(_drain, session.accept_stream()))
        gevent.joinall(jobs, raise_error=True)
        _report(sum(job.value for job in jobs), args.streams, started)
        session.close()
        return 0

    def one() -> None:
        stream = session.open_stream()
        _fill(stream, args.bytes)
        stream.close()

    gevent.joinall([gevent.spawn(one) for _ in range(args.streams)], raise_error=True)
    session.wait_closed(CASE_TIMEOUT)  # the sink closes once it has everything
    return 0


# ------------------------------------------------------------------ the benchmark

@dataclass
class Case:
    name: str
    sink: str  # "python-raw", "python" or "go"
    source: str


CASES = [
    Case("raw socket (Python)", "python-raw", "python-raw"),
    Case("Python -> Python", "python", "python"),
    Case("Python -> Go", "go", "python"),
    Case("Go -> Python", "python", "go"),
    Case("Go -> Go", "go", "go"),
]


def _start_end(kind: str, role: str, streams: int, per_stream: int, version: int,
               dial: int | None) -> PeerProcess:
    if kind == "go":
        where = ["--dial", f"127.0.0.1:{dial}"] if dial else ["--listen", "127.0.0.1:0"]
        return start_go_peer("smuxpeer", *where, "--mode", role, "--streams", streams, "--bytes", per_stream,
                             "--write-chunk", WRITE_CHUNK, "--version", version)
    peer_kind = "raw" if kind == "python-raw" else "smux"
    where = ["--dial", dial] if dial else []
    return start_python(SCRIPT, "peer", "--kind", peer_kind, "--role", role, "--streams", streams,
                        "--bytes", per_stream, "--version", version, *where)


def run_case(case: Case, streams: int, total: int, version: int) -> float:
    """MB/s measured by the sink for `total` bytes over `streams` streams."""
    per_stream = total // streams
    sink = _start_end(case.sink, "sink", streams, per_stream, version, None)
    source = None
    try:
        port = int(sink.wait_for(r"READY port=(\d+)").group(1))
        source = _start_end(case.source, "source", streams, per_stream, version, port)
        result = sink.wait_for(r"RESULT bytes=(\d+) .*mbps=([\d.]+)", timeout=CASE_TIMEOUT)
        received = int(result.group(1))
        if received != per_stream * streams:
            raise RuntimeError(f"{case.name}: the sink got {received} bytes, expected {per_stream * streams}")
        source.wait_exit(timeout=30)
        return float(result.group(2))
    finally:
        for end in (source, sink):
            if end is not None:
                end.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["peer"]:
        return run_peer(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB sent per case (default 256)")
    parser.add_argument("--streams", type=int, default=64, help="the many-streams column (default 64)")
    parser.add_argument("--version", type=int, choices=[1, 2], default=1, help="smux protocol version")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point; the median is shown (default 3)")
    args = parser.parse_args(argv)

    counts = [1, args.streams]
    results: dict[str, list[float]] = {}
    started = time.monotonic()
    for case in CASES:
        try:
            results[case.name] = [
                statistics.median(run_case(case, n, args.mib * MIB, args.version) for _ in range(args.repeat))
                for n in counts]
        except GoPeerUnavailable as error:
            print(f"skipping {case.name}: {error}", file=sys.stderr)
        print(f"  {case.name}: " + ", ".join(f"{v:.0f} MB/s" for v in results.get(case.name, [])),
              file=sys.stderr, flush=True)

    raw, go = results.get(CASES[0].name), results.get(CASES[-1].name)
    ceiling = raw[0] if raw else None
    headers = ["case"] + [f"{n} stream{'s' * (n > 1)} MB/s" for n in counts] + \
        [f"{n} vs raw 1-conn" for n in counts] + [f"{n} vs Go<->Go" for n in counts]
    rows = []
    for name, values in results.items():
        rows.append([name] + [f"{v:.0f}" for v in values]
                    + [ratio(v, ceiling) for v in values]
                    + [ratio(v, go[i] if go else None) for i, v in enumerate(values)])
    print(f"\nsmux v{args.version} bulk throughput over loopback TCP, {args.mib} MiB per point, "
          f"median of {args.repeat} ({time.monotonic() - started:.0f} s)\n")
    print(format_table(headers, rows))
    print()
    print(_targets(results, raw, go))
    return 0


def _targets(results: dict[str, list[float]], raw, go) -> str:
    lines = ["targets (the other processes on this machine move every figure; rerun when it is idle):"]
    python_single = results.get("Python -> Python", [None])[0]
    if python_single and raw:
        share = python_single / raw[0]
        lines.append(f"  one Python stream >= 50% of raw socket: {share:.0%} "
                     f"({'met' if share >= 0.5 else 'MISSED'})")
    for name in ("Python -> Go", "Go -> Python"):
        if name in results and go:
            shares = [v / g for v, g in zip(results[name], go)]
            verdict = "met" if min(shares) >= 1 / 3 else "MISSED"
            lines.append(f"  {name} >= Go<->Go / 3: " + ", ".join(f"{s:.2f}" for s in shares) + f" ({verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
