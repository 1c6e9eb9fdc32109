"""The client's HTTP-Upgrade dial: TLS through a terminating balancer, and a clear error when no 101 comes."""

from __future__ import annotations

import pytest
import requests

from tests.fixtures.tunnel import DOMAIN
from tun2g.client import ClientConfig
from tun2g.client import connect
from tun2g.transport import upgrade


def test_an_https_url_runs_tls_to_a_terminating_balancer_which_passes_the_upgrade(
        plain_deployment, dev_cert, haproxy, tmp_path, backend, start_client):
    cert, key = dev_cert
    pem = tmp_path / "haproxy.pem"  # HAProxy wants certificate and key in one file
    pem.write_text(open(cert).read() + open(key).read())
    balancer = haproxy([plain_deployment.running.http_address[1]], tls_pem=pem)
    backend_url, _app = backend
    token = plain_deployment.grant()
    start_client(ClientConfig(server_addr=balancer.url, token=token, domain=DOMAIN, backend_url=backend_url,
                              conn_type="upgrade", ca_file=cert, backoff_initial=0.05))
    assert [b.proto for b in plain_deployment.server.get_all_backends()] == ["upgrade"]
    response = requests.get(balancer.url + "/", headers={"Host": DOMAIN}, verify=cert, timeout=10)
    assert response.status_code == 200 and response.text == "hello from backend\n"


def test_a_server_that_does_not_switch_is_reported_with_its_answer(backend):
    backend_url, _app = backend
    config = ClientConfig(server_addr=backend_url, token="t", domain=DOMAIN, backend_url=backend_url,
                          conn_type="upgrade", plain=True)
    with pytest.raises(upgrade.UpgradeRefused, match=r"answered 'HTTP/1.1 200 OK' instead of 101"):
        connect.dial(config)
