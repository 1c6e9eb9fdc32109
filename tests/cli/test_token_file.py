"""`tun2g client --token-file` and TUN2G_TOKEN: the token stays out of `ps`."""

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from tests.fixtures.net import env_without_proxies
from tests.fixtures.tunnel import DOMAIN
from tun2g.cli import main

REPO = Path(__file__).resolve().parents[2]


def client_process(deployment, backend_url: str, *args, env_extra=None) -> subprocess.Popen:
    env = env_without_proxies() | (env_extra or {})
    if "TUN2G_TOKEN" not in (env_extra or {}):
        env.pop("TUN2G_TOKEN", None)
    command = [sys.executable, "-m", "tun2g.cli", "client", "--server", deployment.tunnel_addr, "--plain",
               "--domain", DOMAIN, "--backend", backend_url, "--log-level", "warning", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def expect_connected(process: subprocess.Popen) -> None:
    assert "connecting to" in process.stdout.readline()
    assert f"connected as {DOMAIN}" in process.stdout.readline()


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("how", ["token-file", "env"])
def test_the_token_from_a_file_or_the_environment_connects_and_is_not_in_ps(plain_deployment, backend, tmp_path,
                                                                            how):
    backend_url, _app = backend
    token = plain_deployment.grant()
    if how == "token-file":
        path = tmp_path / "token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        process = client_process(plain_deployment, backend_url, "--token-file", str(path))
    else:
        process = client_process(plain_deployment, backend_url, env_extra={"TUN2G_TOKEN": token})
    try:
        expect_connected(process)
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert token not in argv  # what `ps` shows
        response = requests.get(plain_deployment.http_url + "/", headers={"Host": DOMAIN}, timeout=10)
        assert response.status_code == 200
    finally:
        stop(process)


def run_client(*args, env=None):
    base = ["client", "--server", "127.0.0.1:1", "--plain", "--domain", DOMAIN, "--backend", "http://127.0.0.1:1"]
    return CliRunner().invoke(main, [*base, *args], env={"TUN2G_TOKEN": None, "TUN2G_TOKEN_FILE": None, **(env or {})})


def one_line_usage_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_a_missing_token_file_is_one_line_naming_the_flag(tmp_path):
    message = one_line_usage_error(run_client("--token-file", str(tmp_path / "nope")))
    assert "--token-file" in message and "No such file" in message


def test_an_unreadable_token_file_is_one_line_naming_the_flag(tmp_path):
    message = one_line_usage_error(run_client("--token-file", str(tmp_path)))  # a directory
    assert "--token-file" in message and "cannot read it" in message


def test_an_empty_token_file_is_refused(tmp_path):
    (tmp_path / "empty").write_text("\n")
    assert "--token-file" in one_line_usage_error(run_client("--token-file", str(tmp_path / "empty")))


def test_no_token_at_all_says_where_to_put_one():
    message = one_line_usage_error(run_client())
    assert "--token-file" in message and "TUN2G_TOKEN" in message


def test_token_and_token_file_together_are_refused(tmp_path):
    (tmp_path / "token").write_text("abc\n")
    message = one_line_usage_error(run_client("--token", "abc", "--token-file", str(tmp_path / "token")))
    assert "not both" in message


def test_the_help_prefers_the_file_or_the_environment():
    out = " ".join(CliRunner().invoke(main, ["client", "--help"]).output.split())
    assert "--token-file PATH" in out and "TUN2G_TOKEN_FILE" in out and "shows in `ps`: prefer" in out
