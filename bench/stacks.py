"""The stacks under test, each nginx in front of app workers (two for the
throughput runs; the spawn and memory runs choose):

    ours       agentctl serve: nginx with the agent module, the agent, 2 workers
    uwsgi      nginx --uwsgi_pass--> uWSGI, 2 processes
    gunicorn   nginx --proxy_pass--> gunicorn, 2 sync workers

and the same with THREADS threads in each worker (the threads part):

    ours-threads       agentctl serve --concurrency-model thread --thread-count THREADS
    uwsgi-threads      uWSGI --enable-threads --threads THREADS
    gunicorn-threads   gunicorn --worker-class gthread --threads THREADS

and, serving the ASGI app bench/apps/asgi.py (the asgi part), 2 workers each:

    ours-asgi   agentctl serve --app-type asgi --concurrency ASGI_CONCURRENCY
    uvicorn     nginx --proxy_pass--> uvicorn --workers 2
    granian     nginx --proxy_pass--> Granian --interface asgi --workers 2

A stack starts its processes in sessions of their own and stops them all,
by process group and then one by one, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import procfs
from figures import (
    AGENT_CORE,
    AGENT_PRELOADER,
    AGENT_WATCHDOG,
    APP_MASTER,
    APP_WORKERS,
    NGINX_MASTER,
    NGINX_WORKERS,
    OTHER,
    SERVE,
)

from agent.control.client import StatusClient, StatusError
from agent.instance import Instance

WORKERS = 2
THREADS = 8     # the threads part's threads per worker, in every stack
# The asgi part: requests at once per agent worker. agent_concurrency's
# default is 100; 128 lets the 2 workers take the largest run's 256
# connections at once, as uvicorn and Granian (no limit by default) do.
ASGI_CONCURRENCY = 128
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
UWSGI_PARAMS = Path("/etc/nginx/uwsgi_params")
READY_STATES = ("idle", "serving")     # the status API's states of a worker that takes requests



@dataclass(frozen=True)
class Buffers:
    """nginx's upstream response buffers, the same in every stack: proxy_*'s
    meanings, given as proxy_* (gunicorn), uwsgi_* (uWSGI) and agent_* (ours).
    The defaults here are the one place the benchmark sets them; run.py's
    --buffer-size, --buffers and --busy-buffers-size override them."""

    buffer_size: str = "16k"        # the agent module's defaults (docs/directives.md)
    buffers: str = "4 32k"
    busy_buffers_size: str = "64k"

    def directives(self, prefix: str) -> list[str]:
        return [f"{prefix}_buffer_size {self.buffer_size};", f"{prefix}_buffers {self.buffers};",
                f"{prefix}_busy_buffers_size {self.busy_buffers_size};"]

    def location_lines(self, prefix: str) -> str:
        return "".join(f"            {line}\n" for line in self.directives(prefix))

    def serve_flags(self) -> list[str]:
        """The same settings as `agentctl serve` flags."""
        return ["--buffer-size", self.buffer_size, "--buffers", self.buffers,
                "--busy-buffers-size", self.busy_buffers_size]


class StackError(Exception):
    """A stack did not start or stopped serving; the message says why."""


class Stack:
    key = ""
    label = ""

    def __init__(self, run_dir: Path, port: int, app_dir: Path, nginx_workers: int, buffers: Buffers,
                 worker_count: int = WORKERS) -> None:
        self.run_dir = run_dir
        self.port = port
        self.app_dir = app_dir
        self.nginx_workers = nginx_workers
        self.buffers = buffers
        self.worker_count = worker_count
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.known: set[procfs.Proc] = set()
        self.logs: list[IO[bytes]] = []
        self.stopped = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def launch(self, name: str, command: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.logs.append(log)
        process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        self.remember()
        return process

    def wait_ready(self) -> None:
        """Until / answers 200 and the stack runs its workers (worker_count)."""
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            self.check_running()
            try:
                status = http_get(self.port, "/")
            except OSError as e:
                last = str(e)
            else:
                last = f"status {status}"
                if status == 200 and len(self.workers()) == self.worker_count:
                    self.remember()
                    return
                last += f", {len(self.workers())} workers"
            time.sleep(0.2)
        raise StackError(f"{self.label} not ready within {READY_TIMEOUT:g} s ({last}){self.log_tails()}")

    def check_answers(self, expected: dict[str, bytes]) -> None:
        """Each path answers 200 with the body the app sends."""
        for path, body in expected.items():
            status, got = http_fetch(self.port, path)
            if status != 200 or got != body:
                raise StackError(f"{self.label}: GET {path} answered {status} with {len(got)} bytes, "
                                 f"expected 200 with {len(body)}{self.log_tails()}")

    def check_running(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise StackError(f"{self.label}: {name} exited with status {process.returncode}"
                                 f"{self.log_tails()}")

    def stop(self) -> None:
        """SIGTERM to every process group started, then SIGKILL to whatever
        of the stack is still alive after STOP_TIMEOUT."""
        if self.stopped:
            return
        self.stopped = True
        self.remember()
        for _, process in self.processes:
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if all(p.poll() is not None for _, p in self.processes) and not self.survivors():
                break
            time.sleep(0.05)
        for _, process in self.processes:
            signal_group(process, signal.SIGKILL)
        for proc in self.survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for _, process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        for log in self.logs:
            log.close()

    def survivors(self) -> list[procfs.Proc]:
        return [proc for proc in self.known if proc.alive()]

    # -- what is measured ------------------------------------------------

    def roots(self) -> list[int]:
        """The pids whose process trees make up the stack."""
        return [p.pid for _, p in self.processes if p.poll() is None]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for root in self.roots():
            found.add(root)
            found.update(procfs.descendants(root))
        return sorted(found)

    def remember(self) -> None:
        for pid in self.pids():
            proc = procfs.Proc.of(pid)
            if proc is not None:
                self.known.add(proc)

    def workers(self) -> list[int]:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """CPU time of every process of the stack (nginx included)."""
        return sum(procfs.cpu_seconds(pid) or 0.0 for pid in self.pids())

    def cpu_by_process(self) -> dict[procfs.Proc, tuple[str, float]]:
        """Each process of the stack, with its role (figures.ROLES) and its
        CPU time so far: the snapshot procfs.cpu_split() compares."""
        found: dict[procfs.Proc, tuple[str, float]] = {}
        for pid in self.pids():
            proc, seconds = procfs.Proc.of(pid), procfs.cpu_seconds(pid)
            if proc is not None and seconds is not None:
                found[proc] = (self.role(pid), seconds)
        return found

    def role(self, pid: int) -> str:
        """What the process is: nginx's master or a worker by the title
        nginx gives them, else what the stack says."""
        title = procfs.command_line(pid)
        if title.startswith("nginx: worker"):
            return NGINX_WORKERS
        if title.startswith("nginx:"):
            return NGINX_MASTER
        return self.server_role(pid)

    def server_role(self, pid: int) -> str:
        return OTHER

    def other_memory(self) -> list[tuple[str, int | None]]:
        """(what, KiB) of processes other than the workers, for the report."""
        return []

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.run_dir.glob("*.log")):
            text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                parts.append(f"\n--- {log} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Signals the process group that process leads, while the leader is
    not reaped (so that its pid, the group's id, cannot have been reused);
    what remains of a group whose leader is gone is killed one by one."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def http_get(port: int, path: str) -> int:
    return http_fetch(port, path)[0]


def http_fetch(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def worker_user() -> tuple[str, str] | None:
    """(user, group) the peers' workers run as: nobody, as the agent's
    workers do when it runs as root; None when not root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name


