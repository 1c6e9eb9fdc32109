"""Every command fed a user's mistake answers one line naming the flag, with the documented exit status.

Real subprocesses (the line and the status a shell sees), never a traceback; and one test per exit status
(docs/cli.md#exit-status): 0 for a stop on purpose, 1 at run time, 2 for the command line, 130 for Ctrl-C.
"""

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port

CLIENT = ["client", "--token", "t", "--no-inspect"]
GOOD_CLIENT = [*CLIENT, "--server", "127.0.0.1:1", "--domain", "app.localhost", "--backend", "http://127.0.0.1:3000"]
SERVER = ["server", "--http", "127.0.0.1:0", "--tunnel", "127.0.0.1:0", "--admin", "127.0.0.1:0"]


def tun2g(*args):
    return [sys.executable, "-m", "tun2g.cli", *args]


def _clean_env(data_dir) -> dict:
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(data_dir)}
    for name in ("REDIS_URL", "TUN2G_STORAGE", "TUN2G_TOKEN", "TUN2G_ADMIN", "TUN2G_ADMIN_URL", "TUN2G_TRACEBACK"):
        env.pop(name, None)
    return env


@pytest.fixture
def env(tmp_path):
    return _clean_env(tmp_path)


@pytest.fixture(scope="module")
def held_port():
    """A port something else listens on (for "Address already in use")."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text("not a certificate\n")
    return str(path)


@pytest.fixture(scope="module")
def not_json_url():
    """An HTTP server answering 200 with HTML (not a tun2g admin API)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# (argv, exit status, words the line must hold); "{held}", "{text}", "{html}" come from fixtures.
