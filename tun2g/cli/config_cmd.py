"""`--config FILE` for `tun2g server` and `tun2g client`: every option of the command is a key of the file.

The keys are derived from the command's click options (the long flag without `--`, spelled with `-` as on
the command line), so a flag added to a command is a key of its file at once. The file's values become
click's `default_map`, which gives the precedence flags > environment variables > file > defaults; they go
through each option's own type and callback first, so a bad value is refused as `file:line: key: why`.
A reload (`reparse`) resolves the command's arguments again, with the file read anew: the same rules,
the same messages.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Mapping

import click

from tun2g.config import (MAX_CONFIG_BYTES, ConfigChange, ConfigError, ParsedConfig, SectionChecker, Setting,
                          check_settings, did_you_mean, read_config, type_name)

_RAW_ARGS = "tun2g.config.raw_args"
_LOADED = "tun2g.config.loaded"
_NOT_KEYS = frozenset({"help", "config_file"})
_SECRET_KEY = re.compile(r"(^|-)(token|secret)$")  # admin-token, cluster-secret, token (not token-file)


class ConfigFileError(click.ClickException):
    """A config file that cannot be used: one line on stderr, exit status 2 (a usage error, as click's own)."""

    exit_code = 2

    def __init__(self, command: str, error: ConfigError) -> None:
        super().__init__(str(error))
        self.command = command
        self.error = error

    def show(self, file=None) -> None:
        click.echo(f"tun2g {self.command}: {self.message}", err=True, file=file)


class ConfigCommand(click.Command):
    """A command that remembers its arguments, so that `reparse` can resolve them again with the file re-read."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_RAW_ARGS] = tuple(args)
        return super().parse_args(ctx, args)


@dataclass
class LoadedConfig:
    """The file a command was started with: its path and its checked tables (e.g. `policy`, `route`)."""

    path: str
    sections: dict[str, Any] = field(default_factory=dict)


def config_option(env: str, sections: Mapping[str, SectionChecker] | None = None):
    """The `--config FILE` option (eager: the file is read before the other options are resolved)."""
    def load(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
        ctx.meta[_LOADED] = None if path is None else _load(ctx, path, sections or {})

    return click.option("--config", "config_file", envvar=env, show_envvar=True, metavar="FILE", is_eager=True,
                        expose_value=False, callback=load,
                        help="Read settings from this TOML file: each key is a flag without `--` "
                             "(ping-interval = 2.5); flags and environment variables override it. "
                             "SIGHUP reloads it (docs/config.md).")


def loaded_config(ctx: click.Context) -> LoadedConfig | None:
    """The config file `ctx` was resolved with (None: no --config)."""
    return ctx.meta.get(_LOADED)


def reparse(ctx: click.Context) -> click.Context:
    """`ctx`'s command resolved again from the same arguments and environment, its config file read anew.

    Raises ConfigFileError (or another click error) when the file, or a value it sets, is bad."""
    return ctx.command.make_context(ctx.info_name, list(ctx.meta[_RAW_ARGS]))


def settings_of(command: click.Command) -> dict[str, tuple[Setting, click.Option]]:
    """Every key a command's config file may hold, with the option it sets."""
    keys: dict[str, tuple[Setting, click.Option]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_KEYS or param.name is None:
            continue
        long_names = [name for name in param.opts if name.startswith("--")]
        if not long_names:
            continue
        key = long_names[0][2:]
        keys[key] = (Setting(key, _kind(param), bool(param.multiple), _choices(param)), param)
    return keys


def key_of(command: click.Command, name: str) -> str:
    """The config key of the option whose parameter name is `name` (the name itself when there is none)."""
    for key, (_setting, option) in settings_of(command).items():
        if option.name == name:
            return key
    return name


def policy_section(config: ParsedConfig, value: Any, path: tuple) -> dict[str, Any]:
    """The `[policy."ROUTE"]` tables of tun2g.toml: each route's edge policy, parsed by tun2g.policy when read
    (error pages named in `error_page_files` are read relative to the file's folder)."""
    if not isinstance(value, dict) or not all(isinstance(table, dict) for table in value.values()):
        raise config.error(path, 'expected [policy."ROUTE"] tables, one per route')
    try:
        from tun2g.policy import Policy, PolicyError  # the edge-policy module (its own branch until merged)
    except ImportError:
        if value:
            raise config.error(path + (next(iter(value)),), "edge policies in the config file need the policy "
                                                            "module, which this build lacks") from None
        return {}
    folder = os.path.dirname(os.path.abspath(config.source))

    def read_page(name: str) -> str:
        try:
            with open(os.path.join(folder, os.path.expanduser(name)), encoding="utf-8") as handle:
                return handle.read(MAX_CONFIG_BYTES)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}") from None

    from tun2g.storage import StorageError
    from tun2g.storage.routing import normalize_route_key

    policies = {}
    for route, table in value.items():
        try:
            key = normalize_route_key(route)  # as `tun2g policy set` names routes
        except StorageError as exc:
            raise config.error(path + (route,), str(exc)) from None
        try:
            policies[key] = Policy.from_mapping(table, config.source, read_file=read_page)
        except PolicyError as exc:
            raise config.error(path + (route, exc.key), exc.detail) from None
    return policies


def route_section(config: ParsedConfig, value: Any, path: tuple) -> list[str]:
    """The client's routes: `[[route]]` tables (`key = "example.com/api"`, `backend = "http://..."`), or
    `route = ["KEY=URL", ...]` as the repeatable `--route KEY=URL` flag takes them; returned in the flag's form."""
    items = value if isinstance(value, list) else [value]
    specs = []
    for index, item in enumerate(items):
        where = path + (index,) if isinstance(value, list) else path
        if isinstance(item, str):
            specs.append(item)
            continue
        if not isinstance(item, dict):
            raise config.error(where, f'expected [[route]] tables (key = "...", backend = "..."), got {type_name(item)}')
        unknown = sorted(set(item) - {"key", "backend"})
        if unknown:
            raise config.error(where + (unknown[0],), "unknown key" + did_you_mean(unknown[0], ["key", "backend"]))
        for name in ("key", "backend"):
            if not isinstance(item.get(name), str) or not item[name]:
                raise config.error(where + (name,) if name in item else where,
                                   f"each [[route]] needs {name} = \"...\" (a string)")
        specs.append(f"{item['key']}={item['backend']}")
    return specs


def _load(ctx: click.Context, path: str, sections: Mapping[str, SectionChecker]) -> LoadedConfig:
    command = ctx.info_name or ctx.command.name or "tun2g"
    try:
        parsed = read_config(path)
        keys = settings_of(ctx.command)
        values = check_settings(parsed, {key: setting for key, (setting, _option) in keys.items()}, sections)
        default_map = {}
        for key, value in values.items():
            if key in sections and key not in keys:
                if isinstance(value, list) and value:  # a table for a flag this build's command lacks
                    raise parsed.error((key,), f"this build of tun2g {command} has no --{key}")
                continue
            option = keys[key][1]
            value = _relative_paths(option, value, os.path.dirname(os.path.abspath(path)))
            _check_value(parsed, ctx, key, option, value)
            default_map[option.name] = value
    except ConfigError as exc:
        raise ConfigFileError(command, exc) from None
    ctx.default_map = {**(ctx.default_map or {}), **default_map}
    _warn_if_secrets_are_exposed(command, path, [key for key in values if _SECRET_KEY.search(key)])
    return LoadedConfig(path, {key: values[key] for key in sections if key in values and key not in keys})


def _warn_if_secrets_are_exposed(command: str, path: str, secret_keys: list[str]) -> None:
    """One line on stderr when a file holding a secret can be read by other users (as ssh says of keys)."""
    if not secret_keys:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        click.echo(f"tun2g {command}: warning: {path} holds {', '.join(secret_keys)} and other users can read it: "
                   f"chmod 600 {path}", err=True)


def _check_value(parsed: ParsedConfig, ctx: click.Context, key: str, option: click.Option, value: Any) -> None:
    """The option's own type and callback on the file's value (as for a flag), the message with the file's line."""
    try:
        option.process_value(ctx, value)
    except click.BadParameter as exc:
        raise parsed.error((key,), exc.message) from None
    except click.UsageError as exc:
        raise parsed.error((key,), exc.message) from None


def _relative_paths(option: click.Option, value: Any, base: str) -> Any:
    """A relative path in the file is relative to the file's folder (`~` expanded), wherever the process runs."""
    if not isinstance(option.type, click.Path):
        return value
    if isinstance(value, list):
        return [_relative_paths(option, item, base) for item in value]
    if isinstance(value, str) and value:
        value = os.path.expanduser(value)
        return value if os.path.isabs(value) else os.path.join(base, value)
    return value


def _kind(option: click.Option) -> type:
    if option.is_flag or isinstance(option.type, click.types.BoolParamType):
        return bool
    if isinstance(option.type, click.types.IntParamType):
        return int
    if isinstance(option.type, click.types.FloatParamType):
        return float
    return str


def _choices(option: click.Option) -> tuple[str, ...]:
    if isinstance(option.type, click.Choice):
        return tuple(str(choice) for choice in option.type.choices)
    return ()


class Reloader:
    """Reads a command's config file again and says what changed against what is in force.

    `live` names the parameters (and sections) the running process can change; a changed setting outside
    it is reported as needing a restart on every reload until the file and the process agree again."""

    def __init__(self, ctx: click.Context, live: frozenset[str]) -> None:
        loaded = loaded_config(ctx)
        if loaded is None:
            raise ValueError("no config file to reload")
        self.ctx = ctx
        self.live = live
        self.source = loaded.path
        self.in_force: dict[str, Any] = {**ctx.params, **loaded.sections}

    def __call__(self) -> ConfigChange:
        """The change the file now asks for; ConfigError (nothing changed) when it cannot be used."""
        try:
            fresh = reparse(self.ctx)
        except ConfigFileError as exc:
            raise exc.error from None
        except click.ClickException as exc:
            raise ConfigError(self.source, exc.format_message()) from None
        loaded = loaded_config(fresh)
        wanted = {**fresh.params, **(loaded.sections if loaded else {})}
        change = ConfigChange(self.source)
        for name in sorted(set(wanted) | set(self.in_force)):
            if wanted.get(name) == self.in_force.get(name):
                continue
            key = key_of(self.ctx.command, name)
            if name in self.live:
                change.live[name] = wanted.get(name)
                change.changed.append(key)
                self.in_force[name] = wanted.get(name)
            else:
                change.needs_restart.append(key)
        return change
