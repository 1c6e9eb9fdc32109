"""The edge-policy step of the request pipeline, and the book of every route's policy.

`PolicyBook.get(route)` is one dict lookup by route key (None for a route
without a policy: then the step costs nothing more). `PolicyBook.check()` runs
a route's rules on a public request before anything reaches a tunnel, in this
order: head size (431), client address (403), per-address then per-route rate
(429 with Retry-After), credentials (401 with WWW-Authenticate), declared body
size (413); a chunked body is cut past the limit as it streams (413 if nothing
was answered yet). A request that passes gets its request-header rules; the
pipeline then applies the response-header rules, the route's response
timeout (504) and its custom error pages.

Where a forwarded request is checked: on the node it came in by only. That
node sees the client's address, keeps the rate buckets and holds the public
socket (body limit, response headers, timeout, pages all act there); the node
that serves a hop trusts the signed hop and does not check again.

Policies come from two sources, merged by route key: the config file
(`set_config_policies`, pushed by whoever loads tun2g.toml) and the store
(`tun2g policy set`, re-read when the store's revision moves, within a
second on every node). For a route in both, the config file's wins whole
(what is deployed is what holds; the shadowed stored one is logged).
"""

from __future__ import annotations

import gevent

from tun2g import pages
from tun2g.http import RequestHead
from tun2g.log import get_logger
from tun2g.policy import Policy, PolicyError, retry_after
from tun2g.server.rate_limit import LocalLimiter, RateLimiter
from tun2g.storage import Storage, StorageError

log = get_logger(__name__)

REFRESH_INTERVAL = 0.5  # s between reads of the store's revision: a change applies within a second


def head_size(head: RequestHead) -> int:
    """Bytes of the request line and header lines as sent (CRLFs included)."""
    return len(head.method) + len(head.target) + len(head.version) + 4 + sum(
        len(name) + len(value) + 4 for name, value in head.headers) + 2


class PolicyBook:
    """Every route's policy (config file over store), the rate limiter, and the checks."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter: RateLimiter = LocalLimiter() if limiter is None else limiter
        self._config: dict[str, Policy] = {}
        self._stored: dict[str, Policy] = {}
        self._active: dict[str, Policy] = {}
        self._revision: str | None = None
        self._greenlet: gevent.Greenlet | None = None

    # -- the request path -------------------------------------------------------------

    def get(self, route: str | None) -> Policy | None:
        """The policy of a route key, or None (one dict lookup)."""
        return self._active.get(route) if route is not None and self._active else None

    def check(self, policy: Policy, route: str, head: RequestHead, client_ip: str, request_id: str
              ) -> pages.Page | None:
        """The refusal page for a request this policy does not let through, else None (rules applied to `head`)."""
        if policy.max_head is not None and head_size(head) > policy.max_head:
            return pages.policy_refusal(431, "The request's headers are larger than this site allows.", request_id)
        if policy.access and not policy.access.admits(client_ip):
            log.info("policy_refused", route=route, client=client_ip, reason="address", request_id=request_id)
            return pages.policy_refusal(403, "Your address may not reach this site.", request_id)
        if policy.rate_per_ip is not None:
            wait = self.limiter.take(f"{route} {client_ip}", policy.rate_per_ip, policy.ip_burst)
            if wait:
                return _too_many(wait, request_id)
        if policy.rate is not None:
            wait = self.limiter.take(route, policy.rate, policy.rate_burst)
            if wait:
                return _too_many(wait, request_id)
        credentials = policy.credentials
        if credentials is not None and not credentials.admits(head.get("Authorization")):
            realm = route.replace('"', "'").replace("\\", "/")
            challenge = ", ".join(f'{scheme} realm="{realm}"' for scheme in credentials.schemes)
            return pages.policy_refusal(401, "This site needs credentials.", request_id,
                                        headers=(("WWW-Authenticate", challenge),))
        length = head.content_length
        if policy.max_body is not None and length is not None and length > policy.max_body:
            return pages.policy_refusal(413, f"The request body is larger than this site allows "
                                             f"({policy.max_body} bytes).", request_id)
        if policy.request_headers:
            head.headers = policy.request_headers.apply(head.headers)
        return None

    # -- where policies come from ---------------------------------------------------------

    def set_config_policies(self, policies: dict[str, Policy]) -> None:
        """The config file's policies by route key (replacing the previous set); they win over stored ones."""
        self._config = dict(policies)
        self._merge()

    def set_stored_policies(self, policies: dict[str, Policy]) -> None:
        self._stored = dict(policies)
        self._merge()

    def _merge(self) -> None:
        shadowed = sorted(set(self._config) & set(self._stored))
        if shadowed:
            log.warning("policy_shadowed", routes=",".join(shadowed[:20]), count=len(shadowed),
                        effect="the config file's policy holds for these routes, not the stored one")
        self._active = {**self._stored, **self._config}

    def refresh(self, storage: Storage) -> bool:
        """Re-read the stored policies if the store's revision moved; True when it did and they were read."""
        try:
            revision = storage.revision()
            if revision == self._revision:
                return False
            stored = storage.list_policies()
        except StorageError as exc:
            log.debug("policy_refresh_failed", error=str(exc))
            return False
        self._revision = revision
        policies: dict[str, Policy] = {}
        for route, data in stored.items():
            previous = self._stored.get(route)
            try:
                policy = Policy.from_mapping(data, f"stored policy for {route}")
            except PolicyError as exc:  # written by a newer tun2g, or by hand: the others still apply
                log.error("policy_invalid", route=route, error=str(exc),
                          effect="the previous policy stays" if previous else "the route has no policy")
                if previous is not None:
                    policies[route] = previous
                continue
            # An unchanged policy keeps its object: its caches (address verdicts, credential verdicts) stay warm.
            policies[route] = previous if previous is not None and previous == policy else policy
        if policies.keys() != self._stored.keys():
            log.info("policies_loaded", stored=len(policies), config=len(self._config))
        self.set_stored_policies(policies)
        return True

    def start(self, storage: Storage, interval: float = REFRESH_INTERVAL) -> None:
        """Load the stored policies now, then follow the store's changes."""
        self.refresh(storage)
        self._greenlet = gevent.spawn(self._follow, storage, interval)

    def _follow(self, storage: Storage, interval: float) -> None:
        while True:
            gevent.sleep(interval)  # the polling cadence, not synchronisation
            try:
                self.refresh(storage)
            except Exception as exc:  # a bug must not freeze the policies for the process's lifetime
                log.error("policy_refresh_crashed", error=repr(exc))

    def close(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        self.limiter.close()

    def __len__(self) -> int:
        return len(self._active)


def _too_many(wait: float, request_id: str) -> pages.Page:
    seconds = retry_after(wait)
    return pages.policy_refusal(429, f"Too many requests for this site; retry in {seconds} s.", request_id,
                                headers=(("Retry-After", str(seconds)),))


__all__ = ["PolicyBook", "head_size"]
