"""Rolling restart with real processes: 3 nodes behind HAProxy, two multi-homed clients (K = 2), GETs and POSTs
through the balancer; every node in turn gets SIGTERM (drains, exits 0) and starts again: not one request fails.

What makes it hold (docs/cluster.md#rolling-restart): the draining node's health check says 503 at once; its
tun2g clients' sessions told to move say `leaving` as soon as a sibling session elsewhere is up; a request that
still lands on the draining node (HAProxy's next check is up to 300 ms away), or is forwarded to it by a node
whose registry answer predates the move, is forwarded once more to a node in service; a miss is looked up
again before any 502."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gevent
import gevent.event
import requests

from tests.fixtures.net import env_without_proxies, free_port
from tests.fixtures.cluster import grant
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.client.multi import MultiClient

DOMAINS = ("roll-a.test", "roll-b.test")


def diagnosis(nodes, balancer) -> str:
    """What the nodes warned about and the balancer's failed requests, in time order (for a failure message)."""
    events = ("level=warning", "level=error", "event=draining", "event=drained", "event=tunnel_leaving",
              "event=taken_over",
              "event=registered", "event=cluster_joined")
    quiet = ("plain_tunnel", "accept_failed")
    lines = [f"{node.node_id} {line}" for node in nodes for line in node.log().splitlines()
             if any(e in line for e in events) and not any(q in line for q in quiet)]
    failed = [line for line in balancer.log_path.read_text(errors="replace").splitlines()
              if '"' in line and " 200 " not in line and "BADREQ" not in line]
    return "\n".join(sorted(lines, key=lambda line: line.split("ts=", 1)[-1])[-250:] + ["haproxy:"] + failed[-20:])


def test_a_rolling_restart_of_three_nodes_fails_no_request(redis_server, node_processes, haproxy, backend):
    nodes = node_processes(3, ttl=2.0)
    balancer = haproxy([node.http_port for node in nodes])
    token = grant(redis_server.url, *DOMAINS)
    backend_url, _app = backend
    clients = [MultiClient(ClientConfig(server_addr=entry.tunnel_addr, token=token, domain=domain,
                                        backend_url=backend_url, plain=True, backoff_initial=0.05, backoff_max=0.3),
                           sessions=2) for entry, domain in zip((nodes[0], nodes[2]), DOMAINS)]
    runners = [gevent.spawn(client.run) for client in clients]
    results: list[tuple[str, str, object]] = []  # (domain, method, status or exception name)
    stop = gevent.event.Event()

    def loop(domain: str, method: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    status: object = session.request(method, balancer.url + ("/sink" if method == "POST" else "/"),
                                                     data=b"p" * 1024 if method == "POST" else None,
                                                     headers={"Host": domain}, timeout=15).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                results.append((domain, method, status))

    def settled() -> bool:
        return all(len(client.connected_nodes()) == 2 for client in clients)

    def every_node_serves() -> bool:
        return all(requests.get(node.url + "/", headers={"Host": domain}, timeout=5).status_code == 200
                   for node in nodes for domain in DOMAINS)

    workers = []
    try:
        wait_until(settled, timeout=20, message="two sessions per client")
        wait_until(every_node_serves, timeout=20, message="every node serving both domains")
        workers = [gevent.spawn(loop, domain, method) for domain in DOMAINS for method in ("GET", "GET", "POST")]
        wait_until(lambda: len(results) >= 60, timeout=20, message="requests flowing")
        for node in nodes:
            assert node.restart() == 0, f"{node.node_id} did not drain cleanly:\n{node.log()[-3000:]}"
            wait_until(lambda: requests.get(node.url + "/_tun2g/health", timeout=5).status_code == 200,
                       timeout=20, message=f"{node.node_id} in service again")
            wait_until(settled, timeout=30, message=f"two sessions per client after restarting {node.node_id}")
            served = len(results)
            wait_until(lambda: len(results) >= served + 60, timeout=30, message="requests flowing after the restart")
        assert all("event=drained" in node.log() for node in nodes)
    finally:
        stop.set()
        gevent.joinall(workers, timeout=20)
        for client in clients:
            client.close()
        gevent.joinall(runners, timeout=5)
    failed = [result for result in results if result[2] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}\n{diagnosis(nodes, balancer)}"
    print(f"{len(results)} requests through 3 rolling restarts, none failed")


def test_the_rolling_restart_script_stops_at_a_node_that_does_not_come_back(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "tun2g-rolling-restart"
    marker = tmp_path / "second-restarted"
    dead = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, str(script), "--node", "true", dead, "--node", f"touch {marker}", dead,
                             "--timeout", "1"], capture_output=True, text=True, timeout=60, env=env_without_proxies())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "did not answer 200" in result.stderr and "--timeout" in result.stderr
    assert not marker.exists()  # the next node was left alone
    failing = subprocess.run([sys.executable, str(script), "--node", "exit 3", dead], capture_output=True, text=True,
                             timeout=60, env=env_without_proxies())
    assert failing.returncode == 1 and "status 3" in failing.stderr and "Traceback" not in failing.stderr
