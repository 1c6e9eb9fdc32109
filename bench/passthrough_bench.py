"""TLS passthrough setup latency: direct to nginx, through one node, and through the cluster hop, same run.

    python3 bench/passthrough_bench.py            # 300 connections per path (~1 minute)
    python3 bench/passthrough_bench.py --quick    # 60 per path

One run starts nginx serving HTTPS for secure.test with its own certificate,
a redis-server, two `tun2g server` nodes on it (plain tunnels, each with a
`--tls-passthrough` port) and a `tun2g client` on node A serving secure.test
by passthrough to nginx. Each sample is one fresh connection: TCP connect,
the full TLS handshake (verified against nginx's certificate; no session
resumption), one GET and the whole response, timed by the caller. The three
paths are sampled in turn (direct, node A, node B -> hop -> node A) so load on
the machine falls on all of them alike; the table gives the median and p90 ms
and each path's median over the direct one.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, child_env, format_table
from tunnel_common import Service, free_port, port_open, require_binary, tun2g_argv, tun2g_run, wait_until

NAME = "secure.test"
BODY = b"end-to-end from nginx\n"
CLUSTER_SECRET = "bench-cluster-secret-0123456789abcdef"

NGINX_TLS_CONF = """\
daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log warn; worker_processes 1;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port} ssl; server_name {name}; ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ return 200 "end-to-end from nginx\\n"; }} }} }}
"""


def one_request(port: int, context: ssl.SSLContext) -> float:
    """Milliseconds for connect + TLS handshake + GET + the whole response on a fresh connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while data := tls.recv(65536):
                response += data
    took = (time.perf_counter() - started) * 1000
    if not response.endswith(BODY):
        raise RuntimeError(f"unexpected response on port {port}: {response[:80]!r}")
    return took


def works(port: int, context: ssl.SSLContext) -> bool:
    try:
        one_request(port, context)
        return True
    except (OSError, RuntimeError, ssl.SSLError):
        return False


def start_node(workdir: Path, node_id: str, redis_url: str) -> tuple[Service, int, int]:
    """A `tun2g server` node on Redis; (service, tunnel port, passthrough port)."""
    http, tunnel, passthrough = free_port(), free_port(), free_port()
    service = Service(f"node {node_id}", tun2g_argv(
        "server", "--http", f"127.0.0.1:{http}", "--tunnel", f"127.0.0.1:{tunnel}", "--plain-tunnel",
        "--admin", f"127.0.0.1:{free_port()}", "--storage", redis_url, "--node-id", node_id,
        "--cluster-secret", CLUSTER_SECRET, "--tls-passthrough", f"127.0.0.1:{passthrough}",
        "--log-level", "warning", "--no-access-log"), workdir / f"node-{node_id}.log", env=child_env())
    return service, tunnel, passthrough


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 connections per path instead of 300")
    parser.add_argument("--count", type=int, help="connections per path")
    args = parser.parse_args()
    count = args.count or (60 if args.quick else 300)
    sys.path.insert(0, str(REPO_ROOT))
    from tun2g.transport.tls import make_dev_certificate

    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="tun2g-passthrough-bench-") as tmp:
        workdir = Path(tmp)
        try:
            cert, key = make_dev_certificate(workdir / "nginx-cert", hostnames=(NAME,))
            nginx_port = free_port()
            (workdir / "nginx.conf").write_text(NGINX_TLS_CONF.format(dir=workdir, port=nginx_port, name=NAME,
                                                                      cert=cert, key=key))
            services.append(Service("nginx", [require_binary("nginx"), "-c", str(workdir / "nginx.conf"), "-p",
                                              str(workdir)], workdir / "nginx.log"))
            redis_port = free_port()
            services.append(Service("redis", [require_binary("redis-server"), "--port", str(redis_port), "--bind",
                                              "127.0.0.1", "--save", "", "--appendonly", "no"],
                                    workdir / "redis.log"))
            wait_until(lambda: port_open(redis_port) and port_open(nginx_port), 15, "redis and nginx")
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            node_a, tunnel_a, through_a = start_node(workdir, "a", redis_url)
            node_b, _tunnel_b, through_b = start_node(workdir, "b", redis_url)
            services += [node_a, node_b]
            wait_until(lambda: port_open(tunnel_a) and port_open(through_a) and port_open(through_b), 20,
                       "both nodes")
            tun2g_run("route", "add", NAME, "--user", "bench", "--storage", redis_url)
            token = tun2g_run("token", "create", "--user", "bench", "--quiet", "--storage", redis_url).stdout.strip()
            services.append(Service("client", tun2g_argv(
                "client", "--server", f"127.0.0.1:{tunnel_a}", "--plain", "--token", token, "--domain", NAME,
                "--backend", "http://127.0.0.1:9", "--no-inspect", "--sessions", "1", "-q", "--log-level", "error",
                "--tls", f"{NAME}=127.0.0.1:{nginx_port}"), workdir / "client.log", env=child_env()))
            context = ssl.create_default_context(cafile=str(cert))
            paths = [("direct to nginx", nginx_port), ("through one node", through_a),
                     ("through the cluster hop (B -> A)", through_b)]
            for _name, port in paths:
                wait_until(lambda port=port: works(port, context), 30, f"passthrough on port {port}")
            for _name, port in paths:  # warm-up: imports, first-connection costs
                for _ in range(5):
                    one_request(port, context)
            samples: dict[int, list[float]] = {port: [] for _name, port in paths}
            for _ in range(count):
                for _name, port in paths:
                    samples[port].append(one_request(port, context))
        except BaseException:
            for service in services:
                if service.proc.poll() is not None:
                    print(f"{service.name} exited:\n{service.log_tail()}", file=sys.stderr)
            raise
        finally:
            for service in reversed(services):
                service.stop()
    direct = statistics.median(samples[nginx_port])
    rows = []
    for name, port in paths:
        values = sorted(samples[port])
        median = statistics.median(values)
        rows.append([name, f"{median:.2f}", f"{values[int(len(values) * 0.9) - 1]:.2f}", f"{median / direct:.2f}x"])
    print(f"\nTLS passthrough: connect + handshake + GET, {count} fresh connections per path "
          f"(plain tunnel, loopback)\n")
    print(format_table(["path", "median ms", "p90 ms", "median / direct"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
