"""Reading a worker's handshake line (docs/protocol.md §3)."""

from __future__ import annotations

import re

import pytest

from agent.core import handshake
from agent.core.handshake import BadHandshake, Handshake


def test_a_handshake_is_read_once_a_line_or_the_end_has_come() -> None:
    assert not handshake.complete(b'{"status": "re', eof=False)
    assert handshake.complete(b'{"status": "ready"}\n', eof=False)
    assert handshake.complete(b"", eof=True)
    assert handshake.complete(b"x" * handshake.LIMIT, eof=False)


def test_a_ready_worker_says_how_many_requests_it_takes() -> None:
    assert handshake.parse(b'{"status": "ready", "concurrency": 4}\n') == Handshake(ready=True, concurrency=4)
    assert handshake.parse(b'{"status": "ready"}\n') == Handshake(ready=True, concurrency=1)
    assert handshake.parse(b'{"status": "ready", "pid": 7, "kind": "x"}\n') == Handshake(ready=True, concurrency=1)


def test_a_failed_start_keeps_its_summary_and_traceback() -> None:
    said = handshake.parse(b'{"status": "error", "summary": "ImportError: x", "traceback": "Traceback..."}\nmore')
    assert said == Handshake(ready=False, summary="ImportError: x", details="Traceback...")
    assert handshake.parse(b"") == Handshake(ready=False, summary="the worker exited before it was ready",
                                             details="the worker exited before it was ready")
    with pytest.raises(BadHandshake, match="not JSON: b'garbage'"):
        handshake.parse(b"garbage\n")


# The line comes from app code: every other shape is a bad handshake, never
# an exception of another kind (which would end the core's loop).
BAD_LINES = {
    b'{"status":"ready","concurrency":"x"}\n': "concurrency must be an integer from 1 to 1024, not 'x'",
    b"[]\n": "not a JSON object but list",
    b'{"status":"ready","concurrency":1099511627776}\n': "not an integer of 41 bits",
    b'{"status":"ready","concurrency":0}\n': "concurrency must be an integer from 1 to 1024, not 0",
    b'{"status":"ready","concurrency":true}\n': "not True",
    b'{"status":"ready","concurrency":1.5}\n': "not 1.5",
    b'{"status":"ready","concurrency":1025}\n': "not 1025",
    b'{"status":"ready","x":"\xff"}\n': "not UTF-8",
    b'{"status":"ok"}\n': "status must be \"ready\" or \"error\", not 'ok'",
    b'{"concurrency":1}\n': "not None",
    b'{"status":"error","summary":["x"]}\n': "summary must be a string",
    b'{"status":"error","traceback":5}\n': "traceback must be a string",
    b'"ready"\n': "not a JSON object but str",
    b"[" * 100_000 + b"\n": "no end of line within 65536 bytes",
    b"[" * 60_000 + b"\n": "not JSON",
    b'{"status":"ready","concurrency":' + b"9" * 5000 + b"}\n": "not JSON",
    b'{"status": "re': "the line is cut off",
    b"x" * handshake.LIMIT: "no end of line within 65536 bytes",
}


@pytest.mark.parametrize("line", BAD_LINES, ids=lambda line: repr(line[:40]))
def test_anything_but_the_two_documented_lines_is_a_bad_handshake(line: bytes) -> None:
    with pytest.raises(BadHandshake, match=re.escape(BAD_LINES[line])):
        handshake.parse(line)
    said = handshake.read(42, line)
    assert not said.ready and said.summary.startswith("bad handshake from worker 42: ")


def test_a_summary_is_one_line_and_long_texts_are_cut() -> None:
    line = ('{"status": "error", "summary": "a\\nb\\u0000c' + "s" * 5000 + '", "traceback": "'
            + "t" * 50_000 + '"}\n').encode()
    said = handshake.parse(line)
    assert said.summary.startswith("a b c") and len(said.summary) <= handshake.SUMMARY_LIMIT + 10
    assert len(said.details) <= handshake.DETAILS_LIMIT + 10
    assert handshake.parse(b'{"status": "error"}\n') == Handshake(ready=False, summary="the app could not be loaded",
                                                                   details="the app could not be loaded")


def test_only_a_whole_line_counts_as_said() -> None:
    assert handshake.has_line(b'{"status": "error"}\n')
    assert not handshake.has_line(b'{"status": "err')
    assert not handshake.has_line(b"x" * handshake.LIMIT + b"\n")
