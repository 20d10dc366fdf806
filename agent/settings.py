"""Every setting, declared once.

Each `agent_*` nginx directive (and the two settings only `agentctl serve`
has, host and port) is one row of SETTINGS. The rows drive:

- parsing the app table nginx writes (apps.json, agent.config), with the
  row's key, type and bounds;
- `agentctl serve`: its command-line flags and the keys of its YAML file
  (agent.serve_config), and the directives it writes into nginx.conf;
- the defaults everywhere on the Python side;
- the checks that hold this table, the module's table
  (nginx-module/ngx_http_agent_settings.h) and docs/directives.md against
  each other (tests/unit/test_settings.py).

Durations are integer milliseconds from the directive to the engine: a
MSEC setting is `<name>_ms` in apps.json and in AppConfig. docs/contributing.md
shows how to add a directive.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any


class Kind(enum.Enum):
    FLAG = "flag"          # on | off
    NUM = "num"            # a whole number >= minimum
    MSEC = "msec"          # nginx's time syntax; integer milliseconds inside
    SIZE_MB = "size_mb"    # a whole number of megabytes
    STR = "str"            # a string
    PATH = "path"          # a file system path
    ENUM = "enum"          # one of choices
    ENV = "env"            # NAME VALUE pairs (agent_env, repeatable)
    TEMP_PATH = "temp_path"  # nginx's PATH [L1 [L2 [L3]]]
    STATUS = "status"      # on | off: the location is a door to the status socket
    SIZE = "size"          # nginx's size syntax (8k, 1m), kept as written
    BUFS = "bufs"          # NUMBER SIZE, as proxy_buffers, kept as written
    URIS = "uris"          # a URI path, repeatable (agent_base_uri)


class Scope(enum.Enum):
    HTTP = "http"          # the http block; the agent as a whole
    APP = "app"            # per app: in apps.json; every location naming the app agrees
    LOCATION = "location"  # http, server or location; nginx's side only, not in apps.json
    SERVE = "serve"        # agentctl serve only: not a directive


@dataclass(frozen=True)
class Setting:
    name: str                  # the directive without its agent_ prefix
    kind: Kind
    scope: Scope
    default: Any               # in the unit apps.json uses; None: computed (help says how)
    help: str
    passenger: str = ""        # Passenger's directive of the same meaning
    minimum: int = 0           # NUM, MSEC, SIZE_MB
    maximum: int | None = None
    choices: tuple[str, ...] = ()  # ENUM
    serve: bool = True         # agentctl serve takes it (flag and YAML key)

    @property
    def directive(self) -> str:
        return f"agent_{self.name}"

    @property
    def key(self) -> str:
        """Its key in apps.json and its field in AppConfig / AppTable."""
        suffix = {Kind.MSEC: "_ms", Kind.SIZE_MB: "_mb"}.get(self.kind, "")
        return self.name + suffix

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


F, N, T, M, S, P, E = Kind.FLAG, Kind.NUM, Kind.MSEC, Kind.SIZE_MB, Kind.STR, Kind.PATH, Kind.ENUM
HTTP, APP, LOC = Scope.HTTP, Scope.APP, Scope.LOCATION

SETTINGS: tuple[Setting, ...] = (
    # -- the http block ---------------------------------------------------------
    Setting("max_pool_size", N, HTTP, 6, "most worker processes of all apps together",
            "passenger_max_pool_size", minimum=1),
    Setting("instance_dir", P, HTTP, None, "where the agent keeps its sockets and state",
            "passenger_instance_registry_dir", serve=False),
    Setting("log_file", P, HTTP, None, "the agent's log, worker output included (default: nginx's stderr)",
            "passenger_log_file", serve=False),
    Setting("core_python", S, HTTP, None, "the Python that runs the agent itself",
            "passenger_root", serve=False),
    Setting("pool_idle_time", T, HTTP, 300_000, "a worker idle this long is stopped; 0: never",
            "passenger_pool_idle_time"),
    # -- per app: written to apps.json ------------------------------------------------
    Setting("app_root", P, APP, None, "the app's directory (default: the parent of root); also its name",
            "passenger_app_root", serve=False),
    Setting("app_type", E, APP, "wsgi",
            "the kind of app: wsgi, asgi, or generic (any program that listens on $PORT)",
            "passenger_app_type", choices=("wsgi", "asgi", "generic")),
    Setting("startup_file", S, APP, "wsgi.py",
            "the file defining the app (WSGI or ASGI), relative to the app root; not used by generic apps",
            "passenger_startup_file"),
    Setting("app_start_command", S, APP, "",
            "agent_app_type generic: the shell command that starts the app, listening on 127.0.0.1:$PORT",
            "passenger_app_start_command"),
    Setting("python", S, APP, "/usr/bin/python3", "the app's interpreter, e.g. a virtualenv's bin/python",
            "passenger_python"),
    Setting("env", Kind.ENV, APP, {}, "an environment variable for the app (NAME=VALUE), repeatable",
            "passenger_env_var"),
    Setting("min_instances", N, APP, 1, "workers kept once the app has had a request",
            "passenger_min_instances"),
    Setting("max_instances", N, APP, 0, "most workers for this app; 0: no bound", "passenger_max_instances"),
    Setting("user", S, APP, "", "the user workers run as (default: the startup file's owner)",
            "passenger_user"),
    Setting("group", S, APP, "", "the group workers run as (default: the user's primary group)",
            "passenger_group"),
    Setting("default_user", S, APP, "nobody", "the user when the startup file belongs to root",
            "passenger_default_user"),
    Setting("max_request_queue_size", N, APP, 100, "most requests waiting for a worker; 0: no bound",
            "passenger_max_request_queue_size"),
    Setting("max_request_queue_time", T, APP, 0, "longest wait for a worker before a 504; 0: no limit",
            "passenger_max_request_queue_time"),
    Setting("prestart", F, APP, False, "start the app's workers when the agent loads the app table",
            "passenger_pre_start"),
    Setting("friendly_error_pages", F, APP, False,
            "the page shown while the app cannot start names the error and shows its traceback",
            "passenger_friendly_error_pages"),
    Setting("memory_limit", M, APP, 0, "a worker over this many megabytes is replaced; 0: none",
            "passenger_memory_limit"),
    Setting("max_requests", N, APP, 0, "a worker is replaced after about this many requests; 0: never",
            "passenger_max_requests"),
    Setting("max_request_time", T, APP, 0, "a worker still on one request after this long is killed; 0: none",
            "passenger_max_request_time"),
    Setting("stat_throttle_rate", T, APP, 10_000, "how often the agent may look at the app's tmp/restart.txt",
            "passenger_stat_throttle_rate"),
    Setting("start_timeout", T, APP, 90_000, "a worker not ready this long after its start is killed",
            "passenger_start_timeout", minimum=1),
    Setting("shutdown_timeout", T, APP, 60_000, "how long a stopping worker may take before SIGKILL",
            minimum=1),
    Setting("spawn_method", E, APP, "smart",
            "smart: workers are forked from a preloader that loaded the app once; direct: each loads it",
            "passenger_spawn_method", choices=("smart", "direct")),
    Setting("max_preloader_idle_time", T, APP, 300_000,
            "a preloader that has forked no worker this long is stopped; 0: never",
            "passenger_max_preloader_idle_time"),
    Setting("concurrency_model", E, APP, "process",
            "process: a worker serves one request at a time; thread: agent_thread_count at once, one per thread",
            "passenger_concurrency_model", choices=("process", "thread")),
    Setting("thread_count", N, APP, 1, "requests one worker serves at once with agent_concurrency_model thread",
            "passenger_thread_count", minimum=1, maximum=1024),
    Setting("concurrency", N, APP, 100, "requests one ASGI worker serves at once on its event loop",
            minimum=1, maximum=1024),
    Setting("websocket_ping_interval", T, APP, 20_000,
            "an ASGI worker pings each open WebSocket this often, and closes (1011) one whose client has sent "
            "nothing for twice as long: a client gone without a word frees its session (uvicorn's "
            "--ws-ping-interval and --ws-ping-timeout); 0: never"),
    Setting("asgi_loop", E, APP, "auto",
            "an ASGI worker's event loop: auto, uvloop's where the app's Python has it, else asyncio's; "
            "asyncio; uvloop (a worker without it fails to start)", choices=("auto", "asyncio", "uvloop")),
    # -- nginx's side only --------------------------------------------------------------
    Setting("enabled", F, LOC, False, "hand this location's dynamic requests to the agent",
            "passenger_enabled", serve=False),
    Setting("status", Kind.STATUS, LOC, False, "this location is a door to the agent's status socket", serve=False),
    Setting("fast_path", F, LOC, True,
            "nginx's workers hand requests straight to an idle worker; off: every request through agent.sock"),
    Setting("long_responses", F, LOC, False,
            "responses may stream as long as the app writes (server-sent events): no request time limit, "
            "and a client that leaves ends the app's response"),
    Setting("base_uri", Kind.URIS, LOC, None,
            "the app is served under this URI: its requests get it as SCRIPT_NAME, the rest as PATH_INFO; "
            "repeatable", "passenger_base_uri", serve=False),
    Setting("buffer_response", F, LOC, True, "nginx buffers the app's response", "passenger_buffer_response"),
    Setting("read_timeout", T, LOC, 600_000, "how long nginx waits for the app's response between two reads",
            "passenger_read_timeout"),
    Setting("send_timeout", T, LOC, 60_000, "how long nginx waits to send the request between two writes"),
    Setting("connect_timeout", T, LOC, 60_000, "how long nginx waits to connect to the agent"),
    Setting("temp_path", Kind.TEMP_PATH, LOC, None, "where buffered responses spill to disk", serve=False),
    Setting("buffer_size", Kind.SIZE, LOC, "16k", "the buffer for the first part of the response, its headers",
            "passenger_buffer_size"),
    Setting("buffers", Kind.BUFS, LOC, "4 32k", "number and size of the buffers for one response, in memory",
            "passenger_buffers"),
    Setting("busy_buffers_size", Kind.SIZE, LOC, None,
            "most of a response's buffers busy sending to the client "
            "(default: twice the larger of buffer_size and one of buffers)", "passenger_busy_buffers_size"),
    Setting("max_temp_file_size", Kind.SIZE, LOC, "1024m",
            "most of a response written to a temporary file; 0: none, the app waits for the client"),
    Setting("temp_file_write_size", Kind.SIZE, LOC, None,
            "most written to the temporary file at once "
            "(default: twice the larger of buffer_size and one of buffers)"),
    # -- agentctl serve only ----------------------------------------------------------
    Setting("host", S, Scope.SERVE, "127.0.0.1", "the address nginx listens on"),
    Setting("port", N, Scope.SERVE, 8080, "the port nginx listens on", minimum=1, maximum=65535),
    Setting("nginx_workers", N, Scope.SERVE, 1, "nginx's worker processes (its worker_processes)", minimum=1),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
DIRECTIVES: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.scope is not Scope.SERVE)
APP_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.scope is APP)
HTTP_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.scope is HTTP)
SERVE_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.serve)

# nginx's size syntax (ngx_parse_size): bytes, or k/K, m/M.
SIZE_SYNTAX = re.compile(r"^\d+[kKmM]?$")
SIZE_UNITS = {"k": 1024, "m": 1024 * 1024}

# nginx's time syntax, as agentctl serve accepts it: a bare number is seconds.
TIME_SYNTAX = re.compile(r"^(\d+)(ms|s|m|h|d)?$")
TIME_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def default(name: str) -> Any:
    """A setting's default, for the dataclasses that carry settings."""
    return BY_NAME[name].default


