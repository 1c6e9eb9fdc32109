"""A tun2g client claiming a name (ClientConfig.claim) against servers that answer badly: a reply naming no valid
domain is not adopted, and a server that stays silent (a Go tun2 server) is a permanent refusal."""

import json

import pytest
from gevent.event import Event
from gevent.server import StreamServer

from tun2g import smux
from tun2g.client import AuthRejected, ClientConfig
from tun2g.client.client import NO_CLAIMS


def _server(reply: bytes | None):
    """A server that reads one Auth per session, answers `reply` (None: nothing) and keeps the session open."""
    auths, sessions, second = [], [], Event()

    def serve(sock, _address):
        session = smux.Session(sock, client=False, config=smux.Config.tun2_server())
        sessions.append(session)
        control = session.open_stream()
        auths.append(json.loads(control.recv(4096)))
        if len(auths) == 2:
            second.set()
        if reply is not None:
            control.sendall(reply)
        session.wait_closed()

    server = StreamServer(("127.0.0.1", 0), serve)
    server.start()
    return server, auths, sessions, second


@pytest.mark.parametrize("domain", ["evil domain", "", None, 7, "x" * 300, "a.test\n"])
def test_a_claim_reply_without_a_valid_domain_is_not_adopted(domain, backend, start_client):
    fields = {"ok": True, "backend": "b"} | ({} if domain is None else {"domain": domain})
    server, auths, sessions, second = _server(json.dumps(fields).encode() + b"\n")
    try:
        url, _app = backend
        config = ClientConfig(server_addr=f"127.0.0.1:{server.server_port}", token="t", domain="", claim=True,
                              backend_url=url, plain=True, backoff_initial=0.05, backoff_max=0.1)
        claimed = []
        client = start_client(config, wait=False, on_claim=claimed.append)
        assert second.wait(10), "the client reconnects (and claims again) instead of serving a bad name"
        assert claimed == [] and config.claim is True and config.domain == ""
        assert all(auth["claim"] == 1 and auth["domain"] == "" for auth in auths)
        assert not client.connected.is_set()
    finally:
        server.stop(timeout=1)
        for session in sessions:
            session.close()


def test_a_silent_server_refuses_a_claim_for_good(backend, start_client):
    server, _auths, sessions, _second = _server(None)
    try:
        url, _app = backend
        config = ClientConfig(server_addr=f"127.0.0.1:{server.server_port}", token="t", domain="", claim=True,
                              backend_url=url, plain=True, backoff_initial=0.05, unconfirmed_timeout=3.0)
        client = start_client(config, wait=False)
        assert client.rejected.wait(15)
        assert isinstance(client.error, AuthRejected) and NO_CLAIMS in str(client.error)
    finally:
        server.stop(timeout=1)
        for session in sessions:
            session.close()


@pytest.mark.pure
def test_a_claiming_config_needs_no_domain_and_others_still_do():
    from tun2g.errors import ConfigurationError

    assert ClientConfig(server_addr="s:1", token="t", domain="", claim=True, backend_url="http://b").domain == ""
    with pytest.raises(ConfigurationError):
        ClientConfig(server_addr="s:1", token="t", domain="", backend_url="http://b")
    with pytest.raises(ConfigurationError):
        ClientConfig(server_addr="s:1", token="t", domain="a b", claim=True, backend_url="http://b")
