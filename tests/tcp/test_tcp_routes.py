"""TCP routes end to end in one process: a real server, a real client, real sockets on both sides."""

from __future__ import annotations

import hashlib
import socket
import struct

import gevent
import pytest
from gevent.server import StreamServer

from tests.fixtures.net import free_port
from tests.fixtures.tunnel import USER, _start, wait_until
from tun2g.client.tcp_forward import TCPForwarder
from tun2g.storage.tcp_route import new_tcp_route


@pytest.fixture
def tcp_deployment(tmp_path, data_dir):
    deployment = _start(tmp_path, data_dir, plain=True)
    deployment.server.tcp.settings.refresh_interval = 0.05
    yield deployment
    deployment.running.stop()


@pytest.fixture
def local_echo():
    """A local TCP service: echoes until the peer's FIN, then sends b"<bye>" and half-closes itself."""

    def handle(conn, _address):
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.sendall(b"<bye>")
        conn.shutdown(socket.SHUT_WR)
        conn.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    yield server.address[1]
    server.stop(timeout=1)


def _route(deployment, port: int, user: str = USER, **policy) -> str:
    deployment.storage.add_tcp_route(new_tcp_route(f"tcp:127.0.0.1:{port}", user, 0.0, **policy))
    wait_until(lambda: port in deployment.server.tcp.listening_ports(), message=f"a listener on {port}")
    return deployment.grant()


def _serve(deployment, start_client, token: str, specs, **options):
    config = deployment.client_config(token, "http://127.0.0.1:9", tcp=TCPForwarder.from_specs(specs), **options)
    return start_client(config)


def _echoing_port(deployment, start_client, local_echo: int) -> int:
    """A TCP route of alice's, served by her client from the local echo service; its port."""
    port = free_port()
    _serve(deployment, start_client, _route(deployment, port), [f"{port}=127.0.0.1:{local_echo}"])
    return port


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_bytes_flow_both_ways_and_a_public_half_close_reaches_the_local_service(tcp_deployment, start_client,
                                                                                  local_echo):
    port = _echoing_port(tcp_deployment, start_client, local_echo)
    with _connect(port) as sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        sock.shutdown(socket.SHUT_WR)  # our FIN must reach the echo service, which then answers and FINs
        assert _read_all(sock) == b"<bye>"


def test_a_local_half_close_reaches_the_public_peer_which_may_go_on_sending(tcp_deployment, start_client):
    received = gevent.event.AsyncResult()

    def handle(conn, _address):  # sends first, half-closes, then reads what the public peer sends after
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.set(_read_all(conn))
        conn.close()

    local = StreamServer(("127.0.0.1", 0), handle)
    local.start()
    try:
        port = free_port()
        token = _route(tcp_deployment, port)
        _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{local.address[1]}"])
        with _connect(port) as sock:
            data = b""
            while not data.endswith(b"banner"):
                piece = sock.recv(64)
                assert piece, "EOF before the banner"
                data += piece
            assert sock.recv(64) == b""  # the local FIN arrived
            sock.sendall(b"after your FIN")
            sock.shutdown(socket.SHUT_WR)
            assert received.get(timeout=10) == b"after your FIN"
    finally:
        local.stop(timeout=1)


