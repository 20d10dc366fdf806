"""The engine (csrc/engine.c) against docs/protocol.md sections 1 and 2, driven
through the agent's engine wrapper with real Unix sockets, fake workers and a test client
in the place of nginx."""

from __future__ import annotations

import hashlib
import itertools
import os
import select
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.core.engine import (
    DURATION_BOUNDS,
    EV_LOG,
    EV_QUEUED,
    EV_WORKER_FAILED,
    EV_WORKER_IDLE,
    WORKER_ACTIVE,
    WORKER_DETACHED,
    Engine,
)
from tests.unit.core.engine_peers import (
    CLOSE,
    END_RECORD,
    KEEP,
    TIMEOUT,
    Behavior,
    EngineHarness,
    FakeWorker,
    SeenRequest,
    answer_after_release,
    answer_hello,
    answer_in_two_parts,
    answer_then_close,
    answer_then_watch_for_close,
    close_without_answer,
    connect,
    encode_pairs,
    hello,
    raw_frame,
    read_all,
    record,
    records,
    request_frame,
    rss_bytes,
    send_request,
    split_response,
    stream_forever,
    wait_until,
)

APP = "/srv/shop"


@pytest.fixture
def engine() -> Iterator[EngineHarness]:
    with tempfile.TemporaryDirectory(prefix="engine-") as directory:
        harness = EngineHarness(directory, frame_timeout_ms=300)
        try:
            yield harness
        finally:
            harness.close()


def engine_reply(status: int, reason: str, body: str, retry_after: bool = False) -> bytes:
    """The exact bytes of a response the engine makes (protocol.md table)."""
    text = f"{status} {reason}: {body}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
        f"Connection: close\r\n{'Retry-After: 1' + chr(13) + chr(10) if retry_after else ''}\r\n"
    )
    return head.encode() + text


def start_request(engine: EngineHarness, uri: str = "/") -> socket.socket:
    sock = connect(engine.socket_path)
    sock.sendall(request_frame(APP, uri))
    return sock


# -- routing and passthrough -------------------------------------------------


