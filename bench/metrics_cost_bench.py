"""What the metrics and the capture add to one request's hot path, timed call by call (no sockets).

    python3 bench/metrics_cost_bench.py [--requests 200000]

Replays the calls the pipeline and the relay make for one small proxied request
(domain lookup, bytes up once, bytes down twice, the finish with its status and
duration), under gevent's monkey-patching as `tun2g server` runs (prometheus-client's
locks are then gevent's). The end-to-end figure, noisier, is
`bench/request_cost_bench.py --modes off,metrics,capture`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import time  # noqa: E402

from tun2g.metrics import Metrics  # noqa: E402
from tun2g.server.inspect import Inspector, MemoryCaptures, encode_record  # noqa: E402

HEADERS = [("Host", "app.test"), ("User-Agent", "wrk"), ("Accept", "*/*"), ("X-Forwarded-For", "127.0.0.1"),
           ("Authorization", "Bearer x")]


def per_request(run, requests: int) -> float:
    started = time.perf_counter()
    run(requests)
    return (time.perf_counter() - started) * 1e6 / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    metrics = Metrics()
    body = b"x" * 600
    for n in range(150):  # a realistic label set
        metrics.domain(f"d{n}.test")

    def metered(count: int) -> None:
        domain = metrics.domain
        for _ in range(count):
            meter = domain("d7.test")
            meter.up(180, b"")
            meter.down(250, body)
            meter.down(5, b"")
            meter.finished(200, 0.0021)

    inspector = Inspector(MemoryCaptures(), queue_size=1 << 30)  # the writer runs below, after the timing
    inspector.set_domains({"d7.test"})

    def captured(count: int) -> None:
        domain = metrics.domain
        for _ in range(count):
            meter = inspector.capture(domain("d7.test"))
            meter.up(180, b"")
            meter.down(250, body)
            meter.down(5, b"")
            metrics.domain("d7.test").finished(200, 0.0021)
            inspector.offer("d7.test", meter.record(
                domain="d7.test", node="n", method="GET", path="/", status=200, seconds=0.0021,
                client_ip="127.0.0.1", request_id="r", request_headers=HEADERS, response_headers=HEADERS,
                backend="b"))

    def baseline(count: int) -> None:
        for _ in range(count):
            pass

    empty = per_request(baseline, args.requests)
    with_metrics = per_request(metered, args.requests) - empty
    captures = args.requests // 10
    with_capture = per_request(captured, captures) - empty
    started = time.perf_counter()
    written = inspector.drain()
    writer = (time.perf_counter() - started) * 1e6 / max(1, written)
    store = RedisShapedCaptures()
    redis_inspector = Inspector(store, queue_size=1 << 30)
    for _ in range(captures):
        meter = redis_inspector.capture(metrics.domain("d7.test"))
        meter.up(180, b"")
        meter.down(250, body)
        redis_inspector.offer("d7.test", meter.record(
            domain="d7.test", node="n", method="GET", path="/", status=200, seconds=0.0021,
            client_ip="127.0.0.1", request_id="r", request_headers=HEADERS, response_headers=HEADERS, backend="b"))
    started = time.perf_counter()
    redis_written = redis_inspector.drain()
    redis_writer = (time.perf_counter() - started) * 1e6 / max(1, redis_written)
    print(f"metrics: {with_metrics:.2f} µs per request (lookup, 3 byte counts, request counter, histogram)")
    print(f"capture: {with_capture:.2f} µs per captured request on the request path (metrics included; "
          f"record built and queued)")
    print(f"capture writer, in memory: {writer:.2f} µs per record (off the request path, same core)")
    print(f"capture writer, Redis-shaped (JSON made, no network): {redis_writer:.2f} µs per record")


class RedisShapedCaptures(MemoryCaptures):
    """What RedisCaptures does to a record before the network: its JSON."""

    def append(self, domain, record) -> None:
        encode_record(record)


if __name__ == "__main__":
    main()
