"""A worker's handshake (docs/protocol.md §3): one JSON line on its ready
pipe, saying that it serves or why it could not load the app.

The line comes from app code (the loader runs inside the app's process, and
the app may write to the pipe itself), so it is untrusted input: parse()
accepts exactly the documented shape and raises BadHandshake for anything
else, which the core treats as a failed start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

LIMIT = 65536            # bytes; a longer line is a bad handshake
MAX_CONCURRENCY = 1024   # requests one worker may say it takes at once
SUMMARY_LIMIT = 1000     # characters kept of the one-line summary
DETAILS_LIMIT = 16384    # characters kept of the traceback
EXITED = "the worker exited before it was ready"


class BadHandshake(ValueError):
    """The worker's line is not a handshake; the message says why."""


@dataclass(frozen=True)
class Handshake:
    ready: bool
    concurrency: int = 1
    summary: str = ""   # one line, for the log and the error page
    details: str = ""   # may hold a traceback


def complete(data: bytes | bytearray, eof: bool) -> bool:
    """Enough has come to decide: a whole line, the pipe closed, or too much."""
    return eof or b"\n" in data or len(data) >= LIMIT


def has_line(data: bytes | bytearray) -> bool:
    """A whole line came (what came before the pipe closed may be cut off)."""
    return b"\n" in data[:LIMIT]


def parse(data: bytes) -> Handshake:
    """What the first line says; nothing at all means the worker exited
    first. Raises BadHandshake when it is not one of the two documented
    messages."""
    if not data:
        return Handshake(ready=False, summary=EXITED, details=EXITED)
    line, newline, _ = data.partition(b"\n")
    if not newline:
        if len(data) >= LIMIT:
            raise BadHandshake(f"no end of line within {LIMIT} bytes")
        raise BadHandshake(f"the line is cut off: {bytes(data[:80])!r}")
    if len(line) >= LIMIT:
        raise BadHandshake(f"no end of line within {LIMIT} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadHandshake(f"not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError):
        raise BadHandshake(f"not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise BadHandshake(f"not a JSON object but {type(message).__name__}")
    status = message.get("status")
    if status == "ready":
        return Handshake(ready=True, concurrency=read_concurrency(message))
    if status == "error":
        summary = one_line(read_text(message, "summary", SUMMARY_LIMIT)) or "the app could not be loaded"
        return Handshake(ready=False, summary=summary,
                         details=read_text(message, "traceback", DETAILS_LIMIT) or summary)
    raise BadHandshake(f"status must be \"ready\" or \"error\", not {shown(status)}")


def read(pid: int, data: bytes) -> Handshake:
    """What worker pid said: a bad line reads as a failed start whose
    summary says what is wrong with it."""
    try:
        return parse(data)
    except BadHandshake as e:
        summary = f"bad handshake from worker {pid}: {e}"
        return Handshake(ready=False, summary=summary, details=summary)


def read_concurrency(message: dict[str, Any]) -> int:
    value = message.get("concurrency", 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CONCURRENCY:
        raise BadHandshake(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}, not {shown(value)}")
    return value


def read_text(message: dict[str, Any], key: str, limit: int) -> str:
    """An optional string field, cut at limit characters."""
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadHandshake(f"{key} must be a string, not {shown(value)}")
    return value if len(value) <= limit else value[:limit] + " [cut]"


def one_line(text: str) -> str:
    """No line breaks nor control characters: a summary is one log line."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def shown(value: object) -> str:
    """A value from the line, short enough for a log line."""
    if isinstance(value, int) and abs(value) >= 10**12:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
