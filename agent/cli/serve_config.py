"""The YAML settings file of `agentctl serve --config agent.yaml`.

Its keys are the nginx directives without the `agent_` prefix, plus `host`
and `port` (docs/agentctl.md). A key that is unknown or has a value of the
wrong type is an error that names the key and its line, because an
operator's typo silently ignored is a setting silently lost.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.cli.serve import ServeOptions

TIME_SYNTAX = re.compile(r"^\d+(ms|s|m|h|d)?$")


class ServeConfigError(ValueError):
    """The settings file is unreadable or one of its values is wrong."""


@dataclass(frozen=True)
class Setting:
    value: Any
    line: int          # 1-based, for messages


@dataclass
class ServeSettings:
    """The file's settings, checked, each with the line it came from."""

    path: Path
    values: dict[str, Setting] = field(default_factory=dict)


Checker = Callable[[Any], Any]


def _integer(minimum: int, maximum: int | None = None) -> Checker:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}, not {value}")
        return value
    return check


def _string(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, not {value!r}")
    return value


def _flag(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _time(value: Any) -> Any:
    """nginx's time syntax; a bare number is seconds, as in nginx."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return f"{value}s"
    if isinstance(value, str) and TIME_SYNTAX.match(value):
        return value
    raise ValueError(f"must be a time such as 30, 500ms, 30s, 5m or 1h, not {value!r}")


def _env(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of NAME: VALUE, not {value!r}")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"names must be strings, not {name!r}")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"{name} must be a string or a number, not {item!r}")
        env[name] = str(item)
    return env


# Keys that ServeOptions carries itself.
OPTION_KEYS: dict[str, Checker] = {
    "host": _string,
    "port": _integer(1, 65535),
    "min_instances": _integer(0),
    "max_instances": _integer(0),
    "max_pool_size": _integer(1),
    "startup_file": _string,
    "python": _string,
    "user": _string,
    "env": _env,
}

# Further directives, rendered as `agent_KEY VALUE;`: those of a location,
# then those of the http block.
LOCATION_DIRECTIVES: dict[str, Checker] = {
    "group": _string,
    "default_user": _string,
    "prestart": _flag,
    "memory_limit": _integer(0),
    "max_requests": _integer(0),
    "max_request_time": _time,
    "max_request_queue_size": _integer(0),
    "max_request_queue_time": _time,
    "start_timeout": _time,
    "shutdown_timeout": _time,
    "buffer_response": _flag,
    "read_timeout": _time,
    "send_timeout": _time,
    "connect_timeout": _time,
}
HTTP_DIRECTIVES: dict[str, Checker] = {
    "pool_idle_time": _time,
    "stat_throttle_rate": _time,
}
ALL_KEYS: dict[str, Checker] = {**OPTION_KEYS, **LOCATION_DIRECTIVES, **HTTP_DIRECTIVES}


def load(path: Path) -> ServeSettings:
    try:
        text = path.read_text()
    except OSError as e:
        raise ServeConfigError(f"cannot read {path}: {e.strerror}") from e
    return parse(text, path)


def parse(text: str, path: Path) -> ServeSettings:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        settings = ServeSettings(path)
        if root is None:
            return settings
        if not isinstance(root, yaml.MappingNode):
            raise ServeConfigError(f"{path}:{root.start_mark.line + 1}: the file must be a mapping of key: value")
        for key_node, value_node in root.value:
            name, setting = _read_pair(loader, key_node, value_node, path)
            if name in settings.values:
                raise ServeConfigError(f"{path}:{setting.line}: {name} is set twice "
                                       f"(first on line {settings.values[name].line})")
            settings.values[name] = setting
        return settings
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise ServeConfigError(f"{path}:{line}: not valid YAML: {e.problem}") from e
    finally:
        loader.dispose()


def _read_pair(loader: yaml.SafeLoader, key_node: yaml.Node, value_node: yaml.Node,
               path: Path) -> tuple[str, Setting]:
    line = key_node.start_mark.line + 1
    name = loader.construct_object(key_node, deep=True)
    if not isinstance(name, str) or name not in ALL_KEYS:
        hint = " (write directives without the agent_ prefix)" if str(name).startswith("agent_") else ""
        raise ServeConfigError(f"{path}:{line}: unknown key {name!r}{hint}; known keys: {', '.join(sorted(ALL_KEYS))}")
    raw = loader.construct_object(value_node, deep=True)
    try:
        value = ALL_KEYS[name](raw)
    except ValueError as e:
        raise ServeConfigError(f"{path}:{line}: {name} {e}") from e
    return name, Setting(value, line)


def directive_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def build_options(app_dir: Path, settings: ServeSettings | None, overrides: dict[str, Any]) -> ServeOptions:
    """ServeOptions from the defaults, then the file, then the command line
    (overrides: the flags given, None for those not given)."""
    values: dict[str, Any] = {}
    if settings is not None:
        values = {name: s.value for name, s in settings.values.items()}
    file_env = dict(values.pop("env", {}))
    flag_env = overrides.pop("env", None) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["env"] = {**file_env, **flag_env}
    location = {k: values.pop(k) for k in list(values) if k in LOCATION_DIRECTIVES}
    http = {k: values.pop(k) for k in list(values) if k in HTTP_DIRECTIVES}
    options = ServeOptions(app_dir=app_dir, **values)
    _attach_directives(options, location, http, settings)
    return options


def _attach_directives(options: ServeOptions, location: dict[str, Any], http: dict[str, Any],
                       settings: ServeSettings | None) -> None:
    """Directives beyond ServeOptions' own fields travel in its `directives`
    and `http_directives` mappings (`agent_` + key -> value), which
    render_config writes into the location and the http block. Where
    ServeOptions has no such mapping, a setting it cannot pass on is an
    error rather than something quietly dropped."""
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    for target, chosen in (("directives", location), ("http_directives", http)):
        if not chosen:
            continue
        if target not in fields:
            name = sorted(chosen)[0]
            line = settings.values[name].line if settings is not None and name in settings.values else 0
            where = f"{settings.path}:{line}: " if settings is not None else ""
            raise ServeConfigError(f"{where}{name}: this version of agentctl serve cannot pass "
                                   f"agent_{name} to nginx; set it in an nginx configuration instead")
        getattr(options, target).update({f"agent_{k}": directive_value(v) for k, v in chosen.items()})
