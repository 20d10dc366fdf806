"""Starting one worker: the user it runs as, its environment, its socket,
and the pipes for its handshake and its output (docs/protocol.md §3)."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from agent.core.config import AppConfig
from agent.core.engine import SpawnSpec, spawn
from agent.core.preloader import Channel, PreloaderFailed
from agent.core.supervision import Supervision
from agent.instance import Instance
from agent.unix import listen_unix

LOADERS = {"wsgi": "wsgi_loader.py", "asgi": "asgi_loader.py"}
# Modules the loaders import, copied beside them: the ASGI loader's WebSocket codec.
LOADER_MODULES = ("asgi_websocket.py",)
# agent_app_type generic: a command that serves HTTP on $PORT, no loader.
GENERIC = "generic"
SHELL = "/bin/sh"
# The loaders' C speedups (csrc/loader_speedups.c), copied next to them: a
# worker's interpreter that can load it (CPython 3.9 or later) does.
LOADER_SPEEDUPS = "_agent_loader_speedups.abi3.so"
WORKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The worker's fd for the startup file the core checked (csrc/spawn_api.h).
STARTUP_FD = 5
ENV_FD = 6
# agent_env names the interpreter or the dynamic linker reads at exec: these
# alone go into the exec environment.
EXEC_ENV_PREFIXES = ("PYTHON", "LD_", "LC_")
EXEC_ENV_NAMES = frozenset({"LANG", "LANGUAGE", "PATH", "HOME", "TZ", "TMPDIR"})


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
    """A started worker or preloader that has not finished its handshake yet."""

    pid: int
    socket_path: str
    ready_fd: int      # read end of the handshake pipe, nonblocking
    output_fd: int     # read end of the output pipe, nonblocking
    control_fd: int = -1    # a preloader's control socket, the core's end
    lifeline_fd: int = -1   # a forked or generic worker's lifeline, the write end the core holds
    port: int = 0           # a generic worker's port on 127.0.0.1 (it has no socket_path nor ready_fd)


def install_loaders(loaders_dir: Path) -> None:
    """Copies the loaders where every worker user can read them: the
    package itself may live in a directory they cannot enter."""
    loaders_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(loaders_dir, 0o755)
    source = Path(__file__).resolve().parents[1] / "loaders"
    for name in (*LOADERS.values(), *LOADER_MODULES, LOADER_SPEEDUPS):
        target = loaders_dir / name
        tmp = loaders_dir / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)


def resolve_user(config: AppConfig, nginx_uid: int | None) -> tuple[WorkerUser | None, int | None]:
    """The user a worker runs as, or None when the agent is not root (it
    cannot switch users then, and keeps its own). As Passenger: the user
    the config names, else the owner of the startup file, else (owner root)
    the default user. Root only when the config names it; nginx's worker
    user never.

    When the user comes from the startup file, the file is also returned,
    open: the worker runs that very file, so that swapping it after this
    check runs nothing as the user it chose. When the config names the
    user, the worker opens the path itself, with that user's rights."""
    if os.geteuid() != 0:
        return None, None
    startup_fd = None
    try:
        if config.user:
            entry = pwd.getpwnam(config.user)
        elif config.app_type == GENERIC:
            # No startup file: the app root's owner, as a startup file must be.
            owner = _app_root_owner(config)
            entry = pwd.getpwnam(config.default_user) if owner == 0 else pwd.getpwuid(owner)
        else:
            owner, startup_fd = _checked_owner(config)
            entry = pwd.getpwnam(config.default_user) if owner == 0 else pwd.getpwuid(owner)
        user = _worker_user(config, entry, nginx_uid)
    except KeyError as e:
        _close(startup_fd)
        raise SpawnError(f"cannot run the app as a user: {e.args[0]}") from e
    except SpawnError:
        _close(startup_fd)
        raise
    return user, startup_fd


