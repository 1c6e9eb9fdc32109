"""The quick start typed into a real terminal (tmux), as a person would, read back from the screen.

Ports are free ones rather than the README's defaults (a test never binds a fixed port); everything
else is the README's walk-through: the server and the client in the background of one shell.
"""

import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.fixtures.net import free_port, require_binary


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", session], capture_output=True,
                          text=True, timeout=10).stdout


def wait_for_screen(session: str, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.2)  # polling the screen, bounded by the deadline
    pytest.fail(f"{text!r} never appeared on the screen:\n{screen(session)}")


def test_the_quick_start_typed_into_a_terminal(tmp_path):
    require_binary("tmux")
    session = f"tun2g-{tmp_path.name}"
    http_port, tunnel_port, admin_port, backend_port = free_port(), free_port(), free_port(), free_port()
    bin_dir = tmp_path / "bin"  # `tun2g` on PATH, as installing the package puts it
    bin_dir.mkdir()
    (bin_dir / "tun2g").write_text(f"#!/bin/sh\nexec {sys.executable} -m tun2g.cli \"$@\"\n")
    (bin_dir / "tun2g").chmod(0o755)
    pythonpath = os.environ.get("PYTHONPATH")  # a tmux server started earlier has its own environment
    setup = (f"export {'PYTHONPATH=' + shlex.quote(pythonpath) + ' ' if pythonpath else ''}PATH={shlex.quote(str(bin_dir))}:$PATH TUN2G_DATA_DIR={shlex.quote(str(tmp_path))} "
             f"TUN2G_INSPECT=off; unset REDIS_URL TUN2G_STORAGE http_proxy HTTP_PROXY; cd {shlex.quote(str(tmp_path))}")
    typed = [
        setup,
        f"tun2g server --http 127.0.0.1:{http_port} --tunnel 127.0.0.1:{tunnel_port} "
        f"--admin 127.0.0.1:{admin_port} 2>server.log &",
        "sleep 3",  # what a person does: give it a moment (the screen is what the test waits on)
        "tun2g route add app.localhost --user me",
        "TOKEN=$(tun2g token create --user me --quiet)",
        f"{sys.executable} -m http.server {backend_port} --bind 127.0.0.1 >/dev/null 2>&1 &",
        f"TUN2G_TOKEN=$TOKEN tun2g client --server localhost:{tunnel_port} --ca $TUN2G_DATA_DIR/tun2g-dev-cert.pem "
        f"--domain app.localhost --backend http://127.0.0.1:{backend_port} 2>client.log &",
    ]
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", "bash", "--norc"],
                   check=True, timeout=10)
    try:
        for line in typed:
            subprocess.run(["tmux", "send-keys", "-t", session, line, "Enter"], check=True, timeout=10)
        wait_for_screen(session, "serving http://app.localhost")
        subprocess.run(["tmux", "send-keys", "-t", session,
                        f"curl -s -o /dev/null -H 'Host: app.localhost' http://127.0.0.1:{http_port}/", "Enter"],
                       check=True, timeout=10)
        shown = wait_for_screen(session, "GET / 200 ")
        assert "Traceback" not in shown
    finally:
        # Stop the shell's jobs and wait for them; the echo's output (not the typed line) says they are gone.
        subprocess.run(["tmux", "send-keys", "-t", session, "kill %1 %2 %3; wait; echo STOPPED-$((6*7))", "Enter"],
                       timeout=10)
        try:
            wait_for_screen(session, "STOPPED-42", timeout=20)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], timeout=10)
