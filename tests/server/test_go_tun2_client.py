"""Wire compatibility with the Go tun2 client (tests/go/tun2client, built from Debian's Go and smux packages).

The tun2g server serves it; the tun2g client against the Go tun2 server is in
tests/client/test_go_tun2_server.py.
"""

import requests

from tests.fixtures.tunnel import DOMAIN, wait_until


def _go_client(go_peer, deployment, token, backend_url):
    args = ["--server", deployment.tunnel_addr, "--token", token, "--domain", DOMAIN, "--backend", backend_url]
    if not deployment.plain:
        args += ["--tls", "--ca", deployment.cert]
    return go_peer("tun2client", *args)


def test_go_client_is_served_by_tun2g_server(deployment, backend, go_peer):
    url, app = backend
    token = deployment.grant()
    peer = _go_client(go_peer, deployment, token, url)
    peer.wait_for(r"AUTH-SENT id=2")
    wait_until(lambda: len(deployment.server.get_all_backends()) == 1, message="the Go client to register")
    for path in ("/", "/status/500", "/bytes/1048576"):
        response = requests.get(deployment.http_url + path, headers={"Host": DOMAIN}, timeout=10)
        assert response.status_code == (500 if "500" in path else 200)
    assert len(response.content) == 1048576
    seen = requests.get(deployment.http_url + "/headers", headers={"Host": DOMAIN}, timeout=10).json()["headers"]
    assert seen["Host"] == DOMAIN and "X-Request-Id" in seen
    upload = requests.post(deployment.http_url + "/sink", data=b"x" * 3_000_000, headers={"Host": DOMAIN},
                           timeout=10).json()
    assert upload["length"] == 3_000_000


def test_go_client_pings_keep_it_registered(plain_deployment, backend, go_peer):
    plain_deployment.server.config.ping_interval = 0.1
    url, app = backend
    token = plain_deployment.grant()
    _go_client(go_peer, plain_deployment, token, url).wait_for(r"AUTH-SENT")
    wait_until(lambda: len(plain_deployment.server.get_all_backends()) == 1, message="registration")
    backend_id = plain_deployment.server.get_all_backends()[0].id
    connection = plain_deployment.server.tunnels.get(backend_id)
    wait_until(lambda: connection.pings_answered >= 3, message="three pings answered by the Go client")
    assert app.health_hits >= 3, "the Go client forwards /health to its backend, as the original does"
    assert [b.id for b in plain_deployment.server.get_all_backends()] == [backend_id]


def test_go_client_rejected_is_closed(plain_deployment, backend, go_peer):
    url, _app = backend
    plain_deployment.grant()
    peer = _go_client(go_peer, plain_deployment, "bad-token", url)
    peer.wait_for(r"SESSION-END", timeout=10)
    assert plain_deployment.server.get_all_backends() == []


def test_many_go_clients_all_register(plain_deployment, backend, go_peer):
    """The original loses ~10% of Auths to an smux race; every one must register here."""
    url, _app = backend
    plain_deployment.server.config.max_sessions_per_token = None  # 30 sessions of one token, on purpose
    token = plain_deployment.grant()
    for _ in range(30):
        _go_client(go_peer, plain_deployment, token, url)
    wait_until(lambda: len(plain_deployment.server.get_all_backends()) == 30, timeout=20,
               message="all 30 Go clients to register")
