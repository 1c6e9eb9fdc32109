"""Config files (TOML, read with the standard library's tomllib): parsed with the line of every key, checked
against the settings a command declares, each problem one `file:line: key: what is wrong` message.

Sans-I/O apart from `read_config` (one bounded read). tomllib reports no positions for keys, so
`key_lines` scans the text tomllib accepted for where each key path is defined (dotted keys, quoted
keys, `[tables]`, `[[arrays of tables]]`, inline tables, multi-line strings and arrays). Which settings
exist is not written here: the command line derives them from its own options (tun2g/cli/config_cmd.py),
so every flag is a key of its file.
"""

from __future__ import annotations

import bisect
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# Far above any real file (a thousand policies take ~200 KiB); a runaway or hostile file is refused
# before tomllib sees it, which bounds everything parsed from it.
MAX_CONFIG_BYTES = 1 << 20

KeyPath = tuple  # ("policy", "example.com", "rate"), ("route", 0, "backend"): str keys, int array indexes

_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               list: "a list", dict: "a table"}
_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """A config file that cannot be used: `str()` is the one line to show (`file:line: key: problem`)."""

    def __init__(self, source: str, message: str, *, line: int | None = None, key: str | None = None) -> None:
        self.source, self.message, self.line, self.key = source, message, line, key
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True)
class Setting:
    """One key a config file may hold: a command-line option's long name without `--`."""

    key: str
    kind: type = str  # bool, int, float or str
    multiple: bool = False  # a list of `kind` (a lone value is taken as a list of one)
    choices: tuple[str, ...] = ()  # for str settings: a whole number written for "1" is accepted too


@dataclass
class ParsedConfig:
    """A file tomllib accepted: its data and the line where each key path is defined."""

    source: str
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """The line defining `path`, else that of its nearest enclosing key (None: nowhere, e.g. an empty file)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ConfigError for the key at `path`, with its line."""
        return ConfigError(self.source, message, line=self.line_of(path), key=dotted(path))


SectionChecker = Callable[[ParsedConfig, Any, KeyPath], Any]


@dataclass
class ConfigChange:
    """What a reload of a config file changes in a running process."""

    source: str  # the file
    live: dict[str, Any] = field(default_factory=dict)  # setting name -> new value, for what can change live
    changed: list[str] = field(default_factory=list)  # keys (as in the file) applied live
    needs_restart: list[str] = field(default_factory=list)  # keys changed that only a restart applies

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.source, "changed": self.changed, "needs_restart": self.needs_restart}

    def log(self, logger) -> None:
        """The reload's log lines: what changed, and in one line what only a restart applies."""
        logger.info("config_reloaded", file=self.source, changed=",".join(self.changed) or "-")
        if self.needs_restart:
            logger.warning("config_needs_restart", file=self.source, keys=",".join(self.needs_restart),
                           note="changed in the file but not applied: these need a restart")


def log_reload_failure(logger, error: ConfigError) -> None:
    """The log line of a reload refused: the file's problem, and that nothing changed."""
    logger.error("config_reload_failed", error=str(error), note="the settings in force are unchanged")


