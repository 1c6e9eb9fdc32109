"""Prometheus metrics at the admin API's /metrics, scraped over HTTP after real traffic through real tunnels."""

from __future__ import annotations

import pytest
import requests

from tests.fixtures.metrics import labels_of, scrape, value
from tests.fixtures.tunnel import DOMAIN, _start, wait_until


@pytest.fixture
def started(tmp_path, data_dir):
    """Factory: a plain-tunnel deployment with the given ServerSetup options; all stopped after the test."""
    deployments = []

    def start(**options):
        deployment = _start(tmp_path / f"d{len(deployments)}", data_dir, plain=True, **options)
        deployments.append(deployment)
        return deployment

    (tmp_path / "d0").mkdir()
    for index in range(1, 3):
        (tmp_path / f"d{index}").mkdir()
    yield start
    for deployment in deployments:
        deployment.running.stop()


def get(deployment, path="/", host=DOMAIN, **kwargs):
    return requests.get(deployment.http_url + path, headers={"Host": host}, timeout=10, **kwargs)


def test_requests_are_counted_by_domain_and_status_class_with_durations_and_tunnels(started, backend,
                                                                                      start_client):
    deployment = started()
    url, _app = backend
    start_client(deployment.client_config(deployment.grant(), url))
    for path, status in [("/", 200)] * 3 + [("/status/404", 404)] * 2 + [("/status/503", 503)]:
        assert get(deployment, path).status_code == status
    assert get(deployment, host="unknown.test").status_code == 502  # no tunnel: counted, but under "none"
    samples = scrape(deployment.admin_url, token=deployment.running.admin_token)
    assert value(samples, "tun2g_requests_total", domain=DOMAIN, code="2xx") == 3
    assert value(samples, "tun2g_requests_total", domain=DOMAIN, code="4xx") == 2
    assert value(samples, "tun2g_requests_total", domain=DOMAIN, code="5xx") == 1
    assert value(samples, "tun2g_requests_total", domain="none", code="5xx") == 1
    assert labels_of(samples, "tun2g_requests_total", "domain") == {DOMAIN, "none"}  # unknown hosts claim no label
    assert value(samples, "tun2g_request_duration_seconds_count", domain=DOMAIN) == 6
    assert value(samples, "tun2g_request_duration_seconds_bucket", domain=DOMAIN, le="+Inf") == 6
    assert 0 < value(samples, "tun2g_request_duration_seconds_sum", domain=DOMAIN) < 6 * 10
    assert value(samples, "tun2g_bytes_in_total", domain=DOMAIN) > 6 * len("GET / HTTP/1.1\r\n")
    assert value(samples, "tun2g_tunnels", domain=DOMAIN) == 1
    assert value(samples, "tun2g_smux_sessions") == 1
    assert value(samples, "tun2g_requests_in_flight") == 0
    assert value(samples, "tun2g_auth_total", outcome="ok") == 1


def test_bytes_out_rise_while_a_download_is_still_streaming(started, backend, start_client):
    deployment = started()
    url, app = backend
    start_client(deployment.client_config(deployment.grant(), url))
    response = get(deployment, "/stream", stream=True)
    try:
        pieces = response.iter_content(chunk_size=None)
        assert next(pieces) == b"first piece\n"
        during = scrape(deployment.admin_url, token=deployment.running.admin_token)
        assert value(during, "tun2g_bytes_out_total", domain=DOMAIN) >= len(b"first piece\n")
        assert value(during, "tun2g_requests_total", domain=DOMAIN, code="2xx") == 0  # counted when it ends
        assert value(during, "tun2g_requests_in_flight") == 1
        assert value(during, "tun2g_smux_streams") >= 1  # the control stream and this exchange's stream
        app.release.set()
        assert b"".join(pieces) == b"last piece\n"
    finally:
        response.close()
    wait_until(lambda: value(scrape(deployment.admin_url, token=deployment.running.admin_token), "tun2g_requests_total", domain=DOMAIN, code="2xx") == 1,
               timeout=5, message="the download counted once it ended")
    after = scrape(deployment.admin_url, token=deployment.running.admin_token)
    grown = value(after, "tun2g_bytes_out_total", domain=DOMAIN) - value(during, "tun2g_bytes_out_total",
                                                                         domain=DOMAIN)
    assert grown >= len(b"last piece\n")


def test_domains_past_the_cap_are_counted_under_other(started, backend, start_client):
    deployment = started(metrics_domain_cap=2)
    url, _app = backend
    domains = [f"d{i}.test" for i in range(4)]
    for domain in domains:
        start_client(deployment.client_config(deployment.grant(domain), url, domain=domain))
    for domain in domains:
        assert get(deployment, host=domain).status_code == 200
    samples = scrape(deployment.admin_url, token=deployment.running.admin_token)
    assert labels_of(samples, "tun2g_requests_total", "domain") == {"d0.test", "d1.test", "other", "none"}
    assert value(samples, "tun2g_requests_total", domain="other", code="2xx") == 2
    assert value(samples, "tun2g_requests_total", domain="d0.test", code="2xx") == 1
    assert labels_of(samples, "tun2g_bytes_out_total", "domain") == {"d0.test", "d1.test", "other", "none"}
    assert value(samples, "tun2g_tunnels", domain="other") == 2
    assert value(samples, "tun2g_tunnels", domain="d1.test") == 1


def test_auth_outcomes_are_counted(started, backend, start_client):
    deployment = started()
    url, _app = backend
    token = deployment.grant()
    start_client(deployment.client_config(token, url))
    bad_token = start_client(deployment.client_config("not-a-token", url), wait=False)
    deployment.storage.add_route("bob.test", "bob")
    not_owned = start_client(deployment.client_config(token, url, domain="bob.test"), wait=False)
    for client in (bad_token, not_owned):
        assert client.rejected.wait(10), client.client.state
    samples = scrape(deployment.admin_url, token=deployment.running.admin_token)
    assert value(samples, "tun2g_auth_total", outcome="ok") == 1
    assert value(samples, "tun2g_auth_total", outcome="invalid_token") == 1
    assert value(samples, "tun2g_auth_total", outcome="rejected") == 1
    assert value(samples, "tun2g_auth_total", outcome="storage_error") == 0


def test_metrics_need_the_admin_token_like_the_rest_of_the_admin_api(started):
    deployment = started(admin_token="s3cret-admin")
    assert requests.get(f"{deployment.admin_url}/metrics", timeout=10).status_code == 401
    samples = scrape(deployment.admin_url, token="s3cret-admin")
    assert ("tun2g_smux_sessions", ()) in samples


def test_with_metrics_off_there_is_no_endpoint_and_requests_still_flow(started, backend, start_client):
    deployment = started(metrics=False)
    url, _app = backend
    start_client(deployment.client_config(deployment.grant(), url))
    assert get(deployment).status_code == 200
    assert requests.get(f"{deployment.admin_url}/metrics", headers=deployment.admin_headers,
                        timeout=10).status_code == 404
