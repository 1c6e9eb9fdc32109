"""Failed tunnel logins: limited per source address, and no oracle of which domains exist."""

import io
import socket
import time

import pytest
import structlog

from tests.fixtures.tunnel import DOMAIN, wait_until
from tun2g import smux
from tun2g.control import Auth, decode_reply
from tun2g.log import configure
from tun2g.server.login_limit import BURST, LoginLimiter, source_key


def attempt(deployment, token: str, domain: str = DOMAIN) -> dict | None:
    """One Go-compatible login on the raw control stream (stream 2); the server's reply line, if any."""
    sock = socket.create_connection(("127.0.0.1", deployment.running.tunnel_address[1]), timeout=5)
    session = smux.Session(sock, client=True)
    try:
        control = session.accept_stream(timeout=5)
        try:
            control.sendall(Auth(token, domain).encode())
        except (OSError, smux.SessionClosedError):
            pass  # refused before reading: the reply may already be there
        control.settimeout(5)
        line = b""
        while not line.endswith(b"\n"):
            try:
                data = control.recv(4096)
            except (OSError, smux.SessionClosedError, socket.timeout):
                break
            if not data:
                break
            line += data
        return decode_reply(line.strip()) if line else None
    finally:
        session.close()


@pytest.fixture
def log_lines(plain_deployment):
    """The key=value log lines written during the test, after the server started (logging restored afterwards)."""
    buffer = io.StringIO()
    configure("info", stream=buffer)
    yield lambda: buffer.getvalue().splitlines()
    structlog.reset_defaults()


def test_a_burst_of_bad_tokens_from_one_address_is_limited(plain_deployment):
    plain_deployment.grant()
    started = time.monotonic()
    replies = [attempt(plain_deployment, f"guess-{n}") for n in range(60)]
    elapsed = time.monotonic() - started
    checked = [r for r in replies if r is not None and r["error"] == "invalid token"]
    limited = [r for r in replies if r is not None and "too many failed logins" in r["error"]]
    assert len(checked) + len(limited) == len(replies), replies
    # The burst, then about one check per second of the run: never the 60 guesses that were sent.
    assert BURST <= len(checked) <= BURST + elapsed * 1.0 + 1, (len(checked), elapsed)
    assert len(limited) >= len(replies) - BURST - elapsed - 1
    assert all(r["retry"] is True and "retry in" in r["error"] for r in limited)
    assert plain_deployment.server.get_all_backends() == []


def test_the_limit_is_logged_once_per_address_and_interval(plain_deployment, log_lines):
    for n in range(BURST + 20):
        attempt(plain_deployment, f"guess-{n}")
    lines = [line for line in log_lines() if "event=login_limited" in line]
    assert len(lines) == 1, lines
    assert "source=127.0.0.1" in lines[0]


def test_a_valid_client_connects_once_the_window_passes(plain_deployment, backend, start_client):
    url, _app = backend
    token = plain_deployment.grant()
    for n in range(BURST + 5):
        attempt(plain_deployment, f"guess-{n}")
    assert "too many failed logins" in attempt(plain_deployment, token)["error"]  # even a good token waits
    client = start_client(plain_deployment.client_config(token, url), wait=False)
    client.wait_connected(timeout=15)  # the refusal said "retry": the client backs off and gets in
    assert client.error is None
    assert [b.domain for b in plain_deployment.server.get_all_backends()] == [DOMAIN]


def test_an_unknown_domain_with_a_bad_token_says_only_invalid_token(plain_deployment, log_lines):
    plain_deployment.grant()
    for domain in ("unrouted.test", DOMAIN, "not a domain!"):
        reply = attempt(plain_deployment, "not-a-token", domain)
        assert reply == {"ok": False, "error": "invalid token"}, (domain, reply)
    logged = " ".join(line for line in log_lines() if "event=auth_rejected" in line)
    assert "no route for domain 'unrouted.test'" in logged and "unknown or revoked token" in logged


def test_with_a_valid_token_the_reason_is_precise(plain_deployment):
    token = plain_deployment.grant()
    assert "no route for domain 'unrouted.test'" in attempt(plain_deployment, token, "unrouted.test")["error"]
    assert "invalid domain" in attempt(plain_deployment, token, "not a domain!")["error"]
    assert attempt(plain_deployment, token)["ok"] is True


def test_the_limiter_refills_and_keeps_bounded_memory():
    now = [0.0]
    limiter = LoginLimiter(burst=3, refill_per_second=1.0, max_tracked=100, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.allow("10.0.0.1:1000") == 0
        limiter.failed("10.0.0.1:1000")
    assert limiter.allow("10.0.0.1:2000") == pytest.approx(1.0)  # any port of that address
    assert limiter.allow("10.0.0.2:1000") == 0  # another address is not held back
    now[0] += 1.0
    assert limiter.allow("10.0.0.1:1000") == 0
    limiter.failed("10.0.0.1:1000")
    assert limiter.allow("10.0.0.1:1000") > 0
    for n in range(10_000):
        limiter.failed(f"10.1.{n // 256}.{n % 256}:1")
    assert len(limiter) == 100  # least recently seen forgotten first
    assert source_key("2001:db8::1:5555") == source_key("2001:db8::2:80") == "2001:db8::/64"
    assert source_key("::ffff:10.0.0.1:9") == "10.0.0.1"


def test_a_flood_of_addresses_stays_bounded_on_a_real_server(plain_deployment):
    limiter = plain_deployment.server.login_limiter
    for n in range(limiter.max_tracked + 50):
        limiter.failed(f"198.18.{n // 256 % 256}.{n % 256}:{n}")
    assert len(limiter) == limiter.max_tracked
    wait_until(lambda: attempt(plain_deployment, "x")["error"] == "invalid token", timeout=5,
               message="a fresh address still checked")
