"""The app table that nginx hands the agent (apps.json, docs/protocol.md §4).

Every key, its type, bounds and default come from agent.settings; this
module only reads them. Durations stay integer milliseconds (`*_ms`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.settings import APP_SETTINGS, HTTP_SETTINGS, Kind, Setting, default


class ConfigError(ValueError):
    """The app table is unreadable or a value in it is out of range."""


@dataclass(frozen=True)
class AppConfig:
    """One app's settings (docs/directives.md); the fields are the keys of
    the APP rows of agent.settings, a unit test holds them together."""

    name: str
    app_root: str
    app_type: str = default("app_type")
    startup_file: str = default("startup_file")
    app_start_command: str = default("app_start_command")
    python: str = default("python")
    env: tuple[tuple[str, str], ...] = ()
    user: str = default("user")
    group: str = default("group")
    default_user: str = default("default_user")
    min_instances: int = default("min_instances")
    max_instances: int = default("max_instances")
    max_request_queue_size: int = default("max_request_queue_size")
    max_request_queue_time_ms: int = default("max_request_queue_time")
    prestart: bool = default("prestart")
    friendly_error_pages: bool = default("friendly_error_pages")
    memory_limit_mb: int = default("memory_limit")
    max_requests: int = default("max_requests")
    max_request_time_ms: int = default("max_request_time")
    stat_throttle_rate_ms: int = default("stat_throttle_rate")
    shutdown_timeout_ms: int = default("shutdown_timeout")
    start_timeout_ms: int = default("start_timeout")
    spawn_method: str = default("spawn_method")
    max_preloader_idle_time_ms: int = default("max_preloader_idle_time")
    concurrency_model: str = default("concurrency_model")
    thread_count: int = default("thread_count")
    concurrency: int = default("concurrency")
    websocket_ping_interval_ms: int = default("websocket_ping_interval")
    asgi_loop: str = default("asgi_loop")

    @property
    def startup_path(self) -> Path:
        return Path(self.app_root) / self.startup_file

    def process_settings(self) -> tuple[object, ...]:
        """What a worker process is made of. When these change on reload, the
        app's processes are replaced; the other settings are limits the
        policy applies to the running processes as they are."""
        return (self.app_root, self.app_type, self.startup_file, self.app_start_command, self.python, self.env,
                self.user, self.group, self.default_user, self.spawn_method,
                self.worker_concurrency, self.asgi_loop, self.websocket_ping_interval_ms)

    @property
    def worker_concurrency(self) -> int:
        """Requests one worker serves at once."""
        if self.app_type == "asgi":
            return self.concurrency
        return self.thread_count if self.concurrency_model == "thread" else 1


@dataclass(frozen=True)
class AppTable:
    max_pool_size: int = default("max_pool_size")
    pool_idle_time_ms: int = default("pool_idle_time")
    apps: tuple[AppConfig, ...] = field(default_factory=tuple)


def read_value(entry: dict[str, Any], setting: Setting, where: str) -> Any:
    """One key of apps.json, checked against its row."""
    key = setting.key
    value = entry.get(key, setting.default)
    if value is None and setting.default is None:
        return None                      # computed by nginx, and nginx left it out
    kind = setting.kind
    if kind in (Kind.NUM, Kind.MSEC, Kind.SIZE_MB):
        if not isinstance(value, int) or isinstance(value, bool) or value < setting.minimum:
            raise ConfigError(f"{where}: {key} must be an integer >= {setting.minimum}, not {value!r}")
    elif kind is Kind.FLAG:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
    elif kind is Kind.ENV:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise ConfigError(f"{where}: {key} must map names to strings")
        value = tuple(sorted(value.items()))
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {value!r}")
    elif kind is Kind.ENUM and value not in setting.choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(setting.choices)}, not {value!r}")
    return value


# The HTTP rows nginx computes (instance_dir, ...) start the agent; they are not in the table.
TABLE_FIELDS = frozenset(f.name for f in fields(AppTable))


def parse_app(entry: dict[str, Any], where: str) -> AppConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an app must be an object")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string, not {name!r}")
    values = {s.key: read_value(entry, s, where) for s in APP_SETTINGS}  # every row is a field (test_settings)
    values["app_root"] = values.get("app_root") or name
    if not values["app_root"].startswith("/"):
        raise ConfigError(f"{where}: app_root must be an absolute path, not {values['app_root']!r}")
    config = AppConfig(name=name or values["app_root"], **values)
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
    values = {s.key: read_value(data, s, "app table") for s in HTTP_SETTINGS if s.key in TABLE_FIELDS}
    return AppTable(apps=apps, **values)


def load_table(path: Path) -> AppTable:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    return parse_table(data)
