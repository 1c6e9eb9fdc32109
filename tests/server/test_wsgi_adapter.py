"""The WSGI front and the requests adapter: the same routing through Server.round_trip."""

import hashlib

import pytest
import requests
from gevent.pywsgi import WSGIServer

from tests.fixtures.backends import pattern_bytes, pattern_digest
from tests.fixtures.tunnel import DOMAIN
from tun2g import pages
from tun2g.server.wsgi import WSGIFront


@pytest.fixture
def wsgi_url(tunnel):
    deployment, _app, _client = tunnel
    server = WSGIServer(("127.0.0.1", 0), WSGIFront(deployment.server), log=None, error_log=None)
    server.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.stop(timeout=1)


def test_wsgi_front_routes_by_host(wsgi_url):
    response = requests.get(wsgi_url + "/headers?q=1", headers={"Host": DOMAIN, "X-Request-Id": "w1"}, timeout=10)
    assert response.status_code == 200
    seen = response.json()
    assert seen["headers"]["Host"] == DOMAIN and seen["query"] == "q=1"
    assert seen["headers"]["X-Forwarded-For"].startswith("127.0.0.1")
    assert response.headers["X-Request-Id"] == "w1"


def test_wsgi_front_streams_both_ways(wsgi_url):
    size = 8 * 1024 * 1024
    download = requests.get(wsgi_url + f"/chunked/{size}", headers={"Host": DOMAIN}, timeout=30)
    assert hashlib.sha256(download.content).hexdigest() == pattern_digest(size)
    upload = requests.post(wsgi_url + "/sink", data=pattern_bytes(size), headers={"Host": DOMAIN}, timeout=30)
    assert upload.json() == {"sha256": pattern_digest(size), "length": size}


def test_wsgi_front_no_backend_page(wsgi_url):
    response = requests.get(wsgi_url + "/", headers={"Host": "nobody.test", "X-Request-Id": "z"}, timeout=10)
    assert response.status_code == 502 and response.content == pages.no_backends("nobody.test", "z").body


def test_requests_adapter(tunnel):
    deployment, _app, _client = tunnel
    with requests.Session() as session:
        session.mount("http://", deployment.server.adapter())
        assert session.get(f"http://{DOMAIN}/status/201", timeout=10).status_code == 201
        posted = session.post(f"http://{DOMAIN}/sink", data=b"abc", timeout=10).json()
        assert posted == {"sha256": hashlib.sha256(b"abc").hexdigest(), "length": 3}
        streamed = session.post(f"http://{DOMAIN}/sink", data=pattern_bytes(1 << 20), timeout=10).json()
        assert streamed["length"] == 1 << 20
        big = session.get(f"http://{DOMAIN}/bytes/3000000", stream=True, timeout=10)
        assert sum(len(piece) for piece in big.iter_content(65536)) == 3000000
        assert session.get("http://nobody.test/", timeout=10).status_code == 502