@pytest.mark.parametrize("size", [64 << 20, pytest.param(1 << 30, marks=pytest.mark.slow)], ids=["64MiB", "1GiB"])
def test_a_big_transfer_both_ways_keeps_every_byte_in_flat_memory(tcp_deployment, start_client, local_echo, size):
    import psutil

    process = psutil.Process()
    rss_before = process.memory_info().rss
    peak = [rss_before]
    port = free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{local_echo}"])
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    sent = hashlib.sha256()
    with _connect(port) as sock:
        def upload():
            for index in range(size // len(block)):
                sock.sendall(block)
                sent.update(block)
                if index % 256 == 0:
                    peak[0] = max(peak[0], process.memory_info().rss)
            sock.shutdown(socket.SHUT_WR)

        writer = gevent.spawn(upload)
        got, total = hashlib.sha256(), 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got.update(data)
            total += len(data)
        writer.get(timeout=60)
    sent.update(b"<bye>")
    assert total == size + 5
    assert got.hexdigest() == sent.hexdigest()
    # Server, client and both peers live in this process: the windows bound what is buffered.
    assert peak[0] - rss_before < 96 << 20, f"memory grew by {(peak[0] - rss_before) >> 20} MiB"


def test_a_refused_local_dial_resets_the_public_connection_at_once(tcp_deployment, start_client):
    port, dead = free_port(), free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{dead}"])
    with _connect(port) as sock:
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(1)
    assert tcp_deployment.server.metrics.tcp_connections["local_refused"].value == 1


def test_a_client_claiming_a_port_it_does_not_own_is_rejected(tcp_deployment, start_client):
    port = free_port()
    _route(tcp_deployment, port, user="bob")
    token = tcp_deployment.grant()  # alice's
    config = tcp_deployment.client_config(token, "http://127.0.0.1:9", reconnect=False,
                                          tcp=TCPForwarder.from_specs([f"{port}=127.0.0.1:22"]))
    running = start_client(config, wait=False)
    assert running.rejected.wait(10)
    assert "does not belong" in str(running.error)
    unrouted = free_port()
    config = tcp_deployment.client_config(token, "http://127.0.0.1:9", reconnect=False,
                                          tcp=TCPForwarder.from_specs([f"{unrouted}=127.0.0.1:22"]))
    running = start_client(config, wait=False)
    assert running.rejected.wait(10)
    assert "no TCP route" in str(running.error)


def test_denied_addresses_and_connections_past_the_cap_are_reset(tcp_deployment, start_client, local_echo):
    port = free_port()
    token = _route(tcp_deployment, port, deny=("127.0.0.0/8",))
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{local_echo}"])
    with _connect(port) as sock, pytest.raises(ConnectionResetError):
        sock.sendall(b"x")
        sock.recv(1)
    assert tcp_deployment.server.metrics.tcp_connections["refused_by_policy"].value == 1

    capped = free_port()
    tcp_deployment.storage.add_tcp_route(new_tcp_route(f"tcp:127.0.0.1:{capped}", USER, 0.0, max_connections=3))
    wait_until(lambda: capped in tcp_deployment.server.tcp.listening_ports(), message="the capped listener")
    # the client above does not announce `capped`: reconnect one that does
    _serve(tcp_deployment, start_client, tcp_deployment.grant(), [f"{capped}=127.0.0.1:{local_echo}"])
    held = [_connect(capped) for _ in range(3)]
    for sock in held:
        sock.sendall(b"p")
        assert sock.recv(1) == b"p"
    flood = [_connect(capped) for _ in range(20)]
    for sock in flood:
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(1)
        sock.close()
    assert tcp_deployment.server.metrics.tcp_connections["over_cap"].value == 20
    for sock in held:
        sock.close()
    # Per route too: each route's own refusals, and the bytes of the connections it served.
    routes = {r.label: r for r in tcp_deployment.server.metrics.all_tcp_routes()}
    assert routes[f"tcp:{port}"].connections["refused_by_policy"] == 1
    assert routes[f"tcp:{capped}"].connections["over_cap"] == 20
    wait_until(lambda: routes[f"tcp:{capped}"].connections["served"] == 3, message="the held ones counted")
    assert routes[f"tcp:{capped}"].bytes_in == 3  # one byte each
    assert routes[f"tcp:{capped}"].bytes_out == 3 * len(b"p<bye>")  # its echo, then the service's goodbye
    text = tcp_deployment.server.metrics.exposition().decode()
    assert f'tun2g_tcp_route_connections_total{{outcome="over_cap",route="tcp:{capped}"}} 20.0' in text


def test_per_route_tcp_metrics_are_capped_like_domains():
    from tun2g.metrics import Metrics

    metrics = Metrics(domain_cap=2)
    labels = {metrics.tcp_route(f"tcp:{port}").label for port in range(1000, 1010)}
    assert labels == {"tcp:1000", "tcp:1001", "other"}
    assert {r.label for r in metrics.all_tcp_routes()} == {"tcp:1000", "tcp:1001", "other", "none"}


def test_port_zero_gets_a_port_of_the_range_released_when_the_client_leaves(tmp_path, data_dir, start_client,
                                                                          local_echo):
    first = free_port()
    deployment = _start(tmp_path, data_dir, plain=True, tcp_ports=f"{first}-{first}")
    try:
        token = deployment.grant()
        client = _serve(deployment, start_client, token, [f"0=127.0.0.1:{local_echo}"])
        assert f"tcp://127.0.0.1:{first}" in client.client.public_urls
        with _connect(first) as sock:
            sock.sendall(b"auto")
            assert sock.recv(4) == b"auto"
        client.close()
        wait_until(lambda: first not in deployment.server.tcp.listening_ports(), message="the port released")
    finally:
        deployment.running.stop()


def test_a_thousand_concurrent_connections_on_one_client(tcp_deployment, start_client, local_echo):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 5000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    port = free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{local_echo}"])
    socks = [_connect(port) for _ in range(1000)]
    try:
        for index, sock in enumerate(socks):
            sock.sendall(struct.pack("!I", index))
        for index, sock in enumerate(socks):
            assert sock.recv(4) == struct.pack("!I", index)
        assert tcp_deployment.server.metrics.tcp_open.value == 1000
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: tcp_deployment.server.metrics.tcp_open.value == 0, timeout=20, message="all closed")


