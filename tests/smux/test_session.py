"""Python<->Python smux sessions over real loopback connections."""

import http.client
import os
import socket
import ssl

import gevent
import pytest
from gevent.event import Event

from tests.fixtures.tunnel import wait_until
from tests.smux.conftest import PSH, assert_session_finished, quiet_config, read_to_eof, serve_echo, sha256, tcp_pair
from tun2g.smux import Config, Session, SessionClosedError, StreamIdsExhaustedError


def test_stream_ids_follow_go_smux(pair):
    client_streams = [pair.client.open_stream() for _ in range(3)]
    server_streams = [pair.server.open_stream() for _ in range(2)]
    assert [s.id for s in client_streams] == [3, 5, 7]
    assert [s.id for s in server_streams] == [2, 4]
    assert sorted(pair.server.accept_stream(timeout=5).id for _ in range(3)) == [3, 5, 7]
    assert sorted(pair.client.accept_stream(timeout=5).id for _ in range(2)) == [2, 4]


@pytest.mark.parametrize("transport", ["tcp", "socketpair"])
@pytest.mark.parametrize("size", [0, 1, 32767, 32768, 32769, 1 << 20, 8 << 20])
def test_echo_payloads_survive_byte_for_byte(make_pair, transport, size):
    pair = make_pair(transport=transport)
    serve_echo(pair.server)
    stream = pair.client.open_stream()
    payload = os.urandom(size)

    def write():
        stream.sendall(payload)
        stream.shutdown(socket.SHUT_WR)

    writer = gevent.spawn(write)
    assert sha256(read_to_eof(stream)) == sha256(payload)
    writer.get(timeout=5)
    assert stream.is_finished


def test_hundreds_of_concurrent_streams(make_pair):
    pair = make_pair()
    serve_echo(pair.server)

    def one(index):
        stream = pair.client.open_stream()
        payload = os.urandom(1000 + index * 37)
        writer = gevent.spawn(lambda: (stream.sendall(payload), stream.shutdown(socket.SHUT_WR)))
        echoed = read_to_eof(stream, 4096)
        writer.get()
        stream.close()
        return sha256(echoed) == sha256(payload)

    workers = [gevent.spawn(one, index) for index in range(300)]
    gevent.joinall(workers, timeout=30, raise_error=True)
    assert all(worker.value for worker in workers)
    assert pair.client.num_streams == 0


def test_half_close_lets_the_other_side_answer(pair):
    request = pair.client.open_stream()
    request.sendall(b"question")
    request.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        request.sendall(b"more")
    answer = pair.server.accept_stream(timeout=5)
    assert read_to_eof(answer) == b"question"
    answer.sendall(b"answer")
    answer.close()
    assert read_to_eof(request) == b"answer"
    assert request.is_finished and request.fin_received


def test_recv_and_accept_time_out(pair):
    with pytest.raises(socket.timeout):
        pair.server.accept_stream(timeout=0.05)
    stream = pair.client.open_stream()
    stream.settimeout(0.05)
    with pytest.raises(socket.timeout):
        stream.recv(10)
    stream.setblocking(False)
    with pytest.raises(BlockingIOError):
        stream.recv(10)
    assert stream.fileno() == -1
    assert stream.getpeername()[0] == "127.0.0.1"


def test_data_sent_right_after_open_is_never_lost(make_pair):
    for _ in range(50):
        pair = make_pair()
        stream = pair.client.open_stream()
        stream.sendall(b"first bytes")  # SYN and PSH leave in the same transport write
        accepted = pair.server.accept_stream(timeout=5)
        assert accepted.recv(100) == b"first bytes"


def test_peer_close_wakes_every_blocked_call(make_pair):
    pair = make_pair(quiet_config(version=2), quiet_config(version=2))
    streams = [pair.client.open_stream() for _ in range(3)]
    readers = [gevent.spawn(stream.recv, 10) for stream in streams]
    acceptor = gevent.spawn(pair.client.accept_stream)
    # A v2 writer blocks once 262144 bytes are unread by the peer.
    blocked_writer = gevent.spawn(streams[0].sendall, b"x" * (1 << 20))
    pair.server.accept_stream(timeout=5)  # the blocked calls start while this waits
    pair.server.close()
    gevent.joinall(readers + [acceptor, blocked_writer], timeout=5)
    for greenlet in readers + [acceptor, blocked_writer]:
        assert isinstance(greenlet.exception, SessionClosedError), greenlet
    assert "peer closed" in str(readers[0].exception)
    assert pair.client.is_closed
    assert_session_finished(pair.client)
    with pytest.raises(SessionClosedError):
        pair.client.open_stream()
    with pytest.raises(SessionClosedError):
        streams[1].sendall(b"late")


