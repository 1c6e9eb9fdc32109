"""Helpers for the HTTP layer's real-socket tests: a tiny proxy built on tun2g.http, raw-socket utilities."""

import socket

from gevent.event import Event
from gevent.server import StreamServer

from tun2g.http import (BackendPool, DownstreamError, HTTPError, MessageReader, UpstreamError, forward_exchange,
                        simple_response)


class TestProxy:
    """A reverse proxy to one backend, the way tun2g's ends use this package: reader + forward_exchange."""

    __test__ = False

    def __init__(self, backend_port: int) -> None:
        self.pool = BackendPool(f"http://127.0.0.1:{backend_port}")
        self.results = []
        self.errors = []
        self.connections = 0
        self.connection_done = Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, sock, _address) -> None:
        self.connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = MessageReader(sock, max_head_size=16384)
        try:
            while True:
                try:
                    head = reader.read_request_head()
                except HTTPError as exc:
                    sock.sendall(simple_response(exc.status, exc.message.encode(), close=True))
                    return
                if head is None or not self._proxy(head, reader, sock):
                    return
        except OSError as exc:
            self.errors.append(exc)
        finally:
            sock.close()
            self.connection_done.set()

    def _proxy(self, head, reader, sock) -> bool:
        try:
            upstream, upstream_reader = self.pool.acquire()
        except OSError as exc:
            sock.sendall(simple_response(502, f"backend unreachable: {exc}".encode(), close=True))
            return False
        reusable = False
        try:
            result = forward_exchange(head, reader, upstream, sock, upstream_reader=upstream_reader,
                                      response_filter=lambda response: response.set("X-Proxied", "1"))
            reusable = result.upstream_reusable
        except UpstreamError as exc:
            self.errors.append(exc)
            sock.sendall(simple_response(502, f"bad gateway: {exc}".encode(), close=True))
            return False
        except DownstreamError as exc:
            self.errors.append(exc)
            return False
        finally:
            self.pool.release(upstream, upstream_reader, reusable)
        self.results.append(result)
        return result.keep_alive

    def close(self) -> None:
        self.server.stop()
        self.pool.close()


def read_request(sock):
    """Read one request (head and whole body) from a raw backend's socket with MessageReader."""
    reader = MessageReader(sock)
    head = reader.read_request_head()
    body = b""
    while not reader.body_complete:
        body += reader.read_body()
    return reader, head, body


def wait_for(event: Event, what: str, timeout: float = 5.0) -> None:
    if not event.wait(timeout):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
