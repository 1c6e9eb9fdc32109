"""The routing table, sans I/O: route keys, host and wildcard precedence, longest prefix, strip, hostile input."""

import pytest

from tun2g.storage import StorageError
from tun2g.storage.routing import (MAX_PREFIXES_PER_HOST, AmbiguousPath, RouteKey, RouteKeyError, RoutingTable,
                                   normalize_route_key, parse_route_key, request_path)

pytestmark = pytest.mark.pure


def table(*keys, strip=()):
    routes: RoutingTable[str] = RoutingTable()
    for key in keys:
        routes.add(parse_route_key(key), key, strip=key in strip)
    return routes


def key_for(routes, host, target="/"):
    found = routes.match(host, target)
    return None if found is None else found.key


def test_route_keys_normalize_case_port_trailing_dot_and_idn():
    assert normalize_route_key("App.Example.COM.:8080") == "app.example.com"
    assert normalize_route_key("*.Example.com") == "*.example.com"
    assert normalize_route_key("example.com/api/") == "example.com/api"
    assert normalize_route_key("bücher.example") == "xn--bcher-kva.example"
    assert normalize_route_key("*.BÜCHER.example/Docs") == "*.xn--bcher-kva.example/Docs"  # paths keep case
    assert parse_route_key("example.com", "/api") == RouteKey("example.com", "/api")
    assert parse_route_key("example.com/") == RouteKey("example.com", "")


@pytest.mark.parametrize("bad", [
    "", "*", "*.", "*.com", "*.x", "a.*.example.com", "**.example.com", "*example.com", "*.[::1]", "exa mple.com",
    "example.com//api", "example.com/a/../b", "example.com/./a", "example.com/%2e%2e", "example.com/a%2Fb",
    "example.com/a?b", "example.com/a#b", "example.com/a\nb", "example.com/" + "a" * 600,
    "a" * 300 + ".com", ".".join(["a"] * 200), "app.test\n",
])
def test_bad_route_keys_are_refused_with_a_storage_error(bad):
    with pytest.raises(RouteKeyError):
        parse_route_key(bad)
    assert issubclass(RouteKeyError, StorageError)


def test_a_path_given_twice_is_refused():
    with pytest.raises(RouteKeyError, match="once"):
        parse_route_key("example.com/api", "/v2")


def test_exact_host_beats_the_wildcard_and_a_wildcard_matches_exactly_one_label():
    routes = table("example.com", "*.example.com", "app.example.com")
    assert key_for(routes, "app.example.com") == "app.example.com"
    assert key_for(routes, "other.example.com") == "*.example.com"
    assert key_for(routes, "example.com") == "example.com"
    assert key_for(routes, "a.b.example.com") is None  # two labels: not under *.example.com
    assert key_for(routes, "example.org") is None
    assert key_for(table("*.example.com"), "example.com") is None


def test_longest_prefix_wins_on_segment_boundaries():
    routes = table("example.com", "example.com/api", "example.com/api/v2")
    assert key_for(routes, "example.com", "/api") == "example.com/api"
    assert key_for(routes, "example.com", "/api/") == "example.com/api"
    assert key_for(routes, "example.com", "/api/x?q=/api/v2") == "example.com/api"
    assert key_for(routes, "example.com", "/api/v2") == "example.com/api/v2"
    assert key_for(routes, "example.com", "/api/v2/users") == "example.com/api/v2"
    assert key_for(routes, "example.com", "/apix") == "example.com"
    assert key_for(routes, "example.com", "/api/v20") == "example.com/api"
    assert key_for(routes, "example.com", "/") == "example.com"
    assert key_for(routes, "example.com", "*") == "example.com"  # OPTIONS *: no path to match


