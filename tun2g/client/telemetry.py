"""What the client tells about the exchanges it proxies: its Prometheus metrics and the observer of each exchange.

`ClientMetrics` has a registry of its own (served at the inspector's /metrics).
`ExchangeObserver` is the one collaborator the Client's proxy path talks to
when anything listens (a status line, the inspector, the metrics): each
exchange gets an `Observed`, the relay's meter, which counts bytes as they
move and tees the bodies into the inspector's capture. With nothing
listening the Client holds no observer and an exchange pays for none of it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tun2g.http import ExchangeResult, RequestHead, ResponseHead
from tun2g.log import debugging, get_logger
from tun2g.metrics import STATUS_CLASSES, Count, Durations

if TYPE_CHECKING:
    from tun2g.client.inspector import Capture, Inspector

__all__ = ["CONTENT_TYPE_LATEST", "ClientMetrics", "ExchangeObserver", "Observed", "Served"]

log = get_logger("tun2g.client.client")


# The client's request durations (finer than the server's: one backend, no queueing across domains).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SERVED_CLASSES = (*STATUS_CLASSES, "error")  # the labels of ClientMetrics.served


class Served(NamedTuple):
    """One exchange the client proxied, for a status line (``status`` 0: no response came)."""

    method: str
    path: str
    status: int
    seconds: float
    request_bytes: int
    response_bytes: int


class ClientMetrics:
    """A few counters about what this client serves; own registry, so nothing collides with the server's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Counted per exchange or with every write of a body (a download shows while it runs) as plain
        # numbers, since prometheus-client's children take a (gevent) lock per increment; exported when scraped.
        self.served = [0] * len(_SERVED_CLASSES)  # by status class, "error" (no response) last
        self.duration = Durations(DURATION_BUCKETS)
        self.bytes_in = Count()   # request bytes written to the backend (heads and framing included)
        self.bytes_out = Count()  # response bytes written to the server (heads and framing included)
        self.registry.register(_ServedCollector(self))
        self.backend_errors = Counter("tun2g_client_backend_errors", "Requests the backend failed "
                                      "(unreachable, or no valid response)", ["kind"], registry=self.registry)
        self.reconnects = Counter("tun2g_client_reconnects", "Tunnel (re)connections after the first",
                                  registry=self.registry)
        self.connected = Gauge("tun2g_client_connected", "1 while the tunnel is up", registry=self.registry)
        self.captures_dropped = Counter("tun2g_client_inspector_captures_dropped",
                                        "Exchanges the inspector did not push to its open pages live (their "
                                        "backlog was full); they are still listed",
                                        registry=self.registry)

    def request_served(self, status: int, seconds: float) -> None:
        """One exchange ended (its bytes were counted as they moved)."""
        self.served[status // 100 - 1 if 100 <= status < 600 else -1] += 1
        self.duration.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _ServedCollector:
    def __init__(self, metrics: ClientMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        requests = CounterMetricFamily("tun2g_client_requests", "Requests served through the tunnel, by status class",
                                       labels=("status_class",))
        for name, count in zip(_SERVED_CLASSES, metrics.served):
            if count:  # as a labelled counter would: a class appears with its first request
                requests.add_metric((name,), count)
        yield requests
        yield metrics.duration.family("tun2g_client_request_duration_seconds",
                                      "From the request head to the end of the response")
        family = CounterMetricFamily("tun2g_client_bytes", "Bytes relayed: in = request to the backend, "
                                     "out = response to the server; counted as they move", labels=("direction",))
        family.add_metric(("in",), metrics.bytes_in.value)
        family.add_metric(("out",), metrics.bytes_out.value)
        yield family


class ExchangeObserver:
    """Everything that hears of the Client's exchanges: ``on_request`` (a status line), the inspector, the metrics."""

    def __init__(self, *, on_request: Callable[[Served], None] | None = None, inspector: Inspector | None = None,
                 metrics: ClientMetrics | None = None) -> None:
        self.on_request = on_request
        self.inspector = inspector
        self.metrics = metrics

    def begin(self, head: RequestHead, stream_id: int | None = None) -> Observed:
        """Observe the exchange ``head`` starts (call before the Client rewrites its target)."""
        if debugging():
            log.debug("request", method=head.method, path=head.target, stream=stream_id)
        return Observed(self, head)


class Observed:
    """One exchange being observed: the relay's `Meter` (live byte counts, the capture's tee), then `finish`."""

    __slots__ = ("_observer", "_method", "_path", "_started", "_capture", "_bytes_in", "_bytes_out",
                 "response_filter")

    def __init__(self, observer: ExchangeObserver, head: RequestHead) -> None:
        self._observer = observer
        self._method, self._path = head.method, head.target
        self._started = time.monotonic()
        inspector, metrics = observer.inspector, observer.metrics
        self._capture: Capture | None = inspector.begin(head) if inspector is not None else None
        self._bytes_in = metrics.bytes_in if metrics is not None else None
        self._bytes_out = metrics.bytes_out if metrics is not None else None
        # For forward_exchange: the capture keeps the final response head.
        self.response_filter: Callable[[ResponseHead], None] | None = (
            None if self._capture is None else self._capture.response_filter)

    def up(self, size: int, body: bytes) -> None:
        if self._bytes_in is not None:
            self._bytes_in.value += size
        if self._capture is not None:
            self._capture.up(size, body)

    def down(self, size: int, body: bytes) -> None:
        if self._bytes_out is not None:
            self._bytes_out.value += size
        if self._capture is not None:
            self._capture.down(size, body)

    def finish(self, status: int, result: ExchangeResult | None = None, error: str | None = None,
               failure: str | None = None) -> None:
        """The exchange ended with ``status`` (0: no response), its ``result`` if the relay returned one;
        ``error`` says why not; ``failure`` names a backend failure (``unreachable``, ``bad_response``)."""
        observer = self._observer
        seconds = time.monotonic() - self._started
        request_bytes = result.request_bytes if result is not None else 0
        response_bytes = result.response_bytes if result is not None else 0
        if debugging():
            log.debug("response", method=self._method, path=self._path, status=status,
                      ms=round(seconds * 1000, 1), bytes_in=request_bytes, bytes_out=response_bytes, error=error)
        if self._capture is not None and observer.inspector is not None:
            self._capture.response_complete = result is not None and result.response_complete
            observer.inspector.finish(self._capture, status, error)
        metrics = observer.metrics
        if metrics is not None:
            metrics.request_served(status, seconds)
            if failure is not None:
                metrics.backend_errors.labels(failure).inc()
        if observer.on_request is not None:
            observer.on_request(Served(self._method, self._path, status, seconds, request_bytes, response_bytes))
