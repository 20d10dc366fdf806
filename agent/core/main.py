"""The core process: builds the policy loop and the status server, and wires
them together (the only module that knows both)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from agent.control.provider import CoreStatus
from agent.control.server import StatusServer
from agent.core.engine import FASTPATH_FILE, NativeError
from agent.core.loop import Core
from agent.core.spawner import nginx_worker_uid
from agent.instance import Instance
from agent.logs import log


def attach_status_server(core: Core, status_fd: int) -> StatusServer:
    """The status socket is served on the core's own loop: its documents
    read the pool between two policy rounds, never during one."""
    server = StatusServer(socket.socket(fileno=status_fd), core.selector, CoreStatus(core), core.instance.root)
    core.tickers.append(server.tick)
    return server


def agent_socket_peers(instance: Instance) -> set[int]:
    """Who may hand the engine requests: the agent itself, and the owner of
    agent.sock, which the watchdog made nginx's workers' user when the agent
    is root (docs/protocol.md, "Who may connect"). Apps never run as either."""
    peers = {os.geteuid()}
    path = instance.agent_socket
    try:
        info = os.lstat(path)
    except OSError as e:
        log.error("cannot read the owner of %s (%s): only uid %d may send requests", path, e.strerror, os.geteuid())
        return peers
    if not stat.S_ISSOCK(info.st_mode):
        log.error("%s is not a socket: only uid %d may send requests", path, os.geteuid())
        return peers
    return peers | {info.st_uid}


class FastPathAttacher:
    """Maps nginx's fast path table (csrc/fastpath.h) into the engine. nginx's
    master makes the table, which may come after the core starts: until the
    engine has it, every request goes through agent.sock, and the core tries
    again about once a second. A failure is logged once per reason."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.path = core.instance.root / FASTPATH_FILE
        self.attached = False
        self.last_error: int | None = None

    def tick(self) -> None:
        if self.attached:
            return
        try:
            self.core.engine.attach_fastpath(self.path, nginx_worker_uid(self.core.instance.agent_socket))
        except NativeError as e:
            if e.errno != self.last_error:
                self.last_error = e.errno
                log.warning("fast path off: %s; requests go through agent.sock", e.strerror)
            return
        self.attached = True
        log.info("fast path on: %s attached", self.path)


def attach_fast_path(core: Core) -> FastPathAttacher:
    attacher = FastPathAttacher(core)
    attacher.tick()
    core.tickers.append(attacher.tick)
    return attacher


def run(instance_dir: Path, listen_fd: int, status_fd: int | None = None) -> int:
    try:
        core = Core(Instance(instance_dir), listen_fd)
        core.engine.allow_peers(agent_socket_peers(core.instance))
        attach_fast_path(core)
        if status_fd is not None:
            attach_status_server(core, status_fd)
        return core.run()
    except Exception:
        # The watchdog restarts the core; the log must say why it died.
        log.exception("core failed")
        return 1
