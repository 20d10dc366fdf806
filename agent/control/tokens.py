"""The status socket's tokens: INSTANCE_DIR/read.token and admin.token
(docs/status-api.md). Apart from agent/control/server.py so that the watchdog,
which makes them, stays small."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.logs import log

READ_TOKEN_FILE = "read.token"
ADMIN_TOKEN_FILE = "admin.token"


@dataclass(frozen=True)
class Tokens:
    read: bytes | None
    admin: bytes | None


def ensure_tokens(instance_dir: Path) -> Tokens:
    """Make INSTANCE_DIR/read.token and admin.token when missing (32 random
    bytes, hex, mode 0600) and return both. A token that exists is kept, so
    that clients keep working across core and watchdog restarts, but only
    if it is a private file of ours: one another user planted (or a link)
    is replaced."""
    for name in (READ_TOKEN_FILE, ADMIN_TOKEN_FILE):
        create_token_file(instance_dir / name)
    return read_tokens(instance_dir)


def token_file_problem(info: os.stat_result) -> str | None:
    """Why a token file cannot be trusted, or None: it must be a regular
    file of our user that no one else may read or write."""
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}"
    if info.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(info.st_mode):04o}"
    return None


def create_token_file(path: Path) -> None:
    """Write the token to a private temporary file (mkstemp: O_EXCL, never
    through a link), then link it into place: a reader never sees a
    partial token, and of two agents racing to create it, both end up
    using the one that won."""
    try:
        problem = token_file_problem(os.lstat(path))
    except FileNotFoundError:
        problem = "is missing"
    if problem is None:
        return
    if problem != "is missing":
        log.warning("%s %s: replacing it", path, problem)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)


def read_tokens(instance_dir: Path) -> Tokens:
    return Tokens(read=read_token(instance_dir / READ_TOKEN_FILE), admin=read_token(instance_dir / ADMIN_TOKEN_FILE))


def read_token(path: Path) -> bytes | None:
    """A missing or empty token file means no client can use that token; so
    does one that is not a private file of ours (a link, a planted file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        log.error("cannot use the token file %s: %s", path, e.strerror)
        return None
    try:
        problem = token_file_problem(os.fstat(fd))
        if problem is not None:
            log.error("not using the token file %s: it %s", path, problem)
            return None
        token = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    return token or None
