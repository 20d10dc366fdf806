"""The core loop's guard: an exception in one step is logged, never the loop's end."""

from __future__ import annotations

import logging

import pytest

from agent.core.loop import Guard


def fails() -> None:
    raise ValueError("boom")


def test_an_exception_is_logged_with_its_traceback_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard()
    calls: list[int] = []
    with caplog.at_level(logging.ERROR, logger="agent"):
        for _ in range(5):
            guard.run("a step", fails)
        guard.run("another step", calls.append, 1)
    records = [r for r in caplog.records if "a step failed" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    assert guard.unlogged["a step"] == 4
    assert calls == [1]
