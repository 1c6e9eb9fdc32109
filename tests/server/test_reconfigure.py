"""RunningServer.reconfigure: each live setting takes effect in place, with the tunnels still up."""

import pytest
import requests

from tun2g.errors import ConfigurationError
from tun2g.server.process import HEADER_TIMEOUT, LIVE_SETTINGS


def test_every_live_setting_changes_in_place_and_none_means_its_default(tunnel):
    deployment, _app, client = tunnel
    running, server = deployment.running, deployment.server
    assert running.inspector is not None and server.metrics is not None
    running.reconfigure({"ping_interval": 0.5, "metrics_domain_cap": 3, "inspect": False, "header_timeout": 2.0,
                         "max_connections_per_ip": 7, "response_timeout": 9.0, "trusted_proxies": ("10.0.0.0/8",),
                         "access_log": True})
    assert server.config.ping_interval == 0.5 and server.metrics.domain_cap == 3
    assert server.pipeline.inspector is None and server.inspector is None
    assert running.front.limits.head_timeout == 2.0 and running.front.limits.max_per_ip == 7
    assert server.pipeline.timeouts.response == 9.0 and "10.1.2.3" in server.pipeline.trusted_proxies
    assert server.pipeline.access_log is True
    running.reconfigure({"inspect": True, "header_timeout": None})
    assert server.pipeline.inspector is running.inspector and running.front.limits.head_timeout == HEADER_TIMEOUT
    response = requests.get(f"{deployment.http_url}/", headers={"Host": "app.test"}, timeout=5)
    assert response.status_code == 200 and client.client.connections == 1  # the same tunnel all along
    assert running.setup.ping_interval == 0.5  # what is in force, for the next reload to compare with


def test_a_setting_that_needs_a_restart_is_refused(plain_deployment):
    with pytest.raises(ConfigurationError, match="http_addr"):
        plain_deployment.running.reconfigure({"http_addr": "127.0.0.1:1"})
    assert "http_addr" not in LIVE_SETTINGS
