"""Inspection across the cluster: captures go to one capped Redis stream per domain that every node reads."""

from __future__ import annotations

import json

import redis
import requests
from click.testing import CliRunner

from tests.cluster.test_forwarding import get, two_nodes  # noqa: F401  (the fixture)
from tests.fixtures.metrics import scrape, value
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cli import main
from tun2g.server.inspect import REDACTED


def records(node, limit=50) -> list:
    response = requests.get(f"{node.admin_url}/inspect", headers=node.admin_headers, params={"domain": DOMAIN, "limit": limit}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["records"]


def test_a_request_served_on_node_b_is_visible_through_node_a(two_nodes, redis_server):  # noqa: F811
    a, b, app, _client = two_nodes
    a.storage.set_route_inspect(DOMAIN, True)
    wait_until(lambda: a.server.inspector.enabled(DOMAIN) and b.server.inspector.enabled(DOMAIN), timeout=5,
               message="both nodes capturing")
    response = get(b, "/headers", headers={"Authorization": "Bearer top-secret"})
    assert response.status_code == 200 and app.seen_paths.count("/headers") == 1
    wait_until(lambda: records(a), timeout=5, message="b's capture readable on a")
    (record,) = records(a)
    assert (record["node"], record["path"], record["status"]) == ("b", "/headers", 200)
    assert record["backend"] == "a"  # b forwarded it to a, which holds the tunnel: captured once, where it came in
    assert {name.lower(): v for name, v in record["request_headers"]}["authorization"] == REDACTED
    assert records(b) == [record]
    # One capped stream per domain in Redis, as README's key schema says.
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.type(f"tun2g:inspect:{DOMAIN}") == "stream" and client.xlen(f"tun2g:inspect:{DOMAIN}") == 1
    finally:
        client.close()
    # tun2g inspect against node a's admin API.
    result = CliRunner().invoke(main, ["inspect", DOMAIN, "--admin", a.admin_url, "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["node"], r["path"]) for r in json.loads(result.output)] == [("b", "/headers")]
    # Each node exports its own metrics: b forwarded one request, a served it through its tunnel.
    on_b, on_a = scrape(b.admin_url, token=b.running.admin_token), scrape(a.admin_url, token=a.running.admin_token)
    assert value(on_b, "tun2g_hop_forwards_total", outcome="ok") == 1
    assert value(on_b, "tun2g_requests_total", domain=DOMAIN, code="2xx") == 1
    assert value(on_a, "tun2g_requests_total", domain=DOMAIN, code="2xx") == 1
    assert value(on_a, "tun2g_hop_forwards_total", outcome="ok") == 0
    assert value(on_b, "tun2g_tunnels", domain=DOMAIN) == 0 and value(on_a, "tun2g_tunnels", domain=DOMAIN) == 1


def test_following_reads_only_newer_captures_from_any_node(two_nodes):  # noqa: F811
    a, b, _app, _client = two_nodes
    a.storage.set_route_inspect(DOMAIN, True)
    wait_until(lambda: a.server.inspector.enabled(DOMAIN) and b.server.inspector.enabled(DOMAIN), timeout=5,
               message="both nodes capturing")
    assert get(a, "/first").status_code == 200
    wait_until(lambda: len(records(b)) == 1, timeout=5, message="the first capture")
    newest = records(b)[0]["id"]
    assert get(b, "/second").status_code == 200
    assert get(a, "/third").status_code == 200
    wait_until(lambda: len(records(a)) == 3, timeout=5, message="three captures")
    after = requests.get(f"{a.admin_url}/inspect", headers=a.admin_headers, params={"domain": DOMAIN, "after": newest}, timeout=10).json()
    assert [(r["path"], r["node"]) for r in after["records"]] == [("/third", "a"), ("/second", "b")]


def test_redis_errors_are_counted(two_nodes, redis_server):  # noqa: F811
    _a, b, _app, _client = two_nodes
    redis_server.stop()
    wait_until(lambda: get(b, host="elsewhere.test").status_code == 503, timeout=5, message="b answering 503")
    assert value(scrape(b.admin_url, token=b.running.admin_token), "tun2g_redis_errors_total", what="cluster registry") >= 1
    redis_server.start()