def parse_time_ms(text: str) -> int:
    """nginx's time syntax (500ms, 30s, 5m, 1h; a bare number is seconds)
    in integer milliseconds. Raises ValueError."""
    match = TIME_SYNTAX.match(text.strip())
    if match is None:
        raise ValueError(f"must be a time such as 30, 500ms, 30s, 5m or 1h, not {text!r}")
    return int(match.group(1)) * TIME_UNITS_MS[match.group(2) or "s"]


def parse_size(text: str) -> int:
    """nginx's size syntax (8k, 1m, 4096) in bytes. Raises ValueError."""
    if not SIZE_SYNTAX.match(text):
        raise ValueError(f"must be a size such as 4096, 8k or 1m, not {text!r}")
    unit = text[-1].lower()
    return int(text[:-1]) * SIZE_UNITS[unit] if unit in SIZE_UNITS else int(text)


def render_directive_value(setting: Setting, value: Any) -> str:
    """A value as nginx reads it in `agent_NAME VALUE;`."""
    if setting.kind is Kind.FLAG:
        return "on" if value else "off"
    if setting.kind is Kind.MSEC:
        return f"{value}ms"
    if setting.kind in (Kind.STR, Kind.PATH):
        return quote(str(value))
    return str(value)


def quote(value: str) -> str:
    """An nginx config string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_value(setting: Setting, value: Any) -> Any:
    """A value from YAML or the command line, checked against the row and
    converted to the unit used inside (MSEC: integer milliseconds). Raises
    ValueError with a message that completes `NAME ...`."""
    kind = setting.kind
    if kind is Kind.FLAG:
        if isinstance(value, str) and value in ("on", "off"):
            return value == "on"
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if kind is Kind.MSEC:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"must be a time such as 30, 500ms, 30s, 5m or 1h, not {value!r}")
        return _at_least(setting, parse_time_ms(value))
    if kind in (Kind.NUM, Kind.SIZE_MB):
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        return _at_least(setting, value)
    if kind is Kind.SIZE:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"must be a size such as 4096, 8k or 1m, not {value!r}")
        parse_size(value.strip())
        return value.strip()
    if kind is Kind.BUFS:
        return _check_bufs(value)
    if kind is Kind.ENV:
        return _check_env(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, not {value!r}")
    if kind is Kind.ENUM and value not in setting.choices:
        raise ValueError(f"must be one of {', '.join(setting.choices)}, not {value!r}")
    return value


def _at_least(setting: Setting, value: int) -> int:
    maximum = setting.maximum
    if value < setting.minimum or (maximum is not None and value > maximum):
        bound = f"between {setting.minimum} and {maximum}" if maximum is not None else f">= {setting.minimum}"
        raise ValueError(f"must be {bound}, not {value}")
    return value


def _check_bufs(value: Any) -> str:
    """NUMBER SIZE, as nginx takes it: at least 2 buffers of more than 0 bytes."""
    parts = value.split() if isinstance(value, str) else []
    if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit() or not SIZE_SYNTAX.match(parts[1]):
        raise ValueError(f"must be a number of buffers and their size such as '8 16k', not {value!r}")
    if int(parts[0]) < 2 or parse_size(parts[1]) == 0:
        raise ValueError(f"must be at least 2 buffers of more than 0 bytes, not {value!r}")
    return f"{int(parts[0])} {parts[1]}"


def _check_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of NAME: VALUE, not {value!r}")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise ValueError(f"names must be strings without '=', not {name!r}")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"{name} must be a string or a number, not {item!r}")
        env[name] = str(item)
    return env
