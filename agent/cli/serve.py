"""`agentctl serve`: one app behind nginx and the agent, in the foreground.

As Passenger Standalone does, it writes an nginx configuration that loads
the module and enables the agent for the app, then runs nginx in the
foreground. Stopping it (Ctrl-C, SIGTERM) stops nginx, which stops the
agent and every worker; serve returns once they are all gone.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.instance import Instance
from agent.settings import SERVE_SETTINGS, Kind, Scope, quote, render_directive_value

MODULE_NAME = "ngx_http_agent_module.so"
AGENT_STOP_WAIT = 90.0


class ServeError(Exception):
    """serve cannot start; the message says why and what to do."""


def serve_defaults() -> dict[str, Any]:
    return {s.name: copy.copy(s.default) for s in SERVE_SETTINGS}


@dataclass
class ServeOptions:
    """What serve runs: the app, the settings (agent.settings rows serve
    takes, by name, in the units used inside), and where things go."""

    app_dir: Path
    settings: dict[str, Any] = field(default_factory=serve_defaults)
    run_dir: Path | None = None
    module: Path | None = None
    nginx: str = "nginx"
    client_max_body_size: str = "1024m"

    @property
    def host(self) -> str:
        return str(self.settings["host"])

    @property
    def port(self) -> int:
        return int(self.settings["port"])

    def resolved_run_dir(self) -> Path:
        return self.run_dir or Path(f"/tmp/agent-serve-{self.port}")

    def directive_lines(self, scopes: tuple[Scope, ...], indent: str) -> str:
        """`agent_NAME VALUE;` for each setting of these scopes that has a
        value; agent_env once per variable."""
        lines = []
        for setting in SERVE_SETTINGS:
            value = self.settings.get(setting.name)
            if setting.scope not in scopes or value is None or value == "":
                continue
            if setting.kind is Kind.ENV:
                lines += [f"agent_env {quote(k)} {quote(v)};" for k, v in value.items()]
            else:
                lines.append(f"{setting.directive} {render_directive_value(setting, value)};")
        return "".join(f"{indent}{line}\n" for line in lines)


def find_module(explicit: Path | None) -> Path:
    """The built nginx module: --module, $AGENT_NGINX_MODULE, the source
    tree's build/, or nginx's modules directory."""
    candidates = [explicit] if explicit else []
    if os.environ.get("AGENT_NGINX_MODULE"):
        candidates.append(Path(os.environ["AGENT_NGINX_MODULE"]))
    candidates += [
        Path(__file__).resolve().parents[2] / "build" / MODULE_NAME,
        Path("/usr/lib/nginx/modules") / MODULE_NAME,
    ]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ServeError(f"the nginx module {MODULE_NAME} is not built (looked in: "
                     f"{', '.join(str(p) for p in candidates)}); run `make build`")


def render_config(options: ServeOptions, module: Path) -> str:
    app_dir = options.app_dir.resolve()
    run_dir = options.resolved_run_dir()
    temp = run_dir / "tmp"
    http_lines = options.directive_lines((Scope.HTTP,), "    ")
    location_lines = options.directive_lines((Scope.APP, Scope.LOCATION), "            ")
    mime = "    include /etc/nginx/mime.types;\n" if Path("/etc/nginx/mime.types").exists() else ""
    return f"""# Written by agentctl serve for {app_dir}
load_module {quote(str(module))};
daemon off;
master_process on;
worker_processes 1;
pid {quote(str(run_dir / 'nginx.pid'))};
error_log stderr notice;

events {{
    worker_connections 4096;
}}

http {{
{mime}    default_type application/octet-stream;
    access_log off;
    sendfile on;
    client_max_body_size {options.client_max_body_size};
    client_body_temp_path {quote(str(temp / 'body'))};
    proxy_temp_path {quote(str(temp / 'proxy'))};
    fastcgi_temp_path {quote(str(temp / 'fastcgi'))};
    uwsgi_temp_path {quote(str(temp / 'uwsgi'))};
    scgi_temp_path {quote(str(temp / 'scgi'))};
    agent_temp_path {quote(str(temp / 'agent'))};

    agent_core_python {quote(sys.executable)};
    agent_instance_dir {quote(str(run_dir / 'instance'))};
{http_lines}
    server {{
        listen {options.host}:{options.port};
        server_name _;
        root {quote(str(app_dir / 'public'))};

        location / {{
            agent_enabled on;
            agent_app_root {quote(str(app_dir))};
{location_lines}        }}
    }}
}}
"""


def write_config(options: ServeOptions) -> Path:
    app_dir = options.app_dir.resolve()
    startup_file = options.settings["startup_file"]
    if not (app_dir / startup_file).is_file():
        raise ServeError(f"{app_dir / startup_file} does not exist: "
                         "APP_DIR must hold the startup file (see --startup-file)")
    run_dir = options.resolved_run_dir()
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)
    config = run_dir / "nginx.conf"
    config.write_text(render_config(options, find_module(options.module)))
    return config


def find_nginx(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise ServeError(f"nginx ({name}) is not installed; run `make deps`")
    return found


def serve(options: ServeOptions) -> int:
    nginx = find_nginx(options.nginx)
    config = write_config(options)
    run_dir = options.resolved_run_dir()
    command = [nginx, "-p", str(run_dir), "-c", str(config), "-e", "stderr"]
    test = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if test.returncode != 0:
        raise ServeError(f"nginx rejected the configuration {config}:\n{test.stderr.strip()}")
    print(f"agentctl: serving {options.app_dir.resolve()} at http://{options.host}:{options.port}/ "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    process = subprocess.Popen(command)
    forward_signals(process)
    status = process.wait()
    wait_for_agent_exit(Instance(run_dir / "instance"))
    return status if status >= 0 else 128 - status


def forward_signals(process: subprocess.Popen[bytes]) -> None:
    """A signal sent to serve alone is passed on, so nginx stops either way
    (Ctrl-C also reaches nginx through the terminal; twice is harmless)."""
    def forward(signum: int, frame: object) -> None:
        process.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, forward)


def wait_for_agent_exit(instance: Instance) -> None:
    """nginx is gone; the agent follows. Return once its lock is free."""
    deadline = time.monotonic() + AGENT_STOP_WAIT
    while time.monotonic() < deadline:
        if not instance.watchdog_running():
            return
        time.sleep(0.05)
    print(f"agentctl: the agent ({instance.root}) is still running after {AGENT_STOP_WAIT:.0f} s",
          file=sys.stderr)
