"""Keeping every process an app starts under the core's hand.

Each worker is a session leader (csrc/spawn.c), so its process group is its
pid and lasts as long as any process of the group: killing the group kills
the children the app forked too. A child can leave the group with setsid(),
so where the core (as root) can write to a cgroup v2 hierarchy each worker
also gets a cgroup of its own, under one this agent instance owns; the
kernel keeps every descendant in it, and cgroup.kill ends them all.
Leftovers of a previous core of the same instance (workers that cleared
their PDEATHSIG and outlived it) are killed when the next core starts.

The layout is INSTANCE/u<uid>/w<n>: the cgroups of one user's workers share
a parent, and that user may write to the parent's cgroup.procs and to each
of its workers'. This is what lets a preloader, which runs as the app's
user, fork a worker straight into the worker's cgroup (clone3 with
CLONE_INTO_CGROUP: the kernel asks for write access to the destination's
and the common ancestor's cgroup.procs): a move after the fork would cost
the worker an RCU grace period, about 8 ms. What the user gains is moving
its own processes between its own cgroups: none can leave u<uid>, and no
process of the agent's lives in u<uid> itself, so what moves there is
killed as the next worker of that user is reaped.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import signal
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from agent.logs import log

MOUNTS = Path("/proc/self/mounts")
USER_CGROUP = re.compile(r"u[0-9]+")
OWN_CGROUP = Path("/proc/self/cgroup")


@dataclass
class Supervision:
    """The core's record of its workers' process groups and cgroups."""

    cgroup_parent: Path | None = None              # None: process groups only
    cgroups: dict[int, Path] = field(default_factory=dict)    # worker pid -> its cgroup
    to_remove: set[Path] = field(default_factory=set)         # killed, not yet empty
    users: dict[int, set[str]] = field(default_factory=dict)  # uid -> apps that ran as it
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def setup(cls, instance_root: Path) -> Supervision:
        """Chooses cgroups when available, and says which in the log."""
        parent, why_not = find_cgroup_parent(instance_root)
        if parent is None:
            log.info("workers are supervised by process group (no cgroup: %s)", why_not)
            return cls()
        supervision = cls(cgroup_parent=parent)
        supervision.kill_leftovers()
        log.info("workers are supervised by cgroup, each in its own under %s", parent)
        return supervision

    # -- before and after a spawn --------------------------------------

    def new_cgroup(self, uid: int) -> Path | None:
        """A fresh cgroup for the next worker, run by the user uid, or None
        where the agent makes no cgroups."""
        if self.cgroup_parent is None:
            return None
        self.remove_empty()
        users = self.cgroup_parent / f"u{uid}"
        for directory in (self.cgroup_parent, users):
            with contextlib.suppress(FileExistsError):  # removed when it emptied
                os.mkdir(directory, 0o755)
        path = users / f"w{next(self.numbers)}"
        try:
            delegate(users, uid)
            os.mkdir(path, 0o755)
            delegate(path, uid)
        except OSError:
            remove_cgroup(path)
            raise
        return path

    def uid_beside(self, pid: int) -> int | None:
        """The user whose cgroups hold the process pid (a preloader, whose
        workers go beside it), or None."""
        cgroup = self.cgroups.get(pid)
        if cgroup is None or not USER_CGROUP.fullmatch(cgroup.parent.name):
            return None
        return int(cgroup.parent.name[1:])

    def adopt(self, pid: int, cgroup: Path | None) -> None:
        if cgroup is not None:
            self.cgroups[pid] = cgroup

    def abandon(self, cgroup: Path | None) -> None:
        """A cgroup made for a spawn that failed."""
        if cgroup is not None:
            kill_cgroup(cgroup)
            self.to_remove.add(cgroup)

    def note_user(self, app: str, uid: int, user: str) -> None:
        """Apps that share a user can read each other's files and signal
        each other's processes: worth a warning, once per app."""
        apps = self.users.setdefault(uid, set())
        if app in apps:
            return
        apps.add(app)
        if len(apps) > 1:
            others = ", ".join(sorted(apps - {app}))
            log.warning("app %s runs as %s (uid %d), as app(s) %s do: apps that share a user can signal, "
                        "trace and read each other's files; give each app its own user (agent_user)",
                        app, user, uid, others)

    # -- stopping ------------------------------------------------------

    def kill(self, pid: int) -> None:
        """SIGKILL to the worker, everything in its process group and,
        with cgroups, everything in its cgroup. The worker itself first: a
        worker just forked has made neither its group nor its move into
        the cgroup yet, and the other two would miss it. It is not yet
        reaped (its exit is what makes it leave the pool), so its pid is
        still its own."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        cgroup = self.cgroups.get(pid)
        if cgroup is not None:
            kill_cgroup(cgroup)

    def exited(self, pid: int, reaped: bool = False) -> None:
        """The worker has exited and not yet been reaped: its zombie keeps
        its pid (the group's id) from being reused, so what it left behind
        is killed now. reaped: a preloader reaped it, after killing its
        group itself; its pid may be another process's already."""
        if not reaped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        cgroup = self.cgroups.pop(pid, None)
        if cgroup is not None:
            kill_cgroup(cgroup)
            kill_strays(cgroup.parent)
            self.to_remove.add(cgroup)
            self.remove_empty()

    def remove_empty(self) -> None:
        """A killed cgroup can be removed once its last process is gone;
        the instance's own once it holds no worker's (so that a stopped
        agent leaves nothing behind)."""
        for path in list(self.to_remove):
            if remove_cgroup(path):
                self.to_remove.discard(path)
        if self.cgroup_parent is None:
            return
        in_use = {path.parent for path in (*self.cgroups.values(), *self.to_remove)}
        for users in user_cgroups(self.cgroup_parent) - in_use:
            with contextlib.suppress(OSError):  # a stray still in it
                os.rmdir(users)
        if not self.cgroups and not self.to_remove:
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup_parent)

    def kill_leftovers(self) -> None:
        assert self.cgroup_parent is not None
        for child in self.cgroup_parent.iterdir():
            if child.is_dir() and not child.is_symlink():
                log.warning("killing what is left in %s (a previous core's worker)", child)
                kill_cgroup(child)
                self.to_remove.add(child)
        self.remove_empty()