def test_close_is_idempotent_and_calls_back_once(pair):
    calls = []
    done = gevent.event.Event()
    pair.client.add_close_callback(lambda session: (calls.append(session), done.set()))
    pair.client.close()
    pair.client.close()
    assert done.wait(5)
    assert calls == [pair.client]
    assert "closed by the local application" in str(pair.client.close_reason)
    assert pair.client.wait_closed(0)


def test_stream_ids_run_out_with_go_away(pair):
    pair.client._state._next_id = 0xFFFFFFFF - 2
    assert pair.client.open_stream().id == 0xFFFFFFFF
    with pytest.raises(StreamIdsExhaustedError, match="no stream ids left"):
        pair.client.open_stream()
    assert not pair.client.is_closed
    pair.server._state._next_id = 0xFFFFFFFE - 2
    assert pair.server.open_stream().id == 0xFFFFFFFE
    with pytest.raises(SessionClosedError):
        pair.server.open_stream()


def test_stream_close_drops_unread_data_and_returns_budget(pair):
    stream = pair.client.open_stream()
    accepted_later = pair.server.accept_stream(timeout=5)
    accepted_later.sendall(b"y" * 100000)
    with gevent.Timeout(5):
        while pair.client._state.budget > pair.client.config.max_receive_buffer - 100000:
            stream._readable.wait()
            stream._readable.clear()
    stream.close()
    assert pair.client._state.budget == pair.client.config.max_receive_buffer
    assert stream.recv(10) == b""
    with pytest.raises(BrokenPipeError):
        stream.send(b"x")
    stream.close()
    assert pair.client.num_streams == 0


def test_makefile_works_with_http_client(pair):
    def serve():
        stream = pair.server.accept_stream()
        reader = stream.makefile("rb")
        request_line = reader.readline()
        headers = []
        while (line := reader.readline()) not in (b"\r\n", b""):
            headers.append(line)
        writer = stream.makefile("wb")
        body = b"hello over smux: " + request_line.strip()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        writer.flush()
        return headers

    server = gevent.spawn(serve)
    stream = pair.client.open_stream()
    stream.sendall(b"GET /path HTTP/1.1\r\nHost: example\r\n\r\n")
    response = http.client.HTTPResponse(stream)
    response.begin()
    assert response.status == 200
    assert response.read() == b"hello over smux: GET /path HTTP/1.1"
    assert server.get(timeout=5) == [b"Host: example\r\n"]
    text = stream.makefile("rw")
    assert text.writable() and text.readable()


def test_automatic_version_adopts_the_server_version(make_pair):
    pair = make_pair(Config(version=None), Config(version=2))
    early = pair.client.open_stream()  # queued until the server has spoken
    early_write = gevent.spawn(early.sendall, b"early")
    assert pair.client.version is None
    pair.server.open_stream().sendall(b"hello")
    from_server = pair.client.accept_stream(timeout=5)
    assert from_server.recv(10) == b"hello"
    assert pair.client.version == 2
    early_write.get(timeout=5)
    assert pair.server.accept_stream(timeout=5).recv(10) == b"early"


class CountingSocket:
    """A real socket that counts the writes a Session makes on it."""

    def __init__(self, sock):
        self.sock = sock
        self.writes = 0

    def sendall(self, data):
        self.writes += 1
        return self.sock.sendall(data)

    def sendmsg(self, buffers):
        self.writes += 1
        return self.sock.sendmsg(buffers)

    def recv(self, size):
        return self.sock.recv(size)

    def close(self):
        self.sock.close()


def test_small_frames_from_many_streams_share_transport_writes():
    client_end, server_end = tcp_pair()
    counting = CountingSocket(client_end)
    client = Session(counting, client=True, config=quiet_config())
    server = Session(server_end, client=False, config=quiet_config())
    try:
        streams = [client.open_stream() for _ in range(100)]
        senders = [gevent.spawn(stream.sendall, b"tiny") for stream in streams]
        gevent.joinall(senders, timeout=5, raise_error=True)
        for _ in streams:
            assert server.accept_stream(timeout=5).recv(10) == b"tiny"
        print(f"{counting.writes} transport writes for 200 small frames")
        assert counting.writes <= 10, f"{counting.writes} writes for 200 small frames"
    finally:
        client.close()
        server.close()


