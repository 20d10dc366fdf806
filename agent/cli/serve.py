"""`agentctl serve`: one app behind nginx and the agent, in the foreground.

As Passenger Standalone does, it writes an nginx configuration that loads
the module and enables the agent for the app, then runs nginx in the
foreground. Stopping it (Ctrl-C, SIGTERM) stops nginx, which stops the
agent and every worker; serve returns once they are all gone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.instance import Instance, UnsafeDirectory, make_private_directory, open_directory
from agent.settings import SERVE_SETTINGS, Kind, Scope, quote, render_directive_value

MODULE_NAME = "ngx_http_agent_module.so"
AGENT_STOP_WAIT = 90.0
# nginx's workers run as the first of these that exists, when serve runs as
# root: never as nobody, which apps whose files belong to root run as.
NGINX_USERS = ("www-data", "nginx")
RUN_DIR_ADVICE = "name a directory of your own with --run-dir"


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
        """--run-dir, else a place no other user can make first: /run for
        root; for other users a fresh directory that prepare_run_dir()
        makes (mkdtemp), whose name --print-config can only show."""
        if self.run_dir is not None:
            return self.run_dir
        if os.geteuid() == 0:
            return Path(f"/run/agent-serve-{self.port}")
        return Path(tempfile.gettempdir()) / f"agent-serve-{self.port}-XXXXXXXX"

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
{user_directive()}worker_processes {options.settings['nginx_workers']};
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


def user_directive() -> str:
    """As root, nginx's workers get a user of their own (docs/security.md):
    without one they would be nobody, as are the apps of root's files, and
    such an app could talk to agent.sock or signal them."""
    if os.geteuid() != 0:
        return ""
    for name in NGINX_USERS:
        with contextlib.suppress(KeyError):
            return f"user {pwd.getpwnam(name).pw_name};\n"
    raise ServeError(f"no user for nginx's workers: create one of {', '.join(NGINX_USERS)} "
                     "(useradd --system www-data), so that they never run as an app's user")


def prepare_run_dir(options: ServeOptions) -> Path:
    """Make (or check: agent.instance.check_directory) the run directory,
    and fix options.run_dir to it. Returns it."""
    if options.run_dir is None and os.geteuid() != 0:
        options.run_dir = Path(tempfile.mkdtemp(prefix=f"agent-serve-{options.port}-"))
    run_dir = options.run_dir = options.resolved_run_dir()
    try:
        make_private_directory(run_dir, advice=RUN_DIR_ADVICE)
        # nginx's workers reach agent.sock and the temporary files through it
        dir_fd = open_directory(run_dir)
        try:
            os.fchmod(dir_fd, 0o755)
        finally:
            os.close(dir_fd)
        make_private_directory(run_dir / "tmp", advice=RUN_DIR_ADVICE)
    except UnsafeDirectory as e:
        raise ServeError(str(e)) from None
    return run_dir


def write_config(options: ServeOptions) -> Path:
    app_dir = options.app_dir.resolve()
    startup_file = options.settings["startup_file"]
    if not (app_dir / startup_file).is_file():
        raise ServeError(f"{app_dir / startup_file} does not exist: "
                         "APP_DIR must hold the startup file (see --startup-file)")
    run_dir = prepare_run_dir(options)
    write_private_file(run_dir, "nginx.conf", render_config(options, find_module(options.module)))
    return run_dir / "nginx.conf"


def write_private_file(directory: Path, name: str, text: str) -> None:
    """A fresh file (O_EXCL|O_NOFOLLOW: never one planted, never through a
    link), renamed into place, which replaces a link rather than follow it."""
    dir_fd = open_directory(directory)
    temporary = f".{name}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def find_nginx(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise ServeError(f"nginx ({name}) is not installed; run `make deps`")
    return found


def serve(options: ServeOptions) -> int:
    nginx = find_nginx(options.nginx)
    made_run_dir = options.run_dir is None and os.geteuid() != 0
    config = write_config(options)
    run_dir = options.resolved_run_dir()
    try:
        return run_nginx(options, nginx, config, run_dir)
    finally:
        if made_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def run_nginx(options: ServeOptions, nginx: str, config: Path, run_dir: Path) -> int:
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
