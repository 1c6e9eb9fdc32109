#!/usr/bin/env python3
"""Requests/s through tun2g.http's proxy path (MessageReader + forward_exchange + BackendPool) vs direct.

One command: ``python3 bench/http_layer_bench.py [--seconds 3] [--connections 1,16,64]``.
It starts nginx (or, without nginx, a small gevent backend) as the backend, a
one-process gevent proxy built on tun2g.http, and drives both with wrk in the
same run, so the ratio column compares like with like. Prints a table.

Three floors come with it, for small answers (`/`): what one gevent process costs
per relayed request when it does no HTTP work at all (one recv and one send each
way on a kept-alive upstream), written in the two styles gevent allows: a
greenlet per connection blocking on its sockets (`greenlet relay`), and
event-loop callbacks with non-blocking sockets and no greenlet (`callback relay`);
and the callback relay with the least HTTP work any proxy does, httptools parsing
each request and response as it passes (`callback HTTP relay`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port} after {timeout}s")
            time.sleep(0.05)  # start-up poll of a child process, not the data path


def start_nginx(workdir: str, port: int):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None
    with open(os.path.join(workdir, "big.bin"), "wb") as f:
        f.write(os.urandom(BIG))
    with open(os.path.join(workdir, "small.txt"), "wb") as f:
        f.write(b"hello from the backend\n")
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {workdir}/nginx.pid; error_log {workdir}/error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 60;
  client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
  uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
  server {{ listen 127.0.0.1:{port}; root {workdir};
    location = / {{ try_files /small.txt =404; }} }} }}
""")
    return subprocess.Popen([nginx, "-c", conf, "-p", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve_gevent_backend(port: int) -> None:
    """Fallback backend: fixed answers on keep-alive connections, using tun2g.http to read requests."""
    from gevent import monkey
    monkey.patch_all()
    from gevent.server import StreamServer

    from tun2g.http import MessageReader, simple_response
    small = simple_response(200, b"hello from the backend\n")
    big = simple_response(200, os.urandom(BIG), content_type="application/octet-stream")

    def handle(sock, _address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = MessageReader(sock)
        while (head := reader.read_request_head()) is not None:
            while reader.read_body():
                pass
            sock.sendall(big if head.target == "/big.bin" else small)
    StreamServer(("127.0.0.1", port), handle, backlog=1024).serve_forever()


def serve_proxy(port: int, backend_port: int) -> None:
    """The measured path: public socket -> MessageReader -> forward_exchange -> pooled backend socket."""
    from gevent import monkey
    monkey.patch_all()
    from gevent.server import StreamServer

    from tun2g.http import (BackendPool, DownstreamError, HTTPError, MessageReader, UpstreamError,
                            forward_exchange, simple_response)
    pool = BackendPool(f"http://127.0.0.1:{backend_port}", max_idle=1024)

    def handle(sock, _address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = MessageReader(sock)
        try:
            while (head := reader.read_request_head()) is not None:
                upstream, upstream_reader = pool.acquire()
                reusable = False
                try:
                    result = forward_exchange(head, reader, upstream, sock, upstream_reader=upstream_reader)
                    reusable = result.upstream_reusable
                finally:
                    pool.release(upstream, upstream_reader, reusable)
                if not result.keep_alive:
                    break
        except UpstreamError:
            sock.sendall(simple_response(502, b"bad gateway\n", close=True))
        except (OSError, HTTPError, DownstreamError):
            pass
        finally:
            sock.close()
    StreamServer(("127.0.0.1", port), handle, backlog=1024).serve_forever()


def serve_greenlet_relay(port: int, backend_port: int) -> None:
    """A floor: a greenlet per connection, one blocking recv and one send each way, no HTTP (small answers only)."""
    from gevent import monkey
    monkey.patch_all()
    from gevent.server import StreamServer

    def handle(client, _address):
        with socket.create_connection(("127.0.0.1", backend_port)) as upstream:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
                    client.sendall(upstream.recv(65536))
            except OSError:  # wrk resets its connections at the end of a run
                pass
    StreamServer(("127.0.0.1", port), handle, backlog=1024).serve_forever()


def serve_callback_relay(port: int, backend_port: int) -> None:
    """A floor: the same relay from event-loop callbacks on non-blocking sockets, with no greenlet at all."""
    _serve_callback_relays(port, backend_port, parse=False)


def serve_callback_http_relay(port: int, backend_port: int) -> None:
    """A floor with the least HTTP work a proxy needs: the callback relay, with httptools (llhttp) parsing every
    request (its URL and headers, kept as a router would need them) and every response (to find where it ends),
    the bytes forwarded as read."""
    _serve_callback_relays(port, backend_port, parse=True)


class _Head:
    """What a router reads of a request: its target and headers (httptools' callbacks fill it)."""

    def __init__(self) -> None:
        self.target, self.headers, self.done = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.done += 1


def _serve_callback_relays(port: int, backend_port: int, parse: bool) -> None:
    """Relays from fd-watcher callbacks (one kept upstream connection per client connection); with `parse`,
    every message is fed to httptools on its way."""
    import gevent
    import httptools
    loop = gevent.get_hub().loop
    relays = set()  # the live relays (the watchers' callbacks are their only other reference)

    class Relay:
        def __init__(self, client: socket.socket) -> None:
            self.client, self.upstream = client, socket.create_connection(("127.0.0.1", backend_port))
            client.setblocking(False)
            self.upstream.setblocking(False)
            self.request, self.response = _Head(), _Head()
            self.requests = httptools.HttpRequestParser(self.request) if parse else None
            self.responses = httptools.HttpResponseParser(self.response) if parse else None
            self.watchers = [loop.io(client.fileno(), 1), loop.io(self.upstream.fileno(), 1)]
            self.watchers[0].start(self.from_client)
            self.watchers[1].start(self.from_upstream)
            relays.add(self)

        def from_client(self) -> None:
            data = _take(self.client)
            if data is None:
                return
            if data:
                if self.requests is not None:
                    self.request.headers = []
                    self.requests.feed_data(data)
                self.upstream.send(data)  # a small request: the kernel takes it whole
                return
            for watcher in self.watchers:
                watcher.stop()
            self.client.close()
            self.upstream.close()
            relays.discard(self)

        def from_upstream(self) -> None:
            data = _take(self.upstream)
            if data:
                if self.responses is not None:
                    self.response.headers = []
                    self.responses.feed_data(data)
                self.client.send(data)

    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                client, _address = listener.accept()
            except BlockingIOError:
                return
            Relay(client)
    accepting = loop.io(listener.fileno(), 1)
    accepting.start(accept)
    gevent.wait()


def _take(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket holds: None when nothing yet, b"" at its end (or on an error)."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


PROXIES = {"tun2g.http": "--serve-proxy", "greenlet relay": "--serve-greenlet-relay",
           "callback relay": "--serve-callback-relay", "callback HTTP relay": "--serve-callback-http-relay"}


def run_wrk(port: int, path: str, connections: int, seconds: float, server_pid: int | None = None) -> dict:
    """wrk's figures; with ``server_pid``, also that process's CPU microseconds per request."""
    cpu_before = _cpu_seconds(server_pid)
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)]
    latency = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    cpu_us = (_cpu_seconds(server_pid) - cpu_before) / max(requests, 1) * 1e6
    return {"rps": rate, "cpu_us": cpu_us, "mbps": float(transfer.group(1)) * scale, "p50": latency["50"], "p99": latency["99"],
            "errors": errors.group(0) if errors else ""}


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--serve-proxy", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-greenlet-relay", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-callback-relay", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-callback-http-relay", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for serve in (serve_proxy, serve_greenlet_relay, serve_callback_relay, serve_callback_http_relay):
        ports = getattr(args, serve.__name__)
        if ports:
            serve(*ports)
            return
    if args.serve_backend:
        serve_gevent_backend(args.serve_backend)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run scripts/install-test-deps")
    env = dict(os.environ, PYTHONPATH=ROOT)
    backend_port = free_port()
    children = []
    with tempfile.TemporaryDirectory() as workdir:
        try:
            backend = start_nginx(workdir, backend_port)
            backend_name = "nginx"
            if backend is None:
                backend_name = "gevent"
                backend = subprocess.Popen([sys.executable, __file__, "--serve-backend", str(backend_port)], env=env)
            children.append(backend)
            wait_for_port(backend_port)
            proxies = {}
            for name, flag in PROXIES.items():
                port = free_port()
                proxies[name] = (port, subprocess.Popen([sys.executable, __file__, flag, str(port), str(backend_port)],
                                                        env=env))
                children.append(proxies[name][1])
                wait_for_port(port)
            print(f"backend: {backend_name}; each proxy: one gevent process; wrk -t1, {args.seconds:g}s each;"
                  f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"{'proxy':<21}{'path':<10}{'conns':>6}{'direct req/s':>14}{'proxy req/s':>13}{'ratio':>7}"
                  f"{'proxy MB/s':>12}{'p50 ms':>8}{'p99 ms':>8}{'proxy CPU us/req':>18}  notes")
            for path in ("/", "/big.bin"):
                for connections in (int(c) for c in args.connections.split(",")):
                    direct = run_wrk(backend_port, path, connections, args.seconds)
                    for name, (port, proxy) in proxies.items():
                        if path != "/" and name != "tun2g.http":
                            continue  # the relays do no HTTP framing: one recv is one small answer
                        proxied = run_wrk(port, path, connections, args.seconds, proxy.pid)
                        print(f"{name:<21}{path:<10}{connections:>6}{direct['rps']:>14.0f}{proxied['rps']:>13.0f}"
                              f"{proxied['rps'] / direct['rps']:>7.2f}{proxied['mbps']:>12.1f}"
                              f"{proxied['p50']:>8.2f}{proxied['p99']:>8.2f}{proxied['cpu_us']:>18.1f}  "
                              f"{proxied['errors']}", flush=True)
        finally:
            for child in children:
                child.terminate()  # SIGTERM: nginx's master stops its workers (a SIGKILL would orphan them)
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


if __name__ == "__main__":
    main()
