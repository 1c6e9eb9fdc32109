"""Hold many idle tun2g tunnel clients open from one gevent process, for the server memory benchmark.

    python3 bench/idle_clients.py --server 127.0.0.1:4443 --ca cert.pem --token T \
        --domain bench.test --backend http://127.0.0.1:8080 --count 1

It prints `connected N` each time all N clients are connected, then reads
target totals from stdin, one per line (e.g. `1000`), and grows to each.
It exits on end of input or SIGTERM, closing every tunnel.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this working tree's tun2g

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.fileobject import FileObjectThread  # noqa: E402

from tun2g.client import Client, ClientConfig  # noqa: E402
from tun2g.log import configure  # noqa: E402
from tun2g.transport import tls  # noqa: E402

CONNECT_TIMEOUT = 120.0


def raise_fd_limit(wanted: int) -> None:
    """Lift the soft open-files limit towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class IdleFleet:
    """Many Clients sharing one TLS context, each run in its own greenlet."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.context = None if args.plain else tls.client_context(ca_file=args.ca)
        self.clients: list[Client] = []
        self.connected = 0
        self._changed = Event()

    def grow_to(self, total: int) -> None:
        """Start clients until there are `total`, then wait until all are connected."""
        while len(self.clients) < total:
            config = ClientConfig(server_addr=self.args.server, token=self.args.token, domain=self.args.domain,
                                  backend_url=self.args.backend, plain=self.args.plain,
                                  tls_context=self.context, reconnect=False)
            client = Client(config, on_status=self._on_status)
            self.clients.append(client)
            gevent.spawn(self._run, client)
        with gevent.Timeout(CONNECT_TIMEOUT, TimeoutError(f"{total} clients not all connected after "
                                                          f"{CONNECT_TIMEOUT:.0f}s ({self.connected} are)")):
            while self.connected < total:
                self._changed.clear()
                self._changed.wait()

    def _on_status(self, client: Client) -> None:
        self.connected = sum(1 for c in self.clients if c.state == "connected")
        self._changed.set()

    def _run(self, client: Client) -> None:
        try:
            client.run()
        except Exception as exc:  # noqa: BLE001 - reported, the fleet goes on
            print(f"client failed: {exc}", file=sys.stderr, flush=True)
        finally:
            client.state = "closed"
            self._on_status(client)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--ca", help="CA / self-signed certificate the server uses")
    parser.add_argument("--plain", action="store_true", help="no TLS (server run with --plain-tunnel)")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    configure("warning")
    raise_fd_limit(65536)
    fleet = IdleFleet(args)
    worker = gevent.spawn(serve, fleet, args.count)
    gevent.signal_handler(signal.SIGTERM, worker.kill)
    try:
        worker.get()
    finally:
        fleet.close()


def serve(fleet: IdleFleet, count: int) -> None:
    """Grow to `count`, then to each total read from stdin, reporting each on stdout."""
    fleet.grow_to(count)
    print(f"connected {fleet.connected}", flush=True)
    for line in FileObjectThread(sys.stdin):
        if line.strip():
            fleet.grow_to(int(line))
            print(f"connected {fleet.connected}", flush=True)

if __name__ == "__main__":
    main()
