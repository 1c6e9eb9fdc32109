"""The liveness check between tun2g peers (docs/protocol.md#liveness): control-stream pings instead of
HTTP health pings, fed to phi; dead, silent and hostile peers."""

from __future__ import annotations

import json
import time

import gevent
import pytest
import requests

from tests.fixtures.tunnel import DOMAIN, _start, wait_until
from tests.server.support import handshake as _handshake
from tun2g import smux
from tun2g.control import LIVENESS_KEEPALIVE, PING_REQUEST, EventReader, encode_event
from tun2g.errors import ConfigurationError
from tun2g.server.server import ServerConfig

FAST = 0.1  # the liveness interval in these tests
TIMEOUT = 0.5


def _fast_liveness(deployment) -> None:
    deployment.server.config.liveness_interval = FAST
    deployment.server.config.liveness_timeout = TIMEOUT


def _tunnel(deployment):
    wait_until(lambda: len(deployment.server.tunnels) == 1, message="registration")
    return next(iter(deployment.server.tunnels))


def _events(control: smux.Stream, reader: EventReader, until, timeout: float = 5.0) -> list[dict]:
    """Read control messages until ``until(events)``; returns them all."""
    events: list[dict] = []
    with gevent.Timeout(timeout, AssertionError(f"no matching control messages in {timeout} s: {events}")):
        while not until(events):
            data = control.recv(4096)
            assert data, f"the control stream ended; messages so far: {events}"
            events += reader.feed(data)
    return events


def test_a_tun2g_client_is_watched_by_control_pings_not_health_requests(plain_deployment, backend, start_client):
    _fast_liveness(plain_deployment)
    plain_deployment.server.config.liveness_timeout = 5.0  # pings come every interval, not every timeout
    url, _app = backend
    running = start_client(plain_deployment.client_config(plain_deployment.grant(), url))
    tunnel = _tunnel(plain_deployment)
    wait_until(lambda: tunnel.pings_answered >= 5, timeout=10, message="five pongs within two timeouts")
    assert running.client.health_checks == 0  # no GET /health stream was ever opened
    assert tunnel.phi < 1
    assert (tunnel.session._keepalive_interval, tunnel.session._keepalive_timeout) == LIVENESS_KEEPALIVE
    client_session = running.client._session
    assert (client_session._keepalive_interval, client_session._keepalive_timeout) == LIVENESS_KEEPALIVE
    backends = plain_deployment.server.get_all_backends()
    assert len(backends) == 1 and backends[0].usable


def test_the_reply_names_the_liveness_check_and_pings_carry_increasing_seqs(plain_deployment):
    _fast_liveness(plain_deployment)
    session, control, reply = _handshake(plain_deployment, 2, plain_deployment.grant())
    try:
        assert reply["ok"] is True and reply["liveness"] == {"interval": FAST, "timeout": TIMEOUT}
        reader = EventReader()
        events = _events(control, reader, lambda events: len(events) >= 1)
        assert events[0] == {"event": "ping", "seq": 1}
        control.sendall(encode_event("pong", seq=1))
        events = _events(control, reader, lambda events: any(e.get("seq") == 2 for e in events))
        tunnel = _tunnel(plain_deployment)
        assert tunnel.pings_answered == 1 and not tunnel.is_closed
    finally:
        session.close()


@pytest.fixture
def pinged(plain_deployment):
    """A hand-made level-2 session whose first ping has arrived: (session, control stream, tunnel, when)."""
    _fast_liveness(plain_deployment)
    session, control, _reply = _handshake(plain_deployment, 2, plain_deployment.grant())
    try:
        tunnel = _tunnel(plain_deployment)
        registered = time.monotonic()
        assert _events(control, EventReader(), lambda events: len(events) >= 1) == [{"event": "ping", "seq": 1}]
        yield session, control, tunnel, registered
    finally:
        session.close()


def test_a_peer_that_never_answers_is_declared_dead_after_the_timeout(plain_deployment, pinged):
    session, _control, tunnel, started = pinged
    assert session.wait_closed(10), "the server kept a tunnel that answers no ping"
    assert time.monotonic() - started >= TIMEOUT * 0.9
    wait_until(lambda: len(plain_deployment.server.tunnels) == 0, message="deregistration")
    assert tunnel.is_closed and tunnel.pings_answered == 0


