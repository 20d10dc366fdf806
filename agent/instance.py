"""The instance directory: where one agent keeps its sockets and state."""

from __future__ import annotations

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
