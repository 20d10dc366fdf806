"""The core's end of a preloader's control socket (docs/protocol.md §3, "The preloader").

A preloader (agent_spawn_method smart) is app code, so what it says is
untrusted: read() accepts exactly the documented messages and drops
anything else with a log line. The pids it names are checked by the
caller against the process tree (a forked worker must be the preloader's
child) before the core acts on them.
"""

from __future__ import annotations

import array
import json
import select
import socket
from dataclasses import dataclass

from agent.clock import monotonic_ms
from agent.logs import log

MESSAGE_LIMIT = 4096
FORK_REPLY_TIMEOUT_MS = 10_000   # how long the core waits for "forked" before it gives up on the preloader


class PreloaderFailed(Exception):
    """The preloader did not fork as asked: it is killed and replaced."""


@dataclass(frozen=True)
class Exited:
    pid: int
    status: int   # as waitpid() gives it


@dataclass(frozen=True)
class Forked:
    number: int
    pid: int


@dataclass(frozen=True)
class ForkFailed:
    number: int
    error: str


Message = Exited | Forked | ForkFailed


def parse(data: bytes) -> Message | None:
    """One message, or None (logged) when it is not one of the three."""
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not an object")
        if "exited" in message:
            return Exited(positive(message["exited"]), whole(message["status"]))
        if "forked" in message:
            return Forked(whole(message["forked"]), positive(message["pid"]))
        if "failed" in message:
            error = message.get("error")
            return ForkFailed(whole(message["failed"]), error[:1000] if isinstance(error, str) else "no reason")
        raise ValueError("no known key")
    except (ValueError, KeyError, RecursionError) as e:
        log.warning("a preloader sent a message that is not one: %r (%s)", bytes(data[:80]), e)
        return None


def whole(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise ValueError(f"not a whole number: {value!r}")
    return value


def positive(value: object) -> int:
    number = whole(value)
    if number == 0:
        raise ValueError("pid 0")
    return number


class Channel:
    """The core's end, nonblocking. Exit reports that come while the core
    waits for a fork's reply are kept for the next take()."""

    def __init__(self, fd: int, pid: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.pid = pid
        self.numbers = 0
        self.pending: list[Message] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self) -> list[Message]:
        """What has come; self.closed once the preloader's end is gone."""
        messages, self.pending = self.pending, []
        while not self.closed:
            try:
                data = self.sock.recv(MESSAGE_LIMIT)
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("preloader %d: control socket: %s", self.pid, e.strerror)
                data = b""
            if not data:
                self.closed = True
                break
            message = parse(data)
            if message is not None:
                messages.append(message)
        return messages

    def fork(self, fds: list[int], cgroup: bool) -> int:
        """Asks for a worker made of fds; returns its pid as the preloader
        says it. Raises PreloaderFailed when it does not answer in time, or
        has gone."""
        self.numbers += 1
        number = self.numbers
        command = json.dumps({"spawn": number, "cgroup": cgroup}).encode()
        try:
            self.sock.sendmsg([command], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError as e:
            raise PreloaderFailed(f"cannot send it the spawn command: {e.strerror}") from e
        deadline = monotonic_ms() + FORK_REPLY_TIMEOUT_MS
        while (left := deadline - monotonic_ms()) > 0:
            select.select([self.sock], [], [], left / 1000)
            reply: Forked | ForkFailed | None = None
            for message in self.take():
                if isinstance(message, Forked | ForkFailed) and message.number == number:
                    reply = message
                else:
                    # kept whole: an exit report may come in the same batch as the reply, before or after it
                    self.pending.append(message)
            if isinstance(reply, ForkFailed):
                raise PreloaderFailed(reply.error)
            if reply is not None:
                return reply.pid
            if self.closed:
                raise PreloaderFailed("it closed its control socket")
        raise PreloaderFailed(f"it did not fork within {FORK_REPLY_TIMEOUT_MS // 1000} s")

    def close(self) -> None:
        self.sock.close()
