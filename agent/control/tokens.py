"""The status socket's tokens: INSTANCE_DIR/read.token and admin.token
(docs/status-api.md). Apart from agent/control/server.py so that the watchdog,
which makes them, stays small."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

READ_TOKEN_FILE = "read.token"
ADMIN_TOKEN_FILE = "admin.token"


@dataclass(frozen=True)
class Tokens:
    read: bytes | None
    admin: bytes | None


def ensure_tokens(instance_dir: Path) -> Tokens:
    """Make INSTANCE_DIR/read.token and admin.token when missing (32 random
    bytes, hex, mode 0600) and return both. A token that exists is kept, so
    that clients keep working across core and watchdog restarts."""
    for name in (READ_TOKEN_FILE, ADMIN_TOKEN_FILE):
        create_token_file(instance_dir / name)
    return read_tokens(instance_dir)


def create_token_file(path: Path) -> None:
    """Write the token to a private temporary file, then link it into
    place: a reader never sees a partial token, and of two agents racing
    to create it, both end up using the one that won."""
    if path.exists():
        return
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
    """A missing or empty token file means no client can use that token."""
    try:
        token = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    return token or None
