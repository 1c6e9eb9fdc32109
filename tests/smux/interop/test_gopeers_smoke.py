"""The Go reference peers build offline and behave as their flags say, Go against Go."""

import http.server
import queue
import threading

import pytest
import requests

from tests.fixtures.gopeers import GoPeerUnavailable, build_go_binary


def test_unknown_peer_name_fails_with_a_clear_message():
    with pytest.raises(GoPeerUnavailable, match="no Go peer named 'nosuchpeer'"):
        build_go_binary("nosuchpeer")


def test_missing_go_tells_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GoPeerUnavailable, match="run scripts/install-test-deps"):
        build_go_binary("smuxpeer")


def test_build_is_cached_by_source_hash(go_binary):
    assert build_go_binary("smuxpeer") == go_binary("smuxpeer")


@pytest.mark.parametrize("version", [1, 2])
def test_go_smuxpeer_check_against_go_echo(go_peer, version):
    echo = go_peer("smuxpeer", "--listen", "127.0.0.1:0", "--mode", "echo", "--version", version)
    port = echo.wait_for(r"READY port=(\d+)").group(1)
    check = go_peer("smuxpeer", "--dial", f"127.0.0.1:{port}", "--mode", "check", "--version", version,
                    "--streams", "12", "--sizes", "0,1,32769,1048576")
    result = check.wait_for(r"CHECK ok=(\d+) failed=(\d+) ids=([\d,]+)")
    assert result.group(1, 2) == ("12", "0")
    assert sorted(int(i) for i in result.group(3).split(",")) == list(range(3, 27, 2))
    assert check.wait_exit() == 0


class _HelloBackend(http.server.BaseHTTPRequestHandler):
    seen: "queue.Queue[tuple[str, str]]"  # (path, Host) of every request, set per fixture

    def do_GET(self):
        self.seen.put((self.path, self.headers["Host"]))
        body = f"hello {self.path} via {self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def backend_requests():
    """Every (path, Host) the hello backend served, in order."""
    return queue.Queue()


@pytest.fixture
def hello_backend(backend_requests):
    handler = type("Handler", (_HelloBackend,), {"seen": backend_requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_go_tun2_client_and_server_route_by_host(go_peer, hello_backend):
    server = go_peer("tun2server", "--avoid-auth-race", "--token", "tok1", "--domain", "lb.test")
    tunnel_port, http_port = server.wait_for(r"READY tunnel=(\d+) http=(\d+)").groups()
    client = go_peer("tun2client", "--server", f"127.0.0.1:{tunnel_port}", "--token", "tok1",
                     "--domain", "lb.test", "--backend", hello_backend)
    assert client.wait_for(r"AUTH-SENT id=(\d+)").group(1) == "2"
    server.wait_for(r"REGISTERED domain=lb.test")

    routed = requests.get(f"http://127.0.0.1:{http_port}/x", headers={"Host": "lb.test"}, timeout=5)
    assert (routed.status_code, routed.text) == (200, "hello /x via lb.test")

    unrouted = requests.get(f"http://127.0.0.1:{http_port}/", headers={"Host": "other.test",
                                                                       "X-Request-Id": "r1"}, timeout=5)
    assert unrouted.status_code == 502
    assert "Please ensure a backend is running for other.test. This is request ID r1." in unrouted.text


def test_go_tun2_server_closes_session_on_wrong_token(go_peer, hello_backend):
    server = go_peer("tun2server", "--avoid-auth-race", "--token", "tok1", "--domain", "lb.test")
    tunnel_port = server.wait_for(r"READY tunnel=(\d+)").group(1)
    client = go_peer("tun2client", "--server", f"127.0.0.1:{tunnel_port}", "--token", "bad",
                     "--domain", "lb.test", "--backend", hello_backend)
    server.wait_for(r"REJECTED token=bad domain=lb.test")
    client.wait_for(r"SESSION-END")
    assert client.wait_exit() == 1


def test_go_tun2_peers_speak_tls(go_peer, hello_backend, kcp_certs):
    server = go_peer("tun2server", "--avoid-auth-race", "--token", "tok1", "--domain", "lb.test",
                     "--cert", kcp_certs.cert_file, "--key", kcp_certs.key_file)
    tunnel_port, http_port = server.wait_for(r"READY tunnel=(\d+) http=(\d+)").groups()
    go_peer("tun2client", "--server", f"127.0.0.1:{tunnel_port}", "--tls", "--ca", kcp_certs.ca_file,
            "--token", "tok1", "--domain", "lb.test", "--backend", hello_backend)
    server.wait_for(r"REGISTERED domain=lb.test")
    routed = requests.get(f"http://127.0.0.1:{http_port}/tls", headers={"Host": "lb.test"}, timeout=5)
    assert (routed.status_code, routed.text) == (200, "hello /tls via lb.test")


def test_go_tun2_server_pings_the_backend_through_the_tunnel(go_peer, hello_backend, backend_requests):
    server = go_peer("tun2server", "--avoid-auth-race", "--token", "tok1", "--domain", "lb.test",
                     "--ping-interval", "200ms")
    tunnel_port = server.wait_for(r"READY tunnel=(\d+)").group(1)
    go_peer("tun2client", "--server", f"127.0.0.1:{tunnel_port}", "--token", "tok1", "--domain", "lb.test",
            "--backend", hello_backend)
    assert backend_requests.get(timeout=5) == ("/health", "backend")
    assert backend_requests.get(timeout=5) == ("/health", "backend")
