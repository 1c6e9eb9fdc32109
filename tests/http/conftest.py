"""Fixtures for the HTTP layer's real-socket tests: proxies built on tun2g.http, and backends."""

import pytest
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from .support import TestProxy


@pytest.fixture
def proxy_to():
    """proxy_to(backend_port) -> a started TestProxy; all are stopped after the test."""
    proxies = []

    def start(backend_port: int) -> TestProxy:
        proxies.append(TestProxy(backend_port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def wsgi_backend():
    """wsgi_backend(app) -> port of a gevent.pywsgi server running app."""
    servers = []

    def start(app) -> int:
        server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def raw_backend():
    """raw_backend(handler) -> port of a StreamServer calling handler(sock) per connection."""
    servers = []

    def start(handler) -> int:
        def serve(sock, _address):
            try:
                handler(sock)
            except OSError:
                pass
            finally:
                sock.close()
        server = StreamServer(("127.0.0.1", 0), serve)
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop()
