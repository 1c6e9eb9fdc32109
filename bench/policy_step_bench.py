"""CPU cost of the edge-policy step per request, in process: no policies, 1,000 on other routes, one on the route.

    python3 bench/policy_step_bench.py [--requests 200000]

Times `Pipeline._policy_step` the way the pipeline calls it (lookup by route key, then the checks of
a route's policy: allow list, a header rule, a body limit) on one prepared request head; the rest of
a request's cost is in bench/request_cost_bench.py (`--modes off,policies,policy`).
"""

from __future__ import annotations

import argparse
import time

from tun2g.http import RequestHead
from tun2g.policy import Policy
from tun2g.server.pipeline import Pipeline, Request
from tun2g.server.policy_step import PolicyBook
from tun2g.server.router import Router
from tun2g.server.tunnels import Tunnels

ROUTE = "bench.test"
OTHERS = {f"site{index}.bench.test": Policy.from_mapping({"allow": ["10.0.0.0/8"], "rate": "10/s"}, "bench")
          for index in range(1000)}
OWN = Policy.from_mapping({"allow": ["127.0.0.0/8"], "max_body": "10M",
                           "request_headers": {"set": {"X-Edge": "bench"}, "remove": []}}, "bench")


class _NoExchange:
    def limit(self, timeouts, max_body) -> None:
        pass


def _per_request_us(policies: dict[str, Policy], count: int) -> float:
    book = PolicyBook()
    book.set_config_policies(policies)
    pipeline = Pipeline(Router(Tunnels()), policies=book)
    headers = [("Host", ROUTE), ("User-Agent", "bench"), ("Accept", "*/*"), ("X-Forwarded-For", "127.0.0.1")]
    exchange = _NoExchange()
    started = time.process_time()
    for _ in range(count):
        head = RequestHead("GET", "/", "HTTP/1.1", list(headers))
        request = Request(head, "id", ROUTE, "127.0.0.1", "http", 0.0, False)
        pipeline._policy_step(request, ROUTE, exchange)  # type: ignore[arg-type]
    return (time.process_time() - started) * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    rows = [("no policies", {}), ("1,000 on other routes", OTHERS), ("1,000 + one on the route", {**OTHERS, ROUTE: OWN})]
    print("| policies loaded | CPU µs/request (making the head and Request, then the step) |")
    print("|---|---|")
    for name, policies in rows:
        print(f"| {name} | {_per_request_us(policies, args.requests):.2f} |", flush=True)


if __name__ == "__main__":
    main()
