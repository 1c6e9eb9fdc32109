"""Rediscovery: when a node joins, every node pushes the new list to its tun2g clients ("nodes" event), and a
multi-homed client opens a session there within about a second; a node record forged into Redis (no
heartbeat signed with the cluster secret) is listed to no client."""

from __future__ import annotations

import time

import gevent
import pytest
import redis

from tests.fixtures.cluster import grant
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.client.client import _cluster_view
from tun2g.client.multi import MultiClient
from tun2g.control import MAX_LISTED_NODES, MAX_SERVER_EVENT_SIZE, NODES, EventReader, encode_event
from tun2g.server.node_list import node_entries

DOMAIN = "rediscover.test"


def test_a_k2_client_with_one_dead_node_gets_a_session_on_a_node_that_joins(redis_server, node_processes, backend):
    n1, n2 = node_processes(2, ttl=10.0)
    token = grant(redis_server.url, DOMAIN)
    # A record no node wrote: it must never reach a client (the attacker cannot sign heartbeats).
    forged = redis.Redis.from_url(redis_server.url, decode_responses=True)
    forged.zadd("tun2g:nodes", {"evil": time.time() + 3600})
    forged.hset("tun2g:node:evil", mapping={"url": "http://203.0.113.9:80", "tunnel": "203.0.113.9:4443"})
    backend_url, _app = backend
    config = ClientConfig(server_addr=n1.tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                          plain=True, backoff_initial=0.05, backoff_max=0.3)
    client = MultiClient(config, sessions=2)
    runner = gevent.spawn(client.run)
    try:
        wait_until(lambda: client.connected_nodes() == ["n1", "n2"], timeout=15, message="sessions on n1 and n2")
        n2.kill()
        wait_until(lambda: client.connected_nodes() == ["n1"] and "n2" not in client.entry.cluster_nodes,
                   timeout=15, message="the dead n2 gone from the client's sessions and list")
        (n3,) = node_processes(1, ttl=10.0)
        joined = time.monotonic()
        wait_until(lambda: client.connected_nodes() == ["n1", "n3"], timeout=10, interval=0.05,
                   message="a session on the new node n3")
        took = time.monotonic() - joined
        assert took < 5.0, f"found the new node after {took:.2f} s"  # measured 0.6-1.0 s
        print(f"session on the joining node after {took:.2f} s")
        assert "evil" not in client.entry.cluster_nodes and all("203.0.113.9" not in c.config.server_addr
                                                                 for c in client.clients)
        assert "event=node_list_pushed" in n1.log()
    finally:
        client.close()
        runner.join(5)
        forged.close()


@pytest.mark.pure
def test_the_nodes_event_is_capped_and_fits_the_clients_reader():
    entries = node_entries((f"n{i}" + "x" * 250, "h" * 249 + f":{i}") for i in range(1000))
    assert len(entries) == MAX_LISTED_NODES
    line = encode_event(NODES, nodes=entries)
    (event,) = EventReader(MAX_SERVER_EVENT_SIZE).feed(line)
    assert _cluster_view({"nodes": event["nodes"]})[1] == {e["node"]: e["tunnel"] for e in entries}
    # Junk in a "nodes" event is dropped entry by entry, like junk in the auth reply.
    assert _cluster_view({"nodes": [{"node": 1}, "x", {"node": "a", "tunnel": ""}, None]}) == (None, {})
