"""The app table that nginx hands the agent (apps.json, docs/protocol.md §4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_TYPES = ("wsgi",)


class ConfigError(ValueError):
    """The app table is unreadable or a value in it is out of range."""


@dataclass(frozen=True)
class AppConfig:
    """One app's settings (docs/directives.md)."""

    name: str
    app_root: str
    app_type: str = "wsgi"
    startup_file: str = "wsgi.py"
    python: str = "/usr/bin/python3"
    env: tuple[tuple[str, str], ...] = ()
    user: str = ""
    group: str = ""
    default_user: str = "nobody"
    min_instances: int = 1
    max_instances: int = 0
    max_request_queue_size: int = 100
    max_request_queue_time: float = 0.0
    prestart: bool = False
    memory_limit_mb: int = 0
    max_requests: int = 0
    max_request_time: float = 0.0
    shutdown_timeout: float = 60.0
    start_timeout: float = 90.0

    @property
    def startup_path(self) -> Path:
        return Path(self.app_root) / self.startup_file

    def process_settings(self) -> tuple[object, ...]:
        """What a worker process is made of. When these change on reload, the
        app's processes are replaced; the other settings are limits the
        policy applies to the running processes as they are."""
        return (self.app_root, self.app_type, self.startup_file, self.python, self.env,
                self.user, self.group, self.default_user)


@dataclass(frozen=True)
class AppTable:
    max_pool_size: int = 6
    pool_idle_time: float = 300.0
    stat_throttle_rate: float = 10.0
    apps: tuple[AppConfig, ...] = field(default_factory=tuple)


def _int(entry: dict[str, Any], key: str, default: int, minimum: int, where: str) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: {key} must be an integer >= {minimum}, not {value!r}")
    return value


def _seconds(entry: dict[str, Any], key: str, default_ms: int, where: str) -> float:
    """A time the module wrote in milliseconds (key ends in _ms), in seconds."""
    return _int(entry, key, default_ms, 0, where) / 1000.0


def _bool(entry: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _str(entry: dict[str, Any], key: str, default: str, where: str) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {value!r}")
    return value


def parse_app(entry: dict[str, Any], where: str) -> AppConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an app must be an object")
    name = _str(entry, "name", "", where)
    app_root = _str(entry, "app_root", name, where)
    if not app_root.startswith("/"):
        raise ConfigError(f"{where}: app_root must be an absolute path, not {app_root!r}")
    app_type = _str(entry, "app_type", "wsgi", where)
    if app_type not in APP_TYPES:
        raise ConfigError(f"{where}: app_type must be one of {', '.join(APP_TYPES)}, not {app_type!r}")
    env = entry.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ConfigError(f"{where}: env must map names to strings")
    config = AppConfig(
        name=name or app_root,
        app_root=app_root,
        app_type=app_type,
        startup_file=_str(entry, "startup_file", "wsgi.py", where),
        python=_str(entry, "python", "/usr/bin/python3", where),
        env=tuple(sorted(env.items())),
        min_instances=_int(entry, "min_instances", 1, 0, where),
        max_instances=_int(entry, "max_instances", 0, 0, where),
        user=_str(entry, "user", "", where),
        group=_str(entry, "group", "", where),
        default_user=_str(entry, "default_user", "nobody", where),
        max_request_queue_size=_int(entry, "max_request_queue_size", 100, 0, where),
        max_request_queue_time=_seconds(entry, "max_request_queue_time_ms", 0, where),
        prestart=_bool(entry, "prestart", False, where),
        memory_limit_mb=_int(entry, "memory_limit_mb", 0, 0, where),
        max_requests=_int(entry, "max_requests", 0, 0, where),
        max_request_time=_seconds(entry, "max_request_time_ms", 0, where),
        shutdown_timeout=_seconds(entry, "shutdown_timeout_ms", 60_000, where),
        start_timeout=_seconds(entry, "start_timeout_ms", 90_000, where),
    )
    if config.max_instances and config.min_instances > config.max_instances:
        raise ConfigError(f"{where}: min_instances ({config.min_instances}) exceeds "
                          f"max_instances ({config.max_instances})")
    return config


def parse_table(data: Any) -> AppTable:
    if not isinstance(data, dict):
        raise ConfigError("the app table must be a JSON object")
    apps_data = data.get("apps", [])
    if not isinstance(apps_data, list):
        raise ConfigError("apps must be a list")
    apps = tuple(parse_app(entry, f"apps[{i}]") for i, entry in enumerate(apps_data))
    names = [app.name for app in apps]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"app named twice: {', '.join(duplicates)}")
    return AppTable(
        max_pool_size=_int(data, "max_pool_size", 6, 1, "app table"),
        pool_idle_time=_seconds(data, "pool_idle_time_ms", 300_000, "app table"),
        stat_throttle_rate=_seconds(data, "stat_throttle_rate_ms", 10_000, "app table"),
        apps=apps,
    )


def load_table(path: Path) -> AppTable:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    return parse_table(data)
