"""The Python ends of bench/smux_bench.py, one per process (gevent), speaking tun2g.smux or raw TCP.

    python3 bench/smux_bench_peers.py --kind smux|raw --role ROLE [--dial PORT] ...

Roles (output lines match the Go smuxpeer's, so one parser reads both):

    sink    listen; read --streams streams to EOF    -> RESULT bytes=.. streams=.. seconds=.. mbps=..
    source  dial; write --bytes on each of --streams streams, then close them
    echo    listen; echo every stream until EOF, forever
    rtt     dial; --count round trips of a --size-byte message on one stream -> RTT count=.. seconds=.. us=..
    churn   dial; --count times open a stream, echo --size bytes, close; --parallel
            workers at once                              -> CHURN count=.. seconds=..

In raw mode every "stream" is its own TCP connection.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tun2g.smux import Config, Session  # noqa: E402

WRITE_CHUNK = 64 * 1024
READ_BUFFER = 256 * 1024
DONE_TIMEOUT = 120.0


def say(line: str) -> None:
    print(line, flush=True)


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drain(conn) -> int:
    """Read `conn` (socket or smux stream) to EOF; the byte count."""
    buffer = memoryview(bytearray(READ_BUFFER))
    total = 0
    while count := conn.recv_into(buffer):
        total += count
    return total


def fill(conn, size: int) -> None:
    """Write `size` bytes of the source pattern (byte i = i % 251, per write) in 64 KiB writes."""
    chunk = memoryview(bytes(i % 251 for i in range(WRITE_CHUNK)))
    while size > 0:
        conn.sendall(chunk[:min(size, WRITE_CHUNK)])
        size -= WRITE_CHUNK


def exchange(conn, message: bytes) -> None:
    """Send `message` and read back as many bytes."""
    conn.sendall(message)
    left = len(message)
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("the echo peer closed the stream early")
        left -= len(chunk)


def echo(conn) -> None:
    try:
        while chunk := conn.recv(READ_BUFFER):
            conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()


class Ends:
    """How to get streams: many TCP connections (raw) or streams of one smux session."""

    def __init__(self, args) -> None:
        self.args = args
        self.listener = None
        self.session = None
        if args.dial is None:
            self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            say(f"READY port={self.listener.getsockname()[1]}")
        if args.kind == "smux":
            if args.dial is None:
                sock = self.listener.accept()[0]
            else:
                sock = socket.create_connection(("127.0.0.1", args.dial))
            self.session = Session(sock, client=args.dial is not None, config=Config(version=args.version))

    def accept(self):
        if self.session is not None:
            return self.session.accept_stream()
        return nodelay(self.listener.accept()[0])

    def open(self):
        if self.session is not None:
            return self.session.open_stream()
        return nodelay(socket.create_connection(("127.0.0.1", self.args.dial)))

    def finish(self, wait_for_peer: bool) -> None:
        """Close the session (or wait for the peer to close it, when it still has to drain)."""
        if self.session is not None:
            if wait_for_peer:
                self.session.wait_closed(DONE_TIMEOUT)
            self.session.close()


def run_sink(ends: Ends, args) -> None:
    first = ends.accept()
    started = time.monotonic()
    jobs = [gevent.spawn(drain, first)]
    jobs += [gevent.spawn(drain, ends.accept()) for _ in range(args.streams - 1)]
    gevent.joinall(jobs, raise_error=True)
    seconds = time.monotonic() - started
    total = sum(job.value for job in jobs)
    say(f"RESULT bytes={total} streams={args.streams} seconds={seconds:.3f} mbps={total / seconds / 1e6:.1f}")
    for job in jobs:
        job.args[0].close()
    ends.finish(wait_for_peer=False)


def run_source(ends: Ends, args) -> None:
    def one() -> None:
        conn = ends.open()
        fill(conn, args.bytes)
        if ends.session is None:
            conn.shutdown(socket.SHUT_WR)
            drain(conn)  # until the sink has read everything and closes
        conn.close()

    gevent.joinall([gevent.spawn(one) for _ in range(args.streams)], raise_error=True)
    ends.finish(wait_for_peer=True)


def run_echo(ends: Ends, _args) -> None:
    while True:
        gevent.spawn(echo, ends.accept())


def run_rtt(ends: Ends, args) -> None:
    conn = ends.open()
    message = bytes(args.size)
    started = time.monotonic()
    for _ in range(args.count):
        exchange(conn, message)
    seconds = time.monotonic() - started
    say(f"RTT count={args.count} seconds={seconds:.3f} us={seconds / args.count * 1e6:.1f}")
    conn.close()
    ends.finish(wait_for_peer=False)


def run_churn(ends: Ends, args) -> None:
    message = bytes(args.size)

    def worker(count: int) -> None:
        for _ in range(count):
            conn = ends.open()
            exchange(conn, message)
            conn.close()

    shares = [args.count // args.parallel + (i < args.count % args.parallel) for i in range(args.parallel)]
    started = time.monotonic()
    gevent.joinall([gevent.spawn(worker, share) for share in shares], raise_error=True)
    say(f"CHURN count={args.count} seconds={time.monotonic() - started:.3f}")
    ends.finish(wait_for_peer=False)


ROLES = {"sink": run_sink, "source": run_source, "echo": run_echo, "rtt": run_rtt, "churn": run_churn}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["smux", "raw"], required=True)
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--dial", type=int, help="port on 127.0.0.1 to connect to (default: listen)")
    parser.add_argument("--streams", type=int, default=1, help="sink, source: streams")
    parser.add_argument("--bytes", type=int, default=0, help="source: bytes per stream")
    parser.add_argument("--count", type=int, default=1000, help="rtt, churn: exchanges")
    parser.add_argument("--size", type=int, default=64, help="rtt, churn: message size")
    parser.add_argument("--parallel", type=int, default=1, help="churn: concurrent workers")
    parser.add_argument("--version", type=int, default=1, help="smux protocol version")
    args = parser.parse_args(argv)
    ROLES[args.role](Ends(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
