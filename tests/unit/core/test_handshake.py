"""Reading a worker's handshake line (docs/protocol.md §3)."""

from __future__ import annotations

from agent.core import handshake
from agent.core.handshake import Handshake


def test_a_handshake_is_read_once_a_line_or_the_end_has_come() -> None:
    assert not handshake.complete(b'{"status": "re', eof=False)
    assert handshake.complete(b'{"status": "ready"}\n', eof=False)
    assert handshake.complete(b"", eof=True)
    assert handshake.complete(b"x" * handshake.LIMIT, eof=False)


def test_a_ready_worker_says_how_many_requests_it_takes() -> None:
    assert handshake.parse(b'{"status": "ready", "concurrency": 4}\n') == Handshake(ready=True, concurrency=4)
    assert handshake.parse(b'{"status": "ready"}\n') == Handshake(ready=True, concurrency=1)
    assert handshake.parse(b'{"status": "ready", "concurrency": 0}\n').concurrency == 1


def test_a_failed_start_keeps_its_summary_and_traceback() -> None:
    said = handshake.parse(b'{"status": "error", "summary": "ImportError: x", "traceback": "Traceback..."}\nmore')
    assert said == Handshake(ready=False, summary="ImportError: x", details="Traceback...")
    assert handshake.parse(b"") == Handshake(ready=False, summary="the worker exited before it was ready",
                                             details="the worker exited before it was ready")
    assert handshake.parse(b"garbage\n").summary == "unreadable handshake: b'garbage'"
