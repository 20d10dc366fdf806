"""The instance directory: where one agent keeps its sockets and state."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


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
            fd = os.open(self.watchdog_pid_file, os.O_RDONLY | os.O_CLOEXEC)
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
