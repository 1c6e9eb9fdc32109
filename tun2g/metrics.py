"""Prometheus metrics: the families one server process exports, and the cap on per-domain labels.

Ground floor: nothing here knows a Server. The process builds one `Metrics`
(its own CollectorRegistry, so several servers in one process never mix their
figures) and hands it to the parts that count. On the hot path a request costs
one dict lookup for its domain (`Metrics.domain()` returns that domain's
cached figures; no `.labels()` call), then a few additions to plain numbers;
a custom collector builds the Prometheus families from them at scrape time,
and reads the tunnel, stream and smux figures then too, so those cost
nothing per request.

Label cardinality: the first `domain_cap` distinct domains (default 200) keep
their own label, every later one is counted under ``domain="other"``, so a
server with 10k tunnels exports at most cap + 1 series per family.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

DEFAULT_DOMAIN_CAP = 200
OTHER = "other"      # the label of every domain past the cap
UNROUTED = "none"    # the label of requests that reached no upstream (no tunnel, unknown Host, ...)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
AUTH_OUTCOMES = ("ok", "invalid_token", "rejected", "malformed", "storage_error", "aborted")
HOP_OUTCOMES = ("ok", "failed", "unreachable")
CAPTURE_OUTCOMES = ("queued", "dropped", "stored", "failed")
# What became of a public TCP / TLS-passthrough connection (tun2g.server.tcp_routes).
TCP_OUTCOMES = ("served", "refused_by_policy", "over_cap", "no_tunnel", "local_refused", "local_unreachable",
                "failed", "bad_hello", "forwarded")
CONTENT_TYPE = CONTENT_TYPE_LATEST
ACME_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0)  # an ACME order: validation and finalization


@dataclass(frozen=True, slots=True)
class SessionSample:
    """One tunnel's state at scrape time: its domain, its smux session's figures, its requests in flight."""

    domain: str
    streams: int
    buffered_bytes: int
    in_flight: int


class Count:
    """One counter value. Plain arithmetic: the server runs on one thread of greenlets, and a greenlet
    never switches inside `inc`, so no lock is needed (prometheus-client's own children take one per
    increment, which costs more than the rest of the metrics of a request put together)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Durations:
    """A histogram as plain numbers (per-bucket counts and a sum), made a Prometheus family when scraped."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (the last: above every bound)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """One duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram family, unlabelled."""
        return HistogramMetricFamily(name, documentation, buckets=_cumulative(self.bounds, self.counts),
                                     sum_value=self.total)


class DomainMetrics:
    """The figures of one domain (or of `other`, or of `none`), found once per request by a dict lookup."""

    __slots__ = ("label", "requests", "buckets", "duration_sum", "bytes_in", "bytes_out")

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = [0] * len(STATUS_CLASSES)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket (the last: above every bound)
        self.duration_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0

    def finished(self, status: int, seconds: float) -> None:
        """One request answered with `status` after `seconds`."""
        index = status // 100 - 1
        self.requests[index if 0 <= index < 5 else 4] += 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    # The relay's meter (tun2g.http.relay.Meter): called as bytes move, so a long download is counted live.
    def up(self, size: int, body: bytes) -> None:
        self.bytes_in += size

    def down(self, size: int, body: bytes) -> None:
        self.bytes_out += size


class AcmeMetrics:
    """The in-server ACME manager's figures (tun2g.server.cert_manager)."""

    def __init__(self) -> None:
        self.started, self.succeeded, self.failed, self.renewals = Count(), Count(), Count(), Count()
        self.seconds = Durations(ACME_SECONDS_BUCKETS)

    def issued(self, seconds: float) -> None:
        """One order that produced a certificate after `seconds`."""
        self.succeeded.inc()
        self.seconds.observe(seconds)

    def families(self, ns: str) -> Iterator[Metric]:
        """The Prometheus families, built at scrape time."""
        for name, count, text in (("started", self.started, "ACME orders begun by this node"),
                                  ("succeeded", self.succeeded, "ACME orders that produced a certificate"),
                                  ("failed", self.failed, "ACME orders that failed (the log line has the error)")):
            yield CounterMetricFamily(f"{ns}_acme_orders_{name}", text, value=count.value)
        yield CounterMetricFamily(f"{ns}_acme_renewals", "Certificates renewed by this node", value=self.renewals.value)
        yield self.seconds.family(f"{ns}_acme_issue_seconds", "From an order begun to its certificate stored")


