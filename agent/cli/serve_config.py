"""The YAML settings file of `agentctl serve --config agent.yaml`.

Its keys are the nginx directives without the `agent_` prefix, plus `host`
and `port` (docs/agentctl.md): the rows of agent.settings that serve takes.
A key that is unknown or has a value of the wrong type is an error that
names the key and its line, because an operator's typo silently ignored is
a setting silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.cli.serve import ServeOptions
from agent.settings import SERVE_SETTINGS, check_value

SERVE_BY_NAME = {s.name: s for s in SERVE_SETTINGS}


class ServeConfigError(ValueError):
    """The settings file is unreadable or one of its values is wrong."""


@dataclass(frozen=True)
class GivenValue:
    value: Any
    line: int          # 1-based, for messages


@dataclass
class ServeSettings:
    """The file's settings, checked, each with the line it came from."""

    path: Path
    values: dict[str, GivenValue] = field(default_factory=dict)


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
               path: Path) -> tuple[str, GivenValue]:
    line = key_node.start_mark.line + 1
    name = loader.construct_object(key_node, deep=True)
    setting = SERVE_BY_NAME.get(name) if isinstance(name, str) else None
    if setting is None:
        hint = " (write directives without the agent_ prefix)" if str(name).startswith("agent_") else ""
        known = ", ".join(sorted(SERVE_BY_NAME))
        raise ServeConfigError(f"{path}:{line}: unknown key {name!r}{hint}; known keys: {known}")
    raw = loader.construct_object(value_node, deep=True)
    try:
        value = check_value(setting, raw)
    except ValueError as e:
        raise ServeConfigError(f"{path}:{line}: {name} {e}") from e
    return name, GivenValue(value, line)


def build_options(app_dir: Path, settings: ServeSettings | None, overrides: dict[str, Any]) -> ServeOptions:
    """ServeOptions from the defaults, then the file, then the command line
    (overrides: the flags given, None for those not given). The file's
    env and the flags' env add up, the flags winning a name both set."""
    options = ServeOptions(app_dir=app_dir)
    if settings is not None:
        options.settings.update({name: s.value for name, s in settings.values.items()})
    file_env = dict(options.settings.get("env") or {})
    options.settings.update({k: v for k, v in overrides.items() if v is not None})
    options.settings["env"] = {**file_env, **(overrides.get("env") or {})}
    return options