BAD_INPUTS = [
    ([*CLIENT, "--server", "127.0.0.1:1", "--domain", "a.localhost", "--backend", "http://"], 2, "--backend"),
    ([*CLIENT, "--server", "127.0.0.1:1", "--domain", "a.localhost", "--backend", "http://127.0.0.1:99999"], 2,
     "--backend"),
    ([*GOOD_CLIENT, "--ca", "{text}"], 2, "--ca"),
    ([*CLIENT, "--server", "127.0.0.1:1", "--domain", "http://app.localhost", "--backend", "http://127.0.0.1:3000"],
     2, "--domain"),
    ([*CLIENT, "--server", "127.0.0.1:1", "--domain", "*.x", "--backend", "http://127.0.0.1:3000"], 2, "--domain"),
    ([*CLIENT, "--server", "127.0.0.1:1", "--domain", "a b", "--backend", "http://127.0.0.1:3000"], 2, "--domain"),
    (["client", "--no-inspect"], 2, "--server"),
    ([*GOOD_CLIENT, "--token-file", "/nonexistent/token"], 2, "--token"),
    ([*GOOD_CLIENT, "--no-reconnect"], 1, "connection refused"),
    (["server", "--http", "127.0.0.1:99999"], 2, "--http"),
    ([*SERVER, "--storage", "mysql://x"], 2, "--storage"),
    ([*SERVER, "--ping-interval", "-1"], 2, "--ping-interval"),
    ([*SERVER, "--liveness-interval", "0"], 2, "--liveness-interval"),
    ([*SERVER, "--liveness-timeout", "soon"], 2, "--liveness-timeout"),
    ([*SERVER, "--tls-cert", "{text}"], 2, "--tls-cert"),
    ([*SERVER, "--self-service-domain", "com"], 2, "--self-service-domain"),
    ([*SERVER, "--self-service-limit", "0"], 2, "--self-service-limit"),
    ([*SERVER, "--public-url", "tunnels.example.com"], 2, "--public-url"),
    (["http", "3000", "--new-name", "--domain", "app.localhost"], 2, "--new-name"),
    (["server", "--http", "127.0.0.1:{held}", "--tunnel", "127.0.0.1:0", "--admin", "127.0.0.1:0"], 1, "--http"),
    (["server", "--http", "127.0.0.1:0", "--tunnel", "127.0.0.1:{held}", "--admin", "127.0.0.1:0"], 1, "--tunnel"),
    (["server", "--http", "127.0.0.1:0", "--tunnel", "127.0.0.1:0", "--admin", "127.0.0.1:{held}"], 1, "--admin"),
    (["server", "--http", "127.0.0.1:0", "--tunnel", "127.0.0.1:0", "--admin", "0.0.0.0:0"], 2, "--admin"),
    (["backends", "--admin", "{html}"], 1, "not a tun2g admin API"),
    (["backends", "--admin", "127.0.0.1:1"], 1, "connection refused"),
    (["inspect", "app.localhost", "--limit", "0"], 2, "--limit"),
    (["route", "add", "not a domain!", "--user", "me"], 1, "invalid domain"),
    (["cert", "--out", "/proc/nope"], 1, "/proc/nope"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, held_port, text_file, not_json_url):
    """Every row of BAD_INPUTS run at once (each its own process and data dir): index -> (status, stderr)."""
    processes = []
    for index, (argv, _status, _words) in enumerate(BAD_INPUTS):
        env = _clean_env(tmp_path_factory.mktemp(f"bad{index}"))
        argv = [a.format(held=held_port, text=text_file, html=not_json_url) for a in argv]
        processes.append(subprocess.Popen(tun2g(*argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = {}
    try:
        for index, process in enumerate(processes):
            _out, err = process.communicate(timeout=60)
            results[index] = (process.returncode, err)
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    return results


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[" ".join(a[:1] + a[-2:]) for a, _s, _w in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_its_status(index, outcomes):
    argv, status, words = BAD_INPUTS[index]
    returncode, stderr = outcomes[index]
    said = [line for line in stderr.splitlines() if line and not line.startswith("ts=")]
    assert "Traceback" not in stderr
    assert returncode == status, stderr
    assert len(said) == 1, said
    assert said[0].startswith(f"tun2g {argv[0]}: ") and words in said[0], said


def _server(env, *args):
    http_port, tunnel_port = free_port(), free_port()
    process = subprocess.Popen(tun2g("server", "--http", f"127.0.0.1:{http_port}", "--tunnel",
                                     f"127.0.0.1:{tunnel_port}", "--admin", "127.0.0.1:0", *args),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_port(http_port)
    wait_for_port(tunnel_port)
    return process, tunnel_port


def test_exit_0_when_the_server_is_stopped_by_sigterm(env):
    server, _port = _server(env)
    try:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        server.kill()
        server.wait(10)


def test_exit_130_on_ctrl_c_even_in_the_middle_of_a_handshake(env):
    """A server that accepts and never answers: Ctrl-C ends the TLS handshake at once, quietly."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    client = subprocess.Popen(tun2g(*CLIENT, "--server", f"127.0.0.1:{silent.getsockname()[1]}", "--domain",
                                    "app.localhost", "--backend", "http://127.0.0.1:3000"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "connecting to" in client.stdout.readline()
        silent.settimeout(10)
        held, _address = silent.accept()  # the client is in its handshake now
        started = time.monotonic()
        client.send_signal(signal.SIGINT)
        assert client.wait(5) == 130
        assert time.monotonic() - started < 3, "Ctrl-C waited for the handshake timeout"
        stderr = client.stderr.read()
        assert "Traceback" not in stderr and "level=warning" not in stderr
        held.close()
    finally:
        client.kill()
        client.wait(10)
        silent.close()


def test_exit_130_on_ctrl_c_in_the_middle_of_a_kcp_handshake(env):
    """A UDP port that takes the client's KCP segments and never answers: Ctrl-C still acts at once."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    client = subprocess.Popen(tun2g(*CLIENT, "--conn-type", "kcp", "--insecure", "--server",
                                    f"127.0.0.1:{silent.getsockname()[1]}", "--domain", "app.localhost",
                                    "--backend", "http://127.0.0.1:3000"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "connecting to" in client.stdout.readline()
        silent.settimeout(20)
        silent.recvfrom(65536)  # the first segment of its TLS handshake over KCP: it waits for us now
        started = time.monotonic()
        client.send_signal(signal.SIGINT)
        assert client.wait(10) == 130
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"Ctrl-C took {elapsed:.2f} s: it waited for the KCP handshake timeout (10 s)"
        stderr = client.stderr.read()
        assert "Traceback" not in stderr and "level=warning" not in stderr
    finally:
        client.kill()
        client.wait(10)
        silent.close()


def test_exit_2_when_the_certificate_does_not_verify_with_the_fix(env, tmp_path):
    server, port = _server(env)
    try:
        result = subprocess.run(tun2g(*CLIENT, "--server", f"localhost:{port}", "--domain", "app.localhost",
                                      "--backend", "http://127.0.0.1:3000"),
                                env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert f"--ca {tmp_path / 'tun2g-dev-cert.pem'}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("mistake, hint", [("plain-to-tls", "drop --plain"), ("tls-to-plain", "add --plain")])
def test_a_wrong_tunnel_port_kind_is_named(env, mistake, hint):
    server, port = _server(env, *(["--plain-tunnel"] if mistake == "tls-to-plain" else []))
    try:
        extra = ["--plain"] if mistake == "plain-to-tls" else []
        result = subprocess.run(tun2g(*CLIENT, "--server", f"127.0.0.1:{port}", "--domain", "app.localhost",
                                      "--backend", "http://127.0.0.1:3000", *extra),
                                env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        assert hint in result.stderr and "--conn-type upgrade" in result.stderr
    finally:
        server.terminate()
        server.wait(10)


def test_the_retry_line_says_why_and_when(env):
    client = subprocess.Popen(tun2g(*GOOD_CLIENT), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        assert "connecting to" in client.stdout.readline()
        line = client.stdout.readline()
        assert line.startswith("tun2g: cannot reach 127.0.0.1:1 (connection refused); retrying in "), line
        assert line.rstrip().endswith(" s")
    finally:
        client.terminate()
        assert client.wait(10) == 0  # SIGTERM: a stop on purpose
