"""Header rules of a route: set and remove, on the request going up and on the response coming down.

A rule can never touch the message's framing or the proxy's own headers
(X-Forwarded-*, X-Request-Id, the cluster's hop header): those stay as the
relay and the pipeline set them. Names must be RFC 9110 tokens and values
visible ASCII/UTF-8 text without CR, LF or NUL, so a rule cannot inject a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

MAX_RULES = 100       # set + remove, per direction
MAX_VALUE = 8192      # bytes of a set value

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB: CR and LF above all
# Framing and connection management (RFC 9110 section 7.6.1, RFC 9112), then the proxy's own headers.
PROTECTED = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
    "proxy-connection", "host", "expect",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip", "x-request-id",
    "x-tun2g-hop",
})


class HeaderRuleError(ValueError):
    """A header rule that cannot be: the message says which name or value and why."""


def check_name(name: object) -> str:
    """A header name a rule may use; HeaderRuleError for a non-token or a protected name."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise HeaderRuleError(f"{name!r} is not a header name (letters, digits and !#$%&'*+.^_`|~-)")
    if name.lower() in PROTECTED or name.lower().startswith("x-tun2g-"):
        raise HeaderRuleError(f"{name} is a framing or proxy header that rules may not change")
    return name


def check_value(name: str, value: object) -> str:
    """A header value a rule may set; HeaderRuleError for CR, LF, other controls or an oversized value."""
    if not isinstance(value, str):
        raise HeaderRuleError(f"the value for {name} must be a string, not {type(value).__name__}")
    if _BAD_VALUE.search(value):
        raise HeaderRuleError(f"the value for {name} contains CR, LF or another control character")
    if len(value.encode()) > MAX_VALUE or value != value.strip():
        raise HeaderRuleError(f"the value for {name} must be at most {MAX_VALUE} bytes, without edge whitespace")
    return value


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Headers to remove (lower-case names) and headers to set (replacing any of that name), in one direction."""

    set: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)

    @classmethod
    def build(cls, set_: Mapping[str, str] | Iterable[tuple[str, str]], remove: Iterable[str]) -> HeaderRules:
        pairs = list(set_.items() if isinstance(set_, Mapping) else set_)
        removed = [check_name(name).lower() for name in remove]
        if len(pairs) + len(removed) > MAX_RULES:
            raise HeaderRuleError(f"at most {MAX_RULES} header rules per direction")
        seen: dict[str, tuple[str, str]] = {}
        for name, value in pairs:
            seen[check_name(name).lower()] = (name, check_value(name, value))
        return cls(tuple(seen.values()), frozenset(removed))

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """`headers` without the removed and the set names, then the set ones appended."""
        dropped = self.remove | {name.lower() for name, _ in self.set}
        kept = [header for header in headers if header[0].lower() not in dropped]
        kept.extend(self.set)
        return kept

    def as_mapping(self) -> dict:
        return {"set": dict(self.set), "remove": sorted(self.remove)}
