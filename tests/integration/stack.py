"""A real stack for the integration tests: the system nginx with the built
module, the agent it starts, and the workers the agent spawns.

Everything lives in a world-readable directory under /tmp, because the
workers run as an unprivileged user (the agent runs as root here) and must
read the apps.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.instance import Instance

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "build" / "ngx_http_agent_module.so"
APP_PYTHON = "/usr/bin/python3"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# nginx's workers run as a user of their own, never as an app's (apps whose
# files belong to root run as nobody): docs/security.md.
NGINX_USER = "www-data"


def hello_answers(port: int) -> bool:
    """examples/hello answers on 127.0.0.1:port."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        ok = conn.getresponse().read().startswith(b"Hello from worker")
        conn.close()
        return ok
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    """The process has exited (a zombie that waits to be reaped counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(pid: int) -> bool:
    return not gone(pid)


def unsanitized_env() -> dict[str, str]:
    """The environment for a system program a test runs (curl, a browser):
    without the sanitizer runtimes `make sanitize` preloads for the agent's
    C extension, which such programs do not run under."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


@dataclass
class AppSpec:
    """One app and the location that serves it."""

    name: str
    source: str                      # the startup file's text
    location: str = "/"
    directives: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    public_files: dict[str, str] = field(default_factory=dict)
    startup_file: str = "wsgi.py"
    python: str = APP_PYTHON         # agent_python: a virtualenv's interpreter


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


# The name a preloader gives itself (agent/loaders/wsgi_loader.py).
PRELOADER_NAME = "agent-preloader"


