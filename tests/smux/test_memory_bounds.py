"""Tiny smux frames must not pin many times their size in server memory (issue 9, item 3).

Two layers: a sans-I/O/pair check of the accounting (tracemalloc, in process), and a
real `tun2g server` subprocess flooded by a raw smux writer, with its RSS (psutil)
measured. Figures for the old code are in docs/protocol.md#memory-bounds.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import gevent
import psutil
import pytest

from tests.fixtures.net import env_without_proxies
from tun2g.control import Auth
from tun2g.smux import Config, Session
from tun2g.smux.frame import PSH, SYN, encode_frame
from tun2g.storage import open_storage

MiB = 1 << 20


def tiny_frames(sid: int, payload_bytes: int, version: int = 1) -> bytes:
    """``payload_bytes`` of stream data for ``sid`` in 2-byte PSH frames."""
    return encode_frame(version, PSH, sid, b"ab") * (payload_bytes // 2)


# --- in process: what the budget counts is what the memory holds ------------------


def test_tiny_frames_on_an_unread_stream_cost_about_their_size(make_pair):
    budget = 256 * 1024
    pair = make_pair(Config(), Config(max_receive_buffer=budget, max_stream_buffer=budget,
                                      max_stream_backlog=64 * MiB))
    stream = pair.client.open_stream()
    pair.server.accept_stream(timeout=5)  # accepted, never read
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sender = gevent.spawn(stream.sendall, b"x")  # warm the path
        sender.get(timeout=5)
        raw = pair.client.transport
        blob = tiny_frames(stream.id, 2 * budget)  # twice the budget: the reader must stop at it
        writer = gevent.spawn(raw.sendall, blob)
        deadline = time.monotonic() + 20
        while pair.server._state.budget > 0 and time.monotonic() < deadline:
            gevent.sleep(0.05)  # polling state owned by the session's reader greenlet, bounded
        held = tracemalloc.get_traced_memory()[0] - before - len(blob)
    finally:
        tracemalloc.stop()
        writer.kill()
    assert pair.server._state.budget <= 0, "the reader never spent its budget"
    state = pair.server._state.streams[stream.id]
    # The payload buffered is within the budget, and the memory it holds is too (plus slack):
    # before the fix each 2-byte chunk cost ~60 bytes, i.e. ~7.5 MiB for this budget.
    assert state.buffered <= budget
    assert held < 2 * budget, f"{held} bytes held for a {budget} bytes budget"


def test_streams_the_peer_opens_are_refused_when_the_config_says_so(make_pair):
    pair = make_pair(Config(), Config(accept_peer_streams=False))
    stream = pair.client.open_stream()
    stream.sendall(b"data nobody will read" * 1000)
    with gevent.Timeout(5):
        assert stream.recv(10) == b""  # the server answered the SYN with a FIN
    assert pair.server.num_streams == 0
    assert pair.server._state.budget == pair.server.config.max_receive_buffer
    with pytest.raises(gevent.socket.timeout):
        pair.server.accept_stream(timeout=0.2)


def test_the_initial_budget_holds_until_released(make_pair):
    pair = make_pair(Config(), Config(initial_receive_buffer=64 * 1024))
    assert pair.server._state.budget == 64 * 1024
    pair.server.release_receive_buffer()
    assert pair.server._state.budget == pair.server.config.max_receive_buffer


# --- a real server process under a flood ------------------------------------------


class ServerProcess:
    """`python -m tun2g.cli server` on ephemeral ports, plain tunnel, own SQLite store."""

    def __init__(self, tmp_path):
        self.storage_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
        env = env_without_proxies()
        env["TUN2G_DATA_DIR"] = str(tmp_path)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
        self.log_path = tmp_path / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tun2g.cli", "server", "--http", "127.0.0.1:0", "--tunnel", "127.0.0.1:0",
             "--plain-tunnel", "--admin", "127.0.0.1:0", "--storage", self.storage_url, "--no-access-log",
             "--log-level", "info"],
            stdout=subprocess.DEVNULL, stderr=self._log, env=env)
        self.tunnel_port = self._wait_for_port()
        self.ps = psutil.Process(self.proc.pid)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            match = re.search(rb"event=listening.* tunnel=127\.0\.0\.1:(\d+)", self.log_path.read_bytes())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()}")
            time.sleep(0.05)  # waiting for another process's log line, bounded by the deadline
        raise AssertionError("the server did not log its tunnel port within 20 s")

    @property
    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def server_process(tmp_path):
    server = ServerProcess(tmp_path)
    yield server
    server.stop()


def _flood(sock: socket.socket, blob: bytes, stall: float = 3.0) -> int:
    """Write ``blob`` until done or until the server stops reading for ``stall`` s; bytes sent."""
    sock.settimeout(stall)
    view, sent = memoryview(blob), 0
    try:
        while sent < len(view):
            sent += sock.send(view[sent:sent + 256 * 1024])
    except (socket.timeout, OSError):
        pass
    return sent


def _drain_in_background(sock: socket.socket) -> threading.Thread:
    """Read (and drop) what the server sends, so its writer never blocks on us."""
    def run():
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _settled_rss(server: ServerProcess) -> int:
    """RSS once it stopped moving (the server may still be digesting the last bytes)."""
    last, deadline = server.rss, time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)  # sampling another process's memory, bounded by the deadline
        now = server.rss
        if abs(now - last) < MiB // 2:
            return now
        last = now
    return last


def test_unauthenticated_tiny_frame_flood_holds_little_server_memory(server_process):
    """5 client-opened streams, 1 MiB each in 2-byte frames, never authenticated: the
    old server pinned 38 MiB per such connection (its 4 MiB budget counted payload only),
    this one holds under 1 MiB (the streams are refused, the pre-auth budget is 64 KiB)."""
    connections, blob = 1, b"".join(encode_frame(1, SYN, sid) + tiny_frames(sid, 1 * MiB)
                                    for sid in range(3, 13, 2))
    baseline = _settled_rss(server_process)
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", server_process.tunnel_port))
        _drain_in_background(sock)
        socks.append(sock)
        _flood(sock, blob)
    held = (_settled_rss(server_process) - baseline) / connections
    for sock in socks:
        sock.close()
    print(f"unauthenticated flood: {held / MiB:.1f} MiB held per connection")
    assert held < 8 * MiB, f"{held / MiB:.1f} MiB held per connection"


def test_authenticated_tiny_frame_flood_holds_little_server_memory(server_process):
    """Sessions of one valid token flooding the control stream and streams of their own:
    12.6 MiB held per connection before, under 1 MiB now (the control stream drops what
    arrives after the Auth; client-opened streams are refused)."""
    storage = open_storage(server_process.storage_url)
    storage.add_route("flood.test", "mallory")
    _info, token = storage.create_token("mallory", scopes=("connect",))
    auth = Auth(token, "flood.test").encode()
    connections = 2
    blob = tiny_frames(2, 2 * MiB) + b"".join(encode_frame(1, SYN, sid) + tiny_frames(sid, 1 * MiB)
                                             for sid in range(3, 9, 2))
    baseline = _settled_rss(server_process)
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", server_process.tunnel_port))
        sock.settimeout(5)
        assert sock.recv(8)[:2] == bytes([1, SYN])  # the control stream's SYN
        sock.sendall(encode_frame(1, PSH, 2, auth))
        _drain_in_background(sock)
        socks.append(sock)
        _flood(sock, blob)
    held = (_settled_rss(server_process) - baseline) / connections
    for sock in socks:
        sock.close()
    print(f"authenticated flood: {held / MiB:.1f} MiB held per connection")
    assert held < 8 * MiB, f"{held / MiB:.1f} MiB held per connection"
