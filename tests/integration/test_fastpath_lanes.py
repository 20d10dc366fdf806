"""nginx's direct path to workers that serve many requests at once (lanes,
csrc/fastpath.h): an ASGI worker of concurrency N has min(N, 128) slots in
the table, each one request's place; nginx claims them as it claims a
worker of one request, and the engine takes the rest of the concurrency
(engine_spare). On the real stack: the first lane of every worker is
claimed before any second one, and requests one at a time stay on one
worker; a WebSocket is a tunnel on its lane that the
request time limit does not cut; its connection is never kept; concurrency
past the lanes goes through the engine; a threaded worker's lanes carry its
requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from websockets.sync.client import ClientConnection, connect

from tests.integration import apps, websocket_apps
from tests.integration.fastpath_table import (
    CLAIMED,
    IDLE,
    LANES,
    UNTIMED,
    FastPathTable,
    flags,
    kind,
    pid_of,
)
from tests.integration.stack import AppSpec, Stack, running_stack, wait_until
from tests.integration.test_agentctl import agentctl
from tests.integration.test_threads import THREADED_SOURCE, app_status, release


def asgi_app(**directives: str) -> AppSpec:
    return AppSpec("lanes", websocket_apps.APP, "/", startup_file="main.py",
                   directives={"agent_app_type": "asgi", **directives})


@contextlib.contextmanager
def table_of(stack: Stack) -> Iterator[FastPathTable]:
    table = FastPathTable(stack.instance)
    try:
        yield table
    finally:
        table.close()


def client(stack: Stack, path: str) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{stack.port}{path}", proxy=None, open_timeout=30)


def opened_by(stack: Stack, name: str) -> int:
    """The pid of the worker whose app took the WebSocket `name` (its marker)."""
    path = stack.scratch / f"{name}-open"
    # The app writes the file after it creates it: wait for its pid.
    wait_until(lambda: path.exists() and path.read_text().strip() != "", timeout=30, what=f"the app holding {name}")
    return int(path.read_text())


def lane_words(table: FastPathTable, name: str) -> list[int]:
    return [int(s.word) for s in table.app_slots(name)]


def nginx_claims(table: FastPathTable, name: str) -> list[int]:
    engine = int(table.t.header.engine_pid)
    return [w for w in lane_words(table, name) if kind(w) == CLAIMED and pid_of(w) != engine]


def test_every_workers_first_lane_is_claimed_before_any_second_one() -> None:
    app = asgi_app(agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack, table_of(stack) as table:
        assert stack.get("/").status == 200
        wait_until(lambda: len(stack.worker_pids()) == 2, timeout=30, what="two workers")
        name = str(stack.app_root(app))
        lanes = min(100, LANES)  # agent_concurrency's default: 100
        # A worker is listed once spawned; its lanes come when it is ready.
        wait_until(lambda: len(table.app_slots(name)) == 2 * lanes, timeout=30, what="both workers' lanes")
        assert table.app(table.row_of(name) or 0).engine_spare == 2 * (100 - lanes)
        with client(stack, "/hold?name=first"), client(stack, "/hold?name=second"):
            owners = {opened_by(stack, "first"), opened_by(stack, "second")}
            assert owners == stack.worker_pids()
            assert len(nginx_claims(table, name)) == 2  # both through nginx's direct path


def test_requests_one_at_a_time_stay_on_one_warm_worker() -> None:
    """The claim takes the first IDLE slot: with one request at a time the
    same worker serves them all, the other stays idle (docs/design.md: at
    one connection that beat taking turns by 19 % in requests a second)."""
    app = AppSpec("hello", apps.HELLO, "/", directives={"agent_min_instances": "2", "agent_max_instances": "2"})
    with running_stack([app]) as stack, table_of(stack) as table:
        assert stack.get("/").status == 200
        name = str(stack.app_root(app))
        wait_until(lambda: len(table.serving_pids(name)) == 2, timeout=30, what="both workers on the fast path")
        answers = [stack.get("/").text for _ in range(8)]
        assert all(a.startswith("hello from ") for a in answers), answers
        assert len(set(answers)) == 1, answers
        assert table.claims(name) >= 8


def test_a_websocket_on_a_lane_outlives_the_request_time_limit_and_its_connection_is_not_kept() -> None:
    app = asgi_app(agent_max_instances="1", agent_max_request_time="2s")
    with running_stack([app]) as stack, table_of(stack) as table:
        assert stack.get("/").status == 200
        (pid,) = stack.worker_pids()
        name = str(stack.app_root(app))
        before = app_status(stack)
        with client(stack, "/echo?name=long") as ws:
            ws.send("first")
            assert ws.recv(timeout=10) == "first"
            (word,) = nginx_claims(table, name)
            assert flags(word) & UNTIMED  # the tunnel's claim: no time limit
            time.sleep(3.5)  # past the 2 s limit and the engine's sweeps
            ws.send("later")
            assert ws.recv(timeout=10) == "later"
        wait_until(lambda: all(kind(w) == IDLE for w in lane_words(table, name)), timeout=10,
                   what="the lane back to IDLE")
        after = app_status(stack)
        assert stack.worker_pids() == {pid}
        assert after["request_timeouts"] == before["request_timeouts"]
        # The tunnel's connection ended with it: the lane's next request
        # opens a new one, and is served.
        for _ in range(3):
            answer = stack.get("/")
            assert answer.status == 200 and answer.text == f"plain http, pid {pid}"


def test_concurrency_past_the_lanes_goes_through_the_engine() -> None:
    app = asgi_app(agent_max_instances="1", agent_concurrency=str(LANES + 2))
    with running_stack([app]) as stack, table_of(stack) as table, ThreadPoolExecutor(1) as pool:
        assert stack.get("/").status == 200
        name = str(stack.app_root(app))
        row = table.app(table.row_of(name) or 0)
        assert row.engine_spare == 2
        with contextlib.ExitStack() as opened:
            for n in range(LANES + 2):
                opened.enter_context(client(stack, f"/hold?name=h{n}"))
                opened_by(stack, f"h{n}")
            assert len(nginx_claims(table, name)) == LANES
            assert row.engine_spare == 0
            status = app_status(stack)
            assert [p["sessions"] for p in status["processes"] if p["state"] == "serving"] == [LANES + 2]
            # One more: every lane nginx's and the engine's room taken. It waits.
            extra = pool.submit(client, stack, "/hold?name=extra")
            wait_until(lambda: app_status(stack)["queue_length"] == 1, timeout=30, what="the extra one waiting")
            assert not (stack.scratch / "extra-called").exists()
        # The others closed: the waiting one is served.
        with extra.result(timeout=30):
            opened_by(stack, "extra")


def test_a_threaded_workers_requests_take_its_lanes() -> None:
    app = AppSpec("threads", THREADED_SOURCE, "/", directives={
        "agent_concurrency_model": "thread", "agent_thread_count": "4", "agent_min_instances": "1",
        "agent_max_instances": "1"})
    with running_stack([app]) as stack, table_of(stack) as table, ThreadPoolExecutor(4) as pool:
        assert stack.get("/").status == 200
        name = str(stack.app_root(app))
        assert len(table.app_slots(name)) == 4
        claims = table.claims(name)
        held = [pool.submit(stack.get, "/hold", timeout=60) for _ in range(4)]
        wait_until(lambda: len(nginx_claims(table, name)) == 4, timeout=30, what="four lanes claimed by nginx")
        assert app_status(stack)["processes"][0]["sessions"] == 4
        listed = agentctl(stack, "requests").stdout
        assert listed.count("/hold") == 4, listed  # the in-flight view lists each lane's request
        release(stack, app)
        answers = [f.result() for f in held]
        assert [a.status for a in answers] == [200] * 4
        assert len({a.text.split()[1] for a in answers}) == 4  # four threads
        assert table.claims(name) - claims == 4