class TCPRouteMetrics:
    """The figures of one TCP route or passthrough name ("tcp:2222", "tls:db.example.com"), or of `other` / `none`."""

    __slots__ = ("label", "connections", "bytes_in", "bytes_out")

    def __init__(self, label: str) -> None:
        self.label = label
        self.connections = {outcome: 0 for outcome in TCP_OUTCOMES}
        self.bytes_in = 0
        self.bytes_out = 0


class Metrics:
    """Every metric of one server process, exported from its own registry."""

    def __init__(self, domain_cap: int = DEFAULT_DOMAIN_CAP, *, namespace: str = "tun2g") -> None:
        if domain_cap < 0:
            raise ValueError("domain_cap must be zero or more")
        self.domain_cap = domain_cap
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=False)
        self.auth = {outcome: Count() for outcome in AUTH_OUTCOMES}
        self.hops = {outcome: Count() for outcome in HOP_OUTCOMES}
        self.captures = {outcome: Count() for outcome in CAPTURE_OUTCOMES}
        self.redis_errors: dict[str, Count] = {}
        self.tcp_connections = {outcome: Count() for outcome in TCP_OUTCOMES}
        self.tcp_bytes = {"in": Count(), "out": Count()}
        self.tcp_open = Count()  # a gauge: public TCP connections being spliced now
        self.acme = AcmeMetrics()
        self._tcp_routes: dict[str, TCPRouteMetrics] = {}  # capped like the domains (domain_cap, then "other")
        self.tcp_unrouted = TCPRouteMetrics(UNROUTED)  # connections for no route (an unknown SNI name, no SNI)
        self._domains: dict[str, DomainMetrics] = {}
        self._other: DomainMetrics | None = None
        self.unrouted = DomainMetrics(UNROUTED)
        self._sources: list[Callable[[], Iterable[SessionSample]]] = []
        self.registry.register(_Collector(self))

    def domain(self, domain: str) -> DomainMetrics:
        """The figures for `domain`; past the cap, the shared `other` ones."""
        found = self._domains.get(domain)
        if found is not None:
            return found
        if len(self._domains) < self.domain_cap:
            found = self._domains[domain] = DomainMetrics(domain)
            return found
        if self._other is None:
            self._other = DomainMetrics(OTHER)
        return self._other

    def tcp_route(self, key: str) -> TCPRouteMetrics:
        """The figures of one TCP route key ("tcp:2222", "tls:NAME"); past the cap, the shared `other` ones."""
        found = self._tcp_routes.get(key)
        if found is None:  # `other` shares the table: no route key is spelled "other"
            label = key if len(self._tcp_routes) < self.domain_cap else OTHER
            found = self._tcp_routes.setdefault(label, TCPRouteMetrics(label))
        return found

    def all_tcp_routes(self) -> list[TCPRouteMetrics]:
        """Every route's figures, `other` and `none` included."""
        return [*self._tcp_routes.values(), self.tcp_unrouted]

    def label(self, domain: str) -> str:
        """The label `domain` is exported under (claims a slot if one is free)."""
        return self.domain(domain).label

    def all_domains(self) -> list[DomainMetrics]:
        extra = [self.unrouted] + ([self._other] if self._other is not None else [])
        return list(self._domains.values()) + extra

    def redis_error(self, what: str) -> None:
        count = self.redis_errors.get(what)
        if count is None:
            count = self.redis_errors[what] = Count()
        count.value += 1

    def watch(self, source: Callable[[], Iterable[SessionSample]]) -> None:
        """Export tunnels, streams and smux figures read from `source()` at each scrape."""
        self._sources.append(source)

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape reads."""
        return generate_latest(self.registry)


class _Collector:
    """Builds every family when scraped: the request path only adds to plain numbers."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        ns = m.namespace
        domains = m.all_domains()
        requests = CounterMetricFamily(f"{ns}_requests", "Public requests answered, by domain and status class",
                                       labels=("domain", "code"))
        duration = HistogramMetricFamily(f"{ns}_request_duration_seconds",
                                         "From the request head read to the response sent", labels=("domain",))
        bytes_in = CounterMetricFamily(f"{ns}_bytes_in", "Bytes relayed from public clients to upstreams (heads and "
                                       "framing included), counted as they move", labels=("domain",))
        bytes_out = CounterMetricFamily(f"{ns}_bytes_out", "Bytes relayed from upstreams to public clients (heads "
                                        "and framing included), counted as they move", labels=("domain",))
        for d in domains:
            for code, count in zip(STATUS_CLASSES, d.requests):
                requests.add_metric((d.label, code), count)
            duration.add_metric((d.label,), _cumulative(DURATION_BUCKETS, d.buckets), d.duration_sum)
            bytes_in.add_metric((d.label,), d.bytes_in)
            bytes_out.add_metric((d.label,), d.bytes_out)
        yield from (requests, duration, bytes_in, bytes_out)
        yield _counts(f"{ns}_auth", "Tunnel client authentications, by outcome", "outcome", m.auth)
        yield _counts(f"{ns}_hop_forwards", "Requests forwarded to another node, by outcome", "outcome", m.hops)
        yield _counts(f"{ns}_redis_errors", "Failed Redis calls, by what made them", "what", m.redis_errors)
        yield _counts(f"{ns}_inspect_captures", "Captured exchanges for the inspector, by fate", "outcome",
                      m.captures)
        yield _counts(f"{ns}_tcp_connections", "Public TCP and TLS-passthrough connections, by outcome",
                      "outcome", m.tcp_connections)
        yield _counts(f"{ns}_tcp_bytes", "Bytes spliced through TCP routes (in: from public peers)", "direction",
                      m.tcp_bytes)
        yield GaugeMetricFamily(f"{ns}_tcp_connections_open", "Public TCP connections being spliced now",
                                value=m.tcp_open.value)
        yield from m.acme.families(ns)
        yield from _tcp_route_families(ns, m.all_tcp_routes())
        yield from _StateCollector(m, ns).collect()


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus' cumulative (le, count) pairs, +Inf last."""
    pairs, total = [], 0
    for bound, count in zip([str(bound) for bound in bounds] + ["+Inf"], counts):
        total += count
        pairs.append((bound, float(total)))
    return pairs




