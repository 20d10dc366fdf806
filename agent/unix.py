"""Unix plumbing shared by the watchdog and the core: listening sockets and
how a child process ended."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path


def listen_unix(path: str | Path, backlog: int, *, mode: int | None = None,
                owner: tuple[int, int] | None = None) -> socket.socket:
    """A listening Unix stream socket at path, close-on-exec. A file already
    there (a previous run's socket) is replaced. mode and owner are set
    before listen(), so nobody connects before they hold. The error names
    the path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(str(path))
        if owner is not None:
            os.chown(path, *owner)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from e
    return sock


def describe_exit(returncode: int) -> str:
    """How a child ended, from a return code as subprocess reports it (a
    negative one is the signal that killed it); os.waitstatus_to_exitcode()
    turns a wait status into one."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"
