"""The fast path's failure cases, on the real stack: nginx's workers claim
app workers in the shared table and talk to them directly
(docs/protocol.md §5). Each test attacks at one moment a real fault comes:
while nginx sends, while a worker is claimed, while the core is gone,
while nginx's workers race, and from an app that writes what it likes on
the connection back to nginx.

The fault suite (test_faults.py) runs on the same path, since the fast path
is on by default: rolling restarts, killed workers, queue and time limits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

from tests.integration import fault_apps
from tests.integration.fastpath_table import FastPathTable
from tests.integration.load import Load
from tests.integration.stack import AppSpec, Stack, running_stack, wait_until

MiB = 1 << 20
# The agent looks at tmp/restart.txt at every tick (docs/directives.md).
CHECK_RESTART_OFTEN = {"agent_stat_throttle_rate": "0"}


def warm_up(stack: Stack, app: AppSpec, workers: int) -> set[int]:
    assert stack.get(app.location).status == 200
    wait_until(lambda: len(stack.worker_pids(app)) == workers, timeout=30, what=f"{workers} workers")
    return stack.worker_pids(app)


def table(stack: Stack) -> FastPathTable:
    return FastPathTable(stack.instance)


def name(stack: Stack, app: AppSpec) -> str:
    """The app's name in the agent (AGENT_APP): its root."""
    return str(stack.app_root(app))


def wait_for_fast_path(stack: Stack, app: AppSpec, workers: int) -> None:
    """Until the app's row is open with `workers` serving slots."""
    wait_until(lambda: len(table(stack).serving_pids(name(stack, app))) == workers, timeout=15,
               what=f"{workers} slots published for {app.name}")


# -- a worker killed while nginx is sending it a request ------------------------

SLOW_READER = """
import os, time

def application(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    if query.startswith("pidfile="):
        with open(query[len("pidfile="):], "w") as f:
            f.write(str(os.getpid()))
        stream = environ["wsgi.input"]
        while stream.read(16384):
            time.sleep(0.05)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", body.decode())])
    return [body]
"""


def test_worker_killed_while_nginx_sends_the_body_gives_502_and_the_next_request_is_served() -> None:
    app = AppSpec("slowread", SLOW_READER, "/", directives={"agent_min_instances": "1", "agent_max_instances": "1"})
    with running_stack([app]) as stack:
        warm_up(stack, app, 1)
        wait_for_fast_path(stack, app, 1)
        failed_before = table(stack).failed(name(stack, app))
        pidfile = stack.scratch / "reader.pid"
        outcome: dict[str, object] = {}

        def upload() -> None:
            try:
                outcome["response"] = stack.request("POST", f"/?pidfile={pidfile}", body=b"x" * (16 * MiB),
                                                    timeout=60)
            except OSError as e:
                outcome["error"] = e

        sender = threading.Thread(target=upload)
        sender.start()
        wait_until(pidfile.exists, timeout=20, what="the worker to start reading the body")
        victim = int(pidfile.read_text())
        # The worker reads 16 KiB every 50 ms: nginx is blocked writing the rest.
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        sender.join(60)
        assert not sender.is_alive()
        assert "error" not in outcome, outcome
        response = outcome["response"]
        # Part of the request reached the worker: it is not sent again.
        assert response.status == 502, response  # type: ignore[attr-defined]
        # nginx answered it on the fast path, and counted it for the status.
        assert table(stack).failed(name(stack, app)) == failed_before + 1
        for _ in range(10):
            again = stack.get("/")
            assert again.status == 200 and int(again.body) != victim
        assert "exited on signal" not in stack.error_log.read_text()


