"""A dead node's registry entries go at once (heartbeat silence, sooner after a refused hop), not at the TTL;
forged or replayed heartbeat-channel messages evict nobody and keep no dead node alive; a node that was
evicted while alive (frozen) re-registers as soon as it runs again."""

from __future__ import annotations

import time

import pytest
import redis
import requests

from tests.fixtures.cluster import CLUSTER_SECRET, grant
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.cluster import heartbeat

DOMAIN = "evict.test"
SECRET = CLUSTER_SECRET.encode()


# -- the pure rules ------------------------------------------------------------------------------


@pytest.mark.pure
def test_only_signed_fresh_newer_messages_are_heard():
    now = 1_000_000.0
    beat = heartbeat.encode(SECRET, "beat", "n1", int(now * 1000))
    assert heartbeat.decode(SECRET, beat, now) == heartbeat.Message("beat", "n1", int(now * 1000))
    assert heartbeat.decode(b"another secret", beat, now) is None
    assert heartbeat.decode(SECRET, beat.replace("n1", "n2", 1), now) is None  # the node id is signed
    assert heartbeat.decode(SECRET, beat, now + 60) is None  # stale
    for junk in ("", "beat", "beat n1 1 2 3", "evict n1 1 x", "x" * 10_000, "beat  1 sig", "leave n1 abc sig"):
        assert heartbeat.decode(SECRET, junk, now) is None
    table = heartbeat.PeerTable("n2")
    message = heartbeat.decode(SECRET, beat, now)
    assert table.hear(message, 0.0) is True  # n1 joined
    assert table.hear(message, 0.1) is False and table.heard["n1"] == 0.0  # a replay refreshes nothing
    # An evict notice carries its sender's clock (here 5 s ahead): n1's own later beats still count.
    assert table.hear(heartbeat.Message("evict", "n1", int(now * 1000) + 5000, by="n3"), 0.2) is True
    assert table.hear(heartbeat.Message("beat", "n1", int(now * 1000) + 250), 0.3) is True and "n1" in table.heard


@pytest.mark.pure
def test_silence_evicts_but_a_refused_hop_alone_never_does():
    table = heartbeat.PeerTable("n2")
    ms = 1_000_000_000

    def beat(node: str, at: float) -> None:
        table.hear(heartbeat.Message("beat", node, ms + int(at * 1000)), at)

    for step in range(40):  # 10 s of both nodes beating, with a refused hop to n1 every 0.25 s
        at = step * 0.25
        beat("n1", at)
        beat("n2", at)
        table.suspect("n1", at)
        assert table.to_evict(at + 0.2) == []
    beat("n2", 10.25)
    assert table.to_evict(10.3) == []  # n1 silent 0.55 s, suspected: not yet
    beat("n2", 10.5)
    assert [node for node, _ in table.to_evict(10.6)] == ["n1"]  # silent past SUSPECT_SILENCE, suspected
    # Without a suspicion, EVICT_SILENCE; and nobody while our own beats do not reach us (our channel is deaf).
    beat("n1", 11.0)
    assert table.to_evict(11.0 + heartbeat.EVICT_SILENCE + 0.1) == []
    beat("n2", 13.2)
    assert [node for node, _ in table.to_evict(13.2)] == ["n1"]


# -- real processes --------------------------------------------------------------------------------


