"""tun2g.config: TOML config files parsed with the line of every key, checked against settings, hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.config import (MAX_CONFIG_BYTES, ConfigError, Setting, check_settings, dotted, key_lines, parse_config,
                          read_config)

pytestmark = pytest.mark.pure

SETTINGS = {
    "ping-interval": Setting("ping-interval", float),
    "metrics-domain-cap": Setting("metrics-domain-cap", int),
    "access-log": Setting("access-log", bool),
    "log-level": Setting("log-level", str, choices=("debug", "info")),
    "smux-version": Setting("smux-version", str, choices=("auto", "1", "2")),
    "trusted-proxy": Setting("trusted-proxy", str, multiple=True),
}


def parse(text: str, source: str = "tun2g.toml"):
    return parse_config(text.encode(), source)


def error_of(text: str, checked: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        config = parse(text)
        if checked:
            check_settings(config, SETTINGS)
    return str(info.value)


# -- where keys are -------------------------------------------------------------------------------

DOCUMENT = '''# a comment = "not a key"
log-level = "debug"
"ping-interval" = 2  # quoted key
trusted-proxy = [
  "10.0.0.0/8",  # a comment ]
  "::1",
]
notes = """
fake = "inside a string"
[fake.table]
"""
literal = \'\'\'it's = [not] a key\'\'\'
escaped = "a \\" quote = here"
dates = 1979-05-27 07:32:00Z

[policy."example.com"]
basic-auth.users = { alice = "hash", "bob.smith" = 'h2' }
rate = "10/s"

[policy.'*.example.com'.headers]
set = {X-Env = "prod"}

[[route]]
key = "example.com/api"
backend = "http://127.0.0.1:4000"

[[route]]
key = "b.example.com"
[route.options]
strip = true
'''


def test_key_lines_find_every_key_of_a_varied_document():
    lines = key_lines(DOCUMENT)
    assert lines[("log-level",)] == 2
    assert lines[("ping-interval",)] == 3
    assert lines[("trusted-proxy",)] == 4 and lines[("trusted-proxy", 1)] == 6
    assert lines[("notes",)] == 8 and ("fake",) not in lines and ("fake", "table") not in lines
    assert lines[("literal",)] == 12 and lines[("escaped",)] == 13 and lines[("dates",)] == 14
    assert lines[("policy", "example.com")] == 16
    assert lines[("policy", "example.com", "basic-auth", "users", "bob.smith")] == 17
    assert lines[("policy", "example.com", "rate")] == 18
    assert lines[("policy", "*.example.com", "headers")] == 20
    assert lines[("policy", "*.example.com", "headers", "set", "X-Env")] == 21
    assert lines[("route", 0)] == 23 and lines[("route", 0, "backend")] == 25
    assert lines[("route", 1)] == 27 and lines[("route", 1, "key")] == 28
    assert lines[("route", 1, "options", "strip")] == 30


def test_line_of_falls_back_to_the_enclosing_key():
    config = parse(DOCUMENT)
    assert config.line_of(("policy", "example.com", "rate", "missing")) == 18
    assert config.line_of(("trusted-proxy", 1)) == 6
    assert config.line_of(("nowhere",)) is None


def test_dotted_names_paths_as_toml_writes_them():
    assert dotted(("policy", "example.com", "rate")) == 'policy."example.com".rate'
    assert dotted(("route", 1, "backend")) == "route[1].backend"


def test_key_lines_never_raise_on_text_that_is_not_toml():
    for text in ("[", "a = [1, 2", 'a = "open', "= 3", "a = {b = 1", "\x00", "[[a]\nb=1"):
        assert isinstance(key_lines(text), dict)


_KEY = st.one_of(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
                 st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8))
_SCALAR = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text(max_size=20),
                    st.floats(allow_nan=False, allow_infinity=False, width=32))


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _toml_string(key)


def _toml_value(value, multiline: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    items = [_toml_value(item, multiline) for item in value]
    if multiline and items:
        return "[\n  " + ",\n  ".join(items) + ",\n]"
    return "[" + ", ".join(items) + "]"


@settings(max_examples=150, deadline=None)
@given(top=st.dictionaries(_KEY, st.one_of(_SCALAR, st.lists(_SCALAR, max_size=3)), max_size=5),
       tables=st.dictionaries(_KEY, st.dictionaries(_KEY, _SCALAR, min_size=1, max_size=3), max_size=3),
       multiline=st.booleans(), comments=st.booleans())
def test_key_lines_agree_with_where_a_generated_document_defines_each_key(top, tables, multiline, comments):
    """Documents of varied syntax (quoted keys, multi-line arrays, comments, tables): every key is found
    at the line that defines it, and tomllib reads the same document."""
    lines: list[str] = []
    expected: dict[tuple, int] = {}
    for key, value in top.items():
        if comments:
            lines.append(f"# {key} = 1")
        expected[(key,)] = len(lines) + 1
        lines.extend((f"{_toml_key(key)} = {_toml_value(value, multiline)}" + (" # note" if comments else "")
                      ).split("\n"))
    for name, table in tables.items():
        if (name,) in expected:
            continue
        lines.append(f"[table.{_toml_key(name)}]")
        expected[("table", name)] = len(lines)
        for key, value in table.items():
            expected[("table", name, key)] = len(lines) + 1
            lines.append(f"{_toml_key(key)} = {_toml_value(value, False)}")
    text = "\n".join(lines) + "\n"
    config = parse(text)
    assert set(config.data) == set(top) | ({"table"} if any(("table", n) in expected for n in tables) else set())
    found = key_lines(text)
    for path, line in expected.items():
        assert found.get(path) == line, (path, text)


# -- errors name the file, the line and the key ---------------------------------------------------

def test_unknown_keys_are_refused_with_the_closest_known_one():
    assert error_of("access-log = true\npingg-interval = 3\n") == (
        "tun2g.toml:2: pingg-interval: unknown key; did you mean ping-interval?")
    assert error_of("ping_interval = 3\n") == (
        "tun2g.toml:1: ping_interval: unknown key; did you mean ping-interval? (keys are spelled as the flags, "
        "with '-')")
    assert "see --help" in error_of("zzz = 1\n")


@pytest.mark.parametrize("text, message", [
    ('ping-interval = "2s"', "tun2g.toml:1: ping-interval: expected a number, got a string"),
    ("metrics-domain-cap = 2.5", "tun2g.toml:1: metrics-domain-cap: expected a whole number, got a number"),
    ("metrics-domain-cap = true", "tun2g.toml:1: metrics-domain-cap: expected a whole number, got true or false"),
    ('access-log = "yes"', "tun2g.toml:1: access-log: expected true or false, got a string"),
    ("log-level = 3", "tun2g.toml:1: log-level: expected a string (one of debug, info), got a whole number"),
    ("\n\n[ping-interval]\nx = 1", "tun2g.toml:3: ping-interval: expected a number, got a table"),
    ('trusted-proxy = [\n "10.0.0.0/8",\n 7,\n]', "tun2g.toml:3: trusted-proxy[1]: expected a string, got a whole number"),
    ("trusted-proxy = {a = 1}", "tun2g.toml:1: trusted-proxy: expected a string or a list of them, got a table"),
    ("ping-interval = 1979-05-27", "tun2g.toml:1: ping-interval: expected a number, got a date"),
])
def test_wrong_types_are_named_with_the_line(text, message):
    assert error_of(text) == message


def test_values_are_normalised_as_the_options_take_them():
    config = parse('ping-interval = 2\nsmux-version = 2\ntrusted-proxy = "10.0.0.0/8"\naccess-log = false\n')
    assert check_settings(config, SETTINGS) == {"ping-interval": 2.0, "smux-version": "2",
                                                "trusted-proxy": ["10.0.0.0/8"], "access-log": False}


def test_the_first_problem_in_file_order_is_the_one_reported():
    assert error_of("zzz = 1\n[ping-interval]\n").startswith("tun2g.toml:1: zzz:")
    assert error_of('[policy]\n"a" = 1\n').startswith("tun2g.toml:1: policy: unknown key")


def test_sections_get_their_tables_with_the_file_for_errors():
    def check(config, value, path):
        for name, table in value.items():
            if "rate" not in table:
                raise config.error(path + (name,), "needs a rate")
        return sorted(value)

    text = '[policy."a.example"]\nrate = 1\n\n[policy."b.example"]\nburst = 2\n'
    assert check_settings(parse('[policy."a.example"]\nrate = 1\n'), SETTINGS, {"policy": check}) == {
        "policy": ["a.example"]}
    with pytest.raises(ConfigError) as info:
        check_settings(parse(text), SETTINGS, {"policy": check})
    assert str(info.value) == 'tun2g.toml:4: policy."b.example": needs a rate'


# -- hostile files --------------------------------------------------------------------------------

def test_a_key_defined_twice_is_refused_with_its_line():
    assert error_of("access-log = true\nping-interval = 1\nping-interval = 2\n", checked=False) == (
        "tun2g.toml:3: ping-interval: not valid TOML: defined twice (each key may be set once)")
    assert error_of("[a]\nx = 1\n[a]\n", checked=False).startswith("tun2g.toml:3: a: not valid TOML: defined twice")


def test_invalid_toml_names_its_line():
    assert error_of('a = 1\nb = "unterminated\n', checked=False).startswith("tun2g.toml:2: b: not valid TOML:")


def test_bad_utf8_names_the_line_of_the_first_bad_byte():
    with pytest.raises(ConfigError) as info:
        parse_config(b'a = 1\nb = "\xff\xfe"\n', "x.toml")
    assert str(info.value) == "x.toml:2: not UTF-8 (byte 0xff): save the file as UTF-8"


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError) as info:
        read_config(str(path))
    assert str(info.value) == f"{path}: larger than 1024 KiB: is this the right file?"


@pytest.mark.parametrize("text", ["a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 3000 + "1" + "}" * 3000,
                                  "[" * 100_000])
def test_deep_nesting_is_one_clean_error(text):
    message = error_of(text, checked=False)
    assert message.startswith("tun2g.toml") and "not valid TOML" in message


def test_a_file_that_cannot_be_read_says_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_config(str(tmp_path / "missing.toml"))
    assert str(info.value) == f"{tmp_path / 'missing.toml'}: cannot read the config file: No such file or directory"
    with pytest.raises(ConfigError) as info:
        read_config(str(tmp_path))
    assert "cannot read the config file: Is a directory" in str(info.value)


def test_an_empty_file_has_no_settings():
    assert check_settings(parse(""), SETTINGS) == {}