def test_request_and_response_pass_through_byte_exact(engine: EngineHarness) -> None:
    raw_answer = b"HTTP/1.1 201 Created\r\nX-Bin: \x00\xff\r\n\r\n" + bytes(range(256)) * 50

    def answer(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(records(raw_answer, cut=1000))  # boundaries mean nothing
        return KEEP

    engine.app(1, APP)
    worker = engine.worker(1, 101, answer)
    body = os.urandom(200_000)
    frame = request_frame(APP, "/p?q=1", "POST", len(body), [(b"HTTP_X_TOKEN", b"a\x00b")])
    assert engine.request(frame, body) == raw_answer
    seen = worker.requests[0]
    assert seen.frame == frame
    assert seen.body_length == len(body)
    assert seen.body == body[: len(seen.body)]
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()


def test_vars_larger_than_an_io_buffer_are_forwarded_unchanged(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    frame = request_frame(APP, extra=[(b"HTTP_COOKIE", b"c" * 300_000)])
    assert engine.request(frame).startswith(b"HTTP/1.1 200 OK")
    assert worker.requests[0].frame == frame


def test_sequential_requests_alternate_between_idle_workers(engine: EngineHarness) -> None:
    engine.app(1, APP)
    engine.worker(1, 101)
    engine.worker(1, 102)
    served = [split_response(engine.request(request_frame(APP)))[2] for _ in range(10)]
    pids = [int(body.split()[-1]) for body in served]
    assert all(a != b for a, b in itertools.pairwise(pids)), pids
    assert sorted(set(pids)) == [101, 102]


def test_least_busy_worker_is_chosen(engine: EngineHarness) -> None:
    engine.app(1, APP)
    busy = engine.worker(1, 101, answer_after_release, concurrency=4)
    held = start_request(engine)
    wait_until(lambda: busy.count() == 1)
    engine.worker(1, 102)
    # 101 has one session and room for more; 102 has none: 102 wins.
    assert b"hello from 102" in engine.request(request_frame(APP))
    busy.release.set()
    assert b"hello from 101" in read_all(held)
    held.close()


def test_stats_count_sessions_and_processed(engine: EngineHarness) -> None:
    engine.app(3, APP)
    worker = engine.worker(3, 101, answer_after_release, concurrency=2)
    held = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    stats = engine.worker_stats()[101]
    assert (stats.app, stats.sessions, stats.processed, stats.state) == (3, 1, 0, WORKER_ACTIVE)
    worker.release.set()
    read_all(held)
    held.close()
    engine.request(request_frame(APP))
    wait_until(lambda: engine.worker_stats()[101].processed == 2)
    assert engine.worker_stats()[101].sessions == 0
    assert engine.app_stats()[3].requests == 2
    idle = engine.wait_event(EV_WORKER_IDLE)
    assert (idle.pid, idle.app) == (101, 3)


# -- the queue ---------------------------------------------------------------


def test_busy_app_queues_and_emits_queued(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine, "/first")
    wait_until(lambda: worker.count() == 1)
    second = start_request(engine, "/second")
    queued = engine.wait_event(EV_QUEUED)
    assert (queued.app, queued.value) == (1, 1)
    assert engine.app_stats()[1].queue_length == 1
    worker.release.set()
    assert b"200 OK" in read_all(first)
    assert b"200 OK" in read_all(second)
    assert [r.vars["REQUEST_URI"] for r in worker.requests] == [b"/first", b"/second"]
    first.close()
    second.close()


def test_full_queue_answers_503_with_retry_after(engine: EngineHarness) -> None:
    engine.app(1, APP, max_queue=1)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    second = start_request(engine)
    engine.wait_event(EV_QUEUED)
    assert engine.request(request_frame(APP)) == engine_reply(
        503, "Service Unavailable", "request queue full", retry_after=True
    )
    assert engine.app_stats()[1].queue_full == 1
    worker.release.set()
    for sock in (first, second):
        assert b"200 OK" in read_all(sock)
        sock.close()


def test_queue_timeout_answers_504(engine: EngineHarness) -> None:
    engine.app(1, APP, queue_timeout_ms=200)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    began = time.monotonic()
    assert engine.request(request_frame(APP)) == engine_reply(504, "Gateway Timeout", "waited too long for a worker")
    assert 0.15 < time.monotonic() - began < 2.0
    assert engine.app_stats()[1].queue_timeouts == 1
    worker.release.set()
    read_all(first)
    first.close()


def test_queued_request_whose_client_left_never_reaches_the_worker(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine, "/first")
    wait_until(lambda: worker.count() == 1)
    gone = start_request(engine, "/gone")
    engine.wait_event(EV_QUEUED)
    gone.close()
    wait_until(lambda: engine.app_stats()[1].queue_length == 0)
    worker.release.set()
    read_all(first)
    first.close()
    assert b"200 OK" in engine.request(request_frame(APP, "/after"))
    assert [r.vars["REQUEST_URI"] for r in worker.requests] == [b"/first", b"/after"]
    assert worker.connections == 1


def test_connect_failure_detaches_the_worker_and_reroutes(engine: EngineHarness) -> None:
    engine.app(1, APP)
    # Added first and as idle as the other, the missing worker is tried first.
    engine.engine.add_worker(1, 100, os.path.join(engine.directory, "none"), 1)
    alive = engine.worker(1, 101)
    assert b"hello from 101" in engine.request(request_frame(APP))
    failed = engine.wait_event(EV_WORKER_FAILED)
    assert (failed.pid, failed.app, failed.value) == (100, 1, 2)  # ENOENT
    assert "pid 100" in failed.message
    assert engine.worker_stats()[100].state == WORKER_DETACHED
    assert alive.count() == 1


def test_worker_that_closes_without_answering_gives_502(engine: EngineHarness) -> None:
    engine.app(1, APP)
    engine.worker(1, 107, close_without_answer)
    assert engine.request(request_frame(APP)) == engine_reply(
        502, "Bad Gateway", "the app worker (pid 107) failed before responding"
    )
    assert engine.app_stats()[1].failed == 1
    wait_until(lambda: engine.worker_stats()[107].sessions == 0)


def test_client_abort_mid_response_keeps_the_worker_busy_until_its_end_record(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_in_two_parts)
    sock = start_request(engine)
    assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    sock.close()
    time.sleep(0.3)  # the engine has seen the close by now; the worker still works
    assert engine.worker_stats()[101].sessions == 1
    worker.release.set()
    wait_until(lambda: engine.worker_stats()[101].sessions == 0)
    assert engine.worker_stats()[101].processed == 1
    worker.behavior = answer_hello
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 101\n"
    assert worker.connections == 1  # the drained connection was kept


def test_client_abort_before_the_body_is_sent_closes_the_worker_connection(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    sock = connect(engine.socket_path)
    sock.sendall(request_frame(APP, "/upload", "POST", content_length=1 << 20) + b"x" * 1000)
    wait_until(lambda: worker.connections == 1)
    sock.close()
    wait_until(lambda: worker.count() == 1)  # the worker saw its body cut off
    wait_until(lambda: engine.worker_stats()[101].sessions == 0)
    assert engine.worker_stats()[101].processed == 0
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 101\n"
    assert worker.connections == 2  # the cut-off connection was not reused


def test_removed_worker_finishes_its_requests(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    sock = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    engine.engine.remove_worker(101)
    assert 101 not in engine.worker_stats()
    worker.release.set()
    assert b"hello from 101" in read_all(sock)
    sock.close()


# -- worker connections (protocol.md section 2) ------------------------------


def test_sequential_requests_reuse_one_connection(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    for i in range(10):
        assert split_response(engine.request(request_frame(APP, f"/{i}")))[2] == b"hello from 101\n"
    assert worker.connections == 1
    assert [r.vars["REQUEST_URI"] for r in worker.requests] == [f"/{i}".encode() for i in range(10)]
    stats = engine.worker_stats()[101]
    assert (stats.sessions, stats.processed) == (0, 10)


def test_worker_closing_after_the_end_record_gets_a_new_connection(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_then_close)
    for _ in range(10):
        assert engine.request(request_frame(APP)) == hello(worker)
    assert worker.connections == 10
    assert engine.app_stats()[1].failed == 0
    wait_until(lambda: engine.worker_stats()[101].processed == 10)


def test_worker_eof_mid_response_closes_the_nginx_side(engine: EngineHarness) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"

    def answer_part(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(record(head + b"first") + record(b" part"))
        return CLOSE

    engine.app(1, APP)
    engine.worker(1, 101, answer_part)
    assert engine.request(request_frame(APP)) == head + b"first part"
    assert "before the response's end record" in engine.wait_event(EV_LOG).message
    wait_until(lambda: engine.worker_stats()[101].sessions == 0)
    assert engine.app_stats()[1].failed == 0  # nginx got a response, cut off


def test_worker_eof_in_a_record_header_before_any_payload_gives_502(engine: EngineHarness) -> None:
    def answer_half_header(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(b"\x00\x00")
        return CLOSE

    engine.app(1, APP)
    engine.worker(1, 107, answer_half_header)
    assert engine.request(request_frame(APP)) == engine_reply(
        502, "Bad Gateway", "the app worker (pid 107) failed before responding"
    )
    assert engine.app_stats()[1].failed == 1


def test_bytes_that_are_not_records_give_502_and_the_connection_is_dropped(engine: EngineHarness) -> None:
    """A worker that answers raw HTTP (no records): "HTTP" reads as a length
    and what follows is no status line."""
    calls = itertools.count()

    def answer_raw_then_records(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        if next(calls) == 0:
            conn.sendall(hello(worker))
        else:
            conn.sendall(records(hello(worker)))
        return KEEP

    engine.app(1, APP)
    worker = engine.worker(1, 107, answer_raw_then_records)
    assert engine.request(request_frame(APP)) == engine_reply(
        502, "Bad Gateway", "the app worker (pid 107) failed before responding"
    )
    assert "not response records" in engine.wait_event(EV_LOG).message
    wait_until(lambda: worker.closes() == 1)  # the engine dropped the connection
    assert engine.request(request_frame(APP)) == hello(worker)
    assert worker.connections == 2
    assert engine.app_stats()[1].failed == 1


def test_bytes_after_the_end_record_close_the_connection_after_the_response(engine: EngineHarness) -> None:
    def answer_with_trailer(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(records(hello(worker)) + b"junk")
        return KEEP

    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_with_trailer)
    assert engine.request(request_frame(APP)) == hello(worker)
    assert "after a response's end record" in engine.wait_event(EV_LOG).message
    wait_until(lambda: worker.closes() == 1)
    assert engine.request(request_frame(APP)) == hello(worker)
    assert worker.connections == 2


def test_idle_connection_that_turns_readable_is_closed(engine: EngineHarness) -> None:
    def answer_then_chatter(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(records(hello(worker)))
        time.sleep(0.1)  # the connection is idle in the engine by now
        conn.sendall(b"unasked")
        return KEEP

    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_then_chatter)
    assert engine.request(request_frame(APP)) == hello(worker)
    assert "on an idle connection" in engine.wait_event(EV_LOG).message
    wait_until(lambda: worker.closes() == 1)
    assert engine.request(request_frame(APP)) == hello(worker)
    assert worker.connections == 2


def test_worker_of_concurrency_two_gets_at_most_two_connections(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release, concurrency=2)
    held = [start_request(engine, f"/{i}") for i in range(4)]
    wait_until(lambda: worker.count() == 2)
    wait_until(lambda: engine.app_stats()[1].queue_length == 2)
    assert worker.connections == 2
    worker.release.set()
    for sock in held:
        assert b"hello from 101" in read_all(sock)
        sock.close()
    for i in range(6):
        assert b"hello from 101" in engine.request(request_frame(APP, f"/more{i}"))
    assert worker.connections == 2
    assert worker.count() == 10


@pytest.mark.parametrize("how", ["detach", "remove"])
def test_stopping_a_worker_closes_its_idle_connections(engine: EngineHarness, how: str) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release, concurrency=2)
    other = engine.worker(1, 102, answer_after_release)
    held = [start_request(engine) for _ in range(3)]  # 101 opens two connections
    wait_until(lambda: (worker.count(), other.count()) == (2, 1))
    worker.release.set()
    other.release.set()
    for sock in held:
        assert b"200 OK" in read_all(sock)
        sock.close()
    assert worker.connections == 2
    stop = engine.engine.detach_worker if how == "detach" else engine.engine.remove_worker
    stop(101)
    wait_until(lambda: worker.closes() == 2)
    assert engine.request(request_frame(APP)) == hello(other)


def test_detached_worker_closes_a_busy_connection_when_its_request_ends(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    sock = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    engine.engine.detach_worker(101)
    worker.release.set()
    assert read_all(sock) == hello(worker)
    sock.close()
    wait_until(lambda: worker.closes() == 1)
    assert engine.worker_stats()[101].processed == 1


def test_answer_before_the_whole_body_does_not_reuse_the_connection(engine: EngineHarness) -> None:
    """The worker answers before the body has arrived: the connection is not
    at a request boundary, so the engine closes it after the response."""
    too_large = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"

    def answer_early(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(records(too_large))
        return KEEP

    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_early)
    worker.read_body = False
    with connect(engine.socket_path) as sock:
        sock.sendall(request_frame(APP, "/up", "POST", 10_000) + b"x" * 10)  # the rest never comes
        assert read_all(sock) == too_large
    wait_until(lambda: worker.closes() == 1)
    assert engine.request(request_frame(APP)) == too_large
    assert worker.connections == 2
    assert engine.worker_stats()[101].processed == 2


# -- bad input ---------------------------------------------------------------

GOOD_PAIRS = encode_pairs(
    [(b"AGENT_APP", APP.encode()), (b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/"), (b"CONTENT_LENGTH", b"0")]
)

MALFORMED = {
    "zero vars-size": (struct.pack(">I", 0), "vars-size 0 is zero"),
    "oversized vars-size": (struct.pack(">I", 0xFFFFFFFF), "vars-size 4294967295 is over the cap"),
    "random bytes": (b"\x9c\x17\xe2\x01garbage garbage", "is over the cap"),
    "pair overrun": (
        raw_frame(GOOD_PAIRS + struct.pack(">I", 3) + b"KEY" + struct.pack(">I", 50) + b"x"),
        "pair 5 runs past the end of vars",
    ),
    "leftover bytes": (raw_frame(GOOD_PAIRS + b"\x00\x00"), "pair 5 runs past the end of vars"),
    "missing AGENT_APP": (raw_frame(GOOD_PAIRS[4 + 9 + 4 + len(APP) :]), "AGENT_APP is missing"),
    "bad key": (raw_frame(GOOD_PAIRS + encode_pairs([(b"http_x", b"1")])), "byte outside [A-Z0-9_]"),
    "empty key": (raw_frame(GOOD_PAIRS + encode_pairs([(b"", b"1")])), "pair 5 has an empty key"),
    "bad length": (
        raw_frame(
            encode_pairs(
                [
                    (b"AGENT_APP", APP.encode()),
                    (b"REQUEST_METHOD", b"GET"),
                    (b"REQUEST_URI", b"/"),
                    (b"CONTENT_LENGTH", b"12a"),
                ]
            )
        ),
        "CONTENT_LENGTH is not a decimal number",
    ),
    "two lengths": (raw_frame(GOOD_PAIRS + encode_pairs([(b"CONTENT_LENGTH", b"5")])), "CONTENT_LENGTH appears twice"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_gets_400_and_a_log_line(engine: EngineHarness, case: str) -> None:
    engine.app(1, APP)
    engine.worker(1, 101)
    data, reason = MALFORMED[case]
    with connect(engine.socket_path) as sock:
        sock.sendall(data)
        response = read_all(sock)
    status, headers, body = split_response(response)
    assert status == "HTTP/1.1 400 Bad Request"
    assert body.startswith(b"400 Bad Request: malformed request frame (")
    assert int(headers["Content-Length"]) == len(body)
    assert reason.encode() in body
    log = engine.wait_event(EV_LOG)
    assert log.message.startswith("malformed request frame: ") and reason in log.message
    assert b"200 OK" in engine.request(request_frame(APP))


def test_truncated_frame_gets_400_and_a_log_line(engine: EngineHarness) -> None:
    engine.app(1, APP)
    engine.worker(1, 101)
    frame = request_frame(APP)
    with connect(engine.socket_path) as sock:
        sock.sendall(frame[: len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
        status, _, body = split_response(read_all(sock))
    assert status == "HTTP/1.1 400 Bad Request"
    assert b"closed after" in body
    assert "closed after" in engine.wait_event(EV_LOG).message
    assert b"200 OK" in engine.request(frame)


def test_oversized_frame_is_refused_after_the_size_alone(engine: EngineHarness) -> None:
    engine.app(1, APP)
    with connect(engine.socket_path) as sock:
        sock.sendall(struct.pack(">I", (1 << 20) + 1))  # the rest is never sent
        assert split_response(read_all(sock))[0] == "HTTP/1.1 400 Bad Request"


def test_silent_connection_is_closed_after_the_frame_timeout(engine: EngineHarness) -> None:
    with connect(engine.socket_path) as sock:
        began = time.monotonic()
        assert read_all(sock) == b""
        assert 0.25 < time.monotonic() - began < 2.0


def test_unknown_app_gets_503(engine: EngineHarness) -> None:
    assert engine.request(request_frame("/srv/none")) == engine_reply(
        503, "Service Unavailable", "unknown app /srv/none"
    )


def test_removed_app_answers_its_queue_503(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    second = start_request(engine)
    engine.wait_event(EV_QUEUED)
    engine.engine.remove_app(1)
    assert read_all(second) == engine_reply(503, "Service Unavailable", f"unknown app {APP}")
    worker.release.set()
    assert b"200 OK" in read_all(first)
    first.close()
    second.close()


def test_failed_app_answers_waiting_and_new_requests_verbatim(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release)
    first = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    waiting = start_request(engine)
    engine.wait_event(EV_QUEUED)
    page = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n\r\n<h1>SyntaxError</h1>" * 3
    engine.engine.fail_app(1, page)
    assert read_all(waiting) == page
    assert engine.request(request_frame(APP)) == page
    engine.engine.clear_app_failure(1)
    worker.release.set()
    assert b"200 OK" in read_all(first)
    assert b"200 OK" in engine.request(request_frame(APP))
    first.close()
    waiting.close()


# -- volume ------------------------------------------------------------------


def test_large_body_streams_without_growing_memory(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    size = 100 << 20
    chunk = os.urandom(1 << 20)
    frame = request_frame(APP, "/upload", "POST", size)
    sock = connect(engine.socket_path)
    before = rss_bytes()
    peak = before
    sock.sendall(frame)
    for _ in range(size // len(chunk)):
        sock.sendall(chunk)
        peak = max(peak, rss_bytes())
    response = read_all(sock)
    sock.close()
    assert b"200 OK" in response
    assert worker.requests[0].body_length == size
    assert peak - before < 16 << 20, f"RSS grew by {(peak - before) >> 20} MiB"


def test_frame_sent_in_pieces_is_assembled(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    body = b"0123456789" * 10
    frame = request_frame(APP, "/pieces", "PUT", len(body))
    with connect(engine.socket_path) as sock:
        for piece in (frame[:2], frame[2:7], frame[7:-1], frame[-1:] + body[:3], body[3:]):
            sock.sendall(piece)
            time.sleep(0.02)
        assert b"200 OK" in read_all(sock)
    assert worker.requests[0].frame == frame
    assert worker.requests[0].body == body


def test_large_response_to_a_slow_reader_is_held_one_buffer_at_a_time(engine: EngineHarness) -> None:
    payload = os.urandom(1 << 20)
    count = 32

    def answer_big(worker: FakeWorker, conn: socket.socket, request: object) -> bool:
        conn.sendall(record(b"HTTP/1.1 200 OK\r\n\r\n"))
        for _ in range(count):
            conn.sendall(record(payload))
        conn.sendall(END_RECORD)
        return KEEP

    engine.app(1, APP)
    engine.worker(1, 101, answer_big)
    before = rss_bytes()
    with connect(engine.socket_path) as sock:
        sock.sendall(request_frame(APP))
        time.sleep(0.3)  # the worker and the engine meet a full socket
        digest = hashlib.sha256()
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        digest.update(head.split(b"\r\n\r\n", 1)[1])
        received = len(head.split(b"\r\n\r\n", 1)[1])
        buffer = memoryview(bytearray(1 << 16))  # reused, so that only the engine could grow
        while n := sock.recv_into(buffer):
            digest.update(buffer[:n])
            received += n
    grown = rss_bytes() - before
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(payload)
    assert received == count * len(payload)
    assert digest.hexdigest() == expected.hexdigest()
    assert grown < 16 << 20


def test_idle_and_queued_events_are_coalesced_while_unread(engine: EngineHarness) -> None:
    engine.app(1, APP)
    engine.worker(1, 101)
    for _ in range(20):
        engine.request(request_frame(APP))
    wait_until(lambda: engine.worker_stats()[101].processed == 20)
    assert select.select([engine.engine.notify_fd()], [], [], 0)[0]
    idle = [ev for ev in engine.poll() if ev.type == EV_WORKER_IDLE]
    assert [(ev.pid, ev.value) for ev in idle] == [(101, 20)]
    # Everything read: the notify fd is quiet again.
    with pytest.raises(BlockingIOError):
        os.read(engine.engine.notify_fd(), 8)


# -- what the status socket reads: durations and requests in flight ----------


@dataclass
class NativeEngine:
    """The harness with the wrapper's own calls, as the status socket reads them."""

    harness: EngineHarness

    @property
    def engine(self) -> Engine:
        return self.harness.engine

    @property
    def socket_path(self) -> str:
        return self.harness.socket_path

    def worker(self, app_id: int, pid: int, behavior: Behavior = answer_hello) -> FakeWorker:
        return self.harness.worker(app_id, pid, behavior)

    def request(self, uri: str = "/", method: str = "GET", app: str = APP) -> bytes:
        return send_request(self.socket_path, request_frame(app, uri, method))

    def start_request(self, uri: str, method: str = "GET") -> socket.socket:
        sock = connect(self.socket_path)
        sock.sendall(request_frame(APP, uri, method))
        return sock


@pytest.fixture
def native_engine() -> Iterator[NativeEngine]:
    with tempfile.TemporaryDirectory(prefix="engine-") as directory:
        harness = EngineHarness(directory)
        try:
            yield NativeEngine(harness)
        finally:
            harness.close()


SLOW_S = 0.3  # lands in the (250 ms, 500 ms] bucket with 200 ms to spare


def answer_after_a_while(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    if request.vars["REQUEST_URI"] == b"/slow":
        time.sleep(SLOW_S)
    return answer_hello(worker, conn, request)


def test_durations_are_counted_in_the_bucket_of_the_response_time(native_engine: NativeEngine) -> None:
    native_engine.engine.set_app(1, APP, 0, 0)
    native_engine.worker(1, 101, answer_after_a_while)
    for _ in range(3):
        assert b"200 OK" in native_engine.request("/fast")
    for _ in range(2):
        assert b"200 OK" in native_engine.request("/slow")
    durations = native_engine.engine.app_durations()[1]
    slow_bucket = DURATION_BOUNDS.index(0.5)
    assert len(durations.buckets) == len(DURATION_BOUNDS) == 12
    assert durations.buckets[slow_bucket] == 2
    assert sum(durations.buckets[: DURATION_BOUNDS.index(0.1) + 1]) == 3  # fast, on any machine
    assert durations.count == 5 == sum(durations.buckets)
    assert durations.cumulative()[-1] == durations.count
    assert 2 * SLOW_S <= durations.sum_seconds < 2 * SLOW_S + 1.0


def test_engine_answers_for_an_app_are_counted_and_others_are_not(native_engine: NativeEngine) -> None:
    native_engine.engine.set_app(1, APP, 1, 0)  # a queue of one
    worker = native_engine.worker(1, 101, answer_after_release)
    held = native_engine.start_request("/held")
    wait_until(lambda: worker.count() == 1)
    queued = native_engine.start_request("/queued")
    wait_until(lambda: native_engine.engine.app_stats()[1].queue_length == 1)
    assert b"503 Service Unavailable" in native_engine.request("/refused")  # queue full: counted
    assert b"503 Service Unavailable" in native_engine.request(app="/srv/none")  # no app: not counted
    with connect(native_engine.socket_path) as sock:  # malformed: not counted
        sock.sendall(raw_frame(b"garbage"))
        assert b"400 Bad Request" in read_all(sock)
    assert native_engine.engine.app_durations()[1].count == 1
    worker.release.set()
    for sock in (held, queued):
        assert b"200 OK" in read_all(sock)
        sock.close()
    wait_until(lambda: native_engine.engine.app_durations()[1].count == 3)


def test_requests_shows_one_in_flight_and_one_queued(native_engine: NativeEngine) -> None:
    native_engine.engine.set_app(1, APP, 0, 0)
    worker = native_engine.worker(1, 101, answer_after_release)
    assert native_engine.engine.requests() == []
    slow = native_engine.start_request("/report?year=2024", "GET")
    wait_until(lambda: worker.count() == 1)
    waiting = native_engine.start_request("/upload", "POST")
    wait_until(lambda: native_engine.engine.app_stats()[1].queue_length == 1)
    time.sleep(0.05)
    first, second = native_engine.engine.requests()  # oldest first
    assert (first.app, first.pid, first.state, first.method, first.path) == (
        1,
        101,
        "forwarding",
        "GET",
        "/report?year=2024",
    )
    assert (second.app, second.pid, second.state, second.method, second.path) == (1, None, "queued", "POST", "/upload")
    assert first.age >= second.age >= 0.04
    worker.release.set()
    for sock in (slow, waiting):
        assert b"200 OK" in read_all(sock)
        sock.close()
    wait_until(lambda: native_engine.engine.requests() == [])


def test_requests_truncates_a_long_method_and_path(native_engine: NativeEngine) -> None:
    native_engine.engine.set_app(1, APP, 0, 0)
    worker = native_engine.worker(1, 101, answer_after_release)
    path = "/" + "p" * 2000
    sock = native_engine.start_request(path, "M" * 40)
    wait_until(lambda: worker.count() == 1)
    (request,) = native_engine.engine.requests()
    assert request.method == "M" * 15
    assert request.path == path[:511]
    assert worker.requests[0].vars["REQUEST_URI"] == path.encode()  # the worker gets it whole
    worker.release.set()
    read_all(sock)
    sock.close()


def free_slots(engine: EngineHarness, app_id: int) -> int:
    return engine.app_stats()[app_id].free_slots


def test_free_slots_count_what_active_workers_can_take(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_after_release, concurrency=2)
    engine.worker(1, 102)
    assert free_slots(engine, 1) == 3
    sock = start_request(engine)
    wait_until(lambda: worker.count() == 1)
    assert free_slots(engine, 1) == 2
    engine.engine.detach_worker(102)
    assert free_slots(engine, 1) == 1
    worker.release.set()
    assert b"hello from 101" in read_all(sock)
    sock.close()
    wait_until(lambda: free_slots(engine, 1) == 2)


# -- who may connect: SO_PEERCRED on the agent socket ------------------------


def other_uid() -> int:
    """A uid that is not ours (nobody's, or one past ours when we are nobody)."""
    return 65534 if os.geteuid() != 65534 else 65533


def refused_exchange(engine: EngineHarness, frame: bytes) -> bytes:
    """Sends frame and reads the answer; a connection closed with the frame
    unread (a reset, or a send that finds it closed) answered nothing."""
    with connect(engine.socket_path) as sock:
        try:
            sock.sendall(frame)
            return read_all(sock)
        except (BrokenPipeError, ConnectionResetError):
            return b""


def test_peer_whose_uid_is_not_allowed_is_closed_unread_and_unanswered(engine: EngineHarness) -> None:
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    engine.engine.allow_peers([other_uid()])
    assert refused_exchange(engine, request_frame(APP, "/forged", extra=[(b"REMOTE_ADDR", b"6.6.6.6")])) == b""
    assert worker.count() == 0
    assert engine.engine.refused_peers() == 1
    log = engine.wait_event(EV_LOG)
    assert f"uid {os.geteuid()}" in log.message and "refused 1 connection" in log.message
    assert engine.app_stats()[1].requests == 0  # never counted as a request
    engine.engine.allow_peers([other_uid(), os.geteuid()])
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 101\n"


def test_refusals_are_logged_once_per_interval_and_all_counted(engine: EngineHarness) -> None:
    engine.app(1, APP)
    engine.engine.allow_peers([other_uid()])
    for _ in range(5):
        assert refused_exchange(engine, request_frame(APP)) == b""
    wait_until(lambda: engine.engine.refused_peers() == 5)
    time.sleep(0.05)
    assert len([ev for ev in engine.poll() if ev.type == EV_LOG]) == 1


def test_engine_allows_only_its_own_uid_by_default(engine: EngineHarness) -> None:
    """Run as root: a process of another uid that reaches the socket (its
    mode opened here on purpose) is refused by the engine itself."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as another user")
    engine.app(1, APP)
    worker = engine.worker(1, 101)
    os.chmod(engine.directory, 0o755)
    os.chmod(engine.socket_path, 0o666)
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "try:\n"
        "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "    print(len(s.recv(65536)))\n"
        "except (BrokenPipeError, ConnectionResetError):  # closed unread\n"
        "    print(0)\n"
    )
    frame = request_frame(APP, "/forged", extra=[(b"REMOTE_ADDR", b"6.6.6.6")])
    result = subprocess.run(["/usr/bin/python3", "-c", script, engine.socket_path, frame.hex()], user=65534,
                            group=65534, extra_groups=[], capture_output=True, text=True, timeout=10, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    assert worker.count() == 0
    assert engine.engine.refused_peers() == 1
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 101\n"


# -- draining a response nobody reads is bounded -----------------------------


@pytest.fixture
def small_drain() -> Iterator[EngineHarness]:
    with tempfile.TemporaryDirectory(prefix="engine-") as directory:
        harness = EngineHarness(directory, drain_max_bytes=256 << 10, drain_max_ms=400)
        try:
            yield harness
        finally:
            harness.close()


def abandon_request(engine: EngineHarness) -> None:
    """A request whose nginx side reads the response's head and goes away."""
    sock = start_request(engine)
    assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    sock.close()


def test_endless_response_after_an_abort_is_cut_at_the_byte_bound(small_drain: EngineHarness) -> None:
    engine = small_drain
    engine.app(1, APP)
    streaming = engine.worker(1, 101, stream_forever)
    abandon_request(engine)
    started = time.monotonic()
    failed = engine.wait_event(EV_WORKER_FAILED)
    assert time.monotonic() - started < 0.4  # the bytes, not the time, ended it
    assert failed.pid == 101 and "bound in bytes" in failed.message
    assert streaming.saw_close.wait(TIMEOUT)  # its sends now fail: it is not held
    stats = engine.worker_stats()[101]
    assert stats.sessions == 0 and stats.state == WORKER_DETACHED and stats.processed == 0
    engine.worker(1, 102)  # the policy's replacement
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 102\n"
    assert streaming.count() == 1  # the broken stream carried nothing more


def test_silent_response_after_an_abort_is_cut_at_the_time_bound(small_drain: EngineHarness) -> None:
    engine = small_drain
    engine.app(1, APP)
    stuck = engine.worker(1, 101, answer_then_watch_for_close)
    abandon_request(engine)
    started = time.monotonic()
    failed = engine.wait_event(EV_WORKER_FAILED)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert failed.pid == 101 and "bound in time" in failed.message
    assert stuck.saw_close.wait(TIMEOUT)
    assert engine.worker_stats()[101].sessions == 0
    assert engine.worker_stats()[101].state == WORKER_DETACHED


def test_a_response_that_ends_within_the_bounds_keeps_its_connection(small_drain: EngineHarness) -> None:
    engine = small_drain
    engine.app(1, APP)
    worker = engine.worker(1, 101, answer_in_two_parts)
    abandon_request(engine)
    time.sleep(0.1)
    worker.release.set()
    wait_until(lambda: engine.worker_stats()[101].sessions == 0)
    assert engine.worker_stats()[101].state == WORKER_ACTIVE
    worker.behavior = answer_hello
    assert split_response(engine.request(request_frame(APP, "/next")))[2] == b"hello from 101\n"
    assert worker.connections == 1
    assert not [ev for ev in engine.poll() if ev.type == EV_WORKER_FAILED]
