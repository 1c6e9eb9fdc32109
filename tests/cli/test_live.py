"""`tun2g backends --watch` against a real server: refreshes until Ctrl-C, then exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import gevent
from click.testing import CliRunner

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g.cli import main


def test_backends_watch_refreshes_the_table(tunnel):
    deployment, _app, _client = tunnel
    result = CliRunner().invoke(main, ["backends", "--admin", deployment.admin_url, "--watch", "0.1",
                                       "--count", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("1 backend(s), every 0.1 s") == 3
    assert result.output.count(DOMAIN) == 3


def test_backends_watch_stops_on_ctrl_c_without_a_traceback(plain_deployment):
    process = subprocess.Popen([sys.executable, "-m", "tun2g.cli", "backends", "--admin",
                                plain_deployment.admin_url, "--watch", "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = gevent.spawn(lambda: [lines.append(line) for line in process.stdout])
        wait_until(lambda: sum("0 backend(s)" in line for line in lines) >= 2, timeout=15,
                   message="two refreshes")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        reader.join(5)
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
