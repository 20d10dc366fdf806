"""The instance directory: where one agent keeps its sockets and state.

It holds the socket nginx sends every request to, the app table with its
secrets, the tokens and the pid nginx signals, and the agent runs as root:
whoever made the directory first, or can rename or replace it, would own
all of these. So a directory is used only when it passes check_directory()
(docs/security.md), in the watchdog as in the nginx module."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafeDirectory(Exception):
    """A directory another user could have made or could change."""


def trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def ancestor_problem(ancestor: Path) -> str | None:
    """Why a directory above ours lets another user swap what is in it, or
    None. A symbolic link may lead on if its owner is trusted; so must its
    target. Sticky directories (/tmp) are safe: only owners rename there."""
    info = os.lstat(ancestor)
    if stat.S_ISLNK(info.st_mode):
        if not trusted_owner(info.st_uid):
            return "is a symbolic link of another user"
        info = os.stat(ancestor)
    if not trusted_owner(info.st_uid):
        return f"belongs to another user (owner uid {info.st_uid})"
    if info.st_mode & OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
        return f"lets other users rename what is in it (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def directory_problem(path: Path) -> str | None:
    """Why path is not a private directory of ours, or None (lstat: a
    symbolic link is refused, not followed)."""
    info = os.lstat(path)
    owner, mode = info.st_uid, stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return f"is a symbolic link (owner uid {owner})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if owner != os.geteuid():
        return f"belongs to another user (owner uid {owner}, mode {mode:04o})"
    if mode & OTHERS_WRITE:
        return f"is writable by other users (owner uid {owner}, mode {mode:04o})"
    return None


def check_directory(path: Path, advice: str = "set agent_instance_dir to another path") -> None:
    """Raise UnsafeDirectory, naming the path, its owner and mode and what
    to do, unless path is a directory of ours that only we can change."""
    path = Path(os.path.abspath(path))
    culprit, problem = path, directory_problem(path)
    for ancestor in reversed(path.parents):
        if problem is not None:
            break
        culprit, problem = ancestor, ancestor_problem(ancestor)
    if problem is not None:
        where = "" if culprit == path else f": {culprit}"
        raise UnsafeDirectory(
            f"refusing the directory {path}{where} {problem}; it must be a directory, not a symbolic "
            f"link, owned by uid {os.geteuid()} and writable by no other user, inside directories only "
            f"root or uid {os.geteuid()} can change: remove it, or {advice}")


def make_private_directory(path: Path, mode: int = 0o755,
                           advice: str = "set agent_instance_dir to another path") -> None:
    """Create path (and missing parents), or accept an existing one that
    passes check_directory()."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    check_directory(path, advice)


def open_directory(path: Path) -> int:
    """An fd of the directory for the *at() calls, never through a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


@dataclass(frozen=True)
class Instance:
    root: Path

    @property
    def apps_file(self) -> Path:
        return self.root / "apps.json"

    @property
    def watchdog_pid_file(self) -> Path:
        return self.root / "watchdog.pid"

    @property
    def core_pid_file(self) -> Path:
        return self.root / "core.pid"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def status_socket(self) -> Path:
        return self.root / "status.sock"

    @property
    def loaders_dir(self) -> Path:
        return self.root / "loaders"

    @property
    def workers_dir(self) -> Path:
        return self.root / "workers"

    def watchdog_running(self) -> bool:
        """The watchdog holds an exclusive flock on its pid file for its whole
        life, so a lock we cannot share means it runs (a stale file does not)."""
        try:
            fd = os.open(self.watchdog_pid_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as e:
            return e.errno in (errno.EAGAIN, errno.EACCES)
        finally:
            os.close(fd)
        return False
