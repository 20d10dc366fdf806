"""The core process: builds the policy loop and the status server, and wires
them together (the only module that knows both)."""

from __future__ import annotations

import socket
from pathlib import Path

from agent.control.provider import CoreStatus
from agent.control.server import StatusServer
from agent.core.loop import Core
from agent.instance import Instance
from agent.logs import log


def attach_status_server(core: Core, status_fd: int) -> StatusServer:
    """The status socket is served on the core's own loop: its documents
    read the pool between two policy rounds, never during one."""
    server = StatusServer(socket.socket(fileno=status_fd), core.selector, CoreStatus(core), core.instance.root)
    core.tickers.append(server.tick)
    return server


def run(instance_dir: Path, listen_fd: int, status_fd: int | None = None) -> int:
    try:
        core = Core(Instance(instance_dir), listen_fd)
        if status_fd is not None:
            attach_status_server(core, status_fd)
        return core.run()
    except Exception:
        # The watchdog restarts the core; the log must say why it died.
        log.exception("core failed")
        return 1
