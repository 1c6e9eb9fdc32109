"""Failures on every side: backend down or dying, tunnel client killed, public client leaving."""

import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest
import requests

from tests.fixtures.backends import pattern_bytes
from tests.fixtures.net import env_without_proxies, free_port
from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.server.process import ServerSetup


def get(deployment, path="/", timeout=10, **kwargs):
    return requests.get(deployment.http_url + path, headers={"Host": DOMAIN}, timeout=timeout, **kwargs)


def cli_client(deployment, token, backend_url):
    """A real `tun2g client` process for this deployment."""
    command = [sys.executable, "-m", "tun2g.cli", "client", "--server", deployment.tunnel_addr, "--token", token,
               "--domain", DOMAIN, "--backend", backend_url, "--log-level", "warning"]
    command += ["--plain"] if deployment.plain else ["--ca", deployment.cert]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_without_proxies())


def test_backend_down_gives_a_clear_502_and_the_tunnel_stays(deployment, closed_port_url, start_client):
    token = deployment.grant()
    start_client(deployment.client_config(token, closed_port_url))
    response = get(deployment)
    assert response.status_code == 502
    assert "cannot reach the backend (connection refused)" in response.text
    assert closed_port_url not in response.text and closed_port_url.rsplit(":", 1)[1] not in response.text
    assert [b.usable for b in deployment.server.get_all_backends()] == [True]


def test_backend_dying_mid_body_cuts_that_response_only(deployment, dying_backend, backend, start_client):
    token = deployment.grant()
    start_client(deployment.client_config(token, dying_backend))
    response = get(deployment, stream=True)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut short: no hang, no false success
        for _piece in response.iter_content(65536):
            pass
    assert len(deployment.server.get_all_backends()) == 1


def test_public_client_abort_closes_one_stream_not_the_tunnel(tunnel):
    deployment, app, _client = tunnel
    backend_id = deployment.server.get_all_backends()[0].id
    with pytest.raises(requests.exceptions.Timeout):
        get(deployment, "/wait", timeout=0.3)
    app.release.set()
    assert get(deployment).status_code == 200
    assert [b.id for b in deployment.server.get_all_backends()] == [backend_id]
    wait_until(lambda: deployment.server.get_all_backends()[0].requests_in_flight == 0,
               message="the aborted request's stream to be closed")