def registered_nodes(url: str) -> set[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        members = client.zrangebyscore(f"tun2g:domain:{DOMAIN}", time.time(), "+inf")
        return {member.split(" ")[0] for member in members}
    finally:
        client.close()


@pytest.fixture
def two_nodes(redis_server, node_processes, backend, start_client):
    """Two node processes with a registry TTL of 10 s, and a client on n1 serving evict.test."""
    nodes = node_processes(2, ttl=10.0)
    token = grant(redis_server.url, DOMAIN)
    backend_url, _app = backend
    start_client(ClientConfig(server_addr=nodes[0].tunnel_addr, token=token, domain=DOMAIN, backend_url=backend_url,
                              plain=True, backoff_initial=0.05, backoff_max=0.3))
    wait_until(lambda: registered_nodes(redis_server.url) == {"n1"}, message="n1 registered for the domain")
    wait_until(lambda: "event=node_joined" in nodes[1].log(), message="n2 hearing n1's heartbeats")
    return nodes


def test_a_killed_nodes_entries_go_within_the_heartbeat_silence_not_the_ttl(two_nodes, redis_server):
    n1, n2 = two_nodes
    n1.kill()
    killed = time.monotonic()
    wait_until(lambda: not registered_nodes(redis_server.url), timeout=8, interval=0.05,
               message="n1's entries evicted")
    took = time.monotonic() - killed
    # EVICT_SILENCE (2 s) plus a beat; measured 2.1-2.4 s. The TTL is 10 s.
    assert took < 6.0, f"evicted after {took:.2f} s"
    assert "event=node_evicted" in n2.log() and "node=n1" in n2.log()
    print(f"time to evict: {took:.2f} s with a registry TTL of 10 s")


def test_a_refused_hop_evicts_sooner(two_nodes, redis_server):
    n1, n2 = two_nodes
    n1.kill()
    killed = time.monotonic()
    while registered_nodes(redis_server.url):
        requests.get(n2.url + "/", headers={"Host": DOMAIN}, timeout=5)  # n2 forwards to n1: refused
        assert time.monotonic() - killed < 8, "n1 never evicted"
    took = time.monotonic() - killed
    assert took < 4.0, f"evicted after {took:.2f} s"  # SUSPECT_SILENCE (0.75 s) plus a beat; measured ~1 s
    print(f"time to evict after refused hops: {took:.2f} s with a registry TTL of 10 s")


def test_forged_and_replayed_heartbeat_messages_evict_nobody_and_keep_no_dead_node(two_nodes, redis_server):
    n1, n2 = two_nodes
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("tun2g:heartbeat")
    captured = None
    deadline = time.monotonic() + 5
    while captured is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and str(message["data"]).startswith("beat n1 "):
            captured = message["data"]
    pubsub.close()
    assert captured, "no beat of n1 seen"
    now_ms = int(time.time() * 1000)
    forged = [heartbeat.encode(b"wrong secret", kind, "n1", now_ms, by="n2") for kind in ("evict", "leave")]
    forged += [f"evict n1 n2 {now_ms} " + "0" * 64, "leave n1 1 x", "evict n1", "\x00" * 500, "beat " * 200]
    for _ in range(20):
        for data in forged:
            client.publish("tun2g:heartbeat", data)
    response = requests.get(n2.url + "/", headers={"Host": DOMAIN}, timeout=5)
    assert response.status_code == 200  # still forwarded to n1
    assert registered_nodes(redis_server.url) == {"n1"}
    assert "node_evicted" not in n2.log()
    # A replayed real beat of n1 does not keep it alive once it is dead.
    n1.kill()
    killed = time.monotonic()
    while registered_nodes(redis_server.url):
        client.publish("tun2g:heartbeat", captured)
        assert time.monotonic() - killed < 8, "the replayed beat kept n1 registered"
        time.sleep(0.05)  # the replay's cadence (not synchronisation)
    client.close()


def test_a_frozen_node_is_evicted_and_re_registers_when_it_runs_again(two_nodes, redis_server):
    n1, n2 = two_nodes
    n1.proc.send_signal(19)  # SIGSTOP
    try:
        wait_until(lambda: not registered_nodes(redis_server.url), timeout=8, message="the frozen n1 evicted")
    finally:
        n1.proc.send_signal(18)  # SIGCONT
    resumed = time.monotonic()
    wait_until(lambda: registered_nodes(redis_server.url) == {"n1"}, timeout=8, interval=0.05,
               message="n1 re-registered")
    took = time.monotonic() - resumed
    assert took < 3.0, f"re-registered after {took:.2f} s"  # at once on the evict notice; measured < 0.3 s
    wait_until(lambda: requests.get(n2.url + "/", headers={"Host": DOMAIN}, timeout=5).status_code == 200,
               timeout=5, message="n2 forwarding to n1 again")
    assert "event=evicted_while_alive" in n1.log()
