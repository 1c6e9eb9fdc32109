"""Wildcard and path routes, a client serving several routes, and takeover, end to end over real sockets."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.fixtures.backends import BackendApp, _NoDelayWSGIServer
from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import USER, wait_until


@pytest.fixture
def second_backend():
    app = BackendApp()
    server = _NoDelayWSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.stop(timeout=1)


def get(deployment, host, path="/", **headers):
    return requests.get(deployment.http_url + path, headers={"Host": host, **headers}, timeout=10)


def token_for(deployment, *routes, strip=(), user=USER):
    for route in routes:
        deployment.storage.add_route(route, user, strip=route in strip)
    return deployment.storage.create_token(user)[1]


def test_a_wildcard_route_serves_one_label_and_the_exact_host_wins(plain_deployment, backend, second_backend,
                                                                   start_client):
    (wild_url, wild_app), (exact_url, exact_app) = backend, second_backend
    token = token_for(plain_deployment, "*.wild.test", "app.wild.test")
    start_client(plain_deployment.client_config(token, wild_url, domain="*.wild.test"))
    start_client(plain_deployment.client_config(token, exact_url, domain="app.wild.test"))
    assert get(plain_deployment, "anything.wild.test", "/one").status_code == 200
    assert get(plain_deployment, "App.Wild.Test:8080", "/two").status_code == 200
    assert get(plain_deployment, "a.b.wild.test", "/three").status_code == 502  # two labels: no route
    assert wild_app.seen_paths == ["/one"] and exact_app.seen_paths == ["/two"]


def test_path_routes_pick_the_longest_prefix_and_strip(plain_deployment, backend, second_backend, start_client):
    (site_url, site_app), (api_url, api_app) = backend, second_backend
    token = token_for(plain_deployment, "path.test", "path.test/api", strip=("path.test/api",))
    start_client(plain_deployment.client_config(token, site_url, domain="path.test"))
    start_client(plain_deployment.client_config(token, api_url, domain="path.test/api"))
    response = get(plain_deployment, "path.test", "/api/headers?x=1")
    assert response.status_code == 200
    seen = response.json()
    assert (seen["path"], seen["query"]) == ("/headers", "x=1")
    assert seen["headers"]["X-Forwarded-Prefix"] == "/api"
    assert get(plain_deployment, "path.test", "/apix").status_code == 200
    assert get(plain_deployment, "path.test", "/api/%2e%2e/admin").status_code == 400  # never routed past /api
    # A public X-Tun2g-Route neither moves the request nor reaches a single-route (maybe Go) client's backend.
    spoofed = get(plain_deployment, "path.test", "/headers", **{"X-Tun2g-Route": "path.test/api"}).json()
    assert "X-Tun2g-Route" not in spoofed["headers"]
    assert site_app.seen_paths == ["/apix", "/headers"] and api_app.seen_paths == ["/headers"]


def test_one_client_serves_several_routes_each_to_its_backend(plain_deployment, backend, second_backend,
                                                              start_client):
    (site_url, site_app), (api_url, api_app) = backend, second_backend
    token = token_for(plain_deployment, "multi.test", "multi.test/api", "*.multi.test", strip=("multi.test/api",))
    running = start_client(plain_deployment.client_config(
        token, site_url, domain="multi.test", routes=[("multi.test/api", api_url), ("*.multi.test", api_url)]))
    assert [b.routes for b in plain_deployment.server.get_all_backends()] == [
        ("multi.test", "multi.test/api", "*.multi.test")]
    assert get(plain_deployment, "multi.test", "/site").status_code == 200
    # A public client cannot pick the backend: the server drops its X-Tun2g-Route and sets its own.
    assert get(plain_deployment, "multi.test", "/api/headers", **{"X-Tun2g-Route": "multi.test"}).json()[
        "headers"].get("X-Tun2g-Route") is None
    assert get(plain_deployment, "x.multi.test", "/wild").status_code == 200
    assert site_app.seen_paths == ["/site"] and api_app.seen_paths == ["/headers", "/wild"]
    assert running.client.requests_served == 3


def test_a_route_of_another_user_is_refused_for_the_whole_session(plain_deployment, backend, start_client):
    url, _ = backend
    token_for(plain_deployment, "theirs.test", user="mallory")
    token = token_for(plain_deployment, "mine.test")
    running = start_client(plain_deployment.client_config(token, url, domain="mine.test",
                                                          routes=[("theirs.test", url)]), wait=False)
    assert running.rejected.wait(10)
    assert "'theirs.test' does not belong to the token's user" in str(running.error)
    assert plain_deployment.server.get_all_backends() == []


def _client_process(deployment, token, domain, backend_url, instance):
    return subprocess.Popen(
        [sys.executable, "-m", "tun2g.cli", "client", "--server", deployment.tunnel_addr, "--plain", "--token",
         token, "--route", f"{domain}={backend_url}", "--instance-id", instance, "--no-inspect", "--quiet",
         "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_without_proxies())


def _stop(*processes):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(10)


def _served_within_a_second(url, host) -> float:
    started = time.monotonic()
    response = requests.get(url + "/", headers={"Host": host}, timeout=1.0)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_takeover_a_frozen_client_is_replaced_at_once(plain_deployment, backend):
    url, _ = backend
    token = token_for(plain_deployment, "takeover.test")
    server = plain_deployment.server
    old = _client_process(plain_deployment, token, "takeover.test", url, "laptop-1")
    other = None
    new = None
    try:
        wait_until(lambda: len(server.get_backends_for_domain("takeover.test")) == 1, timeout=20)
        old_id = server.get_backends_for_domain("takeover.test")[0].id
        os.kill(old.pid, signal.SIGSTOP)  # frozen: its session stays registered, its pings go unanswered
        new = _client_process(plain_deployment, token, "takeover.test", url, "laptop-1")
        wait_until(lambda: [b.id for b in server.get_backends_for_domain("takeover.test")] not in ([], [old_id]),
                   timeout=20, message="the new session registered")
        assert _served_within_a_second(plain_deployment.http_url, "takeover.test") < 1.0
        assert [b.id for b in server.get_backends_for_domain("takeover.test")] != [old_id]
        assert old_id not in [b.id for b in server.get_all_backends()]  # the old session is closed
        # Another instance of the same user load-balances beside it, as before.
        other = _client_process(plain_deployment, token, "takeover.test", url, "laptop-2")
        wait_until(lambda: len(server.get_backends_for_domain("takeover.test")) == 2, timeout=20)
    finally:
        _stop(*(p for p in (old, new, other) if p is not None))


def test_takeover_across_two_nodes(cluster_node, backend):
    url, _ = backend
    a, b = cluster_node("a"), cluster_node("b")
    token = token_for(a, "far.test")
    old = _client_process(a, token, "far.test", url, "box-1")
    new = None
    try:
        wait_until(lambda: len(a.server.get_backends_for_domain("far.test")) == 1, timeout=20)
        wait_until(lambda: len(b.server.get_backends_for_domain("far.test")) == 1, timeout=10,
                   message="node b sees the tunnel on a")
        os.kill(old.pid, signal.SIGSTOP)
        new = _client_process(b, token, "far.test", url, "box-1")
        wait_until(lambda: b.server.tunnels and len(list(b.server.tunnels)) == 1, timeout=20)
        # Node a closed its frozen session at b's request: a request arriving at a is forwarded to b at once.
        wait_until(lambda: len(a.server.tunnels) == 0, timeout=2, message="node a closed the old session")
        assert _served_within_a_second(a.http_url, "far.test") < 1.0
        assert _served_within_a_second(b.http_url, "far.test") < 1.0
    finally:
        _stop(*(p for p in (old, new) if p is not None))