def _tcp_route_families(ns: str, routes: list[TCPRouteMetrics]) -> Iterator[Metric]:
    connections = CounterMetricFamily(f"{ns}_tcp_route_connections", "Public TCP and TLS-passthrough connections, "
                                      "by route and outcome", labels=("route", "outcome"))
    moved = CounterMetricFamily(f"{ns}_tcp_route_bytes", "Bytes spliced, by route (in: from public peers)",
                                labels=("route", "direction"))
    for route in routes:
        for outcome, count in route.connections.items():
            if count:
                connections.add_metric((route.label, outcome), count)
        moved.add_metric((route.label, "in"), route.bytes_in)
        moved.add_metric((route.label, "out"), route.bytes_out)
    yield from (connections, moved)


def _counts(name: str, documentation: str, label: str, counts: dict[str, Count]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=(label,))
    for value, count in sorted(counts.items()):
        family.add_metric((value,), count.value)
    return family


class _StateCollector:
    """Gauges computed when scraped from the watched sources: zero cost per request."""

    def __init__(self, metrics: Metrics, namespace: str) -> None:
        self._metrics = metrics
        self._ns = namespace

    def collect(self) -> Iterator[Metric]:
        tunnels: dict[str, int] = {}
        sessions = streams = buffered = in_flight = 0
        samples = [sample for source in self._metrics._sources for sample in source()]
        for sample in samples:
            label = self._metrics.label(sample.domain)
            tunnels[label] = tunnels.get(label, 0) + 1
            sessions += 1
            streams += sample.streams
            buffered += sample.buffered_bytes
            in_flight += sample.in_flight
        ns = self._ns
        family = GaugeMetricFamily(f"{ns}_tunnels", "Tunnel clients connected to this node, by domain",
                                   labels=("domain",))
        for label, count in sorted(tunnels.items()):
            family.add_metric((label,), count)
        yield family
        yield GaugeMetricFamily(f"{ns}_requests_in_flight", "Requests being relayed through this node's tunnels",
                                value=in_flight)
        yield GaugeMetricFamily(f"{ns}_smux_sessions", "Open smux sessions (one per tunnel)", value=sessions)
        yield GaugeMetricFamily(f"{ns}_smux_streams", "Open smux streams over every session", value=streams)
        yield GaugeMetricFamily(f"{ns}_smux_buffered_bytes", "Bytes received on smux streams and not yet read",
                                value=buffered)


__all__ = ["AcmeMetrics", "CONTENT_TYPE", "Count", "DEFAULT_DOMAIN_CAP", "DomainMetrics", "Metrics", "OTHER", "SessionSample",
           "UNROUTED"]
