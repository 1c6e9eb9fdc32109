"""SIGTERM on the node holding a client's tunnel, behind HAProxy: the client moves to the other node
(docs/protocol.md#control-messages) and not one request through the balancer fails meanwhile."""

from __future__ import annotations


import gevent
import gevent.event
import requests

from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.storage import RedisStorage

DOMAIN = "moving.test"


def local_backends(node) -> list[dict]:
    rows = requests.get(node.admin_url + "/backends", headers=node.admin_headers, timeout=5).json()
    return [row for row in rows if row["node"] == node.node_id and row["domain"] == DOMAIN]


def test_sigterm_moves_the_client_to_the_other_node_and_no_request_fails(redis_server, node_processes, haproxy,
                                                                          backend, start_client):
    nodes = node_processes(2, ttl=2.0)
    balancer = haproxy([node.http_port for node in nodes])
    storage = RedisStorage(redis_server.url)
    storage.add_route(DOMAIN, "alice")
    _info, token = storage.create_token("alice")
    storage.close()
    backend_url, _app = backend
    # By Upgrade through the balancer, as a Heroku-style client does: a reconnect lands on a node in service.
    client = start_client(ClientConfig(server_addr=balancer.url, token=token, domain=DOMAIN, backend_url=backend_url,
                                       conn_type="upgrade", backoff_initial=0.05, backoff_max=0.3))
    wait_until(lambda: any(local_backends(node) for node in nodes), message="the client on a node")
    holder, other = nodes if local_backends(nodes[0]) else nodes[::-1]

    statuses: list[int] = []
    stop = gevent.event.Event()

    def keep_asking() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    statuses.append(session.get(balancer.url + "/headers", headers={"Host": DOMAIN},
                                                timeout=10).status_code)
                except requests.RequestException as exc:
                    statuses.append(type(exc).__name__)

    asker = gevent.spawn(keep_asking)
    try:
        wait_until(lambda: len(statuses) >= 20, message="requests flowing")
        holder.proc.send_signal(15)  # SIGTERM
        assert holder.proc.wait(30) == 0
        wait_until(lambda: local_backends(other), message="the client re-registered on the other node")
        served = len(statuses)
        wait_until(lambda: len(statuses) >= served + 20, message="requests flowing after the move")
    finally:
        stop.set()
        asker.join(15)
    failed = [status for status in statuses if status != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {failed[:10]}"
    assert client.client.state == "connected"
    assert "event=tunnel_leaving" in holder.log() and "event=drained" in holder.log()