def test_idle_worker_killed_under_a_kept_connection_costs_no_request() -> None:
    app = AppSpec("idlekill", fault_apps.PID_SLEEP, "/",
                  directives={"agent_min_instances": "2", "agent_max_instances": "2"})
    with running_stack([app]) as stack:
        workers = warm_up(stack, app, 2)
        wait_for_fast_path(stack, app, 2)
        # Both workers serve nginx at once: nginx keeps a connection to each.
        with Load(stack.port, "/?sleep=0.05", threads=2, max_requests=400, duration=30) as load:
            wait_until(lambda: workers <= load.pids_seen(), what="both workers to serve")
        assert load.result.failed() == 0, load.result.summary()
        statuses: Counter[int] = Counter()
        for victim in sorted(workers):
            os.kill(victim, signal.SIGKILL)
            # At once: its slot may still read IDLE and nginx's kept
            # connection to it is dead; the request must be sent again.
            for _ in range(20):
                statuses[stack.get("/").status] += 1
        assert statuses == Counter({200: 40}), statuses


# -- a worker detached while its request is claimed ------------------------------


def test_worker_detached_while_claimed_finishes_its_request_then_stops() -> None:
    app = AppSpec("detach", fault_apps.PID_SLEEP, "/",
                  directives={"agent_min_instances": "1", "agent_max_instances": "1"})
    with running_stack([app], CHECK_RESTART_OFTEN) as stack:
        (old,) = warm_up(stack, app, 1)
        wait_for_fast_path(stack, app, 1)
        outcome: dict[str, object] = {}

        def long_request() -> None:
            outcome["response"] = stack.get("/?sleep=3", timeout=30)

        holder = threading.Thread(target=long_request)
        holder.start()
        wait_until(lambda: table(stack).claimed_by_nginx(old), what="nginx to claim the worker")
        tmp = stack.app_root(app) / "tmp"
        tmp.mkdir(exist_ok=True)
        (tmp / "restart.txt").touch()
        # The engine cannot take a claimed worker: it marks it, and the
        # claimant's release stores DETACHED.
        wait_until(lambda: table(stack).detach_requested(old), timeout=10, what="the DETACH mark")
        assert old in stack.worker_pids(app)
        holder.join(30)
        response = outcome["response"]
        assert response.status == 200 and int(response.body) == old  # type: ignore[attr-defined]
        wait_until(lambda: old not in stack.worker_pids(app), timeout=15, what="the old worker to stop")
        new = stack.get("/")
        assert new.status == 200 and int(new.body) != old


def test_rolling_restarts_under_fast_path_load_lose_nothing() -> None:
    app = AppSpec("rolling2", fault_apps.PID_SLEEP, "/",
                  directives={"agent_min_instances": "2", "agent_max_instances": "2"})
    with running_stack([app], CHECK_RESTART_OFTEN, nginx_workers=2) as stack:
        warm_up(stack, app, 2)
        wait_for_fast_path(stack, app, 2)
        with Load(stack.port, "/?sleep=0.002", threads=6, max_requests=200_000, duration=90) as load:
            for _ in range(3):
                current = stack.worker_pids(app)
                tmp = stack.app_root(app) / "tmp"
                tmp.mkdir(exist_ok=True)
                (tmp / "restart.txt").touch()
                wait_until(lambda c=current: not stack.worker_pids(app) & c and len(stack.worker_pids(app)) == 2,
                           timeout=45, what="the workers replaced")
        result = load.result
        assert result.failed() == 0, result.summary()
        assert result.ok() > 500, result.summary()


# -- the core killed while nginx serves on the fast path -------------------------


