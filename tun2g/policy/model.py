"""A route's edge policy: what it holds, how it is read from a mapping (store, config file) and written back.

`Policy.from_mapping(data, source)` is the one parser: the store's JSON, a
`[policy."<route>"]` table of tun2g.toml and the command line all go through
it, and a `PolicyError` names the source and the key at fault. `as_mapping()`
is its inverse (what the store keeps; no plain secret is ever in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tun2g.policy.access import MAX_NETWORKS, AccessError, AddressRules, parse_network
from tun2g.policy.credentials import (MAX_TOKENS, MAX_USERS, CredentialError, Credentials, check_bearer_hash,
                                      check_password_hash)
from tun2g.policy.headers import HeaderRuleError, HeaderRules
from tun2g.policy.units import UnitError, format_duration, format_rate, format_size, parse_duration, parse_rate, parse_size

MAX_PAGE = 64 * 1024     # bytes of one custom error page
MAX_PAGES = 20
MAX_USER_NAME = 256
REQUEST_ID_PLACEHOLDER = "{{request_id}}"  # replaced in a custom page by the request's id (HTML-escaped)
STATUS_PLACEHOLDER = "{{status}}"

_KEYS = ("basic_auth", "bearer", "allow", "deny", "request_headers", "response_headers", "max_body", "max_head",
         "timeout", "rate", "burst", "rate_per_ip", "burst_per_ip", "error_pages", "error_page_files")


class PolicyError(ValueError):
    """A policy that cannot be: ``"<source>: <key>: <what is wrong and what to write instead>"``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.source = source
        self.key = key
        self.detail = message


@dataclass(frozen=True, eq=False)
class Policy:
    """Everything checked or changed at the edge for one route (each part optional)."""

    credentials: Credentials | None = None
    access: AddressRules = field(default_factory=AddressRules)
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    max_body: int | None = None      # bytes (413 past it)
    max_head: int | None = None      # bytes of request line and headers (431 past it)
    timeout: float | None = None     # seconds for the backend's response head (504 past it)
    rate: float | None = None        # requests per second for the whole route ...
    burst: int | None = None         # ... up to this many at once
    rate_per_ip: float | None = None  # requests per second per client address ...
    burst_per_ip: int | None = None
    error_pages: Mapping[int, str] = field(default_factory=dict)  # status -> HTML with placeholders

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str,
                     read_file: Callable[[str], str] | None = None) -> Policy:
        """Parse and validate; PolicyError naming `source` and the key on any fault.

        `error_page_files` (status -> path) needs `read_file` (the caller's I/O): the
        pages' contents are what the policy keeps.
        """
        if not isinstance(data, Mapping):
            raise PolicyError(source, "policy", f"expected a table of settings, got {type(data).__name__}")
        for key in data:
            if key not in _KEYS:
                raise PolicyError(source, str(key), f"unknown setting; known: {', '.join(_KEYS)}")

        def part(key: str, parse: Callable[[Any], Any]) -> Any:
            if key not in data or data[key] is None:
                return None
            try:
                return parse(data[key])
            except (UnitError, AccessError, CredentialError, HeaderRuleError, TypeError, ValueError) as exc:
                raise PolicyError(source, key, str(exc)) from None

        users = part("basic_auth", _users) or {}
        bearers = part("bearer", _bearers) or frozenset()
        rate, rate_per_ip = part("rate", parse_rate), part("rate_per_ip", parse_rate)
        pages = dict(part("error_pages", _pages) or {})
        if data.get("error_page_files"):
            if read_file is None:
                raise PolicyError(source, "error_page_files", "file names cannot be read here; give error_pages")
            pages.update(part("error_page_files", lambda files: _pages(_read_pages(files, read_file))))
        if len(pages) > MAX_PAGES:
            raise PolicyError(source, "error_pages", f"at most {MAX_PAGES} pages")
        return cls(
            credentials=Credentials(users, bearers) if users or bearers else None,
            access=AddressRules(part("allow", _networks) or (), part("deny", _networks) or ()),
            request_headers=part("request_headers", _header_rules) or HeaderRules(),
            response_headers=part("response_headers", _header_rules) or HeaderRules(),
            max_body=part("max_body", parse_size), max_head=part("max_head", parse_size),
            timeout=part("timeout", parse_duration),
            rate=rate, burst=part("burst", _count) if rate else None,
            rate_per_ip=rate_per_ip, burst_per_ip=part("burst_per_ip", _count) if rate_per_ip else None,
            error_pages=pages)

    def as_mapping(self) -> dict[str, Any]:
        """The canonical mapping `from_mapping` reads back to an equal policy (only the settings given)."""
        out: dict[str, Any] = {}
        if self.credentials is not None:
            if self.credentials.users:
                out["basic_auth"] = dict(sorted(self.credentials.users.items()))
            if self.credentials.bearers:
                out["bearer"] = sorted(self.credentials.bearers)
        if self.access.allow:
            out["allow"] = [str(net) for net in self.access.allow]
        if self.access.deny:
            out["deny"] = [str(net) for net in self.access.deny]
        if self.request_headers:
            out["request_headers"] = self.request_headers.as_mapping()
        if self.response_headers:
            out["response_headers"] = self.response_headers.as_mapping()
        if self.max_body is not None:
            out["max_body"] = format_size(self.max_body)
        if self.max_head is not None:
            out["max_head"] = format_size(self.max_head)
        if self.timeout is not None:
            out["timeout"] = format_duration(self.timeout)
        if self.rate is not None:
            out["rate"] = format_rate(self.rate)
            out["burst"] = self.rate_burst
        if self.rate_per_ip is not None:
            out["rate_per_ip"] = format_rate(self.rate_per_ip)
            out["burst_per_ip"] = self.ip_burst
        if self.error_pages:
            out["error_pages"] = {str(status): page for status, page in sorted(self.error_pages.items())}
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.as_mapping() == other.as_mapping()

    __hash__ = None  # type: ignore[assignment]

    @property
    def rate_burst(self) -> int:
        """The route bucket's size: `burst`, else one second of the rate (at least 1)."""
        return self.burst or max(1, math.ceil(self.rate or 0))

    @property
    def ip_burst(self) -> int:
        return self.burst_per_ip or max(1, math.ceil(self.rate_per_ip or 0))

    def merged(self, other: Policy) -> Policy:
        """This policy with every setting `other` gives replaced by other's (a `policy set` on an existing one)."""
        return Policy.from_mapping({**self.as_mapping(), **other.as_mapping()}, "merge")


