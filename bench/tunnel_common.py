"""Harness pieces for the end-to-end tunnel benchmark: nginx, an upload sink, tun2g processes, wrk and curl.

Everything runs on loopback in a private temporary directory and is stopped
by the benchmark itself. Run as a script (`python3 tunnel_common.py
upload-sink PORT`) it serves the upload sink, so the sink gets its own process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import BENCH_ADMIN_TOKEN, MIB, REPO_ROOT, child_env, format_table  # noqa: F401 - re-exported

HELLO_BODY = b"hello, world\n"


# ---------------------------------------------------------------- processes and ports

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a true value; raise TimeoutError naming `what` at the deadline.

    Only used to wait for freshly started processes; the data path is never polled.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def temporary_workdir(stack, prefix: str, keep: bool) -> Path:
    """A fresh temporary directory, removed when `stack` closes unless `keep` (then its path is printed)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if keep:
        print(f"logs and files in {workdir}")
    else:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return workdir


def require_binary(name: str) -> str:
    """The path of an executable, or SystemExit telling how to install it."""
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed: run scripts/install-test-deps (Debian package names: "
                         f"nginx-light, wrk, curl)")
    return path


class Service:
    """A child process with its log file; `stop()` ends only this process."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None,
                 stdin=subprocess.DEVNULL, cwd: Path = REPO_ROOT):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the tail of the log when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; "
                               f"last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- nginx

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    sendfile on;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        location / {{ return 200 "hello, world\\n"; }}
        location = /{download} {{ root {dir}; }}
    }}
}}
"""


