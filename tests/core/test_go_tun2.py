"""Wire compatibility with Go tun2 peers built from Debian's Go and smux packages.

The Go tun2 client (tests/go/tun2client) is served by the tun2g server, and the
tun2g client serves through the Go tun2 server (tests/go/tun2server).
"""

import requests

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.client import ClientConfig


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


def test_tun2g_client_serves_through_go_server(go_peer, backend, start_client, dev_cert):
    url, app = backend
    cert, key = dev_cert
    # --avoid-auth-race: the Go server's own smux race (docs/protocol.md#differences) would
    # otherwise lose our Auth now and then; that bug is not the client's to test.
    server = go_peer("tun2server", "--token", "tok1", "--domain", DOMAIN, "--cert", cert, "--key", key,
                     "--ping-interval", "200ms", "--avoid-auth-race")
    ready = server.wait_for(r"READY tunnel=(\d+) http=(\d+)")
    tunnel_port, http_port = ready.group(1), ready.group(2)
    config = ClientConfig(server_addr=f"localhost:{tunnel_port}", token="tok1", domain=DOMAIN, backend_url=url,
                          ca_file=cert)
    client = start_client(config)
    server.wait_for(r"REGISTERED domain=app.test")
    assert client.client.backend_id is None, "a Go server sends no auth reply; silence means accepted"
    public = f"http://127.0.0.1:{http_port}"
    assert requests.get(public + "/", headers={"Host": DOMAIN}, timeout=10).text == "hello from backend\n"
    assert len(requests.get(public + "/bytes/2000000", headers={"Host": DOMAIN}, timeout=10).content) == 2000000
    wait_until(lambda: client.client.health_checks >= 3, message="three pings from the Go server")
    assert requests.get(public + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200
    assert app.health_hits == 0, "tun2g answers the server's /health itself, sparing the backend"


def test_tun2g_client_rejected_by_go_server_retries(go_peer, backend, start_client):
    url, _app = backend
    server = go_peer("tun2server", "--token", "tok1", "--domain", DOMAIN, "--avoid-auth-race")
    tunnel_port = server.wait_for(r"READY tunnel=(\d+)").group(1)
    config = ClientConfig(server_addr=f"127.0.0.1:{tunnel_port}", token="wrong", domain=DOMAIN, backend_url=url,
                          plain=True, backoff_initial=0.05, backoff_max=0.1)
    client = start_client(config, wait=False)
    server.wait_for(r"REJECTED token=wrong")
    server.wait_for(r"REJECTED token=wrong")  # it tried again: a Go server gives no reason, so we cannot know
    assert not client.connected.is_set()


def test_client_reconnects_when_a_silent_server_lost_its_auth(backend, start_client):
    """A server that takes the Auth and then says and sends nothing (the Go original's lost-Auth state)."""
    from gevent.event import Event
    from gevent.server import StreamServer

    from tun2g import smux

    sessions, second = [], Event()

    def swallow_auth(sock, _address):
        session = smux.Session(sock, client=False, config=smux.Config.tun2_server())
        sessions.append(session)
        if len(sessions) == 2:
            second.set()
        session.open_stream().recv(4096)  # read the Auth, then stay silent forever
        session.wait_closed()

    server = StreamServer(("127.0.0.1", 0), swallow_auth)
    server.start()
    try:
        url, _app = backend
        config = ClientConfig(server_addr=f"127.0.0.1:{server.server_port}", token="t", domain=DOMAIN,
                              backend_url=url, plain=True, backoff_initial=0.05, unconfirmed_timeout=0.3)
        client = start_client(config, wait=False)
        client.connected.wait(10)
        assert second.wait(10), "the client must give up on a server that never serves it, and reconnect"
    finally:
        server.stop(timeout=1)
        for session in sessions:
            session.close()