def _users(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a table of user = \"scrypt$...\" password hashes")
    if len(value) > MAX_USERS:
        raise ValueError(f"at most {MAX_USERS} users")
    users = {}
    for user, encoded in value.items():
        if not isinstance(user, str) or not user or ":" in user or len(user) > MAX_USER_NAME \
                or not user.isprintable():
            raise ValueError(f"{user!r} is not a user name (printable, no colon, at most {MAX_USER_NAME})")
        users[user] = check_password_hash(encoded)
    return users


def _bearers(value: Any) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError("expected a list of sha256:<hex> token digests")
    if len(value) > MAX_TOKENS:
        raise ValueError(f"at most {MAX_TOKENS} bearer tokens")
    return frozenset(check_bearer_hash(item) for item in value)


def _networks(value: Any) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError("expected a list of CIDRs such as [\"10.0.0.0/8\", \"2001:db8::/32\"]")
    if len(value) > MAX_NETWORKS:
        raise ValueError(f"at most {MAX_NETWORKS} networks")
    return tuple(dict.fromkeys(parse_network(item) for item in value))


def _header_rules(value: Any) -> HeaderRules:
    if not isinstance(value, Mapping) or set(value) - {"set", "remove"}:
        raise TypeError("expected a table with set = {Name = \"value\"} and/or remove = [\"Name\"]")
    set_, remove = value.get("set") or {}, value.get("remove") or []
    if not isinstance(set_, Mapping) or isinstance(remove, str) or not isinstance(remove, (list, tuple)):
        raise TypeError("set is a table of Name = \"value\", remove a list of names")
    return HeaderRules.build(set_, remove)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ValueError(f"expected a whole number from 1 to 1000000, got {value!r}")
    return value


def _pages(value: Any) -> dict[int, str]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a table of status = \"<html>...\"")
    pages = {}
    for status, body in value.items():
        try:
            code = int(status)
        except (TypeError, ValueError):
            raise ValueError(f"{status!r} is not an HTTP status (400 to 599)") from None
        if not 400 <= code <= 599:
            raise ValueError(f"{status!r} is not an error status (400 to 599)")
        if not isinstance(body, str) or len(body.encode()) > MAX_PAGE:
            raise ValueError(f"the page for {code} must be text of at most {MAX_PAGE} bytes")
        pages[code] = body
    return pages


def _read_pages(files: Any, read_file: Callable[[str], str]) -> dict:
    if not isinstance(files, Mapping):
        raise TypeError("expected a table of status = \"path/to/page.html\"")
    pages = {}
    for status, path in files.items():
        try:
            pages[status] = read_file(str(path))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
    return pages
