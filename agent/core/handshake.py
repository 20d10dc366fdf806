"""A worker's handshake (docs/protocol.md §3): one JSON line on its ready
pipe, saying that it serves or why it could not load the app."""

from __future__ import annotations

import json
from dataclasses import dataclass

LIMIT = 65536  # a worker that sends more without a newline is read as it is


@dataclass(frozen=True)
class Handshake:
    ready: bool
    concurrency: int = 1
    summary: str = ""   # one line, for the log and the error page
    details: str = ""   # may hold a traceback


def complete(data: bytes | bytearray, eof: bool) -> bool:
    """Enough has come to decide: a whole line, the pipe closed, or too much."""
    return eof or b"\n" in data or len(data) >= LIMIT


def parse(data: bytes) -> Handshake:
    """What the first line says; an empty one means the worker exited first."""
    line = data.split(b"\n", 1)[0]
    try:
        message = json.loads(line) if line else {}
    except json.JSONDecodeError:
        message = {"status": "error", "summary": f"unreadable handshake: {line[:200]!r}"}
    if message.get("status") == "ready":
        return Handshake(ready=True, concurrency=max(1, int(message.get("concurrency", 1))))
    summary = str(message.get("summary") or "the worker exited before it was ready")
    return Handshake(ready=False, summary=summary, details=str(message.get("traceback") or summary))