def find_cgroup_parent(instance_root: Path) -> tuple[Path | None, str]:
    """The cgroup under which this instance's workers go, made if needed:
    beside the core's own, named after the instance directory (so that two
    agents never touch each other's workers). None with the reason when
    there is no writable cgroup v2 hierarchy with cgroup.kill."""
    if os.geteuid() != 0:
        return None, "the agent is not root"
    mount = cgroup2_mount()
    own = own_cgroup()
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy"
    name = f"agent-{zlib.crc32(str(instance_root).encode()):08x}"
    parent = mount / own.lstrip("/") / name
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, 0o755)
        info = os.lstat(parent)
    except OSError as e:
        return None, f"cannot make {parent}: {e.strerror}"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        return None, f"{parent} is not a directory of root's"
    if not (parent / "cgroup.kill").exists():
        return None, "the kernel has no cgroup.kill (before Linux 5.14)"
    return parent, ""


def cgroup2_mount() -> Path | None:
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def own_cgroup() -> str | None:
    try:
        lines = OWN_CGROUP.read_text().splitlines()
    except OSError:
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def kill_cgroup(path: Path) -> None:
    try:
        fd = os.open(path / "cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("cannot kill the processes of %s: %s", path, e.strerror)
        return
    try:
        os.write(fd, b"1")
    except OSError as e:
        log.warning("cannot kill the processes of %s: %s", path, e.strerror)
    finally:
        os.close(fd)


def delegate(path: Path, uid: int) -> None:
    """The user uid may move its own processes into the cgroup path: its
    cgroup.procs becomes theirs. Its other files (cgroup.kill, limits)
    stay root's."""
    os.chown(path / "cgroup.procs", uid, -1)


def user_cgroups(parent: Path) -> set[Path]:
    try:
        return {child for child in parent.iterdir() if USER_CGROUP.fullmatch(child.name)}
    except FileNotFoundError:
        return set()


def kill_strays(users: Path) -> None:
    """No process of the agent's lives in a user's cgroup itself: one
    that is there was moved there by the app's code, out of its worker's
    cgroup, and is killed."""
    if not USER_CGROUP.fullmatch(users.name):
        return
    try:
        pids = (users / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        log.warning("killing process %s, which an app moved out of its worker's cgroup into %s", pid, users)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def remove_cgroup(path: Path) -> bool:
    """True once the cgroup and those under it are gone; False while
    processes remain in them."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink() and not remove_cgroup(child):
                return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        log.warning("cannot remove %s: %s", path, e.strerror)
    return True