def test_sessions_run_over_tls(kcp_certs):  # kcp_certs: a throwaway CA + localhost cert (tests/fixtures/kcp.py)
    client_end, server_end = tcp_pair()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kcp_certs.cert_file, kcp_certs.key_file)
    client_context = ssl.create_default_context(cafile=kcp_certs.ca_file)
    handshake = gevent.spawn(server_context.wrap_socket, server_end, server_side=True)
    client_tls = client_context.wrap_socket(client_end, server_hostname="localhost")
    server_tls = handshake.get(timeout=5)
    client = Session(client_tls, client=True, config=Config.tun2_server().copy(version=2))
    server = Session(server_tls, client=False, config=Config.tun2_server().copy(version=2))
    try:
        serve_echo(server)
        payload = os.urandom(3 << 20)
        stream = client.open_stream()
        writer = gevent.spawn(lambda: (stream.sendall(payload), stream.shutdown(socket.SHUT_WR)))
        assert sha256(read_to_eof(stream)) == sha256(payload)
        writer.get(timeout=5)
    finally:
        client.close()
        server.close()
    assert_session_finished(client)
    assert_session_finished(server)


def test_non_blocking_and_timed_out_sends(make_pair):
    pair = make_pair(quiet_config(version=2), quiet_config(version=2))
    stream = pair.client.open_stream()
    stream.setblocking(False)
    buffer = bytearray(b"a" * 1000)
    assert stream.send(buffer) == 1000
    buffer[:] = b"b" * 1000  # the queued bytes were copied
    accepted = pair.server.accept_stream(timeout=5)
    assert accepted.recv(2000) == b"a" * 1000
    stream.settimeout(0.1)
    assert stream.gettimeout() == 0.1
    with pytest.raises(socket.timeout):  # the peer never reads: the v2 window fills up
        stream.sendall(b"c" * (1 << 20))


def test_frames_queued_in_one_loop_turn_go_out_in_one_write_without_a_writer_greenlet(make_pair):
    pair = make_pair(client_config=quiet_config(), server_config=quiet_config())
    serve_echo(pair.server)
    for _ in range(5):
        writes = pair.client._writer.writes
        stream = pair.client.open_stream()  # SYN
        stream.sendall(b"hello")            # PSH
        stream.shutdown(socket.SHUT_WR)     # FIN: all three queued before this greenlet yields
        assert read_to_eof(stream) == b"hello"
        assert pair.client._writer.writes == writes + 1
        assert pair.client._writer.greenlet is None  # the hub wrote them: no greenlet, no switch
        stream.close()
    assert pair.client.greenlets == []  # reads and writes from hub callbacks: no greenlet


def test_what_the_socket_cannot_take_goes_on_from_a_writer_greenlet_that_ends_once_written(raw_peer):
    peer = raw_peer()
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    peer.session_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    session = Session(peer.session_end, client=True, config=quiet_config())
    try:
        stream = session.open_stream()
        stream.settimeout(0)  # queued without waiting for the writer
        payload = os.urandom(4 << 20)  # far more than both socket buffers hold
        view = memoryview(payload)
        while len(view):
            view = view[stream.send(view):]
        gevent.sleep(0)  # the hub runs the write queued before this: the kernel takes a part of it
        writer = session._writer.greenlet
        assert writer is not None and not writer.dead
        peer.read_frames(lambda frames: peer.psh_bytes(stream.id) == len(payload), timeout=10)
        assert b"".join(value for cmd, sid, value in peer.frames if cmd == PSH) == payload
        writer.join(5)
        assert writer.dead and session._writer.greenlet is None
    finally:
        session.close()
    assert_session_finished(session)


class RefusesGatheredWrites(CountingSocket):
    """Like TLS sockets: sendmsg exists but refuses to run."""

    def sendmsg(self, buffers):
        raise NotImplementedError("sendmsg not allowed")


def test_a_transport_refusing_sendmsg_falls_back_to_joined_writes():
    client_end, server_end = tcp_pair()
    refusing = RefusesGatheredWrites(client_end)
    client = Session(refusing, client=True, config=quiet_config())
    server = Session(server_end, client=False, config=quiet_config())
    try:
        client.open_stream().sendall(b"x" * 100000)
        accepted = server.accept_stream(timeout=5)
        received = b""
        while len(received) < 100000:
            received += accepted.recv(1 << 20)
        assert received == b"x" * 100000 and not client.is_closed
    finally:
        client.close()
        server.close()