def test_a_host_with_only_prefix_routes_falls_through_to_the_wildcard():
    routes = table("*.example.com", "app.example.com/api")
    assert key_for(routes, "app.example.com", "/api/x") == "app.example.com/api"
    assert key_for(routes, "app.example.com", "/other") == "*.example.com"
    assert key_for(table("app.example.com/api"), "app.example.com", "/other") is None


def test_strip_removes_the_prefix_and_keeps_the_query():
    routes = table("example.com/api", "example.com/keep", strip=("example.com/api",))
    cases = {"/api": "/", "/api/": "/", "/api/users?id=1": "/users?id=1", "/api?x=1": "/?x=1"}
    for target, forwarded in cases.items():
        found = routes.match("example.com", target)
        assert (found.key, found.prefix, found.target, found.strip) == ("example.com/api", "/api", forwarded, True)
    kept = routes.match("example.com", "/keep/x")
    assert (kept.target, kept.strip) == ("/keep/x", False)


def test_unreserved_escapes_match_as_the_backend_reads_them():
    routes = table("example.com", "example.com/api", strip=("example.com/api",))
    found = routes.match("example.com", "/%61pi/%7Euser")
    assert (found.key, found.target) == ("example.com/api", "/~user")


@pytest.mark.parametrize("target", ["/api/../admin", "/x/..", "/./api", "/%2e%2e/api", "/%2E/api", "/api%2Fx",
                                    "/api%2fx", "/api%5Cx", "/a/%2e"])
def test_ambiguous_paths_are_refused_on_a_host_with_prefix_routes(target):
    routes = table("example.com", "example.com/api")
    with pytest.raises(AmbiguousPath):
        routes.match("example.com", target)
    assert key_for(table("example.com"), "example.com", target) == "example.com"  # no prefixes: no question


def test_absolute_form_targets_are_routed_by_their_path():
    routes = table("example.com", "example.com/api")
    assert key_for(routes, "example.com", "http://example.com/api/x") == "example.com/api"
    assert request_path("https://example.com") == ("/", "")


def test_hostile_hosts_and_paths_cost_one_bounded_lookup():
    routes = table("example.com", "*.example.com", "example.com/api")
    many_labels = ".".join(["a"] * 120) + ".example.com"
    assert key_for(routes, many_labels) is None
    assert key_for(routes, "x" * 10_000) is None
    assert key_for(routes, "example.com", "/api" + "/x" * 50_000) == "example.com/api"
    assert key_for(routes, "example.com", "/" + "a" * 100_000) == "example.com"
    assert key_for(routes, "[::1]") is None


def test_prefixes_per_host_are_capped_and_replacing_one_does_not_count():
    routes = table(*(f"example.com/p{i}" for i in range(MAX_PREFIXES_PER_HOST)))
    routes.add(parse_route_key("example.com/p0"), "again", strip=True)
    assert len(routes) == MAX_PREFIXES_PER_HOST and routes.get(parse_route_key("example.com/p0")) == "again"
    with pytest.raises(RouteKeyError, match="limit"):
        routes.add(parse_route_key("example.com/one-more"), "x")
    routes.add(parse_route_key("other.example.com/one-more"), "x")  # another host has its own budget


def test_remove_and_keys():
    routes = table("example.com", "example.com/api", "*.example.com")
    assert sorted(routes.keys()) == ["*.example.com", "example.com", "example.com/api"]
    assert routes.remove(parse_route_key("example.com/api")) and not routes.remove(parse_route_key("example.com/api"))
    assert key_for(routes, "example.com", "/api") == "example.com"
    assert routes.remove(parse_route_key("example.com")) and routes.remove(parse_route_key("*.example.com"))
    assert len(routes) == 0 and list(routes.keys()) == []


def test_a_thousand_routes_match_like_one():
    routes = table(*(f"app{i}.example.com" for i in range(1000)), "*.example.com", "example.com/api")
    assert key_for(routes, "app999.example.com") == "app999.example.com"
    assert key_for(routes, "new.example.com") == "*.example.com"
    assert len(routes) == 1002
