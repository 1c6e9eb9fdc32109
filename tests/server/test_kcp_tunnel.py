"""The whole product over KCP: auth, routing and streaming unchanged above the transport."""

import hashlib

import pytest
import requests

from tests.fixtures.backends import pattern_digest
from tests.fixtures.tunnel import DOMAIN, Deployment, RunningClient
from tun2g.server.process import ServerSetup


@pytest.fixture(params=["plain", "tls"])
def kcp_deployment(request, tmp_path, data_dir, dev_cert):
    plain = request.param == "plain"
    setup = ServerSetup(http_addr="127.0.0.1:0", tunnel_addr="127.0.0.1:0", kcp_addr="127.0.0.1:0",
                        admin_addr=None, plain_tunnel=plain, storage_url=f"sqlite:///{tmp_path / 'k.db'}",
                        access_log=False, log_level="warning")
    deployment = Deployment(running=setup.start(), storage_url="", cert=None if plain else dev_cert[0], plain=plain)
    yield deployment
    deployment.running.stop()


def test_requests_flow_over_kcp(kcp_deployment, backend):
    url, _app = backend
    token = kcp_deployment.grant()
    config = kcp_deployment.client_config(token, url, conn_type="kcp",
                                          server_addr=f"localhost:{kcp_deployment.running.kcp_address[1]}")
    client = RunningClient(config)
    try:
        client.wait_connected()
        [record] = kcp_deployment.server.get_all_backends()
        assert record.proto == ("kcp" if kcp_deployment.plain else "kcp+tls")
        assert requests.get(kcp_deployment.http_url + "/", headers={"Host": DOMAIN}, timeout=10).status_code == 200
        size = 4 * 1024 * 1024
        body = requests.get(kcp_deployment.http_url + f"/bytes/{size}", headers={"Host": DOMAIN}, timeout=30).content
        assert hashlib.sha256(body).hexdigest() == pattern_digest(size)
    finally:
        client.close()