def read_config(path: str, max_bytes: int = MAX_CONFIG_BYTES) -> ParsedConfig:
    """Read and parse the TOML file at `path` (at most `max_bytes`); ConfigError says why it cannot be used."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read the config file: {exc.strerror or exc}") from None
    return parse_config(data, path, max_bytes)


def parse_config(data: bytes, source: str, max_bytes: int = MAX_CONFIG_BYTES) -> ParsedConfig:
    """Parse TOML bytes named `source` (for messages) into data and key lines, or raise ConfigError."""
    if len(data) > max_bytes:
        raise ConfigError(source, f"larger than {max_bytes // 1024} KiB: is this the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(source, f"not UTF-8 (byte {data[exc.start]:#04x}): save the file as UTF-8",
                          line=line) from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _POSITION.search(message)
        line = int(position.group(1)) if position else None
        message = _POSITION.sub("", message)
        if message.startswith("Cannot overwrite a value") or message.startswith("Cannot declare"):
            message = "defined twice (each key may be set once)"
        key = _key_at(text, line) if line else None
        raise ConfigError(source, f"not valid TOML: {message}", line=line, key=key) from None
    except RecursionError:
        raise ConfigError(source, "not valid TOML: nested too deeply") from None
    return ParsedConfig(source, parsed, key_lines(text))


def check_settings(config: ParsedConfig, settings: Mapping[str, Setting],
                   sections: Mapping[str, SectionChecker] | None = None) -> dict[str, Any]:
    """The file's settings, type-checked against `settings` (values normalised: ints as floats where a number
    is wanted, a lone value as a list where a list is); every top-level table named in `sections` is handed to
    its checker (called with the file, the value and its key path; it returns what to keep, or raises the
    file's `error(path, ...)`). The first problem in file
    order raises ConfigError; an unknown key is refused with the closest known one."""
    sections = sections or {}
    values: dict[str, Any] = {}
    for key in sorted(config.data, key=lambda name: config.line_of((name,)) or 0):
        value = config.data[key]
        if key in sections:
            values[key] = sections[key](config, value, (key,))
        elif key in settings:
            values[key] = _checked(config, settings[key], value)
        else:
            raise config.error((key,), "unknown key" + did_you_mean(key, [*settings, *sections]))
    return values


def did_you_mean(name: str, known: list[str]) -> str:
    """`; did you mean X?` for the known name closest to `name` ('_' and '-' alike), else a pointer to all."""
    wanted = name.replace("_", "-").lower()
    if wanted in known and wanted != name:
        return f"; did you mean {wanted}? (keys are spelled as the flags, with '-')"
    close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    return "; the keys are the command's flags without '--' (see --help)"


def type_name(value: Any) -> str:
    """How a TOML value's type is named in messages."""
    for kind, name in _TYPE_NAMES.items():
        if type(value) is kind:
            return name
    return f"a {type(value).__name__}"


def dotted(path: KeyPath) -> str:
    """A key path as written in TOML: policy."example.com".rate, route[1].backend."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out += f".{name}" if out else name
    return out


def _checked(config: ParsedConfig, setting: Setting, value: Any) -> Any:
    path: KeyPath = (setting.key,)
    if setting.multiple:
        items = value if isinstance(value, list) else [value]
        in_list = isinstance(value, list)
        return [_scalar(config, setting, item, path + (index,) if in_list else path, in_list)
                for index, item in enumerate(items)]
    return _scalar(config, setting, value, path, False)


def _scalar(config: ParsedConfig, setting: Setting, value: Any, path: KeyPath, in_list: bool) -> Any:
    kind = setting.kind
    if kind is float and type(value) is int:
        return float(value)
    if kind is str and setting.choices and type(value) is int and str(value) in setting.choices:
        return str(value)
    if type(value) is kind:
        return value
    wanted = _TYPE_NAMES[kind] + (f" (one of {', '.join(setting.choices)})" if setting.choices else "")
    if setting.multiple and not in_list:
        wanted = f"{_TYPE_NAMES[kind]} or a list of them"
    raise config.error(path, f"expected {wanted}, got {type_name(value)}")


def _key_at(text: str, line: int) -> str | None:
    """The key a line defines (for tomllib's errors, which name only a position)."""
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return None
    statement = lines[line - 1].strip()
    if statement.startswith("["):
        return statement.strip("[] ") or None
    name = statement.partition("=")[0].strip()
    return name if "=" in statement and name else None


# -- where each key is defined ------------------------------------------------------------------

def key_lines(text: str) -> dict[KeyPath, int]:
    """The line (1-based) where each key path of a TOML document is defined, for text tomllib has accepted.

    Paths as `ParsedConfig.line_of` takes them; a table or array-of-tables element is at its header's line,
    a dotted key's implied tables at their first mention. Never raises: on anything unexpected it returns
    what it found so far (a message then names a line less precisely, never a wrong one)."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (IndexError, ValueError, tomllib.TOMLDecodeError):
        pass
    return scanner.lines


class _Scanner:
    """A forward scan over valid TOML that records key paths, skipping values (strings included) whole."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._newlines = [index for index, char in enumerate(text) if char == "\n"]
        self._arrays_of_tables: dict[KeyPath, int] = {}  # resolved path -> elements so far

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_left(self._newlines, self.pos if pos is None else pos) + 1

    def document(self) -> None:
        prefix: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                prefix = self._header(self._key(), array=True)
                self._expect("]]")
            elif self.text[self.pos] == "[":
                self.pos += 1
                prefix = self._header(self._key(), array=False)
                self._expect("]")
            else:
                self._key_value(prefix)

    def _header(self, parts: list[str], *, array: bool) -> KeyPath:
        line = self.line()
        resolved: KeyPath = ()
        for index, part in enumerate(parts):
            resolved += (part,)
            last = index == len(parts) - 1
            if last and array:
                count = self._arrays_of_tables.get(resolved, 0)
                self._arrays_of_tables[resolved] = count + 1
                self.lines.setdefault(resolved, line)
                resolved += (count,)
            elif resolved in self._arrays_of_tables:  # inside the latest element of an array of tables
                resolved += (self._arrays_of_tables[resolved] - 1,)
            if last:
                self.lines[resolved] = line
            else:
                self.lines.setdefault(resolved, line)
        return resolved

    def _key_value(self, prefix: KeyPath) -> None:
        line = self.line()
        path = prefix
        for part in self._key():
            path += (part,)
            self.lines.setdefault(path, line)
        self.lines[path] = line
        self._skip_blank()
        self._expect("=")
        self._skip_blank()
        self._value(path)

    def _key(self) -> list[str]:
        parts = []
        while True:
            self._skip_blank()
            char = self.text[self.pos]
            if char in "\"'":
                start = self.pos
                self._string()
                parts.append(tomllib.loads("k = " + self.text[start:self.pos])["k"])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    raise ValueError("no key")
                parts.append(match.group())
                self.pos = match.end()
            self._skip_blank()
            if self.pos < len(self.text) and self.text[self.pos] == ".":
                self.pos += 1
                continue
            return parts

    def _value(self, path: KeyPath) -> None:
        char = self.text[self.pos]
        if char in "\"'":
            self._string()
        elif char == "[":
            self.pos += 1
            index = 0
            while True:
                self._skip_blank(newlines=True)
                if self.text[self.pos] == "]":
                    break
                self.lines[path + (index,)] = self.line()
                self._value(path + (index,))
                self._skip_blank(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
                    index += 1
                elif self.text[self.pos] != "]":
                    raise ValueError("expected ',' or ']'")
            self.pos += 1
        elif char == "{":
            self.pos += 1
            while True:
                self._skip_blank()
                if self.text[self.pos] == "}":
                    break
                self._key_value(path)
                self._skip_blank()
                if self.text[self.pos] == ",":
                    self.pos += 1
                elif self.text[self.pos] != "}":
                    raise ValueError("expected ',' or '}'")
            self.pos += 1
        else:  # a number, boolean or date/time (which may hold one space): up to what ends a value
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}#\r\n":
                self.pos += 1

    def _string(self) -> None:
        text, quote = self.text, self.text[self.pos]
        if text.startswith(quote * 3, self.pos):
            end = self.pos + 3
            while True:
                end = text.index(quote * 3, end)
                if quote == '"' and _escaped(text, end):
                    end += 1
                    continue
                break
            end += 3
            while end < len(text) and text[end] == quote:  # up to two quotes may end the content
                end += 1
            self.pos = end
            return
        end = self.pos + 1
        while True:
            end = text.index(quote, end)
            if quote == '"' and _escaped(text, end):
                end += 1
                continue
            break
        self.pos = end + 1

    def _skip_blank(self, newlines: bool = False) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        self._skip_blank()
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r}")
        self.pos += len(token)


def _escaped(text: str, index: int) -> bool:
    """Whether the character at `index` follows an odd run of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


__all__ = ["MAX_CONFIG_BYTES", "ConfigChange", "ConfigError", "ParsedConfig", "SectionChecker", "Setting", "check_settings", "did_you_mean",
           "dotted", "key_lines", "log_reload_failure", "parse_config", "read_config", "type_name"]
