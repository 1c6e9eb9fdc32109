"""Deploy shapes: the Procfile's web line from PORT and REDIS_URL alone, and gunicorn's gevent worker."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests

from tests.fixtures.backends import pattern_bytes
from tests.fixtures.net import env_without_proxies, free_port, require_binary, wait_for_port
from tests.fixtures.tunnel import wait_until
from tun2g.client import ClientConfig
from tun2g.storage import RedisStorage

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "app.test"


@pytest.fixture
def token(redis_server):
    storage = RedisStorage(redis_server.url)
    storage.add_route(DOMAIN, "alice")
    _info, secret = storage.create_token("alice")
    storage.close()
    return secret


@pytest.fixture
def run_process(tmp_path):
    """Start a process with its output in a log file; stopped (SIGTERM, then SIGKILL) after the test.

    Each runs in its own process group and the whole group is signalled: `sh -c "tun2g ..."`
    (the Procfile line) has the server as a child of the shell, which a signal to the shell
    alone would leave running.
    """
    started = []

    def run(argv, env, name):
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        started.append((proc, log))
        return proc

    yield run
    for proc, log in started:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group led by proc, SIGKILL to any of it left after 10 s; reaps proc."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []

    def signal_group(signum):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass  # the whole group is gone already

    signal_group(signal.SIGTERM)
    try:
        proc.wait(10)
        _gone, alive = psutil.wait_procs(descendants, timeout=10)
    except subprocess.TimeoutExpired:
        alive = True
    if alive:
        signal_group(signal.SIGKILL)
    proc.wait()


def upgrade_client(url: str, token: str, backend_url: str) -> ClientConfig:
    return ClientConfig(server_addr=url, token=token, domain=DOMAIN, backend_url=backend_url, conn_type="upgrade",
                        plain=True, backoff_initial=0.05, backoff_max=0.3)


def test_the_procfile_web_line_serves_from_port_and_redis_url_alone(tmp_path, redis_server, token, backend,
                                                                     run_process, start_client):
    web = (REPO / "Procfile").read_text().split("web:", 1)[1].splitlines()[0].strip()
    shim = tmp_path / "bin"  # what installing the package puts on PATH
    shim.mkdir()
    (shim / "tun2g").write_text(f"#!/bin/sh\nexec {sys.executable} -m tun2g.cli \"$@\"\n")
    (shim / "tun2g").chmod(0o755)
    port = free_port()
    env = {"PATH": f"{shim}:{os.environ['PATH']}", "HOME": str(tmp_path), "PORT": str(port),
           "REDIS_URL": redis_server.url,
           "TUN2G_ADMIN": "127.0.0.1:0"}  # only so parallel test runs never fight over the default admin port
    run_process(["sh", "-c", web], env, "procfile-web")
    wait_for_port(port, timeout=15)
    backend_url, _app = backend
    start_client(upgrade_client(f"http://127.0.0.1:{port}", token, backend_url))
    response = requests.get(f"http://127.0.0.1:{port}/", headers={"Host": DOMAIN}, timeout=10)
    assert response.status_code == 200 and response.text == "hello from backend\n"


def test_gunicorn_gevent_workers_serve_tunnels_and_forward_between_workers(redis_server, token, backend,
                                                                          run_process, start_client):
    require_binary("gunicorn")
    port = free_port()
    # No TUN2G_CLUSTER_SECRET: the workers agree on the one the first of them stores in Redis.
    env = env_without_proxies() | {"REDIS_URL": redis_server.url, "TUN2G_HOP_LISTEN": "127.0.0.1:0",
                                   "TUN2G_REGISTRY_TTL": "2", "TUN2G_LOG_LEVEL": "warning"}
    for name in ("TUN2G_STORAGE", "TUN2G_CLUSTER_SECRET"):
        env.pop(name, None)
    gunicorn = run_process([sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "-b", f"127.0.0.1:{port}",
                            "tun2g.server.process:create_wsgi_app()"], env, "gunicorn")
    wait_for_port(port, timeout=20)
    nodes = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: nodes.zcard("tun2g:nodes") == 2, timeout=20, message="both gunicorn workers joining")
    backend_url, _app = backend
    start_client(upgrade_client(f"http://127.0.0.1:{port}", token, backend_url))
    lookups_before = nodes.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0)
    for _ in range(30):  # new connections land on either worker; one of them forwards
        response = requests.get(f"http://127.0.0.1:{port}/", headers={"Host": DOMAIN}, timeout=10)
        assert response.status_code == 200 and response.text == "hello from backend\n"
    size = 2 * 1024 * 1024
    for _ in range(4):
        upload = requests.post(f"http://127.0.0.1:{port}/sink", data=pattern_bytes(size), headers={"Host": DOMAIN},
                               timeout=30)
        assert upload.json()["sha256"] == hashlib.sha256(b"".join(pattern_bytes(size))).hexdigest()
    lookups = nodes.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0) - lookups_before
    assert lookups >= 1, "no request ever reached the worker without the tunnel"
    started = time.monotonic()
    stop_process_group(gunicorn)  # with the tunnel connected: its worker drains, then closes it
    assert time.monotonic() - started < 8, "gunicorn's shutdown waited out its graceful timeout for the tunnel"


@pytest.mark.parametrize("advertise", ["10.0.0.2:8080", "http://0.0.0.0:8080", "ftp://node"])
def test_a_bad_advertised_url_stops_the_server_with_a_clear_message(redis_server, advertise, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tun2g.cli", "server", "--http", "127.0.0.1:0", "--tunnel", "none",
                             "--admin", "127.0.0.1:0", "--storage", redis_server.url, "--advertise", advertise],
                            capture_output=True, text=True, timeout=30, cwd=REPO,
                            env=env_without_proxies() | {"TUN2G_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2  # a bad flag value (docs/cli.md#exit-status)
    assert "--advertise" in result.stderr and advertise in result.stderr
