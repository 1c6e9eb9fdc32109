"""Server CPU per public TLS handshake, this tree against a baseline tree, both servers in the same run.

    python3 bench/handshake_cost_bench.py --against a25cae5 [--rounds 12] [--seconds 1]

Two `tun2g server --https` processes (this working tree, and the package of
the `--against` revision exported with `git archive`; one per tree, each with its own SQLite
store holding a certificate for `localhost`) take new connections one after
another, full handshakes and resumed ones (TLS 1.2 session ids), in
alternating rounds so both see the same load on the machine. The figure is the
server process's CPU time over the handshakes it completed (psutil), median of
the rounds. Under load those figures move by 10-40 % between runs, so the step
this tree adds is also timed alone, in this process: the MSG_PEEK of a hello
waiting in a socket and its parse (`https._peek_hello`), CPU time per call,
for a browser-like hello and for a validator's acme-tls/1 one. This tree's
server also answers an ACME TLS-ALPN-01 validation
(acme-tls/1 with a challenge pending in its store): the first one makes the
challenge certificate, later ones reuse it.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tunnel_common as tc
from https_bench import DOMAIN, _cpu, handshakes
from request_cost_bench import export_revision


class Tree:
    """One tree's server: its process, HTTPS port and store."""

    def __init__(self, label: str, root: Path, workdir: Path) -> None:
        self.label, self.root = label, root
        self.store = workdir / f"{label}.sqlite3"
        self.cert = workdir / "tun2g-dev-cert.pem"
        env = tc.child_env()
        env["PYTHONPATH"] = str(root)  # and run in `root`: `python -m` puts its working directory first
        where = subprocess.run([sys.executable, "-c", "import tun2g; print(tun2g.__file__)"], env=env, cwd=root,
                               capture_output=True, text=True, check=True).stdout
        if not where.startswith(str(root)):
            raise RuntimeError(f"the {label} server would import tun2g from {where.strip()}, not {root}")
        storage = f"sqlite:///{self.store}"
        key = workdir / "tun2g-dev-key.pem"
        tc.tun2g_run("cert", "add", DOMAIN, "--cert", str(self.cert), "--key", str(key), "--storage", storage)
        self.port, admin = tc.free_port(), tc.free_port()
        self.service = tc.Service(f"tun2g server ({label})", tc.tun2g_argv(
            "server", "--http", f"127.0.0.1:{tc.free_port()}", "--https", f"127.0.0.1:{self.port}",
            "--tunnel", f"127.0.0.1:{tc.free_port()}", "--plain-tunnel", "--admin", f"127.0.0.1:{admin}",
            "--storage", storage, "--no-access-log", "--log-level", "warning"), workdir / f"{label}.log", env=env,
            cwd=root)
        tc.wait_until(lambda: self.service.check_alive() or tc.port_open(admin), 30, f"the {label} server")
        handshakes(self.port, self._client(), False, 0.5)  # warm-up: certificates loaded, code paths hot

    def _client(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is known right after the handshake
        if alpn:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.set_alpn_protocols(alpn)
        return context

    def measure(self, resume: bool, seconds: float, alpn: list[str] | None = None) -> tuple[float, float]:
        """(handshakes/s, server CPU µs per handshake)."""
        before = _cpu(self.service.pid)
        count, elapsed = handshakes(self.port, self._client(alpn), resume, seconds)
        return count / elapsed, (_cpu(self.service.pid) - before) * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="git revision to compare with (the base)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tun2g-handshake-bench-") as tmp:
        workdir = Path(tmp)
        tc.tun2g_run("cert", "dev", "--out", str(workdir), "--host", DOMAIN)
        trees: list[Tree] = []
        try:
            base = export_revision(args.against, workdir / "base")
            for label, root in (("base", base), ("this", tc.REPO_ROOT)):
                trees.append(Tree(label, root, workdir))
            figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for round_ in range(args.rounds):
                for tree in trees if round_ % 2 == 0 else trees[::-1]:  # neither always goes first
                    for kind, resume in (("full", False), ("resumed", True)):
                        figures.setdefault((tree.label, kind), []).append(tree.measure(resume, args.seconds))
            challenge = _challenge_figures(trees[1], args.seconds)
            peeks = {alpn: _peek_cost_us(alpn) for alpn in ("h2,http/1.1", "acme-tls/1")}
        finally:
            for tree in trees:
                tree.service.stop()
    print("| tree | handshake | handshakes/s | server CPU µs/handshake | CPU vs base |")
    print("|---|---|---|---|---|")
    for (label, kind), values in figures.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        base_cpu = statistics.median(v[1] for v in figures[("base", kind)])
        print(f"| {label} | {kind} | {rate:,.0f} | {cpu:,.0f} | {cpu / base_cpu:.2f} |")
    full_cpu = statistics.median(v[1] for v in figures[("base", "full")])
    resumed_cpu = statistics.median(v[1] for v in figures[("base", "resumed")])
    for alpn, cost in peeks.items():
        print(f"\nthe added peek step, hello offering {alpn}: {cost:.1f} µs CPU "
              f"({cost / full_cpu:.1%} of a full handshake, {cost / resumed_cpu:.1%} of a resumed one)", end="")
    print(f"\nacme-tls/1 answers (this tree): first {challenge[0]:.1f} ms (makes the certificate), "
          f"then {challenge[1]:,.0f}/s at {challenge[2]:,.0f} µs server CPU each")


def _peek_cost_us(alpn: str, calls: int = 5000) -> float:
    """CPU µs of one `_peek_hello` (MSG_PEEK and parse) on a hello waiting in a real socket pair."""
    sys.path.insert(0, str(tc.REPO_ROOT))
    from tun2g.server.https import _ACME_TLS_ALPN_ENTRY, _peek_hello

    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn.split(","))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        context.wrap_bio(incoming, outgoing, server_hostname="shop.example.com").do_handshake()
    except ssl.SSLWantReadError:
        hello = outgoing.read()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(hello)
        assert _peek_hello(right, _ACME_TLS_ALPN_ENTRY) is not None
        started = time.process_time()
        for _ in range(calls):
            _peek_hello(right, _ACME_TLS_ALPN_ENTRY)
        return (time.process_time() - started) * 1e6 / calls


def _challenge_figures(tree: Tree, seconds: float) -> tuple[float, float, float]:
    """(ms of the first acme-tls/1 handshake, answers/s, server CPU µs per answer) with a pending challenge."""
    sys.path.insert(0, str(tc.REPO_ROOT))
    from tun2g.server.tls_alpn import put_pending
    from tun2g.storage.sqlite_store import SQLiteStorage

    put_pending(SQLiteStorage(tree.store), DOMAIN, "bench-token.bench-thumbprint")
    started = time.monotonic()
    handshakes(tree.port, tree._client(["acme-tls/1"]), False, 0)
    first_ms = (time.monotonic() - started) * 1000
    rate, cpu = tree.measure(False, seconds, ["acme-tls/1"])
    return first_ms, rate, cpu


if __name__ == "__main__":
    main()
