"""Sessions per token and per user are capped (issue 9, item 3): one more is refused with
a clear, retryable auth reply; a closed session frees its place."""

from __future__ import annotations

import socket

import pytest

from tests.fixtures.backends import read_until_suffix
from tests.fixtures.tunnel import DOMAIN, USER, wait_until
from tun2g import smux
from tun2g.control import Auth, decode_reply
from tun2g.errors import ConfigurationError
from tun2g.server.server import ServerConfig


def _handshake(deployment, token: str, domain: str = DOMAIN) -> tuple[smux.Session, dict | None]:
    """Authenticate by hand over a real socket; (session, reply). The caller closes the session."""
    sock = socket.create_connection(("127.0.0.1", deployment.running.tunnel_address[1]), timeout=5)
    session = smux.Session(sock, client=True, config=smux.Config(version=None))
    control = session.accept_stream(timeout=5)
    control.sendall(Auth(token, domain, tun2g=1).encode())
    control.settimeout(5)
    line = read_until_suffix(control, b"\n")
    return session, (decode_reply(line.strip()) if line else None)


def test_defaults_are_sane_and_validated(plain_deployment):
    config = plain_deployment.server.config
    assert (config.max_sessions_per_token, config.max_sessions_per_user) == (16, 64)
    with pytest.raises(ConfigurationError, match="max_sessions_per_token"):
        ServerConfig(storage=plain_deployment.storage, max_sessions_per_token=0)


def test_one_session_too_many_per_token_is_refused_with_a_reason(plain_deployment):
    plain_deployment.server.config.max_sessions_per_token = 2
    token = plain_deployment.grant()
    sessions = []
    try:
        for _ in range(2):
            session, reply = _handshake(plain_deployment, token)
            sessions.append(session)
            assert reply is not None and reply["ok"] is True and reply.get("smux") == 2
        session, reply = _handshake(plain_deployment, token)
        sessions.append(session)
        assert reply is not None and reply["ok"] is False and reply["retry"] is True
        assert "too many tunnels for this token" in reply["error"] and "allows 2 per token" in reply["error"]
        assert session.wait_closed(5), "a refused session is closed"
        assert len(plain_deployment.server.get_all_backends()) == 2
        # Closing one frees its place.
        sessions[0].close()
        wait_until(lambda: len(plain_deployment.server.get_all_backends()) == 1, message="deregistration")
        session, reply = _handshake(plain_deployment, token)
        sessions.append(session)
        assert reply is not None and reply["ok"] is True
    finally:
        for session in sessions:
            session.close()


def test_sessions_per_user_are_capped_across_tokens(plain_deployment):
    plain_deployment.server.config.max_sessions_per_user = 2
    tokens = [plain_deployment.grant(user=USER) for _ in range(3)]
    sessions = []
    try:
        for token in tokens[:2]:
            session, reply = _handshake(plain_deployment, token)
            sessions.append(session)
            assert reply is not None and reply["ok"] is True
        session, reply = _handshake(plain_deployment, tokens[2])
        sessions.append(session)
        assert reply is not None and reply["ok"] is False
        assert "too many tunnels for this user" in reply["error"]
    finally:
        for session in sessions:
            session.close()
    wait_until(lambda: not plain_deployment.server._per_user and not plain_deployment.server._per_token,
               message="the counters to drop to zero")


def test_a_refused_client_reports_the_reason_and_retries(plain_deployment, backend, start_client):
    url, _app = backend
    plain_deployment.server.config.max_sessions_per_token = 1
    token = plain_deployment.grant()
    start_client(plain_deployment.client_config(token, url))
    second = start_client(plain_deployment.client_config(token, url), wait=False)
    wait_until(lambda: second.client.state == "waiting", message="the second client to back off")
    assert not second.rejected.is_set(), "a session cap is retryable, not a final rejection"