def test_malformed_and_unsolicited_liveness_messages_count_for_nothing(pinged):
    session, control, tunnel, _started = pinged
    junk = [b'{"event":"pong"}\n', b'{"event":"pong","seq":"1"}\n', b'{"event":"pong","seq":1.0}\n',
            b'{"event":"pong","seq":99}\n', b'{"event":"pong","seq":true}\n', b'{"event":"pong","seq":[1]}\n',
            b'{"event":"ping","seq":1}\n', b"not json\n", b'{"event":"pong","seq":' + b"9" * 500 + b"}\n",
            b"[1,2,3]\n", b'{"event":7}\n']
    for line in junk * 20:
        control.sendall(line)
    assert session.wait_closed(10), "junk pongs kept a tunnel alive"
    assert tunnel.pings_answered == 0
    assert tunnel.session.buffered_bytes == 0  # the server read and dropped everything


def test_a_peer_flooding_pings_gets_no_answers_and_stays_up_while_it_answers(plain_deployment):
    _fast_liveness(plain_deployment)
    session, control, reply = _handshake(plain_deployment, 2, plain_deployment.grant())
    tunnel = _tunnel(plain_deployment)
    got: list[dict] = []

    def answer():
        reader = EventReader()
        control.settimeout(None)
        while True:
            data = control.recv(4096)
            if not data:
                return
            for event in reader.feed(data):
                got.append(event)
                if event["event"] == "ping":
                    control.sendall(encode_event("pong", seq=event["seq"]))

    answering = gevent.spawn(answer)
    try:
        flood = encode_event("ping", seq=1) * 200
        for _ in range(20):
            control.sendall(flood)
            gevent.sleep(FAST / 4)  # the flood's cadence, not synchronisation
        wait_until(lambda: tunnel.pings_answered >= 5, message="the server's own pings answered")
        assert not tunnel.is_closed and not session.is_closed
        assert all(event["event"] == "ping" for event in got)  # the server never answered one of ours
    finally:
        answering.kill()
        session.close()


def test_a_level_1_tun2g_client_still_gets_the_http_health_ping(plain_deployment):
    plain_deployment.server.config.ping_interval = FAST
    session, control, reply = _handshake(plain_deployment, 1, plain_deployment.grant())
    try:
        assert "liveness" not in reply
        stream = session.accept_stream(timeout=5)
        stream.settimeout(5)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += stream.recv(4096)
        assert head == PING_REQUEST
    finally:
        session.close()


def test_liveness_settings_are_validated(plain_deployment):
    for name in ("liveness_interval", "liveness_timeout"):
        with pytest.raises(ConfigurationError, match=name):
            ServerConfig(storage=plain_deployment.storage, **{name: 0})
    assert json.loads(encode_event("ping", seq=3)) == {"event": "ping", "seq": 3}


def test_the_liveness_flags_set_the_cadence_and_the_bound(tmp_path, data_dir, backend, start_client):
    deployment = _start(tmp_path, data_dir, plain=True, liveness_interval=FAST, liveness_timeout=TIMEOUT)
    try:
        assert (deployment.server.config.liveness_interval, deployment.server.config.liveness_timeout) == (FAST, TIMEOUT)
        start_client(deployment.client_config(deployment.grant(), backend[0]))
        tunnel = _tunnel(deployment)
        # At the default 15 s interval five pongs would take over a minute.
        wait_until(lambda: tunnel.pings_answered >= 5, timeout=10, message="five pongs at the set cadence")
    finally:
        deployment.running.stop()


def test_an_idle_tun2g_tunnel_holds_no_server_greenlet(tls_deployment, backend, start_client):
    """Its smux reads and its control messages are read from event-loop callbacks; the greenlet that
    ran its handshake and Auth is gone once it is registered, and its clean-up still runs at the end."""
    _fast_liveness(tls_deployment)
    tls_deployment.server.config.liveness_timeout = 5.0
    server = tls_deployment.server
    baseline = len(server._tasks)
    running = start_client(tls_deployment.client_config(tls_deployment.grant(), backend[0]))
    tunnel = _tunnel(tls_deployment)
    wait_until(lambda: len(server._tasks) == baseline, message="the connection's greenlet to end")
    assert tunnel.session.greenlets == []
    wait_until(lambda: tunnel.pings_answered >= 3, timeout=10, message="pongs read without a greenlet")
    response = requests.get(tls_deployment.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
    assert response.status_code == 200
    running.close()
    wait_until(lambda: len(server.tunnels) == 0, message="the tunnel forgotten when its session closed")
    assert server._per_token == {} and server._per_user == {}
