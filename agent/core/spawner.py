"""Starting one worker: the user it runs as, its environment, its socket,
and the pipes for its handshake and its output (docs/protocol.md §3)."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from agent.core.config import AppConfig
from agent.core.engine import SpawnSpec, spawn
from agent.unix import listen_unix

LOADERS = {"wsgi": "wsgi_loader.py"}
WORKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """A worker could not be started. summary is one line; details may hold
    a traceback."""

    def __init__(self, summary: str, details: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.details = details or summary


@dataclass(frozen=True)
class WorkerUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


@dataclass
class StartedProcess:
    """A forked worker that has not finished its handshake yet."""

    pid: int
    socket_path: str
    ready_fd: int      # read end of the handshake pipe, nonblocking
    output_fd: int     # read end of the output pipe, nonblocking


def install_loaders(loaders_dir: Path) -> None:
    """Copies the loaders where every worker user can read them: the
    package itself may live in a directory they cannot enter."""
    loaders_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(loaders_dir, 0o755)
    source = Path(__file__).resolve().parents[1] / "loaders"
    for name in LOADERS.values():
        target = loaders_dir / name
        tmp = loaders_dir / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)


def resolve_user(config: AppConfig) -> WorkerUser | None:
    """The user a worker runs as, or None when the agent is not root (it
    cannot switch users then, and keeps its own). As Passenger: the user
    the config names, else the owner of the startup file, else (owner root)
    the default user. Root only when the config names it."""
    if os.geteuid() != 0:
        return None
    try:
        if config.user:
            entry = pwd.getpwnam(config.user)
        else:
            owner = _owner_of(config)
            entry = pwd.getpwnam(config.default_user) if owner == 0 else pwd.getpwuid(owner)
    except KeyError as e:
        raise SpawnError(f"cannot run the app as a user: {e.args[0]}") from e
    gid = entry.pw_gid
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError as e:
            raise SpawnError(f"group {config.group!r} does not exist") from e
    groups = tuple(os.getgrouplist(entry.pw_name, gid))
    return WorkerUser(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir, entry.pw_shell)


def _owner_of(config: AppConfig) -> int:
    for path in (config.startup_path, Path(config.app_root)):
        try:
            return path.stat().st_uid
        except OSError:
            continue
    raise SpawnError(f"app root {config.app_root} does not exist")


def worker_env(config: AppConfig, user: WorkerUser | None) -> dict[str, str]:
    """A clean environment: nothing of the agent's own leaks into the app."""
    env = {"PATH": WORKER_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONUNBUFFERED": "1"}
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell)
    env.update(
        AGENT_APP_NAME=config.name,
        AGENT_APP_ROOT=config.app_root,
        AGENT_STARTUP_FILE=config.startup_file,
        AGENT_APP_TYPE=config.app_type,
        AGENT_LISTEN_FD="3",
        AGENT_READY_FD="4",
    )
    env.update(config.env)
    return env


def resolve_python(config: AppConfig, env: dict[str, str]) -> str:
    python = config.python
    if "/" not in python:
        found = shutil.which(python, path=env.get("PATH", WORKER_PATH))
        if found is None:
            raise SpawnError(f"the app's Python interpreter {python!r} is not on PATH ({env.get('PATH')})")
        python = found
    if not os.access(python, os.X_OK):
        raise SpawnError(f"the app's Python interpreter {python} does not exist or is not executable")
    return python


def start_worker(config: AppConfig, loaders_dir: Path, socket_path: str) -> StartedProcess:
    """Forks a worker for config. Raises SpawnError when it cannot even be
    forked (bad user, interpreter or directory); a worker that forks but
    fails to load the app reports that through its handshake."""
    user = resolve_user(config)
    env = worker_env(config, user)
    python = resolve_python(config, env)
    spec = SpawnSpec(
        path=python,
        argv=[python, str(loaders_dir / LOADERS[config.app_type])],
        env=env,
        cwd=config.app_root,
        uid=user.uid if user else -1,
        gid=user.gid if user else -1,
        groups=user.groups if user else (),
        death_signal=signal.SIGKILL,
    )
    fds: list[int] = []
    try:
        listen_fd = listen_unix(socket_path, 1024).detach()
        fds.append(listen_fd)
        # Only the core's ends are nonblocking: a worker's print() must block
        # on a full pipe, not fail.
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        fds += [ready_r, ready_w]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += [out_r, out_w]
        os.set_blocking(ready_r, False)
        os.set_blocking(out_r, False)
        pid = spawn(spec, listen_fd, ready_w, out_w)
    except OSError as e:  # the engine module's NativeError is one too
        for fd in fds:
            os.close(fd)
        _unlink(socket_path)
        raise SpawnError(f"cannot start a worker: {e.strerror}") from e
    for fd in (listen_fd, ready_w, out_w):
        os.close(fd)
    return StartedProcess(pid, socket_path, ready_r, out_r)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
