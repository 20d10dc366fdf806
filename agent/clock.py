"""The pool's clock: integer milliseconds of CLOCK_MONOTONIC.

Durations are integer milliseconds from the nginx directive to the engine;
the pool's timestamps use the same unit and the same clock as the engine
(its last_used_ms), so that policy rules compare like with like.
"""

from __future__ import annotations

import time


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def unix_time(stamp_ms: int) -> float:
    """The wall-clock time (seconds, for display) of a monotonic stamp."""
    return time.time() - (monotonic_ms() - stamp_ms) / 1000.0


def seconds_text(ms: int) -> str:
    """A duration for a message: `90 s`, `1.5 s`."""
    return f"{ms / 1000:g} s"
