"""The nginx module's side of the fast path (docs/protocol.md section 5),
on the real stack: this test plays the engine's part in the shared table
(tests/integration/fastpath_table.py) and a throwaway worker answers in
records, so that every case is the module's alone."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration import apps
from tests.integration.fastpath_table import (
    CLAIMED,
    DETACH,
    DETACHED,
    END,
    FAILED,
    IDLE,
    FastPathTable,
    RecordsWorker,
    flags,
    generation,
    kind,
    read_frame,
    record,
    word,
)
from tests.integration.stack import NGINX_USER, AppSpec, Stack, running_stack, wait_until

# The engine serves the same app. A limit checked after every request
# (agent_max_requests) keeps the engine's own row for it closed, so that the
# module finds only the test's row; the engine's slots stay where it put
# them, far below the test's.
FAST = AppSpec("fast", apps.HELLO, "/", directives={"agent_max_requests": "1000000"})
ROW = 60       # any row: the module finds the app's by its name
SLOT = 200


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack([FAST]) as s:
        wait_until(lambda: s.get("/").status == 200, timeout=30, what="the app to serve")
        yield s


@pytest.fixture
def table(stack: Stack) -> Iterator[FastPathTable]:
    t = FastPathTable(stack.instance)
    engine_row = t.row_of(str(stack.app_root(FAST)))
    assert engine_row is not None and engine_row != ROW
    wait_until(lambda: t.app(engine_row).open == 0, what="the engine's row to close")
    t.forget(ROW, SLOT)
    yield t
    t.forget(ROW, SLOT)
    t.close()


@pytest.fixture
def worker(stack: Stack) -> Iterator[RecordsWorker]:
    w = RecordsWorker(stack.instance, "fp-test.sock", NGINX_USER)
    yield w
    w.close()


def publish(stack: Stack, table: FastPathTable, socket_name: str = "fp-test.sock", **row: int) -> int:
    table.open_app(ROW, str(stack.app_root(FAST)), **row)
    return table.publish(SLOT, ROW, socket_name)


def test_the_table_is_made_by_nginx(stack: Stack) -> None:
    path = stack.instance / "fastpath.table"
    st = path.stat()
    assert oct(st.st_mode & 0o777) == "0o600"
    assert (stack.instance / "wake").is_dir()
    assert list((stack.instance / "wake").iterdir()), "each nginx worker binds its wake-up socket"


def test_a_claim_is_made_released_and_the_connection_kept(stack: Stack, table: FastPathTable,
                                                          worker: RecordsWorker) -> None:
    gen = publish(stack, table)
    for i in range(5):
        r = stack.get(f"/n{i}")
        assert r.status == 200 and r.body == f"fast /n{i} ".encode()
    s = table.slot(SLOT)
    # nginx may end its side of a request just after the client has the response
    wait_until(lambda: s.word == word(IDLE, generation=gen), what="the release")
    assert s.claims == 5
    assert worker.accepts == 1, "one connection carries every request"
    r = stack.request("POST", "/post", body=b"x" * 100_000)
    assert r.status == 200 and r.body.endswith(b"x" * 100_000)
    wait_until(lambda: sum(table.app(ROW).duration_buckets) == 6, what="every request's duration")


def test_off_sends_every_request_through_agent_sock(stack: Stack, table: FastPathTable,
                                                    worker: RecordsWorker) -> None:
    # a row that names no location's app is never used
    table.open_app(ROW, "/no/such/app")
    table.publish(SLOT, ROW, "fp-test.sock")
    assert stack.get("/").body.startswith(b"hello from")
    assert worker.requests == 0


def test_queue_full_is_a_503_with_retry_after(stack: Stack, table: FastPathTable, worker: RecordsWorker) -> None:
    gen = publish(stack, table, max_queue=1)
    table.slot(SLOT).word = word(CLAIMED, pid=1, generation=gen)   # busy: held by someone else
    table.app(ROW).waiting = 1                                      # and the queue already full
    r = stack.get("/full")
    assert r.status == 503
    assert r.headers.get("retry-after") == "1"
    assert r.body == b"503 Service Unavailable: request queue full\n"
    assert table.app(ROW).queue_full == 1


def test_queue_time_is_a_504_and_the_counts_are_undone(stack: Stack, table: FastPathTable,
                                                       worker: RecordsWorker) -> None:
    gen = publish(stack, table, queue_timeout_ms=300)
    table.slot(SLOT).word = word(CLAIMED, pid=1, generation=gen)
    t0 = time.monotonic()
    r = stack.get("/late")
    assert r.status == 504
    assert r.body == b"504 Gateway Timeout: waited too long for a worker\n"
    assert time.monotonic() - t0 >= 0.25
    assert table.app(ROW).queue_timeouts == 1
    assert table.app(ROW).waiting == 0


def test_a_waiter_gets_the_worker_when_it_is_released(stack: Stack, table: FastPathTable,
                                                      worker: RecordsWorker) -> None:
    gen = publish(stack, table, queue_timeout_ms=5000)
    table.slot(SLOT).word = word(CLAIMED, pid=1, generation=gen)

    def release() -> None:
        time.sleep(0.3)
        table.slot(SLOT).word = word(IDLE, generation=gen)   # the holder lets go (no wake-up: the 5 ms timer)

    threading.Thread(target=release).start()
    r = stack.get("/waited")
    assert r.status == 200 and r.body == b"fast /waited "
    assert table.app(ROW).waiting == 0


def test_a_client_that_leaves_while_waiting_never_reaches_a_worker(stack: Stack, table: FastPathTable,
                                                                   worker: RecordsWorker) -> None:
    gen = publish(stack, table)
    table.slot(SLOT).word = word(CLAIMED, pid=1, generation=gen)
    with socket.create_connection(("127.0.0.1", stack.port)) as c:
        c.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: table.app(ROW).waiting == 1, what="the request to wait")
    wait_until(lambda: table.app(ROW).waiting == 0, what="the departed client's request to leave the queue")
    table.slot(SLOT).word = word(IDLE, generation=gen)
    time.sleep(0.1)
    assert worker.requests == 0


@pytest.mark.parametrize("mode", ["garbage", "extra", "eof"])
def test_a_worker_that_breaks_the_records_is_a_502_and_failed(stack: Stack, table: FastPathTable,
                                                              worker: RecordsWorker, mode: str) -> None:
    gen = publish(stack, table)
    worker.mode = mode
    r = stack.get("/bad")
    assert r.status == 502
    w = table.slot(SLOT).word
    assert kind(w) == FAILED and generation(w) == gen
    assert table.app(ROW).failed == 1


def test_a_refused_connect_is_retried_through_agent_sock(stack: Stack, table: FastPathTable) -> None:
    gen = publish(stack, table, socket_name="nobody-listens.sock")
    r = stack.get("/")
    assert r.status == 200 and r.body.startswith(b"hello from")
    w = table.slot(SLOT).word
    assert kind(w) == FAILED and generation(w) == gen


def test_detach_is_honoured_at_release(stack: Stack, table: FastPathTable, worker: RecordsWorker) -> None:
    gen = publish(stack, table)
    worker.delay = 0.5
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("r", stack.get("/slow")))
    t.start()
    wait_until(lambda: kind(table.slot(SLOT).word) == CLAIMED, what="the claim")
    table.slot(SLOT).word = table.slot(SLOT).word | DETACH
    t.join()
    assert got["r"].status == 200
    wait_until(lambda: kind(table.slot(SLOT).word) != CLAIMED, what="the release")
    w = table.slot(SLOT).word
    assert kind(w) == DETACHED and generation(w) == gen and not flags(w) & DETACH


def test_the_request_time_limit_is_a_504(stack: Stack, table: FastPathTable, worker: RecordsWorker) -> None:
    gen = publish(stack, table, request_time_ms=200)
    worker.delay = 1.0
    r = stack.get("/hang")
    assert r.status == 504
    assert r.body == b"504 Gateway Timeout: the app took longer than 200 ms\n"
    w = table.slot(SLOT).word
    assert w == word(FAILED, 0x20, 0, gen)
    assert table.app(ROW).request_timeouts == 1


class ClosingWorker(RecordsWorker):
    """Answers one request per connection and closes it with its end
    record, as protocol.md §2 allows ("either side may close an idle
    connection at any time")."""

    def serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            frame = read_frame(conn, buf)
            if frame is None:
                return
            self.requests += 1
            body = b"fast " + frame["REQUEST_URI"]
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            conn.sendall(record(response) + END)


def test_a_connection_the_worker_closed_with_its_end_record_is_not_kept(stack: Stack,
                                                                       table: FastPathTable) -> None:
    closing = ClosingWorker(stack.instance, "fp-close.sock", NGINX_USER)
    try:
        publish(stack, table, socket_name="fp-close.sock")
        for i in range(5):
            # A POST once sent is never sent again: a dead kept connection
            # would make it a 502 and fail the slot.
            response = stack.request("POST", f"/close{i}", body=b"x")
            assert (response.status, response.body) == (200, f"fast /close{i}".encode())
            assert kind(table.slot(SLOT).word) == IDLE
            time.sleep(0.05)  # the worker's close has long arrived
        assert closing.requests == 5
    finally:
        closing.close()


def test_a_reload_serves_the_requests_that_wait_and_gives_their_counts_back(stack: Stack, table: FastPathTable,
                                                                          worker: RecordsWorker) -> None:
    gen = publish(stack, table)  # no queue time limit: agent_max_request_queue_time's default
    table.slot(SLOT).word = word(CLAIMED, pid=1, generation=gen)   # held by someone else
    client = socket.create_connection(("127.0.0.1", stack.port), timeout=20)
    try:
        client.sendall(b"GET /waited HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_until(lambda: table.app(ROW).waiting == 1, what="the request to wait")
        old = set(stack.nginx_worker_pids())
        subprocess.run(stack.nginx_command("-s", "reload"), check=True, capture_output=True)
        wait_until(lambda: set(stack.nginx_worker_pids()) - old, what="a new nginx worker")
        time.sleep(0.5)
        # The old worker stays, shutting down, for the request that waits in it.
        assert old <= set(stack.nginx_worker_pids())
        table.slot(SLOT).word = word(IDLE, generation=gen)
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"\r\n\r\nfast /waited" in answer, answer
        wait_until(lambda: not old & set(stack.nginx_worker_pids()), what="the old nginx worker to exit")
        assert table.app(ROW).waiting == 0
    finally:
        client.close()
