"""A client moving between nodes: a miss for a stored route is looked up again (bounded) before the 502, so the
milliseconds between a client leaving one node and its new node's registry write cost no request."""

from __future__ import annotations

import time

import gevent
import redis
import requests

from tests.fixtures.cluster import commands_between, redis_command_counts
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.server.router import MISS_RETRIES, MISS_WAIT


def test_a_miss_is_asked_again_and_served_once_the_new_node_registers(cluster_node, backend, start_client,
                                                                     redis_server):
    a, b = cluster_node("a"), cluster_node("b", registry_ttl=60.0)  # b refreshes its records only every 20 s
    url, _app = backend
    start_client(b.client_config(b.grant(), url))
    wait_until(lambda: [x.node for x in a.server.get_all_backends()] == ["b"], message="b's backend listed")
    assert requests.get(a.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200  # forwarded
    # As if b had not written its registration yet: its domain entry is not in Redis.
    store = redis.Redis.from_url(redis_server.url)
    store.delete(f"tun2g:domain:{DOMAIN}")
    store.close()
    a.cluster.registry.forget(DOMAIN)
    asking = gevent.spawn(requests.get, a.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
    wait_until(lambda: DOMAIN in a.cluster.registry._cache, interval=0.005, message="a's first lookup")
    assert a.cluster.registry._cache[DOMAIN].nodes == []
    b.cluster.registry.publish_now()  # b's write lands now, within a's MISS_RETRIES x MISS_WAIT
    response = asking.get(timeout=10)
    assert response.status_code == 200 and response.text == "hello from backend\n"


def test_a_host_no_route_names_is_not_asked_again(cluster_node, redis_server):
    a = cluster_node("a")
    before = redis_command_counts(redis_server.url)
    started = time.monotonic()
    response = requests.get(a.http_url + "/", headers={"Host": "nobody.example"}, timeout=10)
    took = time.monotonic() - started
    assert response.status_code == 502
    assert commands_between(before, redis_command_counts(redis_server.url)).get("zrangebyscore", 0) == 1
    assert took < MISS_RETRIES * MISS_WAIT + 2  # no waiting beyond one lookup (generous bound for a loaded box)