def test_core_killed_during_the_fast_path_refuses_nothing_and_a_new_epoch_serves() -> None:
    app = AppSpec("fpcore", fault_apps.PID_SLEEP, "/",
                  directives={"agent_min_instances": "2", "agent_max_instances": "2"})
    with running_stack([app]) as stack:
        warm_up(stack, app, 2)
        wait_for_fast_path(stack, app, 2)
        epoch = table(stack).epoch
        old_core = stack.core_pid()
        with Load(stack.port, "/?sleep=0.002", threads=4, max_requests=100_000, duration=60) as load:
            target = load.completed() + 200
            wait_until(lambda: load.completed() >= target, what="load on the fast path")
            os.kill(old_core, signal.SIGKILL)
            wait_until(lambda: table(stack).epoch == epoch + 1, timeout=20, what="a new core's epoch")
            wait_for_fast_path(stack, app, 2)
            target = load.completed() + 200
            wait_until(lambda: load.completed() >= target, timeout=30, what="load after the new core")
        result = load.result
        assert result.errors["refused"] == 0, result.summary()
        # agent.sock never refused nginx (a dead worker's socket may: the
        # request then went through agent.sock, and nothing failed).
        assert not [line for line in stack.error_log.read_text().splitlines()
                    if "Connection refused" in line and "agent.sock" in line]
        # Only requests a dying worker held can fail: two workers, one request each.
        assert result.failed() <= 2, result.summary()
        new_workers = stack.worker_pids(app)
        assert table(stack).serving_pids(name(stack, app)) == new_workers


# -- nginx's workers racing for the last idle worker -----------------------------


def test_four_nginx_workers_racing_for_one_worker_lose_no_request_and_claims_add_up() -> None:
    app = AppSpec("race", fault_apps.PID_SLEEP, "/",
                  directives={"agent_min_instances": "1", "agent_max_instances": "1",
                              "agent_max_request_queue_size": "0"})
    with running_stack([app], nginx_workers=4) as stack:
        (only,) = warm_up(stack, app, 1)
        wait_for_fast_path(stack, app, 1)
        before = table(stack).claims(name(stack, app))
        requests = 1200
        result = Load(stack.port, "/", threads=16, max_requests=requests, duration=120,
                      keep_alive=False).start().join()
        assert result.statuses == Counter({200: requests}), result.summary()
        assert result.pids == Counter({only: requests}), result.summary()
        assert table(stack).claims(name(stack, app)) - before == requests
        assert len(set(stack.nginx_worker_pids())) == 4


# -- an app worker that writes garbage on the way back ---------------------------

RAW_WRITER = """
import os, struct

RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nX-Pid: %d\\r\\n\\r\\nraw" % os.getpid()

def application(environ, start_response):
    mode = environ.get("QUERY_STRING", "")
    # Hostile app code: it finds its connection to nginx (the request has a
    # body, so the input stream holds it) and writes to it.
    sock = environ["wsgi.input"]._sock
    if mode == "garbage":
        sock.sendall(b"GARBAGE, not records\\r\\n\\r\\n")
    elif mode == "after-end":
        sock.sendall(struct.pack(">I", len(RESPONSE)) + RESPONSE + b"\\0\\0\\0\\0" + b"EXTRA BYTES")
    elif mode == "not-http":
        sock.sendall(struct.pack(">I", 12) + b"SSH-2.0-evil")
    elif mode == "eof":
        sock.sendall(struct.pack(">I", 100) + b"HTTP/1.1 200 OK\\r\\n")
        os._exit(3)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", body.decode())])
    return [body]
"""


@pytest.mark.parametrize(("mode", "statuses"), [
    ("garbage", {502}),
    ("not-http", {502}),
    ("eof", {502}),
    # The response before the end record is whole; what follows it is not.
    ("after-end", {200, 502}),
])
def test_garbage_from_an_app_worker_is_refused_and_the_worker_replaced(mode: str, statuses: set[int]) -> None:
    app = AppSpec("raw", RAW_WRITER, "/", directives={"agent_min_instances": "1", "agent_max_instances": "1"})
    with running_stack([app]) as stack:
        (old,) = warm_up(stack, app, 1)
        wait_for_fast_path(stack, app, 1)
        response = stack.request("POST", f"/?{mode}", body=b"x")
        assert response.status in statuses, response
        if response.status == 200:
            assert response.body == b"raw"
        # The worker broke the protocol: it is given up and replaced.
        wait_until(lambda: old not in stack.worker_pids(app) and len(stack.worker_pids(app)) == 1,
                   timeout=20, what="the worker replaced")
        for _ in range(10):
            again = stack.get("/")
            assert again.status == 200 and int(again.body) != old
        assert "exited on signal" not in stack.error_log.read_text()
