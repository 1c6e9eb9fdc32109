"""TLS passthrough across the cluster: a name served by a client on node A, reached through node B.

Real processes: two `tun2g server` nodes on one Redis, a `tun2g client` process on node A
serving secure.test by passthrough to nginx (which holds its own key), and curl through
node B's --tls-passthrough port and node B's --https port, verifying nginx's certificate with
nginx's own CA. Removing the route (`tun2g route rm`) stops the name being served on both nodes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures.cluster import NodeProcess
from tests.fixtures.net import env_without_proxies, free_port, require_binary, wait_for_port
from tests.fixtures.tls_pieces import get_with_split_hello
from tests.fixtures.tunnel import wait_until
from tests.tcp.test_real_peers import nginx_tls  # noqa: F401  (a fixture)

NAME = "secure.test"
DOMAIN = "app.test"  # the client's HTTP domain: removing NAME's route leaves the tunnel itself up
BODY = "end-to-end from nginx\n"


def tun2g(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", *args], capture_output=True, text=True, timeout=30,
                            env=env_without_proxies())
    assert result.returncode == 0, result.stderr
    return result.stdout


class PassthroughNode(NodeProcess):
    """A node with a dedicated --tls-passthrough port and a public --https port."""

    def __init__(self, node_id: str, redis_url: str, log_dir) -> None:
        self.passthrough_port, self.https_port = free_port(), free_port()
        super().__init__(node_id, redis_url, log_dir, extra_args=(
            "--tls-passthrough", f"127.0.0.1:{self.passthrough_port}", "--https", f"127.0.0.1:{self.https_port}"))

    def wait_ready(self) -> "PassthroughNode":
        super().wait_ready()
        wait_for_port(self.passthrough_port, timeout=15)
        wait_for_port(self.https_port, timeout=15)
        return self


@pytest.fixture
def two_nodes(tmp_path, redis_server, nginx_tls):  # noqa: F811
    """(node A, node B, nginx CA, client process): the client on A serves NAME by passthrough to nginx."""
    nginx_port, nginx_ca = nginx_tls
    url = redis_server.url
    nodes = [PassthroughNode(node_id, url, tmp_path) for node_id in ("a", "b")]
    client = None
    try:
        for node in nodes:
            node.wait_ready()
        tun2g("route", "add", DOMAIN, "--user", "alice", "--storage", url)
        tun2g("route", "add", NAME, "--user", "alice", "--storage", url)
        token = tun2g("token", "create", "--user", "alice", "--quiet", "--storage", url).strip()
        client = subprocess.Popen([sys.executable, "-m", "tun2g.cli", "client", "--server", nodes[0].tunnel_addr,
                                   "--plain", "--domain", DOMAIN, "--backend", "http://127.0.0.1:9", "--no-inspect",
                                   "--sessions", "1", "--tls", f"{NAME}=127.0.0.1:{nginx_port}"],
                                  env=env_without_proxies() | {"TUN2G_TOKEN": token}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        yield nodes[0], nodes[1], nginx_ca, client
    finally:
        if client is not None:
            client.kill()
            client.wait(10)
        for node in nodes:
            node.stop()


def curl(ca_file, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("curl"), "-sS", "--max-time", "10", "--cacert", str(ca_file),
                           "--resolve", f"{NAME}:{port}:127.0.0.1", f"https://{NAME}:{port}/"],
                          capture_output=True, text=True, timeout=15)


def metric(node, name: str) -> str:
    import requests

    text = requests.get(node.admin_url + "/metrics", headers=node.admin_headers, timeout=5).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def test_a_passthrough_name_served_on_node_a_is_reached_through_node_b_end_to_end(two_nodes):
    node_a, node_b, nginx_ca, client = two_nodes
    wait_until(lambda: curl(nginx_ca, node_b.passthrough_port).stdout == BODY, timeout=20,
               message="node B splicing the name to node A")
    # The public HTTPS port of node B too: peeked, not terminated (node B holds no certificate for it).
    https = curl(nginx_ca, node_b.https_port)
    assert https.returncode == 0 and https.stdout == BODY, https.stderr
    # A hello in 4 segments through node B: the bytes read to find the name are replayed first.
    response = get_with_split_hello(("127.0.0.1", node_b.passthrough_port), NAME, nginx_ca, pieces=4)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(BODY.encode())
    # Three connections entered node B (curl on each port, the split hello): counted there and on A by route.
    wait_until(lambda: 'outcome="forwarded",route="tls:secure.test"} 3.0' in
               metric(node_b, "tun2g_tcp_route_connections_total"), message="node B counting by route")
    wait_until(lambda: 'outcome="served",route="tls:secure.test"} 3.0' in
               metric(node_a, "tun2g_tcp_route_connections_total"), message="node A counting by route")
    # The route is removed: node A stops serving the name, so node B stops forwarding it.
    tun2g("route", "rm", NAME, "--storage", node_a.proc.args[node_a.proc.args.index("--storage") + 1])
    wait_until(lambda: curl(nginx_ca, node_b.passthrough_port).returncode != 0, timeout=10,
               message="the removed route no longer served through node B")
    assert curl(nginx_ca, node_a.passthrough_port).returncode != 0
    assert "tls_name_revoked" in node_a.log()
    assert client.poll() is None  # the tunnel itself (app.test) stays up
