"""The ACME manager's pure rules (renewal point, backoff with jitter, Retry-After) and its bounded queue."""

from __future__ import annotations

import email.utils

import pytest

from tun2g.server import cert_manager
from tun2g.server.cert_manager import (BACKOFF_MAX, BACKOFF_MIN, RATE_LIMITED_WAIT, RETRY_AFTER_MAX, AcmeSettings,
                                       CertManager, backoff_delay, is_acme_issued, parse_retry_after, renewal_due,
                                       shared_backoff)
from tun2g.storage.certificates import CertificateInfo

NOW = 1_800_000_000.0


def info(source: str = "acme:n1", not_before: float = NOW, days: float = 90) -> CertificateInfo:
    return CertificateInfo("app.test", "CN=Pebble", not_before, not_before + days * 86400, source, not_before)


@pytest.mark.pure
def test_renewal_is_due_at_two_thirds_of_the_lifetime():
    cert = info()
    assert not renewal_due(cert, NOW + 59.9 * 86400)
    assert renewal_due(cert, NOW + 60 * 86400)
    assert renewal_due(cert, NOW + 200 * 86400)  # expired: due too
    assert renewal_due(cert, NOW + 45 * 86400, fraction=0.5)


@pytest.mark.pure
def test_only_acme_issued_certificates_are_renewed():
    assert is_acme_issued(info("acme:node-7")) and is_acme_issued(info("cli"))
    assert not is_acme_issued(info("static")) and not is_acme_issued(info("acmexyz"))


@pytest.mark.pure
def test_backoff_doubles_from_a_minute_to_six_hours_with_jitter():
    assert backoff_delay(1, 0.5) == BACKOFF_MIN
    assert backoff_delay(2, 0.5) == 2 * BACKOFF_MIN
    assert backoff_delay(5, 0.5) == 16 * BACKOFF_MIN
    assert backoff_delay(50, 0.5) == BACKOFF_MAX == backoff_delay(10**6, 0.5)
    assert backoff_delay(1, 0.0) == pytest.approx(0.75 * BACKOFF_MIN)
    assert backoff_delay(1, 1.0) == pytest.approx(1.25 * BACKOFF_MIN)
    assert backoff_delay(50, 1.0) == pytest.approx(1.25 * BACKOFF_MAX)
    assert backoff_delay(0, 0.5) == BACKOFF_MIN and backoff_delay(1, 7.0) == pytest.approx(1.25 * BACKOFF_MIN)


@pytest.mark.pure
def test_the_directory_retry_after_and_rate_limits_are_honoured():
    assert backoff_delay(1, 0.5, retry_after=3000) == 3000
    assert backoff_delay(8, 0.5, retry_after=10) == 128 * BACKOFF_MIN  # never sooner than our own backoff
    assert backoff_delay(1, 0.5, rate_limited=True) == RATE_LIMITED_WAIT
    assert backoff_delay(1, 0.5, retry_after=120, rate_limited=True) == 120


