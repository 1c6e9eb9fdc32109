"""KCP transport benchmark: tun2g KCP vs kcp-go vs TCP on loopback, with and without loss.

Run from the repository root:  python3 bench/kcp_bench.py  [--quick]

Part 1 (bulk, no loss): MB/s of one-way transfers between two endpoints in
this process (tun2g's KCP on kcp-go defaults and with KCPOptions.fast(), raw
TCP), Go kcp-go <-> Go kcp-go on defaults (tests/go/kcppeer), and tun2g's fast
preset sending to a Go listener left on defaults.

Part 2 (loss): the same seeded UDP relay the tests use drops 0/1/5 % of
datagrams each way; MB/s and the round-trip time of a 64-byte echo (p50/p99).
TCP cannot go through a datagram-dropping relay and this kernel has no netem,
so TCP is measured through a TCP relay of the same design, without loss.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.gopeers import PeerProcess, build_go_binary  # noqa: E402
from tests.fixtures.kcp import LossyRelay, make_cert_set  # noqa: E402
from tun2g.transport import tls_bio  # noqa: E402
from tun2g.transport.kcp import KCPListener, KCPOptions, kcp_dial  # noqa: E402

CHUNK = 65536
ECHO_SIZE = 64


def recv_exactly(conn, size: int) -> int:
    got = 0
    while got < size:
        data = conn.recv(min(CHUNK, size - got))
        if not data:
            raise EOFError(f"peer closed after {got} of {size} bytes")
        got += len(data)
    return got


def send_bulk(conn, size: int) -> None:
    """The kcppeer bench protocol: 8-byte LE length, the bytes, then wait for "ok"."""
    block = os.urandom(CHUNK)
    conn.sendall(struct.pack("<Q", size))
    left = size
    while left:
        conn.sendall(block[: min(CHUNK, left)])
        left -= min(CHUNK, left)
    recv_exactly(conn, 2)


def serve_bulk(conn) -> None:
    header = bytearray()
    while len(header) < 8:
        header += conn.recv(8 - len(header))
    recv_exactly(conn, struct.unpack("<Q", header)[0])
    conn.sendall(b"ok")


def serve_echo(conn) -> None:
    while data := conn.recv(CHUNK):
        conn.sendall(data)


def timed_bulk(conn, size: int) -> float:
    started = time.monotonic()
    send_bulk(conn, size)
    return size / (time.monotonic() - started) / 1e6


def echo_latency(conn, count: int) -> tuple[float, float]:
    message = b"x" * ECHO_SIZE
    samples = []
    for _ in range(count):
        started = time.monotonic()
        conn.sendall(message)
        recv_exactly(conn, ECHO_SIZE)
        samples.append((time.monotonic() - started) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


# ---- endpoints: each yields a connected client and serves the other end with `handler` ------

class KCPPair:
    """A tun2g KCP listener serving `handler`, optionally behind a lossy relay."""

    def __init__(self, options: KCPOptions, handler, loss: float | None = None):
        self.listener = KCPListener("127.0.0.1", 0, options)
        self.relay = None if loss is None else LossyRelay(self.listener.address, loss=loss, seed=42)
        self.options = options
        self.handler = handler
        self.acceptor = gevent.spawn(self._accept)

    def _accept(self) -> None:
        while True:
            gevent.spawn(_quietly, self.handler, self.listener.accept())

    def dial(self):
        address = self.relay.address if self.relay else self.listener.address
        return kcp_dial(address[0], address[1], self.options)

    def close(self) -> None:
        self.acceptor.kill()
        if self.relay:
            self.relay.close()
        self.listener.close()


def _quietly(handler, conn) -> None:
    """Serve until the bench tears the pair down (closing the listener ends its sessions)."""
    try:
        handler(conn)
    except OSError:
        pass


def _pipe(source, sink) -> None:
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        sink.close()


class TCPPair:
    """A TCP server serving `handler`, optionally behind a TCP relay (same process, TCP_NODELAY)."""

    def __init__(self, handler, relayed: bool = False):
        self.server = StreamServer(("127.0.0.1", 0), lambda sock, _addr: handler(self._tune(sock)))
        self.server.start()
        self.port = self.server.server_port
        self.relay = None
        if relayed:
            self.relay = StreamServer(("127.0.0.1", 0), self._relay)
            self.relay.start()
            self.port = self.relay.server_port

    @staticmethod
    def _tune(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _relay(self, sock, _addr) -> None:
        upstream = self._tune(socket.create_connection(("127.0.0.1", self.server.server_port)))
        self._tune(sock)
        gevent.joinall([gevent.spawn(_pipe, sock, upstream), gevent.spawn(_pipe, upstream, sock)])

    def dial(self):
        return self._tune(socket.create_connection(("127.0.0.1", self.port)))

    def close(self) -> None:
        if self.relay:
            self.relay.stop(timeout=1)
        self.server.stop(timeout=1)


class TLSOverKCPPair(KCPPair):
    """KCPPair with TLS inside KCP (tun2's kcp conn type), certificates made for the run."""

    def __init__(self, options: KCPOptions, handler):
        self.certs_dir = tempfile.TemporaryDirectory(prefix="kcp-bench-certs-")
        certs = make_cert_set(Path(self.certs_dir.name))
        server_context = tls_bio.server_context(certs.cert_file, certs.key_file)
        self.client_context = tls_bio.client_context(ca_file=certs.ca_file)
        super().__init__(options, lambda conn: handler(tls_bio.wrap(conn, server_context, server_side=True)))

    def dial(self):
        return tls_bio.wrap(super().dial(), self.client_context, server_side=False, server_hostname="localhost")

    def close(self) -> None:
        super().close()
        self.certs_dir.cleanup()


def measure(pair, size: int | None = None, echoes: int | None = None):
    """MB/s for `size` bytes, or (p50, p99) ms of `echoes` round trips; always closes the pair."""
    conn = pair.dial()
    try:
        return timed_bulk(conn, size) if size else echo_latency(conn, echoes)
    finally:
        conn.close()
        pair.close()


def go_bulk(size: int, python_options: KCPOptions | None = None) -> float:
    """MB/s into a Go kcppeer bench-server on defaults, from Go (defaults) or from tun2g."""
    binary = build_go_binary("kcppeer")
    server = PeerProcess([binary, "-mode", "bench-server"])
    try:
        port = int(server.wait_for(r"READY port=(\d+)").group(1))
        if python_options is not None:
            return measure(_Dialer(port, python_options), size=size)
        client = PeerProcess([binary, "-mode", "bench-client", "-addr", f"127.0.0.1:{port}", "-bytes", str(size)])
        try:
            return float(client.wait_for(r"mbps=([\d.]+)", timeout=300).group(1))
        finally:
            client.stop()
    finally:
        server.stop()


class _Dialer:
    def __init__(self, port: int, options: KCPOptions):
        self.port, self.options = port, options

    def dial(self):
        return kcp_dial("127.0.0.1", self.port, self.options)

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller transfers (a rough look in ~30 s)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    big, small, echoes = int(64e6 * scale), int(1e6 * scale), int(1000 * scale)
    defaults, fast = KCPOptions(), KCPOptions.fast()

    print(f"KCP bulk, no loss (one-way; defaults runs carry {small / 1e6:g} MB, the others {big / 1e6:g} MB)")
    rows = [
        ("TCP loopback (gevent, both ends here)", lambda: measure(TCPPair(serve_bulk), size=big)),
        ("tun2g KCP fast <-> tun2g KCP fast", lambda: measure(KCPPair(fast, serve_bulk), size=big)),
        ("tun2g TLS over KCP fast (tun2's layout)",
         lambda: measure(TLSOverKCPPair(fast, serve_bulk), size=big)),
        ("tun2g KCP defaults <-> tun2g KCP defaults", lambda: measure(KCPPair(defaults, serve_bulk), size=small)),
        ("Go kcp-go defaults <-> Go kcp-go defaults", lambda: go_bulk(small)),
        ("tun2g KCP fast -> Go kcp-go defaults", lambda: go_bulk(small, fast)),
    ]
    print(f"| {'path':<44} | {'MB/s':>8} |\n|{'-' * 46}|{'-' * 10}|")
    for name, run in rows:
        print(f"| {name:<44} | {run():>8.2f} |", flush=True)

    print(f"\nThrough a relay: MB/s ({big // 4 / 1e6:g} MB fast, {small / 1e6:g} MB defaults) and "
          f"{ECHO_SIZE}-byte echo round trip over {echoes} requests")
    print(f"| {'path':<34} | {'loss':>5} | {'MB/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} |")
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for name, options, size in (("tun2g KCP fast, UDP relay", fast, big // 4),
                                ("tun2g KCP defaults, UDP relay", defaults, small)):
        for loss in (0.0, 0.01, 0.05):
            rate = measure(KCPPair(options, serve_bulk, loss), size=size)
            p50, p99 = measure(KCPPair(options, serve_echo, loss), echoes=echoes)
            print(f"| {name:<34} | {loss:>5.0%} | {rate:>8.2f} | {p50:>7.2f} | {p99:>7.2f} |", flush=True)
    rate = measure(TCPPair(serve_bulk, relayed=True), size=big // 4)
    p50, p99 = measure(TCPPair(serve_echo, relayed=True), echoes=echoes)
    print(f"| {'TCP, TCP relay (no netem: no loss)':<34} | {0:>5.0%} | {rate:>8.2f} | {p50:>7.2f} | {p99:>7.2f} |")


if __name__ == "__main__":
    main()
