"""Route keys and the routing table: which route a request's Host and path select, sans-I/O.

A *route key* names one route: ``example.com`` (a host), ``*.example.com`` (a
wildcard: exactly one more label, so ``a.example.com`` but neither
``example.com`` nor ``a.b.example.com``) or ``example.com/api`` (a path prefix
on a host, also ``*.example.com/api``). Precedence (docs/routing.md):

1. the exact host before the wildcard of its parent;
2. on that host, the longest prefix that matches on a segment boundary
   (``/api`` matches ``/api`` and ``/api/x``, never ``/apix``), the bare host last;
3. a host whose routes all carry prefixes, none matching, falls through to the wildcard.

A lookup is two dict reads at most (the host, then ``*.`` + its parent) and a
scan of that host's few prefixes (at most MAX_PREFIXES_PER_HOST), never a scan
of every route.

Paths are matched as the backend will read them: ``%XX`` escapes of unreserved
characters are decoded first (``/%61pi`` is ``/api``); on a host with prefix
routes, a path holding a dot segment or an encoded slash or backslash is
ambiguous (backends disagree about it) and is refused (`AmbiguousPath`) rather
than routed past a prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

from tun2g.storage.base import StorageError, normalize_domain

WILDCARD = "*."
MAX_PREFIX_LENGTH = 512
MAX_PREFIXES_PER_HOST = 64  # keeps the per-host scan short; operators split hosts before this
# A path prefix is plain segments of RFC 3986 pchars without "%" (no escapes to disagree about).
_PREFIX = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]+)+")
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])")
_AMBIGUOUS_ESCAPE = re.compile(r"%(?:2[Ff]|5[Cc])")

V = TypeVar("V")


class RouteKeyError(StorageError):
    """A route key that is not a host, a wildcard or a host with a path prefix."""


class AmbiguousPath(ValueError):
    """A request path that prefix routing cannot place unambiguously (dot segment, encoded slash)."""


@dataclass(frozen=True)
class RouteKey:
    """A parsed route key: `host` (maybe ``*.parent``) and `path` ("" or ``/a/b``, no trailing slash)."""

    host: str
    path: str = ""

    def __str__(self) -> str:
        return self.host + self.path

    @property
    def wildcard(self) -> bool:
        return self.host.startswith(WILDCARD)

    @property
    def parent(self) -> str:
        """The host minus its first label ("" for a one-label host): what a wildcard covers one label below."""
        return self.host.partition(".")[2]

    def covered_by(self) -> str | None:
        """The wildcard host this key's host sits directly under (``a.example.com`` -> ``*.example.com``)."""
        if self.wildcard or not self.parent or self.host.startswith("["):
            return None
        return WILDCARD + self.parent


def parse_route_key(text: str, path: str | None = None) -> RouteKey:
    """A route key from ``host[/prefix]`` (and an optional separate `path`); RouteKeyError if invalid.

    The host goes through `normalize_domain` (case, IDN, port and trailing dot);
    ``*.`` may lead it. The prefix is "" or ``/seg[/seg...]`` without escapes,
    dot segments, empty segments, query or fragment; a trailing slash is dropped.
    """
    if not isinstance(text, str):
        raise RouteKeyError(f"a route must be a string, not {type(text).__name__}")
    host, slash, rest = text.partition("/")
    key_path = slash + rest
    if path is not None and path not in ("", "/"):
        if key_path:
            raise RouteKeyError(f"route {text!r} already has a path; give it once (in the key or as --path)")
        key_path = path
    wildcard = host.startswith(WILDCARD)
    bare = host[len(WILDCARD):] if wildcard else host
    if "*" in bare:
        raise RouteKeyError(f"invalid route {text!r}: a wildcard is only '*.' before a domain, "
                            f"as in *.example.com (it matches one label)")
    try:
        normalized = normalize_domain(bare)
    except StorageError as exc:
        raise RouteKeyError(str(exc)) from None
    if wildcard and normalized.startswith("["):
        raise RouteKeyError(f"invalid route {text!r}: a wildcard needs a domain after '*.', not an IP address")
    if wildcard and "." not in normalized:  # *.com would claim a whole top-level domain
        raise RouteKeyError(f"invalid route {text!r}: a wildcard needs two labels or more after '*.', "
                            f"as in *.example.com")
    return RouteKey(WILDCARD + normalized if wildcard else normalized, normalize_prefix(key_path, text))


def normalize_route_key(text: str) -> str:
    """A route key as stored and matched (`parse_route_key`, then back to text); RouteKeyError if invalid."""
    return str(parse_route_key(text))


def normalize_prefix(path: str, context: str = "") -> str:
    """A route's path prefix as stored: "" for none, else ``/seg[/seg...]``; RouteKeyError if invalid."""
    if path in ("", "/"):
        return ""
    where = f" in route {context!r}" if context else ""
    if not isinstance(path, str) or len(path) > MAX_PREFIX_LENGTH:
        raise RouteKeyError(f"path prefix{where} is longer than {MAX_PREFIX_LENGTH} characters")
    trimmed = path[:-1] if path.endswith("/") else path
    if not _PREFIX.fullmatch(trimmed) or any(segment in (".", "..") for segment in trimmed.split("/")):
        raise RouteKeyError(f"invalid path prefix {path!r}{where}: expected /segment[/segment...] of letters, "
                            f"digits and -._~!$&'()*+,;=:@ (no %-escapes, '.' or '..' segments, '//', '?' or '#')")
    return trimmed


