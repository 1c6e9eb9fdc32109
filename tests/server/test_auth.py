"""The Auth handshake: every case of the original's tests, plus what tun2g adds."""

import socket

import pytest
import redis

from tun2g import smux
from tun2g.client import AuthRejected
from tun2g.control import Auth, decode_reply

from tests.fixtures.backends import read_until_suffix
from tests.fixtures.tunnel import DOMAIN, USER, wait_until


def _raw_tunnel(deployment):
    """A client-side smux session over a plain socket, for hand-written handshakes."""
    sock = socket.create_connection(("127.0.0.1", deployment.running.tunnel_address[1]), timeout=5)
    return smux.Session(sock, client=True)


def _handshake(deployment, payload: bytes) -> dict | None:
    session = _raw_tunnel(deployment)
    try:
        control = session.accept_stream(timeout=5)
        assert control.id == 2, "the server opens the control stream with id 2, like Go"
        control.sendall(payload)
        control.settimeout(5)
        line = read_until_suffix(control, b"\n")
        return decode_reply(line.strip()) if line else None
    finally:
        session.close()


def test_valid_auth_registers_and_is_acknowledged(plain_deployment):
    token = plain_deployment.grant()
    reply = _handshake(plain_deployment, Auth(token, DOMAIN).encode())
    assert reply["ok"] is True and reply["domain"] == DOMAIN


@pytest.mark.parametrize("case, expected", [
    ("no_route", "no route for domain"),
    ("unknown_token", "invalid token"),
    ("no_connect_scope", "lacks the 'connect' scope"),
    ("owner_mismatch", "does not belong to the token's user"),
    ("revoked", "invalid token"),
    ("unknown_token_no_route", "invalid token"),
])
def test_rejections_say_which_check_failed(plain_deployment, case, expected):
    """With a valid token the reason is precise; without one it is "invalid token" and nothing else."""
    storage = plain_deployment.storage
    token = plain_deployment.grant()
    domain = DOMAIN
    if case == "no_route":
        domain = "unrouted.test"
    elif case in ("unknown_token", "unknown_token_no_route"):
        token = "not-a-token"
        domain = "unrouted.test" if case == "unknown_token_no_route" else DOMAIN
    elif case == "no_connect_scope":
        _info, token = storage.create_token(USER, scopes=("admin",))
    elif case == "owner_mismatch":
        _info, token = storage.create_token("mallory")
    elif case == "revoked":
        info, token = storage.create_token(USER)
        storage.revoke_token(info.id)
    reply = _handshake(plain_deployment, Auth(token, domain).encode())
    assert reply is not None and reply["ok"] is False
    assert expected in reply["error"]
    if expected == "invalid token":
        assert reply["error"] == "invalid token" and "retry" not in reply
    assert plain_deployment.server.get_all_backends() == []


def test_domain_is_case_insensitive_in_auth(plain_deployment):
    token = plain_deployment.grant()
    reply = _handshake(plain_deployment, Auth(token, "APP.Test").encode())
    assert reply["ok"] is True and reply["domain"] == DOMAIN


def test_auth_split_across_frames_is_read_whole(plain_deployment):
    token = plain_deployment.grant()
    payload = Auth(token, DOMAIN).encode()
    session = _raw_tunnel(plain_deployment)
    try:
        control = session.accept_stream(timeout=5)
        for index in range(0, len(payload), 7):
            control.sendall(payload[index:index + 7])
        control.settimeout(5)
        assert decode_reply(control.recv(4096).strip())["ok"] is True
    finally:
        session.close()


@pytest.mark.parametrize("payload, expected", [
    (b'["not", "an object"]', "expected a JSON object"),
    (b'{"token": 1, "domain": "app.test"}', 'string fields "token" and "domain"'),
    (b'{"token": "a", "domain": "b"' + b" " * 9000, "no complete JSON object within"),
])
def test_malformed_auth_is_rejected_clearly(plain_deployment, payload, expected):
    reply = _handshake(plain_deployment, payload)
    assert reply["ok"] is False and expected in reply["error"]


def test_silent_client_is_cut_off_at_the_auth_deadline(plain_deployment):
    plain_deployment.server.config.auth_timeout = 0.3
    session = _raw_tunnel(plain_deployment)
    control = session.accept_stream(timeout=5)
    assert session.wait_closed(timeout=5), "a client that never sends its Auth must not hold a session"
    control.close()


def test_tun2g_client_exits_on_rejection(plain_deployment, backend, start_client):
    url, _app = backend
    plain_deployment.grant()
    config = plain_deployment.client_config("wrong-token", url)
    running = start_client(config, wait=False)
    assert running.rejected.wait(10)
    assert isinstance(running.error, AuthRejected)
    assert "invalid token" in str(running.error)


def test_backend_record_after_registration(tunnel):
    deployment, _app, client = tunnel
    backends = deployment.server.get_all_backends()
    assert len(backends) == 1
    record = backends[0]
    assert (record.domain, record.user, record.usable) == (DOMAIN, USER, True)
    assert record.proto == ("tcp" if deployment.plain else "tcp+tls")
    assert [b.id for b in deployment.server.get_backends_for_domain("APP.TEST")] == [record.id]
    assert [b.id for b in deployment.server.get_backends_for_user(USER)] == [record.id]
    assert deployment.server.get_backends_for_user("nobody") == []
    assert client.client.backend_id == record.id


def test_kill_backend_disconnects_and_client_reconnects(tunnel):
    deployment, _app, client = tunnel
    first = deployment.server.get_all_backends()[0].id
    client.connected.clear()
    deployment.server.kill_backend(first)
    client.wait_connected()
    wait_until(lambda: [b.id for b in deployment.server.get_all_backends()] not in ([], [first]),
               message="a new registration")


def test_storage_outage_is_not_a_rejection_and_leaks_no_address(tmp_path, data_dir, redis_server, backend,
                                                                   start_client):
    from tun2g.client import ClientConfig
    from tun2g.server.process import ServerSetup

    setup = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0", admin_addr=None, plain_tunnel=True,
                        storage_url=redis_server.url, access_log=False, log_level="warning")
    running = setup.start()
    try:
        storage = running.server.storage
        storage.add_route(DOMAIN, USER)
        _info, token = storage.create_token(USER)
        redis.Redis.from_url(redis_server.url).save()  # the restart below reloads this snapshot
        redis_server.stop()
        session = smux.Session(socket.create_connection(("127.0.0.1", running.tunnel_address[1]), timeout=5),
                               client=True)
        control = session.accept_stream(timeout=5)
        control.sendall(Auth(token, DOMAIN).encode())
        control.settimeout(10)
        reply = decode_reply(control.recv(4096).strip())
        session.close()
        assert reply["ok"] is False and reply["retry"] is True
        assert str(redis_server.port) not in reply["error"] and "try again later" in reply["error"]
        url, _app = backend
        client = start_client(ClientConfig(server_addr=f"127.0.0.1:{running.tunnel_address[1]}", token=token,
                                           domain=DOMAIN, backend_url=url, plain=True, backoff_initial=0.05,
                                           backoff_max=0.2), wait=False)
        assert not client.rejected.wait(0.5), "a storage outage must not make the client give up"
        redis_server.start()
        client.wait_connected()
    finally:
        running.stop()