@pytest.mark.pure
def test_retry_after_parses_seconds_and_dates_and_refuses_junk():
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after(" 7 ", NOW) == 7
    date = email.utils.formatdate(NOW + 3600, usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(3600, abs=1)
    assert parse_retry_after(email.utils.formatdate(NOW - 50, usegmt=True), NOW) == 0
    assert parse_retry_after("99999999999", NOW) == RETRY_AFTER_MAX
    for junk in (None, "", "soon", "-5", "1.5", "x" * 10_000, "Mon, 99 Foo 2026 99:99:99 GMT"):
        assert parse_retry_after(junk, NOW) is None


def test_first_uses_are_deduplicated_capped_and_hostile_names_dropped(sqlite_storage):
    manager = CertManager(sqlite_storage, "n1", AcmeSettings(), queue_cap=4)
    for _ in range(3):
        manager.want("App.Test")
    assert manager.waiting() == 1
    for hostile in ("", "a" * 300, "bad name.test", "x.test\r\nHost: y", "*.app.test", "\x00"):
        manager.want(hostile)
    assert manager.waiting() == 1
    for index in range(10):
        manager.want(f"n{index}.test")
    assert manager.waiting() == 4  # the cap: later first uses are dropped, asked again by the next handshake


def test_unrouted_names_never_reach_the_ordering(sqlite_storage):
    orders = []
    manager = CertManager(sqlite_storage, "n1", AcmeSettings(), order=lambda *args, **kwargs: orders.append(args))
    sqlite_storage.add_route("*.app.test", "alice")
    for name in ("unrouted.test", "x.app.test"):  # a wildcard route's names are never ordered one by one
        assert manager.order(name, renewal=False) is False
    assert orders == [] and manager.metrics.started.value == 0


def test_a_failed_order_backs_off(sqlite_storage, monkeypatch):
    from tun2g.server.acme import IssuanceFailed

    sqlite_storage.add_route("app.test", "alice")
    attempts = []

    def failing(*args, **kwargs):
        attempts.append(kwargs["source"])
        raise IssuanceFailed("the ACME server refused the order for app.test: rateLimited", retry_after="7200",
                             rate_limited=True)

    manager = CertManager(sqlite_storage, "n1", AcmeSettings(), order=failing)
    assert manager.order("app.test", renewal=False) is False
    assert manager.order("app.test", renewal=False) is False  # backing off: not asked again
    assert attempts == ["acme:n1"] and manager.metrics.failed.value == 1
    assert sqlite_storage.acme_value("order:app.test") is None  # the lock was released
    [backoff] = manager._backoff.values()
    assert backoff.failures == 1 and backoff.not_before >= cert_manager.time.time() + 7100
    other_node = CertManager(sqlite_storage, "n2", AcmeSettings(), order=failing)
    assert other_node.order("app.test", renewal=False) is False  # the backoff is the cluster's
    assert attempts == ["acme:n1"]


def test_the_shared_backoff_counts_on_and_ends_with_a_success(sqlite_storage):
    from tun2g.server.acme import IssuanceFailed

    sqlite_storage.add_route("app.test", "alice")
    outcomes = [IssuanceFailed("connection refused"), None]

    def flaky(*args, **kwargs):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    first = CertManager(sqlite_storage, "n1", AcmeSettings(), order=flaky)
    assert first.order("app.test", renewal=False) is False
    shared = shared_backoff(sqlite_storage.acme_value("backoff:app.test"))
    assert shared.failures == 1 and shared.not_before > cert_manager.time.time() + 40
    sqlite_storage.put_acme_value("backoff:app.test", "1 0", None)  # its time is up (as if a minute passed)
    second = CertManager(sqlite_storage, "n2", AcmeSettings(), order=flaky)
    assert second.order("app.test", renewal=False) is True
    assert sqlite_storage.acme_value("backoff:app.test") is None


@pytest.mark.pure
def test_a_shared_backoff_value_that_is_not_ours_is_no_backoff():
    assert shared_backoff("3 1800000000.5") == cert_manager.Backoff(3, 1800000000.5)
    for junk in (None, "", "x", "3", "3 y", "a 1", "1 2 3"):
        assert shared_backoff(junk) == cert_manager.Backoff()
    assert shared_backoff("99999999 1").failures == 1000


@pytest.fixture
def rate_limiting_directory():
    """A real HTTP server answering every request as a rate-limited ACME directory (429, Retry-After: 3600)."""
    import json

    from gevent.server import StreamServer

    problem = json.dumps({"type": "urn:ietf:params:acme:error:rateLimited",
                          "detail": "too many certificates already issued for this name"}).encode()
    answer = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/problem+json\r\nRetry-After: 3600\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(problem), problem))

    def serve(conn, _address):
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        conn.sendall(answer)

    server = StreamServer(("127.0.0.1", 0), serve)
    server.start()
    yield f"http://127.0.0.1:{server.server_port}/dir"
    server.stop(timeout=2)


def test_a_rate_limited_directory_is_not_asked_again_before_its_retry_after(sqlite_storage, rate_limiting_directory):
    from tun2g.server.acme import IssuanceFailed, issue

    sqlite_storage.add_route("app.test", "alice")
    with pytest.raises(IssuanceFailed) as refused:
        issue(sqlite_storage, "app.test", directory_url=rate_limiting_directory)
    assert refused.value.rate_limited and refused.value.retry_after == "3600"
    assert "too many certificates" in str(refused.value)
    manager = CertManager(sqlite_storage, "n1", AcmeSettings(directory_url=rate_limiting_directory))
    assert manager.order("app.test", renewal=False) is False
    [backoff] = manager._backoff.values()
    assert backoff.not_before >= cert_manager.time.time() + 3500  # the server's hour, not our minute
    assert manager.metrics.failed.value == 1
