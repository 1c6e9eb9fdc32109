"""The tun2g client's side of the liveness check (docs/protocol.md#liveness): it answers the
server's pings, and a server flooding pings gets a bounded number of pongs."""

from __future__ import annotations

import json
import socket

import gevent

from tests.fixtures.tunnel import wait_until
from tun2g import smux
from tun2g.client import Client, ClientConfig
from tun2g.client.client import PONG_BURST, PONG_RATE
from tun2g.control import MAX_AUTH_SIZE, EventReader, JSONObjectReader, encode_event, encode_reply


class PingingServer:
    """A hand-made tun2 server: opens the control stream, reads the Auth, replies ok, then pings."""

    def __init__(self, reply_delay: float = 0.0):
        self.reply_delay = reply_delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.auth: dict | None = None
        self.pongs: list[dict] = []
        self.session: smux.Session | None = None
        self.control: smux.Stream | None = None
        self.ready = gevent.event.Event()
        self._greenlet = gevent.spawn(self._serve)

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.listener.getsockname()[1]

    def _serve(self):
        sock, _ = self.listener.accept()
        self.session = smux.Session(sock, client=False, config=smux.Config.tun2_server())
        control = self.control = self.session.open_stream()
        reader = JSONObjectReader(MAX_AUTH_SIZE)
        while self.auth is None:
            self.auth = reader.feed(control.recv(4096))
        if self.auth.get("tun2g", 0) >= 1:
            self.session.upgrade()
        gevent.sleep(self.reply_delay)  # a loaded server, slow to check the Auth
        control.sendall(encode_reply(True, backend="b" * 16, domain=self.auth["domain"], node="test",
                                     liveness={"interval": 15, "timeout": 10}))
        self.ready.set()
        events = EventReader()
        try:
            while data := control.recv(4096):
                self.pongs += events.feed(data)
        except smux.SessionClosedError:
            pass  # the test ended the client

    def close(self):
        self._greenlet.kill()
        if self.session is not None:
            self.session.close()
        self.listener.close()


def _client(server: PingingServer) -> tuple[Client, gevent.Greenlet]:
    config = ClientConfig(server_addr=server.address, token="t", domain="app.test", backend_url="http://127.0.0.1:9",
                          plain=True, reconnect=False)
    client = Client(config)
    return client, gevent.spawn(client.run)


def test_the_client_asks_for_the_liveness_check_and_answers_each_ping():
    server = PingingServer()
    client, running = _client(server)
    try:
        assert server.ready.wait(10)
        assert server.auth["tun2g"] == 2
        for seq in (1, 2, 3):
            server.control.sendall(encode_event("ping", seq=seq))
            wait_until(lambda: len(server.pongs) == seq, message=f"pong {seq}")
        assert server.pongs == [{"event": "pong", "seq": 1}, {"event": "pong", "seq": 2}, {"event": "pong", "seq": 3}]
    finally:
        client.close()
        running.join(5)
        server.close()


def test_a_server_flooding_pings_gets_a_bounded_number_of_pongs():
    server = PingingServer()
    client, running = _client(server)
    try:
        assert server.ready.wait(10)
        started = gevent.get_hub().loop.now()
        flood = b"".join(encode_event("ping", seq=seq) for seq in range(1000))
        server.control.sendall(flood + b'{"event":"ping","seq":"x"}\n{"event":"ping"}\n' + encode_event("ping", seq=-1))
        wait_until(lambda: len(server.pongs) >= PONG_BURST, message="the first pongs")
        server.control.sendall(encode_event("ping", seq=5000))  # still connected, still reading
        gevent.sleep(0.3)  # the window in which extra pongs would show; the bound below is what is tested
        elapsed = gevent.get_hub().loop.now() - started
        assert len(server.pongs) <= PONG_BURST + PONG_RATE * elapsed + 1
        assert all(type(pong["seq"]) is int for pong in server.pongs)
        assert not client._session.is_closed
        assert json.loads(encode_event("pong", seq=1)) == {"event": "pong", "seq": 1}
    finally:
        client.close()
        running.join(5)
        server.close()


def test_a_reply_later_than_the_grace_still_confirms_and_pings_are_answered(monkeypatch):
    from tun2g.client import client as client_module

    monkeypatch.setattr(client_module, "REPLY_GRACE", 0.2)
    server = PingingServer(reply_delay=1.0)  # no request comes: only the late reply can confirm us
    client, running = _client(server)
    try:
        assert server.ready.wait(10)
        wait_until(lambda: client.backend_id == "b" * 16, message="the late reply taken")
        server.control.sendall(encode_event("ping", seq=1))
        wait_until(lambda: server.pongs == [{"event": "pong", "seq": 1}], message="the pong")
        assert client._session._keepalive_interval == 20.0  # the reply named the liveness check
    finally:
        client.close()
        running.join(5)
        server.close()
