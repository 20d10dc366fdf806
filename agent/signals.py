"""Signals for a selector loop: handlers only note the signal, and a
wake-up socket makes the loop's select() return, so that the loop handles
signals between its other events, never inside them."""

from __future__ import annotations

import selectors
import signal
import socket
from collections.abc import Iterable


class SignalInbox:
    def __init__(self, selector: selectors.BaseSelector, signums: Iterable[int]) -> None:
        self.pending: list[int] = []
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._note)
        selector.register(self._reader, selectors.EVENT_READ, self.drain)

    def _note(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def drain(self, fd: int = -1) -> None:
        """Empties the wake-up socket (the selector callback)."""
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def take(self) -> list[int]:
        """The signals noted since the last call, oldest first."""
        taken, self.pending = self.pending, []
        return taken