def _worker_user(config: AppConfig, entry: pwd.struct_passwd, nginx_uid: int | None) -> WorkerUser:
    if entry.pw_uid == nginx_uid:
        # The engine trusts whatever reaches agent.sock, and nginx's workers
        # hold every client's requests: an app must not share their user.
        raise SpawnError(f"app would run as nginx's worker user {entry.pw_name} (uid {entry.pw_uid}): "
                         "set agent_user or agent_default_user")
    gid = entry.pw_gid
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError as e:
            raise SpawnError(f"group {config.group!r} does not exist") from e
    groups = tuple(os.getgrouplist(entry.pw_name, gid))
    return WorkerUser(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir, entry.pw_shell)


def _app_root_owner(config: AppConfig) -> int:
    try:
        return os.stat(config.app_root).st_uid
    except OSError as e:
        raise SpawnError(f"app root {config.app_root}: {e.strerror}") from e


def _checked_owner(config: AppConfig) -> tuple[int, int | None]:
    """The owner the worker's user comes from, and the startup file opened
    without following a symbolic link (None when it does not exist: the
    loader reports that). A file that does not belong to the app root's
    owner would let whoever can write the app root run code as that file's
    owner (through a module the file imports), so it is refused."""
    root_owner = _app_root_owner(config)
    path = config.startup_path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return root_owner, None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpawnError(f"the startup file {path} is a symbolic link: the user to run the app as is "
                             "not taken from a link; set agent_user") from e
        raise SpawnError(f"cannot open the startup file {path}: {e.strerror}") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SpawnError(f"the startup file {path} is not a regular file")
    if info.st_uid != root_owner:
        os.close(fd)
        raise SpawnError(f"the startup file {path} belongs to {_user_name(info.st_uid)}, but the app root "
                         f"{config.app_root} to {_user_name(root_owner)}: set agent_user to say who the app "
                         "runs as")
    return info.st_uid, fd


def nginx_worker_uid(agent_socket: Path) -> int | None:
    """nginx's worker user: the watchdog, as root, gives agent.sock to it.
    None when the socket still belongs to the agent (user not known)."""
    try:
        info = os.lstat(agent_socket)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid == os.geteuid():
        return None
    return info.st_uid


def nginx_worker_owner(agent_socket: Path) -> tuple[int, int] | None:
    """nginx's worker user and its primary group (the group agent.sock was
    given when the user has no passwd entry), or None when not known."""
    uid = nginx_worker_uid(agent_socket)
    if uid is None:
        return None
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:
        try:
            return uid, os.lstat(agent_socket).st_gid
        except OSError:
            return None


def peer_uids(nginx_uid: int | None) -> str:
    """AGENT_PEER_UIDS: who may connect to a worker's socket, which the
    loader checks on every connection (SO_PEERCRED): the agent (its engine)
    and nginx's worker user (the fast path)."""
    uids = [os.geteuid()]
    if nginx_uid is not None and nginx_uid not in uids:
        uids.append(nginx_uid)
    return ",".join(map(str, uids))


def prepare_workers_dir(instance: Instance) -> None:
    """The directory of the workers' sockets. Under a root agent that knows
    nginx's worker user: root's, group nginx's worker group, mode 0710, so
    that nginx's workers (the fast path) and root may reach a socket and no
    one else may even look up its name; else private to the agent (0700).
    Set on every start: a previous run may have left it otherwise."""
    path = instance.workers_dir
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = nginx_worker_owner(instance.agent_socket) if os.geteuid() == 0 else None
        if owner is not None:
            os.fchown(fd, 0, owner[1])
            os.fchmod(fd, 0o710)
        else:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def worker_socket_owner(nginx: tuple[int, int] | None) -> tuple[int, int] | None:
    """Who owns a worker's socket (mode 0600): nginx's worker user under a
    root agent, so that its workers can connect; else the agent, whose user
    nginx's workers then share."""
    return nginx if os.geteuid() == 0 else None


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def at_exec(name: str) -> bool:
    """An agent_env variable that must be in the environment at exec, because
    the interpreter or the dynamic linker reads it before the loader runs."""
    return name.startswith(EXEC_ENV_PREFIXES) or name in EXEC_ENV_NAMES