def test_data_queued_just_before_session_close_still_reaches_the_peer(make_pair):
    # send() returns once queued; close() must write what is queued first (a rejection
    # reply followed by closing the tunnel relies on it, as Go's blocking Write did).
    pair = make_pair(client_config=quiet_config(), server_config=quiet_config())
    stream = pair.server.open_stream()
    stream.sendall(b"x")
    accepted = pair.client.accept_stream(timeout=5)
    assert accepted.recv(1) == b"x"
    reply = b"{\"ok\": false}\n" + os.urandom(100_000)
    stream.sendall(reply)
    pair.server.close()
    assert read_to_eof_or_close(accepted) == reply


def read_to_eof_or_close(stream) -> bytes:
    """Everything the stream delivers until EOF or until its session dies."""
    data = b""
    try:
        while chunk := stream.recv(65536):
            data += chunk
    except SessionClosedError:
        pass
    return data


def test_writes_after_the_peers_fin_are_allowed_unless_the_stream_opts_out(pair):
    """Upstream half-close lets a peer read after its FIN; a tun2 client opts out (the server's FIN ends it)."""
    opener = pair.client.open_stream()
    opener.sendall(b"x")
    accepted = pair.server.accept_stream(timeout=5)
    opener.shutdown(socket.SHUT_WR)
    assert accepted.recv(10) == b"x" and accepted.recv(10) == b""  # the FIN arrived
    accepted.sendall(b"still talking")  # allowed by default: the peer may still read
    assert opener.recv(100) == b"still talking"
    accepted.peer_fin_ends_writes = True
    with pytest.raises(BrokenPipeError, match="the peer closed it"):
        accepted.sendall(b"into the void")


def test_recv_nowait_never_waits_and_tells_nothing_yet_from_the_end(make_pair):
    pair = make_pair(client_config=quiet_config(), server_config=quiet_config())
    stream = pair.client.open_stream()
    stream.sendall(b"abc")
    accepted = pair.server.accept_stream(timeout=5)
    wait_until(lambda: accepted.readable_now, timeout=5, message="the data")
    assert accepted.recv_nowait(2) == b"ab" and accepted.recv_nowait(10) == b"c"
    assert accepted.recv_nowait(10) is None  # nothing yet: no wait, no timeout
    stream.shutdown(socket.SHUT_WR)
    wait_until(lambda: accepted.readable_now, timeout=5, message="the FIN")
    assert accepted.recv_nowait(10) == b""
    second = pair.client.open_stream()
    second.sendall(b"x")
    other = pair.server.accept_stream(timeout=5)
    wait_until(lambda: other.readable_now, timeout=5, message="the second stream's data")
    assert other.recv_nowait(10) == b"x"
    pair.client.close()
    wait_until(lambda: pair.server.is_closed, timeout=5, message="the session's end")
    with pytest.raises(SessionClosedError):
        other.recv_nowait(10)


def test_on_readable_calls_back_for_data_and_eof_and_stops_when_unregistered(make_pair):
    pair = make_pair(client_config=quiet_config(), server_config=quiet_config())
    stream = pair.client.open_stream()
    stream.sendall(b"x")
    accepted = pair.server.accept_stream(timeout=5)
    calls = []
    woken = Event()

    def readable():
        calls.append(accepted.readable_now)
        woken.set()

    accepted.on_readable(readable)  # bytes are there already: called at once, from the loop
    assert woken.wait(5) and calls == [True] and accepted.recv(10) == b"x"
    assert not accepted.readable_now
    woken.clear()
    stream.sendall(b"more")
    assert woken.wait(5) and accepted.recv(10) == b"more"
    woken.clear()
    stream.shutdown(socket.SHUT_WR)  # EOF counts: recv returns b"" without waiting
    assert woken.wait(5) and accepted.readable_now and accepted.recv(10) == b""
    accepted.on_readable(None)
    before = len(calls)
    other = pair.client.open_stream()
    other.sendall(b"elsewhere")
    assert pair.server.accept_stream(timeout=5).recv(20) == b"elsewhere"
    assert len(calls) == before  # unregistered: no more calls
