"""Hold many idle tun2g tunnel clients open from one gevent process, for the server memory benchmark.

    python3 bench/idle_clients.py --server 127.0.0.1:4443 --ca cert.pem --token T \
        --domain bench.test --backend http://127.0.0.1:8080 --count 1

It prints `connected N` each time all N clients are connected, then reads
target totals from stdin, one per line (e.g. `1000`), and grows to each.
It exits on end of input or SIGTERM, closing every tunnel. With `--credentials FILE`
(one "token domain" line per client, as bench/idle_bench.py writes it) client i uses
line i instead of --token / --domain.
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

CONNECT_TIMEOUT = 120.0  # --connect-timeout


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
        self.credentials = ([tuple(line.split()) for line in Path(args.credentials).read_text().splitlines()]
                            if args.credentials else [])
        self.clients: list[Client] = []
        self._connected: set[Client] = set()
        self._changed = Event()

    def grow_to(self, total: int) -> None:
        """Start clients, `--step` at a time, until there are `total`, then wait until all are connected."""
        while len(self.clients) < total:
            self._grow_to(min(total, len(self.clients) + self.args.step))

    def _grow_to(self, total: int) -> None:
        while len(self.clients) < total:
            index = len(self.clients)
            token, domain = self.credentials[index] if self.credentials else (self.args.token, self.args.domain)
            config = ClientConfig(server_addr=self.args.server, token=token, domain=domain,
                                  backend_url=self.args.backend, plain=self.args.plain,
                                  tls_context=self.context, reconnect=not self.args.no_reconnect)
            client = Client(config, on_status=self._on_status)
            self.clients.append(client)
            gevent.spawn(self._run, client)
        limit = self.args.connect_timeout
        with gevent.Timeout(limit, TimeoutError(f"{total} clients not all connected after "
                                                f"{limit:.0f}s ({self.connected} are)")):
            while self.connected < total:
                self._changed.clear()
                self._changed.wait()

    @property
    def connected(self) -> int:
        """Clients connected right now."""
        return len(self._connected)

    @property
    def reconnects(self) -> int:
        """Connections beyond each client's first (the server dropped or refused one)."""
        return sum(max(0, client.connections - 1) for client in self.clients)

    def _on_status(self, client: Client) -> None:
        if client.state == "connected":
            self._connected.add(client)
        else:
            self._connected.discard(client)
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
    parser.add_argument("--token")
    parser.add_argument("--domain")
    parser.add_argument("--credentials", help='a file of "token domain" lines, one per client')
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT)
    parser.add_argument("--step", type=int, default=250, help="clients started at once while growing")
    parser.add_argument("--no-reconnect", action="store_true", help="a client whose session ends stays down")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--ca", help="CA / self-signed certificate the server uses")
    parser.add_argument("--plain", action="store_true", help="no TLS (server run with --plain-tunnel)")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    if not args.credentials and not (args.token and args.domain):
        parser.error("give --token and --domain, or --credentials")
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
    print(f"connected {fleet.connected} reconnects {fleet.reconnects}", flush=True)
    for line in FileObjectThread(sys.stdin):
        if line.strip():
            fleet.grow_to(int(line))
            print(f"connected {fleet.connected} reconnects {fleet.reconnects}", flush=True)

if __name__ == "__main__":
    main()