def private_env(config: AppConfig) -> dict[str, str]:
    """The app's agent_env values that reach it through fd 6 rather than the
    exec environment: they never appear in /proc/PID/environ, and the loader
    sets them only once the worker is undumpable (docs/security.md)."""
    return {name: value for name, value in config.env if not at_exec(name)}


def private_env_fd(env: dict[str, str]) -> int | None:
    """A memfd holding env as JSON, read from its start; None when empty."""
    if not env:
        return None
    fd = os.memfd_create("agent-env", os.MFD_CLOEXEC)
    try:
        data = json.dumps(env).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def worker_env(config: AppConfig, user: WorkerUser | None, startup_fd: bool = False,
               nginx_uid: int | None = None) -> dict[str, str]:
    """A clean environment: nothing of the agent's own leaks into the app.
    Of agent_env, only what the interpreter reads at exec is here; the rest
    comes through fd 6 (private_env)."""
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
    env.update((name, value) for name, value in config.env if at_exec(name))
    # Set here only: the loader must never take another fd for these.
    env.pop("AGENT_STARTUP_FD", None)
    env.pop("AGENT_ENV_FD", None)
    env["AGENT_PEER_UIDS"] = peer_uids(nginx_uid)
    env["AGENT_CONCURRENCY"] = str(config.worker_concurrency)
    if config.app_type == "asgi":
        env["AGENT_ASGI_LOOP"] = config.asgi_loop
        env["AGENT_WS_PING_INTERVAL_MS"] = str(config.websocket_ping_interval_ms)
    if startup_fd:
        env["AGENT_STARTUP_FD"] = str(STARTUP_FD)
    if private_env(config):
        env["AGENT_ENV_FD"] = str(ENV_FD)
    return env


def resolve_python(config: AppConfig, env: dict[str, str]) -> str:
    python = config.python
    if "/" not in python:
        path = dict(config.env).get("PATH") or env.get("PATH", WORKER_PATH)
        found = shutil.which(python, path=path)
        if found is None:
            raise SpawnError(f"the app's Python interpreter {python!r} is not on PATH ({env.get('PATH')})")
        python = found
    if not os.access(python, os.X_OK):
        raise SpawnError(f"the app's Python interpreter {python} does not exist or is not executable")
    return python


def start_worker(config: AppConfig, instance: Instance, socket_path: str,
                 supervision: Supervision) -> StartedProcess:
    """Forks a worker for config. Raises SpawnError when it cannot even be
    forked (bad user, startup file, interpreter or directory); a worker that
    forks but fails to load the app reports that through its handshake."""
    nginx = nginx_worker_owner(instance.agent_socket)

    def listener() -> tuple[int, int]:
        return listen_unix(socket_path, 1024, mode=0o600, owner=worker_socket_owner(nginx)).detach(), -1

    try:
        return _start(config, instance, supervision, listener, {}, socket_path)
    except SpawnError:
        _unlink(socket_path)
        raise


def start_preloader(config: AppConfig, instance: Instance, supervision: Supervision) -> StartedProcess:
    """Forks an app's preloader (agent_spawn_method smart) exactly as a
    worker, but with the preloader's end of a control socket on fd 3
    (docs/protocol.md §3, "The preloader") instead of a listening socket. The core's end is
    StartedProcess.control_fd."""

    def control() -> tuple[int, int]:
        core_end, preloader_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return preloader_end.detach(), core_end.detach()

    return _start(config, instance, supervision, control, {"AGENT_PRELOADER": "1"}, "")


