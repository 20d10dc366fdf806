"""The watchdog: a small process that owns the agent's sockets and keeps a
core running.

nginx starts it (docs/protocol.md §4). It binds the request socket before
anything else, so that nginx's connections wait in the socket's backlog
while a core starts or restarts, and are never refused. When the core dies
the watchdog starts another with the same socket. When nginx stops (end of
file on the nginx pipe) or on SIGTERM, it stops the core and exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.control.tokens import ensure_tokens
from agent.instance import Instance, UnsafeDirectory, make_private_directory, open_directory
from agent.logs import log
from agent.signals import SignalInbox
from agent.unix import describe_exit, listen_unix

CORE_STOP_TIMEOUT = 75.0       # the core's own shutdown timeout, plus margin
RESTART_DELAY_MAX = 5.0


class AlreadyRunning(Exception):
    pass


class Watchdog:
    def __init__(self, instance: Instance, nginx_fd: int | None, log_file: str | None,
                 socket_owner: tuple[int, int] | None) -> None:
        self.instance = instance
        self.nginx_fd = nginx_fd
        self.log_file = log_file
        self.socket_owner = socket_owner
        self.core: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0
        self.core_started_at = 0.0
        self.selector = selectors.DefaultSelector()

    # -- lifecycle -----------------------------------------------------

    def prepare(self) -> None:
        """Everything that must hold before nginx is told the agent is ready."""
        self.lock_pid_file()
        self.listener = self.bind_agent_socket()
        self.status_listener = self.bind_status_socket()
        self.signals = SignalInbox(self.selector, (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
        if self.nginx_fd is not None:
            os.set_blocking(self.nginx_fd, False)
            self.selector.register(self.nginx_fd, selectors.EVENT_READ, self.check_nginx)
        self.start_core()

    def run(self) -> int:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                key.data(key.fd)
            self.handle_signals()
            self.reap_core()
        self.stop_core()
        self.cleanup()
        log.info("watchdog stopped")
        return 0

    def lock_pid_file(self) -> None:
        """The directory is checked first (agent.instance); the pid file is
        never opened through a symbolic link, and must be ours."""
        make_private_directory(self.instance.root)
        dir_fd = open_directory(self.instance.root)
        try:
            fd = os.open("watchdog.pid", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise UnsafeDirectory(f"{self.instance.watchdog_pid_file} belongs to another user: remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another agent runs in {self.instance.root}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.pid_fd = fd

    def bind_agent_socket(self) -> socket.socket:
        """Only nginx's workers may connect: their user owns it when it is
        known (a root nginx); else they run as our own user (docs/security.md)."""
        return listen_unix(self.instance.agent_socket, socket.SOMAXCONN, mode=0o600, owner=self.socket_owner)

    def bind_status_socket(self) -> socket.socket:
        """Anyone may connect and read; the core decides who may act, from
        the peer's credentials or a token (docs/status-api.md)."""
        listener = listen_unix(self.instance.status_socket, 64, mode=0o666)
        ensure_tokens(self.instance.root)
        return listener

    def check_nginx(self, fd: int) -> None:
        assert self.nginx_fd is not None
        try:
            data = os.read(self.nginx_fd, 64)
        except BlockingIOError:
            return
        if not data:
            log.info("nginx has stopped: stopping the agent")
            self.stopping = True

    def handle_signals(self) -> None:
        for signum in self.signals.take():
            if signum == signal.SIGHUP and self.core is not None:
                self.core.send_signal(signal.SIGHUP)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping the agent", signal.Signals(signum).name)
                self.stopping = True

    # -- the core ------------------------------------------------------

    def start_core(self) -> None:
        fd, status_fd = self.listener.fileno(), self.status_listener.fileno()
        argv = [sys.executable, "-m", "agent", "core", "--instance-dir", str(self.instance.root),
                "--listen-fd", str(fd), "--status-fd", str(status_fd)]
        if self.log_file:
            argv += ["--log-file", self.log_file]
        # What the core prints before its logging is set up (an import that
        # fails) belongs in the same log.
        output = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self.core = subprocess.Popen(argv, pass_fds=[fd, status_fd], stdout=output, stderr=output)
        finally:
            if output is not None:
                output.close()
        self.core_started_at = time.monotonic()
        log.info("started core %d", self.core.pid)

    def reap_core(self) -> None:
        if self.core is None or self.core.poll() is None:
            return
        status = self.core.returncode
        self.core = None
        if self.stopping:
            return
        # A core that keeps dying quickly is restarted ever more slowly.
        if time.monotonic() - self.core_started_at < 10:
            self.restarts += 1
        else:
            self.restarts = 0
        delay = min(RESTART_DELAY_MAX, 0.1 * (2 ** self.restarts - 1))
        log.error("core %s; restarting it%s", describe_exit(status),
                  f" in {delay:.1f} s" if delay else "")
        time.sleep(delay)
        self.start_core()

    def stop_core(self) -> None:
        core = self.core
        if core is None:
            return
        core.send_signal(signal.SIGTERM)
        try:
            core.wait(timeout=CORE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("core %d did not stop in %.0f s; killing it", core.pid, CORE_STOP_TIMEOUT)
            core.kill()
            core.wait()

    def cleanup(self) -> None:
        for path in (self.instance.agent_socket, self.instance.status_socket, self.instance.core_pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.ftruncate(self.pid_fd, 0)
        os.close(self.pid_fd)


def parse_owner(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid or -1)


def run(instance_dir: Path, nginx_fd: int | None, ready_fd: int | None, log_file: str | None,
        socket_owner: str | None) -> int:
    watchdog = Watchdog(Instance(instance_dir), nginx_fd, log_file, parse_owner(socket_owner))
    try:
        watchdog.prepare()
    except (AlreadyRunning, UnsafeDirectory, OSError) as e:
        message = str(e)
        log.error("cannot start: %s", message)
        report_ready(ready_fd, f"error: {message}")
        return 1
    report_ready(ready_fd, "ok")
    log.info("watchdog ready, pid %d, instance %s", os.getpid(), instance_dir)
    return watchdog.run()


def report_ready(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
