"""The forwarding node relays a hop's response from callbacks too (tun2g.server.loop_relay.SocketSource).

A bodiless forwarded request goes to the node holding the tunnel with one non-blocking send on a
kept hop connection, and the response is read from that socket's own watcher. What would wait goes
on in a greenlet; a hop the forwarder cuts in flight (its node stopped answering) while a callback
watches it is reported at once, as a greenlet blocked on it would be, and the request replayed when safe.
"""

from __future__ import annotations

import hashlib

import gevent
import pytest
import requests

from tests.cluster.test_forwarding import get, two_nodes  # noqa: F401  (the fixture)
from tests.fixtures.backends import pattern_bytes
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.server import loop_relay, pipeline

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def counted(monkeypatch):
    """Counts of hop responses watched from callbacks, hand-overs to a greenlet, and hops cut under a watch."""
    counts = {"socket_relays": 0, "greenlets": 0, "cut": 0}
    made, go_on, throw = loop_relay.SocketSource.__init__, pipeline._SocketExchange._go_on, loop_relay.LoopRelay.throw

    def counted_source(source, *args):
        counts["socket_relays"] += 1
        made(source, *args)

    def counted_go_on(exchange, *args):
        counts["greenlets"] += 1
        go_on(exchange, *args)

    def counted_throw(relay, error):
        counts["cut"] += 1
        throw(relay, error)

    monkeypatch.setattr(loop_relay.SocketSource, "__init__", counted_source)
    monkeypatch.setattr(pipeline._SocketExchange, "_go_on", counted_go_on)
    monkeypatch.setattr(loop_relay.LoopRelay, "throw", counted_throw)
    return counts


def test_forwarded_gets_are_relayed_from_callbacks_over_one_kept_hop(two_nodes, counted):  # noqa: F811
    _a, b, _app, _client = two_nodes
    ids = set()
    with requests.Session() as session:
        for _ in range(20):
            response = session.get(b.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
            assert response.status_code == 200 and response.text == "hello from backend\n"
            ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 20
    assert counted["socket_relays"] == 20 and counted["greenlets"] == 0
    (pool,) = b.cluster.forwarder._pools.values()
    assert len(pool._idle) == 1  # one hop connection carried them all
    assert b.running.front.requests_in_flight == 0


def test_a_big_forwarded_response_goes_on_in_a_greenlet_whole(two_nodes, counted):  # noqa: F811
    _a, b, _app, _client = two_nodes
    size = 3 * 1024 * 1024
    response = get(b, f"/bytes/{size}")
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(b"".join(pattern_bytes(size))).digest()
    # Handed over on both nodes: b's hop relay, and a's tunnel relay.
    assert counted["socket_relays"] == 1 and counted["greenlets"] == 2


def test_a_hop_cut_in_flight_while_a_callback_watches_it_is_sent_again_at_once(two_nodes, counted):  # noqa: F811
    _a, b, app, _client = two_nodes
    forwarder = b.cluster.forwarder
    result = {}

    def visit():
        result["response"] = get(b, "/wait")

    visitor = gevent.spawn(visit)
    wait_until(lambda: "/wait" in app.seen_paths, message="the request at the backend, behind the hop")
    (url,) = forwarder._busy
    forwarder.failed(url, "the test cuts it", cut_in_flight=True)  # what an unanswered health check does
    wait_until(lambda: counted["cut"] == 1, message="the watching callback told of the cut")
    app.release.set()
    visitor.join(timeout=10)
    response = result["response"]
    # A GET that nothing answered yet: sent again (node a is alive: its health check revives it), not
    # left to the response timeout on a socket no one reads any more.
    assert response.status_code == 200 and response.text == "released\n"
    assert app.seen_paths.count("/wait") == 2
    wait_until(lambda: b.running.front.requests_in_flight == 0, message="nothing left in flight on b")