class Stack:
    """nginx + agent + workers, started from a config these tests write."""

    def __init__(self, root: Path, apps: list[AppSpec], http_directives: dict[str, str] | None = None,
                 nginx_workers: int = 1) -> None:
        self.root = root
        self.apps = apps
        self.http_directives = http_directives or {}
        self.nginx_workers = nginx_workers
        self.port = free_port()
        self.instance = root / "instance"
        self.log_file = root / "agent.log"
        self.error_log = root / "error.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- files ---------------------------------------------------------

    def app_root(self, app: AppSpec) -> Path:
        return self.root / "apps" / app.name

    def write_apps(self) -> None:
        for app in self.apps:
            root = self.app_root(app)
            (root / "public").mkdir(parents=True, exist_ok=True)
            (root / app.startup_file).write_text(textwrap.dedent(app.source))
            for name, content in app.public_files.items():
                (root / "public" / name).write_text(content)
        subprocess.run(["chmod", "-R", "a+rX", str(self.root)], check=True)

    def location_block(self, app: AppSpec) -> str:
        lines = [
            f"location {app.location} {{",
            f"    root {self.app_root(app) / 'public'};",
            "    agent_enabled on;",
            f"    agent_app_root {self.app_root(app)};",
            f"    agent_python {app.python};",
            f"    agent_startup_file {app.startup_file};",
        ]
        lines += [f"    agent_env {k} \"{v}\";" for k, v in app.env.items()]
        lines += [f"    {k} {v};" for k, v in app.directives.items()]
        lines.append("}")
        return "\n".join("        " + line for line in lines)

    def config_text(self) -> str:
        temp = self.root / "tmp"
        http_extra = "\n".join(f"    {k} {v};" for k, v in self.http_directives.items())
        locations = "\n".join(self.location_block(app) for app in self.apps)
        return f"""load_module {MODULE};
daemon off;
master_process on;
user {NGINX_USER};
worker_processes {self.nginx_workers};
pid {self.root / 'nginx.pid'};
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {temp / 'body'};
    proxy_temp_path {temp / 'proxy'};
    fastcgi_temp_path {temp / 'fastcgi'};
    uwsgi_temp_path {temp / 'uwsgi'};
    scgi_temp_path {temp / 'scgi'};
    agent_temp_path {temp / 'agent'};
    agent_core_python {sys.executable};
    agent_instance_dir {self.instance};
    agent_log_file {self.log_file};
{http_extra}
    server {{
        listen 127.0.0.1:{self.port};
{locations}
    }}
}}
"""

    @property
    def scratch(self) -> Path:
        """A directory every worker user may write to (marker files)."""
        return self.root / "scratch"

    def write_config(self) -> Path:
        self.write_apps()
        (self.root / "tmp").mkdir(exist_ok=True)
        self.scratch.mkdir(exist_ok=True)
        os.chmod(self.scratch, 0o1777)
        config = self.root / "nginx.conf"
        config.write_text(self.config_text())
        return config

    def nginx_command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-e", str(self.error_log), *extra]

    # -- lifecycle -----------------------------------------------------

    def start(self) -> Stack:
        self.write_config()
        self.process = subprocess.Popen(self.nginx_command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self.accepting, timeout=15, what=f"nginx on port {self.port}")
        return self

    def accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"nginx exited ({self.process.returncode}): {stderr}\n{self.logs()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        wait_until(lambda: not self.agent_running(), timeout=30, what="the agent to stop")

    def reload(self) -> None:
        """nginx -s reload, then wait until the new nginx worker runs and
        the agent has read the new app table."""
        old_workers = set(self.nginx_worker_pids())
        apps_mtime = (self.instance / "apps.json").stat().st_mtime_ns
        self.write_config()
        subprocess.run(self.nginx_command("-s", "reload"), check=True, capture_output=True)
        wait_until(lambda: self.nginx_worker_pids() and not set(self.nginx_worker_pids()) & old_workers,
                   what="nginx workers to be replaced")
        wait_until(lambda: (self.instance / "apps.json").stat().st_mtime_ns != apps_mtime, what="apps.json")

    # -- looking at processes -------------------------------------------

    def master(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def nginx_worker_pids(self) -> list[int]:
        pids = []
        for child in self.master().children():
            with contextlib.suppress(psutil.NoSuchProcess):   # a worker that exits meanwhile
                if "nginx" in child.name():
                    pids.append(child.pid)
        return pids

    def agent_running(self) -> bool:
        return Instance(self.instance).watchdog_running()

    def watchdog_pid(self) -> int:
        return int((self.instance / "watchdog.pid").read_text())

    def core_pid(self) -> int:
        return int((self.instance / "core.pid").read_text())

    def worker_processes(self, app: AppSpec | None = None) -> list[psutil.Process]:
        """The app workers (not the preloaders, which run the same command)."""
        return [p for p in self.loader_processes(app) if p.info["name"] != PRELOADER_NAME]

    def preloader_processes(self, app: AppSpec | None = None) -> list[psutil.Process]:
        return [p for p in self.loader_processes(app) if p.info["name"] == PRELOADER_NAME]

    def loader_processes(self, app: AppSpec | None = None) -> list[psutil.Process]:
        loader = str(self.instance / "loaders")
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd", "name"]):
            cmdline = proc.info["cmdline"] or []
            ours = len(cmdline) >= 2 and cmdline[1].startswith(loader)
            if ours and (app is None or proc.info["cwd"] == str(self.app_root(app))):
                found.append(proc)
        return found

    def worker_pids(self, app: AppSpec | None = None) -> set[int]:
        return {p.pid for p in self.worker_processes(app)}

    def all_agent_pids(self) -> set[int]:
        """Every process that belongs to this stack's agent."""
        pids = {p.pid for p in self.loader_processes()}
        marker = str(self.instance)
        for proc in psutil.process_iter(["cmdline"]):
            if marker in " ".join(proc.info["cmdline"] or []):
                pids.add(proc.pid)
        return pids

    def agent_log(self) -> str:
        """The agent's whole log ('' before it exists); logs() has only its tail."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        parts = []
        for path in (self.log_file, self.error_log):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    # -- requests --------------------------------------------------------

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs: object) -> Response:
        return self.request("GET", path, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_stack(apps: list[AppSpec], http_directives: dict[str, str] | None = None,
                  nginx_workers: int = 1) -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="agent-it-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        with started(Stack(root, apps, http_directives, nginx_workers)) as stack:
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def started(stack: Stack) -> Iterator[Stack]:
    """Starts the stack and stops it after; its logs are printed when
    either fails, or the test does."""
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        try:
            stack.stop()
        except BaseException:
            print(stack.logs())
            raise


def example_venv(example: Path, built: Path, target: Path) -> str:
    """An example's virtualenv at target, where the workers' user can read
    it: a copy of the one `make` built (built), else one made with the
    example's make-venv.sh (pip needs PyPI). Returns its interpreter."""
    if (built / "bin" / "python").exists():
        shutil.copytree(built, target, symlinks=True)
    else:
        subprocess.run([str(example / "make-venv.sh"), str(target)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    return str(target / "bin" / "python")


def nginx_t_with(directives: str, app_source: str = "") -> subprocess.CompletedProcess[str]:
    """`nginx -t` on a one-app stack's configuration with directives added to
    its location (no nginx is started)."""
    root = Path(tempfile.mkdtemp(prefix="agent-conf-", dir="/tmp"))
    try:
        source = app_source or "def application(environ, start_response):\n    return []\n"
        stack = Stack(root, [AppSpec("a", source, "/")])
        stack.write_config()
        config = stack.config_text().replace("agent_enabled on;", f"agent_enabled on;\n{directives}")
        (root / "nginx.conf").write_text(config)
        return subprocess.run(stack.nginx_command("-t"), capture_output=True, text=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