def _start(config: AppConfig, instance: Instance, supervision: Supervision,
           make_fd3: Callable[[], tuple[int, int]], extra_env: dict[str, str], socket_path: str) -> StartedProcess:
    """make_fd3 gives the child's fd 3 and the core's end of it (-1: none)."""
    nginx = nginx_worker_owner(instance.agent_socket)
    nginx_uid = None if nginx is None else nginx[0]
    user, startup_fd = resolve_user(config, nginx_uid)
    if user is not None:
        supervision.note_user(config.name, user.uid, user.name)
    spawning = _Spawning(supervision, [] if startup_fd is None else [startup_fd])
    child_ends = spawning.child_ends
    try:
        env = worker_env(config, user, startup_fd is not None, nginx_uid) | extra_env
        spec = worker_spec(config, instance.loaders_dir, user, env)
        env_fd = private_env_fd(private_env(config))
        if env_fd is not None:
            child_ends.append(env_fd)
        cgroup_fd = spawning.cgroup_fd(user_id(user))
        fd3, control_fd = make_fd3()
        child_ends.append(fd3)
        if control_fd >= 0:
            spawning.core_ends.append(control_fd)
        ready_r, out_r = _pipes(spawning.core_ends, child_ends)
        pid = spawn(spec, fd3, child_ends[-2], child_ends[-1],
                    startup_fd=-1 if startup_fd is None else startup_fd,
                    env_fd=-1 if env_fd is None else env_fd, cgroup_fd=cgroup_fd)
    except (OSError, SpawnError) as e:  # the engine module's NativeError is an OSError too
        spawning.failed(e)
    spawning.forked(pid)
    return StartedProcess(pid, socket_path, ready_r, out_r, control_fd=control_fd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the kernel picks
    one for a socket bound to port 0, which is then closed for the worker to
    bind. (Another process could take it in between; the worker then fails
    to listen, a failed start like any other.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def generic_script(command: str) -> str:
    """What /bin/sh -c runs: the command, with SIGTERM caught by a no-op
    trap first. The core stops a generic worker with SIGTERM to its whole
    process group; a shell killed by it at once would make the core kill
    what is left of the group before the app has finished its requests. A
    caught signal waits for the foreground command to end (POSIX), and the
    command itself starts with SIGTERM's default action (exec resets caught
    signals; an ignored one it would inherit)."""
    return f"trap : TERM\n{command}"


def generic_env(config: AppConfig, user: WorkerUser | None, port: int) -> dict[str, str]:
    """A generic worker's environment: clean as a Python worker's, with
    every agent_env value (no loader reads fd 6 for it) and PORT, which
    agent_env cannot override."""
    env = {"PATH": WORKER_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell)
    env.update(AGENT_APP_NAME=config.name, AGENT_APP_ROOT=config.app_root, AGENT_APP_TYPE=config.app_type)
    env.update(config.env)
    env["PORT"] = str(port)
    return env


def start_generic_worker(config: AppConfig, instance: Instance, supervision: Supervision) -> StartedProcess:
    """Starts a generic worker: `/bin/sh -c COMMAND` in the app root, as
    the app's user, in its own session and cgroup, with PORT set, its output
    on a pipe the core reads and a lifeline on fd 3. It has no handshake:
    the core connects to 127.0.0.1:PORT until the app listens."""
    if not config.app_start_command:
        raise SpawnError("agent_app_type generic needs agent_app_start_command")
    nginx = nginx_worker_owner(instance.agent_socket)
    user, _ = resolve_user(config, None if nginx is None else nginx[0])
    if user is not None:
        supervision.note_user(config.name, user.uid, user.name)
    spawning = _Spawning(supervision)
    core_ends, child_ends = spawning.core_ends, spawning.child_ends
    try:
        port = free_port()
        spec = SpawnSpec(
            path=SHELL,
            argv=[SHELL, "-c", generic_script(config.app_start_command)],
            env=generic_env(config, user, port),
            cwd=config.app_root,
            uid=user.uid if user else -1,
            gid=user.gid if user else -1,
            groups=user.groups if user else (),
            death_signal=signal.SIGKILL,
        )
        cgroup_fd = spawning.cgroup_fd(user_id(user))
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        core_ends.append(out_r)
        child_ends.append(out_w)
        os.set_blocking(out_r, False)
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        core_ends.append(lifeline_w)
        child_ends.append(lifeline_r)
        pid = spawn(spec, -1, -1, out_w, cgroup_fd=cgroup_fd, lifeline_fd=lifeline_r)
    except (OSError, SpawnError) as e:
        spawning.failed(e)
    spawning.forked(pid)
    return StartedProcess(pid, "", -1, out_r, lifeline_fd=lifeline_w, port=port)


class _Spawning:
    """The fds and the cgroup of one spawn under way: the core's ends are
    kept, the child's are closed once it is forked. A spawn that fails
    closes them all and gives its cgroup up."""

    def __init__(self, supervision: Supervision, child_ends: list[int] | None = None) -> None:
        self.supervision = supervision
        self.core_ends: list[int] = []
        self.child_ends: list[int] = child_ends or []
        self.cgroup: Path | None = None

    def cgroup_fd(self, uid: int | None) -> int:
        """A new cgroup for the child, of the user uid: its directory,
        opened, among the child's ends, which csrc/spawn.c or a preloader
        forks the child into; -1 where the agent makes no cgroups (or no
        uid is known). Never an opened cgroup.procs: Linux checks writes
        to one against its opener's rights, and a preloader is app code."""
        self.cgroup = None if uid is None else self.supervision.new_cgroup(uid)
        if self.cgroup is None:
            return -1
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.child_ends.append(fd)
        return fd

    def failed(self, error: OSError | SpawnError | PreloaderFailed) -> NoReturn:
        """Undoes the spawn and raises: a SpawnError or a PreloaderFailed
        as it is, a system call's error as a SpawnError."""
        _close_all(self.core_ends + self.child_ends)
        self.supervision.abandon(self.cgroup)
        if isinstance(error, (SpawnError, PreloaderFailed)):
            raise error
        raise SpawnError(f"cannot start a worker: {error.strerror}") from error

    def forked(self, pid: int) -> None:
        _close_all(self.child_ends)
        self.supervision.adopt(pid, self.cgroup)


def _pipes(core_ends: list[int], child_ends: list[int]) -> tuple[int, int]:
    """The handshake pipe and the output pipe: the core's read ends (only
    they are nonblocking: a worker's print() must block on a full pipe, not
    fail) are returned and added to core_ends, the write ends to child_ends
    (the output pipe's last)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    core_ends.append(ready_r)
    child_ends.append(ready_w)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    core_ends.append(out_r)
    child_ends.append(out_w)
    os.set_blocking(ready_r, False)
    os.set_blocking(out_r, False)
    return ready_r, out_r


def fork_worker(channel: Channel, instance: Instance, socket_path: str, supervision: Supervision) -> StartedProcess:
    """Asks a ready preloader to fork a worker: the core makes the worker's
    listening socket, its handshake and output pipes, its lifeline and its
    cgroup as for a direct worker, and passes them over the control socket.
    Raises SpawnError, or PreloaderFailed when the preloader did not fork."""
    nginx = nginx_worker_owner(instance.agent_socket)
    spawning = _Spawning(supervision)
    core_ends, child_ends = spawning.core_ends, spawning.child_ends
    try:
        child_ends.append(listen_unix(socket_path, 1024, mode=0o600, owner=worker_socket_owner(nginx)).detach())
        ready_r, out_r = _pipes(core_ends, child_ends)
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        core_ends.append(lifeline_w)
        child_ends.append(lifeline_r)
        # The cgroup's fd comes last, as the preloader expects.
        cgroup = spawning.cgroup_fd(supervision.uid_beside(channel.pid)) >= 0
        pid = channel.fork(child_ends, cgroup=cgroup)
    except (OSError, PreloaderFailed) as e:
        _unlink(socket_path)
        spawning.failed(e)
    spawning.forked(pid)
    return StartedProcess(pid, socket_path, ready_r, out_r, lifeline_fd=lifeline_w)


def worker_spec(config: AppConfig, loaders_dir: Path, user: WorkerUser | None, env: dict[str, str]) -> SpawnSpec:
    python = resolve_python(config, env)
    return SpawnSpec(
        path=python,
        argv=[python, str(loaders_dir / LOADERS[config.app_type])],
        env=env,
        cwd=config.app_root,
        uid=user.uid if user else -1,
        gid=user.gid if user else -1,
        groups=user.groups if user else (),
        death_signal=signal.SIGKILL,
    )


def user_id(user: WorkerUser | None) -> int:
    return os.geteuid() if user is None else user.uid


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