@dataclass(frozen=True)
class Match(Generic[V]):
    """The route a request selected: its `key` (``str(RouteKey)``), `value`, `prefix`, and the
    `target` to forward (the prefix removed when the route strips it, else the request's own)."""

    key: str
    value: V
    prefix: str
    target: str
    strip: bool


@dataclass
class _Host(Generic[V]):
    root: tuple[V, bool] | None = None  # the bare host's route: (value, strip)
    # (prefix, value, strip), longest prefix first
    prefixes: list[tuple[str, V, bool]] = field(default_factory=list)


class RoutingTable(Generic[V]):
    """Route keys -> values, and the match of a (host, target) (see the module docstring)."""

    def __init__(self) -> None:
        self._hosts: dict[str, _Host[V]] = {}
        self._size = 0

    def add(self, key: RouteKey, value: V, strip: bool = False) -> None:
        """Add or replace a route; RouteKeyError past MAX_PREFIXES_PER_HOST prefixes on one host."""
        entry = self._hosts.setdefault(key.host, _Host())
        if not key.path:
            self._size += entry.root is None
            entry.root = (value, strip)
            return
        kept = [item for item in entry.prefixes if item[0] != key.path]
        if len(kept) == len(entry.prefixes) and len(kept) >= MAX_PREFIXES_PER_HOST:
            raise RouteKeyError(f"host {key.host} has {MAX_PREFIXES_PER_HOST} path routes already; "
                                f"that is the limit")
        self._size += len(kept) == len(entry.prefixes)
        kept.append((key.path, value, strip))
        kept.sort(key=lambda item: -len(item[0]))
        entry.prefixes = kept

    def remove(self, key: RouteKey) -> bool:
        """Remove a route; True when it was there."""
        entry = self._hosts.get(key.host)
        if entry is None:
            return False
        if key.path:
            kept = [item for item in entry.prefixes if item[0] != key.path]
            removed = len(kept) != len(entry.prefixes)
            entry.prefixes = kept
        else:
            removed, entry.root = entry.root is not None, None
        if entry.root is None and not entry.prefixes:
            del self._hosts[key.host]
        self._size -= removed
        return removed

    def get(self, key: RouteKey) -> V | None:
        """The value stored under exactly this key (no matching), else None."""
        entry = self._hosts.get(key.host)
        if entry is None:
            return None
        if not key.path:
            return None if entry.root is None else entry.root[0]
        return next((value for prefix, value, _ in entry.prefixes if prefix == key.path), None)

    def match(self, host: str, target: str) -> Match[V] | None:
        """The route for a request: `host` already normalized (`normalize_domain`), `target` its request target.

        None when no route matches; raises AmbiguousPath for a path prefix routing cannot place.
        """
        entry = self._hosts.get(host)
        if entry is not None:
            found = self._match_host(host, entry, target)
            if found is not None:
                return found
        parent = host.partition(".")[2]
        if not parent or host.startswith("["):
            return None
        wildcard = WILDCARD + parent
        entry = self._hosts.get(wildcard)
        return None if entry is None else self._match_host(wildcard, entry, target)

    def _match_host(self, host: str, entry: _Host[V], target: str) -> Match[V] | None:
        if entry.prefixes:
            path, query = request_path(target)
            for prefix, value, strip in entry.prefixes:
                if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                    forwarded = (path[len(prefix):] or "/") + query if strip else target
                    return Match(host + prefix, value, prefix, forwarded, strip)
        if entry.root is None:
            return None
        return Match(host, entry.root[0], "", target, entry.root[1])

    def keys(self) -> Iterator[str]:
        """Every route key in the table."""
        for host, entry in self._hosts.items():
            if entry.root is not None:
                yield host
            for prefix, _, _ in entry.prefixes:
                yield host + prefix

    def __len__(self) -> int:
        return self._size


def request_path(target: str) -> tuple[str, str]:
    """(the path prefix routing reads, the "?query" kept as is) of a request target.

    Unreserved escapes are decoded (``%7E`` is ``~``); AmbiguousPath for dot
    segments and encoded slashes or backslashes. An absolute-form target
    (``http://host/path``) is read by its path; ``*`` and other forms match no prefix.
    """
    path, mark, query = target.partition("?")
    if not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if not sep or "/" in scheme:
            return "", mark + query
        path = "/" + rest.partition("/")[2]
    if "%" in path:
        if _AMBIGUOUS_ESCAPE.search(path):
            raise AmbiguousPath("an encoded slash or backslash in the path")
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group()[1:], 16)), path)
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        raise AmbiguousPath("a '.' or '..' segment in the path")
    return path, mark + query


__all__ = ["AmbiguousPath", "MAX_PREFIXES_PER_HOST", "Match", "RouteKey", "RouteKeyError", "RoutingTable",
           "WILDCARD", "normalize_prefix", "normalize_route_key", "parse_route_key", "request_path"]
