"""Forwarded requests ride kept-alive node-to-node connections: one connection carries many requests in turn."""

from __future__ import annotations

import requests

from tests.cluster.test_forwarding import two_nodes  # noqa: F401  (the fixture)
from tests.fixtures.tunnel import DOMAIN


def test_sequential_forwarded_requests_reuse_one_hop_connection(two_nodes):  # noqa: F811
    _a, b, _app, _client = two_nodes
    kept = []
    with requests.Session() as session:
        for _ in range(20):
            response = session.get(b.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
            assert response.status_code == 200 and response.text == "hello from backend\n"
            (pool,) = b.cluster.forwarder._pools.values()
            kept.append([id(sock) for sock, _reader, _at in pool._idle])
    assert all(len(idle) == 1 for idle in kept), kept  # the hop connection went back to the pool each time
    assert len({idle[0] for idle in kept}) == 1, "a new node-to-node connection was dialled"