def test_slow_reader_does_not_stall_other_requests_or_pings(deployment, backend, start_client):
    deployment.server.config.ping_interval = 0.2
    deployment.server.config.liveness_interval = 0.2  # a tun2g client gets control-stream pings (docs/protocol.md#liveness)
    url, _app = backend
    token = deployment.grant()
    start_client(deployment.client_config(token, url))
    backend_id = deployment.server.get_all_backends()[0].id
    stalled = socket.create_connection(("127.0.0.1", deployment.running.http_address[1]))
    stalled.sendall(f"GET /bytes/{256 * 1024 * 1024} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
    stalled.recv(1)  # the response has started; now never read again
    try:
        for _ in range(20):
            assert get(deployment, "/bytes/100000").content.__len__() == 100000
        connection = deployment.server.tunnels.get(backend_id)
        answered = connection.pings_answered
        wait_until(lambda: connection.pings_answered >= answered + 2, timeout=5, message="two more pings answered")
        assert [b.id for b in deployment.server.get_all_backends()] == [backend_id]
    finally:
        stalled.close()


def test_a_stream_reset_for_a_slow_reader_stops_the_backend_transfer(deployment, backend, start_client):
    """v1 has no per-stream window: the server resets a stream nobody reads (once its reader
    stopped for a second, Config.backlog_seconds); the client must then stop pushing that
    response over the tunnel instead of sending all of it into the void."""
    from tun2g import smux

    url, app = backend
    token = deployment.grant()
    start_client(deployment.client_config(token, url, smux_config=smux.Config(version=1)))
    size = 512 * 1024 * 1024
    stalled = socket.create_connection(("127.0.0.1", deployment.running.http_address[1]))
    try:
        stalled.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        stalled.recv(1)  # the response has started; never read again
        assert app.generator_ended.wait(30), "the backend transfer must end once the stream is reset"
        assert app.generated_bytes < size // 4, f"{app.generated_bytes >> 20} MiB went to a reset stream"
        assert get(deployment, "/bytes/1000").content == b"".join(pattern_bytes(1000))
    finally:
        stalled.close()


def test_a_stalled_reader_holds_the_backend_back_on_the_default_v2(deployment, backend, start_client):
    """tun2g client and server negotiate v2: the per-stream window pauses the backend instead."""
    url, app = backend
    token = deployment.grant()
    start_client(deployment.client_config(token, url))
    size = 512 * 1024 * 1024
    stalled = socket.create_connection(("127.0.0.1", deployment.running.http_address[1]))
    try:
        stalled.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        stalled.recv(1)  # the response has started; never read again
        seen = []

        def settled():
            seen.append(app.generated_bytes)
            return len(seen) > 10 and seen[-1] == seen[-11]  # unchanged for ~0.5 s

        wait_until(settled, timeout=20, interval=0.05, message="the backend transfer to pause")
        assert app.generated_bytes < size // 8, f"{app.generated_bytes >> 20} MiB generated for a stalled reader"
        assert not app.generator_ended.is_set()
        assert get(deployment, "/bytes/1000").content == b"".join(pattern_bytes(1000))
    finally:
        stalled.close()


def test_killed_client_fails_its_request_at_once_and_is_deregistered(deployment, backend):
    url, app = backend
    deployment.server.config.ping_interval = 60  # detection must not wait for a ping
    token = deployment.grant()
    process = cli_client(deployment, token, url)
    try:
        wait_until(lambda: len(deployment.server.get_all_backends()) == 1, message="the client process")
        pending = gevent.spawn(get, deployment, "/wait")
        wait_until(lambda: "/wait" in app.seen_paths, message="the request to reach the backend")
        process.send_signal(signal.SIGKILL)
        response = pending.get(timeout=5)
        assert response.status_code == 502
        wait_until(lambda: deployment.server.get_all_backends() == [], timeout=2,
                   message="deregistration when the session dies")
        assert get(deployment).status_code == 502
    finally:
        process.kill()
        process.wait()
        app.release.set()


def test_idle_client_death_is_noticed_without_a_ping(deployment, backend):
    url, _app = backend
    deployment.server.config.ping_interval = 60
    token = deployment.grant()
    process = cli_client(deployment, token, url)
    try:
        wait_until(lambda: len(deployment.server.get_all_backends()) == 1, message="the client process")
        process.send_signal(signal.SIGKILL)
        wait_until(lambda: deployment.server.get_all_backends() == [], timeout=2,
                   message="deregistration when the session dies")
    finally:
        process.kill()
        process.wait()


def test_server_restart_client_reconnects(tmp_path, data_dir, backend, start_client):
    url, _app = backend
    http_port, tunnel_port = free_port(), free_port()
    setup = ServerSetup(http_addr=f"127.0.0.1:{http_port}", tunnel_addr=f"127.0.0.1:{tunnel_port}", admin_addr=None,
                        plain_tunnel=True, storage_url=f"sqlite:///{tmp_path / 's.db'}", access_log=False,
                        log_level="warning")
    running = setup.start()
    running.server.storage.add_route(DOMAIN, "alice")
    _info, token = running.server.storage.create_token("alice")
    from tun2g.client import ClientConfig

    config = ClientConfig(server_addr=f"127.0.0.1:{tunnel_port}", token=token, domain=DOMAIN, backend_url=url,
                          plain=True, backoff_initial=0.05, backoff_max=0.2)
    client = start_client(config)
    public = f"http://127.0.0.1:{http_port}/"
    assert requests.get(public, headers={"Host": DOMAIN}, timeout=5).status_code == 200
    client.connected.clear()
    running.stop()
    running = setup.start()
    try:
        client.wait_connected()
        assert requests.get(public, headers={"Host": DOMAIN}, timeout=5).status_code == 200
    finally:
        running.stop()


def test_reconnect_backoff_resets_as_soon_as_the_server_is_reachable_again(tmp_path, data_dir, backend,
                                                                            start_client):
    """A server that could not be dialled is probed during the backoff: the client is back at once."""
    url, _app = backend
    tunnel_port = free_port()
    setup = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr=f"127.0.0.1:{tunnel_port}", admin_addr=None,
                        plain_tunnel=True, storage_url=f"sqlite:///{tmp_path / 's.db'}", access_log=False,
                        log_level="warning")
    running = setup.start()
    running.server.storage.add_route(DOMAIN, "alice")
    _info, token = running.server.storage.create_token("alice")
    from tun2g.client import ClientConfig

    config = ClientConfig(server_addr=f"127.0.0.1:{tunnel_port}", token=token, domain=DOMAIN, backend_url=url,
                          plain=True, backoff_initial=3.0, backoff_max=30.0)
    client = start_client(config)
    client.connected.clear()
    running.stop()
    # The first wait (1.5-3 s) follows a lost session; the next one (3-6 s) a failed dial, and is probed.
    wait_until(lambda: client.client.state == "waiting" and not client.client.reached_server, timeout=10,
               message="the client waiting after a failed dial")
    running = setup.start()
    back = time.monotonic()
    try:
        client.wait_connected(timeout=10)
        assert time.monotonic() - back < 1.5  # the backoff alone: at least 3 s less start-up
    finally:
        running.stop()


def test_stalled_tls_handshake_does_not_hold_up_others(tls_deployment, backend, start_client):
    url, _app = backend
    staller = socket.create_connection(("127.0.0.1", tls_deployment.running.tunnel_address[1]))
    staller.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then silence
    try:
        token = tls_deployment.grant()
        start_client(tls_deployment.client_config(token, url))
        assert get(tls_deployment).status_code == 200
    finally:
        staller.close()


def test_client_with_wrong_ca_cannot_connect(tls_deployment, backend, start_client, tmp_path):
    from tun2g.transport.tls import make_dev_certificate

    other_cert, _key = make_dev_certificate(tmp_path / "other")
    url, _app = backend
    token = tls_deployment.grant()
    running = start_client(tls_deployment.client_config(token, url, ca_file=str(other_cert)), wait=False)
    assert not running.connected.wait(1.0)
    assert tls_deployment.server.get_all_backends() == []


def test_the_502_page_never_names_the_internal_backend(deployment, start_client):
    """The public reads the client's 502: the backend's host stays in the client's log."""
    token = deployment.grant()
    start_client(deployment.client_config(token, "http://internal-billing.invalid:8443/app/"))
    response = get(deployment)
    assert response.status_code == 502 and "cannot reach the backend (" in response.text
    assert "internal-billing" not in response.text and "8443" not in response.text