# -- the peers ---------------------------------------------------------------

class PeerStack(Stack):
    """nginx in front of an app server on a Unix socket."""

    def __init__(self, run_dir: Path, port: int, app_dir: Path, nginx_workers: int, buffers: Buffers, nginx: str,
                 peers_bin: Path, worker_count: int = WORKERS, python_path: Path | None = None) -> None:
        super().__init__(run_dir, port, app_dir, nginx_workers, buffers, worker_count)
        self.nginx = nginx
        self.peers_bin = peers_bin
        # The app's own packages (its virtualenv's site-packages), put on
        # sys.path the server's documented way: the server itself runs from
        # peers_bin's virtualenv.
        self.python_path = python_path
        self.socket = run_dir / "sockets" / f"{self.key}.sock"
        self.server: subprocess.Popen[bytes] | None = None

    def server_command(self) -> list[str]:
        raise NotImplementedError

    def nginx_location(self) -> str:
        raise NotImplementedError

    def nginx_http_lines(self) -> str:
        """Lines of nginx's http block that the location needs (a map)."""
        return ""

    def start(self) -> None:
        os.chmod(self.run_dir, 0o755)
        # uWSGI binds its socket after dropping privileges: the directory
        # belongs to the workers' user.
        self.socket.parent.mkdir(mode=0o755)
        user = worker_user()
        if user:
            entry = pwd.getpwnam(user[0])
            os.chown(self.socket.parent, entry.pw_uid, entry.pw_gid)
        config = self.write_nginx_config()
        test = subprocess.run([self.nginx, "-p", str(self.run_dir), "-c", str(config), "-e",
                               str(self.run_dir / "nginx-error.log"), "-t", "-q"],
                              capture_output=True, text=True)
        if test.returncode != 0:
            raise StackError(f"nginx rejected {config}:\n{test.stderr.strip()}")
        self.server = self.launch(self.key, self.server_command(), cwd=self.app_dir)
        self.launch("nginx", [self.nginx, "-p", str(self.run_dir), "-c", str(config),
                              "-e", str(self.run_dir / "nginx-error.log")])

    def write_nginx_config(self) -> Path:
        temp = self.run_dir / "tmp"
        temp.mkdir(exist_ok=True)
        paths = "".join(f"    {kind}_temp_path {temp / kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = self.run_dir / "nginx.conf"
        config.write_text(f"""daemon off;
master_process on;
worker_processes {self.nginx_workers};
pid {self.run_dir / 'nginx.pid'};
error_log {self.run_dir / 'nginx-error.log'} warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/octet-stream;
    access_log off;
    sendfile on;
{paths}{self.nginx_http_lines()}
    server {{
        listen 127.0.0.1:{self.port};
        server_name _;

        location / {{
{self.nginx_location()}        }}
    }}
}}
""")
        return config

    def workers(self) -> list[int]:
        if self.server is None or self.server.poll() is not None:
            return []
        return procfs.children(self.server.pid)

    def server_role(self, pid: int) -> str:
        if self.server is None:
            return OTHER
        if pid == self.server.pid:
            return APP_MASTER
        return APP_WORKERS if procfs.parent(pid) == self.server.pid else OTHER

    def other_memory(self) -> list[tuple[str, int | None]]:
        if self.server is None:
            return []
        return [(f"{self.label} master PSS", procfs.pss_kib(self.server.pid))]


class GunicornStack(PeerStack):
    key = "gunicorn"
    label = "nginx→gunicorn"
    preload = False     # --preload: the arbiter loads the app, workers fork from it

    def worker_flags(self) -> list[str]:
        return ["--worker-class", "sync"]

    def server_command(self) -> list[str]:
        user = worker_user()
        drop = ["--user", user[0], "--group", user[1]] if user else []
        path = ["--pythonpath", str(self.python_path)] if self.python_path else []
        preload = ["--preload"] if self.preload else []
        return [str(self.peers_bin / "gunicorn"), "--workers", str(self.worker_count), *self.worker_flags(),
                "--bind", f"unix:{self.socket}", "--chdir", str(self.app_dir), "--log-level", "warning",
                *preload, *path, *drop, "wsgi:application"]

    def nginx_location(self) -> str:
        return (f"            proxy_pass http://unix:{self.socket}:;\n"
                "            proxy_set_header Host $host;\n"
                + self.buffers.location_lines("proxy"))


class GunicornPreloadStack(GunicornStack):
    key = "gunicorn-preload"
    label = "nginx→gunicorn --preload"
    preload = True


class GunicornThreadStack(GunicornStack):
    """gunicorn's threaded workers: each a pool of THREADS threads."""

    key = "gunicorn-threads"
    label = "nginx→gunicorn gthread"

    def worker_flags(self) -> list[str]:
        return ["--worker-class", "gthread", "--threads", str(THREADS)]


class UwsgiStack(PeerStack):
    key = "uwsgi"
    label = "nginx→uWSGI"

    def thread_flags(self) -> list[str]:
        return []

    def server_command(self) -> list[str]:
        user = worker_user()
        drop = ["--uid", user[0], "--gid", user[1]] if user else []
        path = ["--pythonpath", str(self.python_path)] if self.python_path else []
        return [str(self.peers_bin / "uwsgi"), "--master", "--processes", str(self.worker_count),
                *self.thread_flags(), "--socket", str(self.socket), "--chmod-socket=666", "--chdir",
                str(self.app_dir), "--wsgi-file", "wsgi.py", "--need-app", "--disable-logging", "--die-on-term",
                *path, *drop]

    def nginx_location(self) -> str:
        params = (f"            include {UWSGI_PARAMS};\n" if UWSGI_PARAMS.exists() else
                  "".join(f"            uwsgi_param {name} ${var};\n" for name, var in (
                      ("QUERY_STRING", "query_string"), ("REQUEST_METHOD", "request_method"),
                      ("CONTENT_TYPE", "content_type"), ("CONTENT_LENGTH", "content_length"),
                      ("REQUEST_URI", "request_uri"), ("PATH_INFO", "document_uri"),
                      ("SERVER_PROTOCOL", "server_protocol"), ("REMOTE_ADDR", "remote_addr"),
                      ("SERVER_NAME", "server_name"), ("SERVER_PORT", "server_port"))))
        return (params + f"            uwsgi_pass unix:{self.socket};\n"
                + self.buffers.location_lines("uwsgi"))


class UwsgiThreadStack(UwsgiStack):
    """uWSGI's processes each with THREADS threads (and the GIL released
    around them: --enable-threads)."""

    key = "uwsgi-threads"
    label = "nginx→uWSGI threads"

    def thread_flags(self) -> list[str]:
        return ["--enable-threads", "--threads", str(THREADS)]


# -- the ASGI peers ----------------------------------------------------------

RESOURCE_TRACKER = "multiprocessing.resource_tracker"


def drop_privileges(command: list[str]) -> list[str]:
    """command run as the workers' user (nobody) when root, for a server
    that has no option of its own for it."""
    user = worker_user()
    if user is None:
        return command
    return ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", "--", *command]


class AsgiPeerStack(PeerStack):
    """An ASGI server on a Unix socket behind nginx's proxy_pass, the
    configuration uvicorn's deployment guide gives: HTTP/1.1 to the server,
    and the client's Upgrade and Connection headers passed on, so that /ws
    becomes a WebSocket."""

    def nginx_http_lines(self) -> str:
        return ("    map $http_upgrade $connection_upgrade {\n"
                "        default upgrade;\n"
                "        '' close;\n"
                "    }\n")

    def nginx_location(self) -> str:
        return (f"            proxy_pass http://unix:{self.socket}:;\n"
                "            proxy_http_version 1.1;\n"
                "            proxy_set_header Host $host;\n"
                "            proxy_set_header Upgrade $http_upgrade;\n"
                "            proxy_set_header Connection $connection_upgrade;\n"
                + self.buffers.location_lines("proxy"))


class UvicornStack(AsgiPeerStack):
    """uvicorn --workers WORKERS: a supervisor process and its workers, each
    an event loop (uvloop, httptools and websockets: uvicorn[standard]).
    The supervisor starts them with multiprocessing's spawn, which starts
    a resource tracker beside them: a child that is not a worker."""

    key = "uvicorn"
    label = "nginx→uvicorn"

    def workers(self) -> list[int]:
        return [pid for pid in super().workers() if RESOURCE_TRACKER not in procfs.command_line(pid)]

    def server_role(self, pid: int) -> str:
        role = super().server_role(pid)
        return OTHER if role == APP_WORKERS and RESOURCE_TRACKER in procfs.command_line(pid) else role

    def server_command(self) -> list[str]:
        return drop_privileges([
            str(self.peers_bin / "uvicorn"), "--workers", str(self.worker_count), "--uds", str(self.socket),
            "--app-dir", str(self.app_dir), "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio",
            "--log-level", "warning", "--no-access-log", "asgi:application"])


class GranianStack(AsgiPeerStack):
    """Granian --interface asgi --workers WORKERS: a main process and its
    workers, each a Rust HTTP server in front of the app's event loop."""

    key = "granian"
    label = "nginx→Granian"

    def server_command(self) -> list[str]:
        return drop_privileges([
            str(self.peers_bin / "granian"), "--interface", "asgi", "--workers", str(self.worker_count),
            "--uds", str(self.socket), "--working-dir", str(self.app_dir), "--loop", "uvloop",
            "--log-level", "warning", "--no-access-log", "asgi:application"])


# -- ours --------------------------------------------------------------------

class SpawnMethodUnavailable(StackError):
    """The nginx module does not know `agent_spawn_method` (or the method):
    a stack that asks for it cannot run, and nothing is measured for it."""


class AgentStack(Stack):
    """agentctl serve: it writes the nginx config (worker processes and
    buffers from its flags, as the peers' configurations have them) and runs
    nginx in the foreground; nginx starts the agent, which starts the
    workers.

    With a spawn_method, the config serve prints gets `agent_spawn_method
    METHOD;` in its location and nginx runs it itself: nginx's own check is
    what tells whether the module has the directive."""

    key = "ours"
    label = "nginx→agent"

    def __init__(self, run_dir: Path, port: int, app_dir: Path, nginx_workers: int, buffers: Buffers, nginx: str,
                 repo: Path, agent_python: str, app_python: str, worker_count: int = WORKERS,
                 spawn_method: str | None = None) -> None:
        super().__init__(run_dir, port, app_dir, nginx_workers, buffers, worker_count)
        self.nginx = nginx
        self.repo = repo
        self.agent_python = agent_python
        self.app_python = app_python
        self.spawn_method = spawn_method
        self.instance = run_dir / "instance"
        self.serve: subprocess.Popen[bytes] | None = None
        self.pool_pids: set[int] = set()
        self.pool_asked_at = -1e9

    fast_path = "on"

    def concurrency_flags(self) -> list[str]:
        return []

    def serve_command(self) -> list[str]:
        return [self.agent_python, "-m", "agent.cli", "serve", str(self.app_dir), "--port", str(self.port),
                "--run-dir", str(self.run_dir), "--min-instances", str(self.worker_count),
                "--max-instances", str(self.worker_count), "--max-pool-size", str(max(6, self.worker_count)),
                "--python", self.app_python, "--nginx", self.nginx, "--nginx-workers", str(self.nginx_workers),
                "--fast-path", self.fast_path, *self.concurrency_flags(), *self.buffers.serve_flags()]

    def start(self) -> None:
        if self.spawn_method is None:
            self.serve = self.launch("agentctl-serve", self.serve_command(), cwd=self.repo)
            return
        config = self.write_config_with_spawn_method(self.spawn_method)
        self.launch("nginx", [self.nginx, "-p", str(self.run_dir), "-c", str(config), "-e", "stderr"])

    def write_config_with_spawn_method(self, method: str) -> Path:
        printed = subprocess.run([*self.serve_command(), "--print-config"], cwd=self.repo, capture_output=True,
                                 text=True)
        if printed.returncode != 0:
            raise StackError(f"agentctl serve --print-config failed:\n{printed.stderr.strip()}")
        anchor = "agent_enabled on;"
        if anchor not in printed.stdout:
            raise StackError(f"no `{anchor}` in the config agentctl serve printed")
        # serve prints every setting, the spawn method's default among them: ours takes its place.
        kept = "".join(line for line in printed.stdout.splitlines(keepends=True)
                       if not line.strip().startswith("agent_spawn_method "))
        text = kept.replace(anchor, f"{anchor}\n            agent_spawn_method {method};", 1)
        # What serve's own run directory has: tmp/ of root's alone.
        (self.run_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
        config = self.run_dir / "nginx.conf"
        config.write_text(text)
        test = subprocess.run([self.nginx, "-p", str(self.run_dir), "-c", str(config), "-e", "stderr", "-t", "-q"],
                              capture_output=True, text=True)
        if test.returncode != 0:
            problem = test.stderr.strip()
            said = [line for line in problem.splitlines() if "agent_spawn_method" in line]
            if said:
                raise SpawnMethodUnavailable(f"nginx refused `agent_spawn_method {method};`: {said[0]}")
            raise StackError(f"nginx rejected {config}:\n{problem}")
        return config

    def pid_from(self, name: str) -> int | None:
        try:
            pid = int((self.instance / name).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if procfs.stat_fields(pid) is not None else None

    def core_pid(self) -> int | None:
        return self.pid_from("core.pid")

    def watchdog_pid(self) -> int | None:
        return self.pid_from("watchdog.pid")

    def roots(self) -> list[int]:
        extra = [pid for pid in (self.watchdog_pid(), self.core_pid()) if pid is not None]
        return super().roots() + extra

    def pool_processes(self) -> list[dict[str, Any]]:
        """The app's workers as the status API lists them (docs/status-api.md);
        none while the agent does not answer yet."""
        try:
            pool = StatusClient(Instance(self.instance).status_socket, token=None).get("/pool", timeout=5.0)
        except StatusError:
            return []
        return [process for app in pool.get("apps", []) for process in app.get("processes", [])]

    def recent_pool_pids(self) -> set[int]:
        """The pool's pids, asked at most once a second: role() asks for
        each process of the stack in turn."""
        now = time.monotonic()
        if now - self.pool_asked_at > 1.0:
            self.pool_pids = {p["pid"] for p in self.pool_processes()}
            self.pool_asked_at = now
        return self.pool_pids

    def workers(self) -> list[int]:
        """The workers ready to serve. Asked of the status API rather than
        read from the process tree: where workers are forked from a
        preloader, the core's children are not the workers."""
        return sorted(p["pid"] for p in self.pool_processes() if p.get("state") in READY_STATES)

    def server_role(self, pid: int) -> str:
        core, watchdog = self.core_pid(), self.watchdog_pid()
        if pid == core:
            return AGENT_CORE
        if pid == watchdog:
            return AGENT_WATCHDOG
        if self.serve is not None and pid == self.serve.pid:
            return SERVE
        if pid in self.recent_pool_pids():
            return APP_WORKERS
        return AGENT_PRELOADER if core is not None and pid in procfs.descendants(core) else OTHER

    def other_memory(self) -> list[tuple[str, int | None]]:
        core, watchdog = self.core_pid(), self.watchdog_pid()
        return [("agent core RSS", None if core is None else procfs.rss_kib(core)),
                ("agent watchdog RSS", None if watchdog is None else procfs.rss_kib(watchdog))]


class RelayStack(AgentStack):
    """The same agent with `agent_fast_path off`: every request through the
    core's relay (agent.sock), the path the fast path replaced. Measured in
    the same run so that the report carries the before and the after."""

    key = "relay"
    label = "nginx→agent relay"
    fast_path = "off"


class AgentThreadStack(AgentStack):
    """The agent with threaded workers: agent_concurrency_model thread,
    agent_thread_count THREADS (docs/policy.md, "Threads")."""

    key = "ours-threads"
    label = "nginx→agent threads"

    def concurrency_flags(self) -> list[str]:
        return ["--concurrency-model", "thread", "--thread-count", str(THREADS)]


class AgentAsgiStack(AgentStack):
    """The agent serving bench/apps/asgi.py: agent_app_type asgi, each
    worker an event loop of up to ASGI_CONCURRENCY requests at once
    (docs/policy.md, "ASGI apps")."""

    key = "ours-asgi"
    label = "nginx→agent ASGI"

    def concurrency_flags(self) -> list[str]:
        return ["--app-type", "asgi", "--startup-file", "asgi.py", "--concurrency", str(ASGI_CONCURRENCY)]
