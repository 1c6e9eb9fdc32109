"""The client's Prometheus metrics, on a registry of its own (served at the inspector's /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ClientMetrics", "status_class"]


def status_class(status: int) -> str:
    """"2xx" for 204; "error" for 0 (no response)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


class ClientMetrics:
    """A few counters about what this client serves; own registry, so nothing collides with the server's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tun2g_client_requests", "Requests served through the tunnel, by status class",
                                ["status_class"], registry=self.registry)
        self.duration = Histogram("tun2g_client_request_duration_seconds",
                                  "From the request head to the end of the response",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                  registry=self.registry)
        self.bytes = Counter("tun2g_client_bytes", "Bytes relayed: in = request to the backend, "
                             "out = response to the server", ["direction"], registry=self.registry)
        self.backend_errors = Counter("tun2g_client_backend_errors", "Requests the backend failed "
                                      "(unreachable, or no valid response)", ["kind"], registry=self.registry)
        self.reconnects = Counter("tun2g_client_reconnects", "Tunnel (re)connections after the first",
                                  registry=self.registry)
        self.connected = Gauge("tun2g_client_connected", "1 while the tunnel is up", registry=self.registry)
        self.captures_dropped = Counter("tun2g_client_inspector_captures_dropped",
                                        "Exchanges the inspector did not record: its queue was full",
                                        registry=self.registry)
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        self._by_class = {name: self.requests.labels(name) for name in ("1xx", "2xx", "3xx", "4xx", "5xx")}

    def request_served(self, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        counter = self._by_class.get(status_class(status))
        (counter or self.requests.labels(status_class(status))).inc()
        self.duration.observe(seconds)
        self._bytes_in.inc(bytes_in)
        self._bytes_out.inc(bytes_out)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
