"""The access log is buffered (tun2g.log), yet no line is lost: a real `tun2g server` process, requests
on its public port, then SIGTERM (drain and exit) or SIGINT (stop now); every request's line is in its log.

The requests name a Host with no tunnel, so each is answered by the server itself (a page) and
logged like any other (a 502: no backend for it): no client process needed.
"""

import signal
import socket
import subprocess
import sys

import pytest

from tests.fixtures.net import env_without_proxies, free_port, wait_for_port
from tun2g.http import MessageReader

REQUESTS = 200


def _requests_on_one_connection(port: int, count: int) -> list[int]:
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        reader = MessageReader(sock)
        for number in range(count):
            sock.sendall(f"GET /n/{number}?q=1 HTTP/1.1\r\nHost: nobody.test\r\n\r\n".encode())
            statuses.append(reader.read_final_response_head("GET").status)
            while reader.read_body():
                pass
    return statuses


@pytest.fixture
def server(tmp_path):
    env = env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path), "TUN2G_ADMIN_TOKEN": "test-admin-token"}
    for name in ("REDIS_URL", "TUN2G_STORAGE"):
        env.pop(name, None)
    http_port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "tun2g.cli", "server", "--http", f"127.0.0.1:{http_port}",
                                    "--tunnel", f"127.0.0.1:{free_port()}", "--admin", "127.0.0.1:0",
                                    "--plain-tunnel", "--grace-period", "1"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(http_port, timeout=30)
        yield process, http_port, log
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_every_access_line_is_written_by_the_time_the_server_exits(server, signum):
    process, port, log = server
    assert _requests_on_one_connection(port, REQUESTS) == [502] * REQUESTS
    process.send_signal(signum)
    process.wait(30)
    lines = [line for line in log.read_text().splitlines() if " event=request " in line]
    assert [line.split(" path=")[1].split(" ")[0] for line in lines] == [
        f'"/n/{number}?q=1"' for number in range(REQUESTS)]
    assert all(" status=502 " in line and " host=nobody.test " in line for line in lines)