def start_nginx(workdir: Path, port: int, download_name: str) -> Service:
    """Debian nginx on `port`: `/` answers 13 bytes, `/<download_name>` serves that file from workdir."""
    binary = require_binary("nginx")
    workdir.chmod(0o755)  # nginx's workers drop root and must still read the download file
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, download=download_name))
    service = Service("nginx", [binary, "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log")
    wait_until(lambda: service.check_alive() or port_open(port), 10, f"nginx on port {port}")
    return service


def make_file(path: Path, size: int) -> Path:
    """A file of `size` incompressible bytes (random, so no layer can cheat by compressing)."""
    chunk = os.urandom(MIB)
    with open(path, "wb") as out:
        for _ in range(size // MIB):
            out.write(chunk)
        out.write(chunk[: size % MIB])
    return path


# ---------------------------------------------------------------- upload sink

def start_upload_sink(workdir: Path, port: int) -> Service:
    """A process that reads whole request bodies and only then answers `received N`."""
    service = Service("upload sink", [sys.executable, str(Path(__file__).resolve()), "upload-sink", str(port)],
                      workdir / "upload-sink.log", env=child_env())
    wait_until(lambda: service.check_alive() or port_open(port), 10, f"the upload sink on port {port}")
    return service


def serve_upload_sink(port: int) -> None:
    """Accept connections forever, one thread each (nginx answers uploads before reading them)."""
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_sink_connection, args=(conn,), daemon=True).start()


def _sink_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(4 * MIB)
    view = memoryview(buffer)
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
            head, _, pending = pending.partition(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"expect", b"").lower() == b"100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            remaining = int(headers.get(b"content-length", b"0")) - len(pending)
            received = len(pending)
            pending = b""
            while remaining > 0:
                count = conn.recv_into(view, min(remaining, len(buffer)))
                if not count:
                    return
                remaining -= count
                received += count
            body = f"received {received}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))


# ---------------------------------------------------------------- tun2g

def tun2g_argv(*args: str) -> list[str]:
    """Run the working tree's command line with this interpreter."""
    return [sys.executable, "-m", "tun2g.cli", *args]


def tun2g_run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a short tun2g command (token, route, cert) and return its result; raise with its output on failure."""
    result = subprocess.run(tun2g_argv(*args), capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"`tun2g {' '.join(args)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def create_token(storage: str, user: str) -> str:
    """Create a token for `user` and return its secret, parsed from `tun2g token create` output."""
    result = tun2g_run("token", "create", "--user", user, "--storage", storage)
    return parse_token(result.stdout)


def parse_token(output: str) -> str:
    """The secret from `token create` output: the longest url-safe word of 20+ characters."""
    words = re.findall(r"[A-Za-z0-9_\-.~+/=]{20,}", output)
    if not words:
        raise RuntimeError(f"no token found in `tun2g token create` output:\n{output}")
    return max(words, key=len)




def admin_backends(admin_port: int, domain: str | None = None) -> list[dict]:
    """GET /backends from a server's admin API (empty list when it is not up yet)."""
    url = f"http://127.0.0.1:{admin_port}/backends" + (f"?domain={domain}" if domain else "")
    try:
        token = os.environ.get("TUN2G_ADMIN_TOKEN", BENCH_ADMIN_TOKEN)
        return json.loads(http_get(url, headers={"Authorization": f"Bearer {token}"}))
    except OSError:
        return []


_direct_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def http_get(url: str, headers: dict | None = None, timeout: float = 10) -> bytes:
    """The body of a GET; raises OSError (urllib's errors included) on failure."""
    with _direct_opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
        return response.read()


def wait_for_backends(admin_port: int, domain: str, count: int, timeout: float, watch=()) -> None:
    """Wait until `count` backends serve `domain`; fail early if a watched process dies."""
    def ready():
        for service in watch:
            service.check_alive()
        return len(admin_backends(admin_port, domain)) >= count
    wait_until(ready, timeout, f"{count} backend(s) for {domain} on the admin API :{admin_port}", interval=0.1)


# ---------------------------------------------------------------- wrk

@dataclass
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and any errors."""

    requests_per_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: str = ""


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_duration_ms(text: str) -> float:
    """'312.00us' / '1.20ms' / '2.01s' -> milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Parse `wrk --latency` output."""
    def need(pattern: str) -> re.Match:
        match = re.search(pattern, output, re.M)
        if not match:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    errors = []
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors and any(int(n) for n in socket_errors.groups()):
        errors.append(socket_errors.group(0))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors.append(non_2xx.group(0))
    return WrkResult(requests_per_s=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
                     requests=int(need(r"^\s*(\d+) requests in").group(1)),
                     p50_ms=parse_duration_ms(need(r"^\s+50%\s+(\S+)").group(1)),
                     p99_ms=parse_duration_ms(need(r"^\s+99%\s+(\S+)").group(1)),
                     errors="; ".join(errors))


def run_wrk(port: int, host: str, connections: int, duration: float) -> WrkResult:
    """wrk against 127.0.0.1:port with a Host header; one thread at one connection, else two."""
    threads = 1 if connections < 2 else 2
    argv = [require_binary("wrk"), "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
            "--latency", "--timeout", "10s", "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr}{result.stdout}")
    return parse_wrk(result.stdout)


# ---------------------------------------------------------------- curl

@dataclass
class Transfer:
    """One curl transfer: bytes per second and bytes moved (to spot truncation)."""

    bytes_per_s: float
    size: int
    status: int
    body: str = ""


def _curl(argv: list[str], timeout: float) -> tuple[dict, str]:
    marker = "\n@@curl@@"
    result = subprocess.run([require_binary("curl"), "-sS", "--noproxy", "*", *argv, "-w",
                             marker + '{"speed_download":%{speed_download},"speed_upload":%{speed_upload},'
                             '"size_download":%{size_download},"size_upload":%{size_upload},'
                             '"status":%{http_code}}'],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"curl {' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    body, _, stats = result.stdout.rpartition(marker)
    return json.loads(stats), body


def curl_download(port: int, host: str, path: str, timeout: float = 120) -> Transfer:
    stats, _ = _curl(["-H", f"Host: {host}", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"], timeout)
    return Transfer(stats["speed_download"], stats["size_download"], stats["status"])


def curl_upload(port: int, host: str, path: str, file: Path, timeout: float = 120) -> Transfer:
    """PUT a file (streamed by curl, no `Expect: 100-continue` wait) and return curl's upload speed."""
    stats, body = _curl(["-H", f"Host: {host}", "-H", "Expect:", "-T", str(file),
                         f"http://127.0.0.1:{port}{path}"], timeout)
    return Transfer(stats["speed_upload"], stats["size_upload"], stats["status"], body.strip())


# ---------------------------------------------------------------- profiles

def profile_processes(pids: dict[str, int], load, out_dir: Path, duration: float = 10, top: int = 15) -> None:
    """Sample each process with py-spy while `load()` runs; save collapsed stacks and print hotspots."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("  py-spy is not installed (pip install py-spy); skipping the profile")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = {name: subprocess.Popen([spy, "record", "--format", "raw", "--function", "--rate", "250",
                                     "-d", f"{duration:g}", "-o", str(out_dir / f"{name}.collapsed"),
                                     "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, pid in pids.items()}
    load()
    for name, proc in spies.items():
        _, err = proc.communicate(timeout=duration + 60)
        if proc.returncode != 0:
            print(f"  py-spy on the {name} failed: {err.decode(errors='replace').strip()}")
            continue
        report = hotspots((out_dir / f"{name}.collapsed").read_text(), top)
        (out_dir / f"{name}-hotspots.txt").write_text(report + "\n")
        print(f"  {name} hotspots ({out_dir}):\n{report}")


NATIVE = "(no Python frame: greenlet switches, libev)"


def hotspots(collapsed: str, top: int) -> str:
    """Where the samples went by kind, then the top functions by own and by inclusive samples (% of all)."""
    own, inclusive, kinds, total, parked = {}, {}, {}, 0, 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [_short_frame(frame) for frame in stack.split(";")] if stack else [NATIVE]
        if frames[0].startswith("_WorkerGreenlet.run") and frames[-1].startswith("acquire_with_timeout"):
            parked += samples  # an idle gevent threadpool thread waiting for work: no CPU
            continue
        total += samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        kind = _kind(frames[-1])
        kinds[kind] = kinds.get(kind, 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples

    def ranked(table, limit=top, sep="\n    "):
        return sep.join(f"{100 * n / total:5.1f}%  {frame}" for frame, n in
                        sorted(table.items(), key=lambda item: -item[1])[:limit])
    return (f"  {total} samples ({parked} of idle threadpool threads left out)\n"
            f"  by kind:\n    {ranked(kinds)}\n  own time:\n    {ranked(own)}\n"
            f"  inclusive (tun2g frames):\n    {ranked({f: n for f, n in inclusive.items() if 'tun2g/' in f})}")


_SOCKET_CALLS = ("send ", "sendall ", "sendmsg ", "recv ", "recv_into ", "read ", "write ", "getpeername ",
                 "getsockopt ", "_internal_connect ", "__send_chunk ", "_still_idle ", "do_handshake ")


def _kind(leaf: str) -> str:
    """A coarse bucket for a sampled leaf frame."""
    name = leaf.split(" (")[0].split(".")[-1] + " "
    if leaf == NATIVE or leaf.startswith("Hub.run "):
        return "gevent loop and greenlet switches (C)"
    if ("gevent/" in leaf or "_still_idle" in leaf) and name.startswith(_SOCKET_CALLS):
        return "socket and TLS calls (kernel, OpenSSL)"
    for package in ("tun2g/smux", "tun2g/http", "tun2g/", "gevent/"):
        if package in leaf:
            return package.rstrip("/").replace("/", ".") + " (Python)"
    return "stdlib and others"


def _short_frame(frame: str) -> str:
    """'recv (/usr/lib/python3/dist-packages/gevent/_socket3.py:120)' -> 'recv (gevent/_socket3.py:120)'."""
    name, _, where = frame.partition(" (")
    for marker in ("site-packages/", "dist-packages/", str(REPO_ROOT) + "/", "lib/python3.11/"):
        where = where.split(marker)[-1]
    return f"{name} ({where}" if where else name


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "upload-sink":
        raise SystemExit("usage: tunnel_common.py upload-sink PORT")
    serve_upload_sink(int(sys.argv[2]))
