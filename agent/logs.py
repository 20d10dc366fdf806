"""The agent's log: one file or stderr, a pid on every line.

Worker output arrives on pipes (one per worker) and is written here line by
line with the worker's pid, so that an operator can tell which process said
what.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
from logging.handlers import WatchedFileHandler

log = logging.getLogger("agent")

_FORMAT = "%(asctime)s [%(agent_role)s %(process)d] %(levelname)s %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.agent_role = self.role
        return True


def setup(role: str, log_file: str | None, level: int = logging.INFO) -> None:
    """Sends the agent's log to log_file (appending; reopened when rotated
    away) or, with None or "-", to stderr."""
    handler: logging.Handler
    handler = WatchedFileHandler(log_file) if log_file and log_file != "-" else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RoleFilter(role))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def reopen() -> None:
    """Closes and reopens the log file, so that after logrotate moved it the
    agent writes to a new file at the configured path."""
    for handler in log.handlers:
        if isinstance(handler, WatchedFileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
                handler._statstream()
            finally:
                handler.release()


class OutputCapture:
    """Collects one worker's stdout/stderr from a nonblocking pipe and logs
    complete lines, prefixed with the worker's app and pid."""

    MAX_LINE = 16384
    TAIL_LINES = 20

    def __init__(self, fd: int, app: str, pid: int) -> None:
        self.fd = fd
        self.app = app
        self.pid = pid
        self._partial = b""
        self.tail: collections.deque[str] = collections.deque(maxlen=self.TAIL_LINES)  # its last lines

    def read_all(self) -> None:
        """Logs whatever the pipe holds now, up to its end of file."""
        with contextlib.suppress(OSError):
            while True:
                data = os.read(self.fd, 65536)
                if not data:
                    self.flush()
                    return
                self._take(data)

    def read(self) -> bool:
        """Logs what the pipe holds; returns False at end of file."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            self.flush()
            return False
        self._take(data)
        return True

    def _take(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        log.info("[app %s pid %d] %s", self.app, self.pid, text)
