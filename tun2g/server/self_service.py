"""Self-service names and public URLs in the auth reply (docs/routing.md#self-service, docs/protocol.md).

A tun2g client's Auth may say ``"claim": 1``: the server checks the token, then asks
the store for a fresh ``<random>.BASE`` owned by the token's user (within the
per-user limit, `tun2g.storage.claims`) and carries on as if the client had asked
for that domain. The label is always the server's: whatever the client sent as
``domain`` or inside ``claim`` is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Callable
from urllib.parse import urlsplit

from tun2g.control import CONNECT_SCOPE, INVALID_TOKEN, Auth
from tun2g.errors import AuthMismatch
from tun2g.storage import Route, Storage
from tun2g.storage.claims import ClaimRefused, ClaimStore

DEFAULT_LIMIT = 3  # names per user, as ngrok's free plan gives a handful


class RetryLater(Exception):
    """A claim refused for now (the server is stopping, a session cap): the reply says retry."""


def claim_name(storage: Storage, auth: Auth, base: str | None, limit: int,
               cap_refusal: Callable[[str, str], str | None]) -> tuple[Auth, Route]:
    """The Auth with `domain` set to a name claimed for its token's user (and `claim` cleared), and that route.

    AuthMismatch when the server gives no names, the token is unknown or lacks the connect
    scope, or the store refuses the claim for good (the limit); RetryLater when `cap_refusal(token,
    user)` names a reason, checked before the name is made, so a refused client never uses one up;
    StorageError (an outage) as the store raises it.
    """
    if not base or not isinstance(storage, ClaimStore):
        raise AuthMismatch("this server hands out no self-service names; give --domain NAME "
                           "(a route the operator added for you)")
    try:
        user, scopes = storage.has_token(auth.token)
    except LookupError:
        raise AuthMismatch(INVALID_TOKEN, log_reason="unknown or revoked token (claiming a name)") from None
    if CONNECT_SCOPE not in scopes:
        raise AuthMismatch(f"token lacks the {CONNECT_SCOPE!r} scope (it has {sorted(scopes)})")
    refusal = cap_refusal(auth.token, user)
    if refusal is not None:
        raise RetryLater(refusal)
    try:
        route = storage.claim_route(base, user, limit)
    except ClaimRefused as exc:
        raise AuthMismatch(str(exc)) from None
    return dataclasses.replace(auth, domain=route.domain, claim=False), route


def public_url_template(value: str) -> str:
    """A --public-url as a template holding ``{domain}``: kept as given when it holds one, and a bare
    ``scheme://host[:port]`` base becomes ``scheme://{domain}[:port]`` (each client's own host, the
    base's scheme and port). ValueError for anything else."""
    if "{domain}" in value:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, such as https://{{domain}}, got {value!r}")
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or \
            parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"expected https://{{domain}} or a bare base such as https://tunnels.example.com[:8443], "
                         f"got {value!r}")
    return f"{parts.scheme}://{{domain}}" + (f":{port}" if port is not None else "")


def public_urls(template: str | None, route_keys: tuple[str, ...]) -> list[str]:
    """The URL of every route key a tunnel serves (``host/path`` keeps its path), from the template."""
    if not template:
        return []
    urls = []
    for key in route_keys:
        host, slash, path = key.partition("/")
        urls.append(template.replace("{domain}", host) + slash + path)
    return urls