def test_junk_preambles_are_dropped_by_the_client_which_goes_on_serving(tcp_deployment, start_client, local_echo):
    port = free_port()
    token = _route(tcp_deployment, port)
    _serve(tcp_deployment, start_client, token, [f"{port}=127.0.0.1:{local_echo}"])
    tunnel = next(iter(tcp_deployment.server.tunnels))
    for junk in (b"\x00t2g\x09\x01\x00\x00", b"\x00t2g\x01\x01\xff\xff" + b"x" * 100,
                 b"\x00t2g\x01\x01\x00\x0c{\"port\":9999}", b"\x00\x00\x00"):
        stream = tunnel.open_stream()
        stream.settimeout(10)
        stream.sendall(junk)
        stream.shutdown(socket.SHUT_WR)
        answer = stream.recv(16)
        assert answer in (b"", b"\x02"), answer  # closed, or "unreachable" for a port it does not serve
        stream.close()
    with _connect(port) as sock:
        sock.sendall(b"still")
        assert sock.recv(5) == b"still"


def test_a_client_without_tcp_services_is_never_sent_a_tcp_stream(tcp_deployment, start_client, backend):
    url, _app = backend
    port = free_port()
    token = _route(tcp_deployment, port)
    start_client(tcp_deployment.client_config(token, url))  # an HTTP-only client (as a Go tun2 client is)
    with _connect(port) as sock, pytest.raises(ConnectionResetError):
        sock.sendall(b"x")
        sock.recv(1)
    assert tcp_deployment.server.metrics.tcp_connections["no_tunnel"].value == 1
    assert tcp_deployment.server.metrics.tcp_connections["served"].value == 0


def test_a_port_given_to_another_user_is_no_longer_served_by_the_old_owners_tunnel(tcp_deployment, start_client,
                                                                                     local_echo):
    port = _echoing_port(tcp_deployment, start_client, local_echo)
    tcp = tcp_deployment.server.tcp
    assert f"tcp:{port}" in tcp.served_names()
    # The operator removes the route and grants the port to bob: two SQLite calls with no yield between,
    # so the route watcher reads both at once (the port never looks removed).
    tcp_deployment.storage.remove_tcp_route(port)
    tcp_deployment.storage.add_tcp_route(new_tcp_route(f"tcp:127.0.0.1:{port}", "bob", 0.0))
    wait_until(lambda: f"tcp:{port}" not in tcp.served_names(), message="alice's tunnel no longer serving the port")
    assert port in tcp.listening_ports()  # still bob's route, listened on
    with _connect(port) as sock, pytest.raises(ConnectionResetError):
        sock.sendall(b"x")
        sock.recv(1)
