"""Threaded WSGI workers (agent_concurrency_model thread, agent_thread_count
N) on the real stack: one worker serves N requests at once, the queue and
status count its threads, a request over the time limit takes the worker
and its other requests with it, and SIGTERM lets requests in flight finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from tests.integration.stack import REPO, AppSpec, Response, Stack, alive, gone, running_stack, wait_until

# /hold waits until the file named "release" appears in the app's root (its
# cwd) and answers with its pid, its thread and wsgi.multithread; /together
# first waits for THREADS requests to be in the app at once (each then holds
# a thread of its own), then does as /hold; /hang sleeps past any limit here.
THREADS = 4
THREADED_SOURCE = f"""
import os
import threading
import time

meeting = threading.Barrier({THREADS})

def application(environ, start_response):
    if environ["PATH_INFO"] == "/together":
        meeting.wait(60)
    if environ["PATH_INFO"] in ("/hold", "/together"):
        deadline = time.monotonic() + 60
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.01)
    elif environ["PATH_INFO"] == "/hang":
        time.sleep(120)
    body = "%d %d %s" % (os.getpid(), threading.get_ident(), environ["wsgi.multithread"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
"""


def threaded_app(spawn_method: str = "smart", **directives: str) -> AppSpec:
    return AppSpec("threaded", THREADED_SOURCE, "/", directives={
        "agent_concurrency_model": "thread", "agent_thread_count": str(THREADS), "agent_max_instances": "1",
        "agent_min_instances": "1", "agent_spawn_method": spawn_method, **directives})


def app_status(stack: Stack) -> dict[str, Any]:
    import json

    result = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), "status", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)["pool"]["apps"][0]
    return document


def serving(stack: Stack) -> dict[str, Any]:
    """The app's one serving process in the status document."""
    processes = [p for p in app_status(stack)["processes"] if p["state"] in ("idle", "serving")]
    assert len(processes) == 1, processes
    return processes[0]


def release(stack: Stack, app: AppSpec) -> None:
    (stack.app_root(app) / "release").write_text("")


def send(pool: ThreadPoolExecutor, stack: Stack, path: str, count: int) -> list[Future[Response]]:
    return [pool.submit(stack.get, path, timeout=90) for _ in range(count)]


@pytest.mark.parametrize("spawn_method", ["smart", "direct"])
def test_one_worker_serves_its_thread_count_at_once_and_the_rest_wait_in_the_queue(spawn_method: str) -> None:
    app = threaded_app(spawn_method)
    with running_stack([app]) as stack, ThreadPoolExecutor(THREADS + 1) as pool:
        assert stack.get("/").status == 200
        held = send(pool, stack, "/together", THREADS)
        wait_until(lambda: serving(stack)["sessions"] == THREADS, timeout=30, what=f"{THREADS} sessions on one worker")
        process = serving(stack)
        assert process["concurrency"] == THREADS
        # One more finds every thread busy and max_instances reached: it waits.
        extra = send(pool, stack, "/hold", 1)
        wait_until(lambda: app_status(stack)["queue_length"] == 1, timeout=30, what="the fifth request queued")
        document = app_status(stack)
        assert (document["concurrency_model"], document["worker_concurrency"]) == ("thread", THREADS)
        text = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), "status"],
                              cwd=REPO, capture_output=True, text=True, timeout=60).stdout
        assert f"{THREADS} threads per process" in text and f" {THREADS}/{THREADS} " in text, text
        release(stack, app)
        answers = [f.result() for f in held + extra]
    assert [a.status for a in answers] == [200] * (THREADS + 1), [a.text for a in answers]
    pids = {a.text.split()[0] for a in answers}
    threads = {a.text.split()[1] for a in answers[:THREADS]}
    assert pids == {str(process["pid"])}
    assert len(threads) == THREADS
    assert {a.text.split()[2] for a in answers} == {"True"}


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_a_request_over_the_time_limit_kills_the_worker_and_its_other_requests_get_502(fast_path: str) -> None:
    """The worker's other requests: 502 on the engine's path; on nginx's
    direct path nginx's rule first sends a GET with no byte of an answer
    once more through agent.sock (a POST gets its 502)."""
    app = threaded_app(agent_max_request_time="4s", agent_fast_path=fast_path)
    with running_stack([app]) as stack, ThreadPoolExecutor(THREADS) as pool:
        assert stack.get("/").status == 200
        before = app_status(stack)
        victim = serving(stack)["pid"]
        hang = pool.submit(stack.get, "/hang", timeout=90)
        wait_until(lambda: serving(stack)["sessions"] == 1, timeout=30, what="the hanging request")
        # Younger by 2 s, so that the hanging request reaches the limit first.
        time.sleep(2)
        posted = pool.submit(stack.request, "POST", "/hold", b"x", timeout=90)
        got = pool.submit(stack.get, "/hold", timeout=90)
        wait_until(lambda: serving(stack)["sessions"] == 3, timeout=30, what="three requests in the worker")
        assert hang.result().status == 504
        answer = posted.result()
        assert answer.status == 502, answer.text
        if fast_path == "off":  # nginx's own 502 page on its direct path
            assert f"the app worker (pid {victim}) failed before responding" in answer.text
        wait_until(lambda: not psutil.pid_exists(victim), timeout=30, what="the worker killed")
        if fast_path == "on":
            release(stack, app)
            again = got.result()
            assert again.status == 200 and again.text.split()[0] != str(victim), again.text
        else:
            assert got.result().status == 502
        # nginx's counts reach the status at the engine's next sweep.
        failed = 1 if fast_path == "on" else 2
        wait_until(lambda: app_status(stack)["failed"] - before["failed"] == failed, timeout=10,
                   what="the 502s counted")
        after = app_status(stack)
        assert after["request_timeouts"] - before["request_timeouts"] == 1
        assert after["failed"] - before["failed"] == failed
        release(stack, app)
        again = stack.get("/hold")
        assert again.status == 200 and again.text.split()[0] != str(victim)


def test_sigterm_lets_the_requests_in_flight_finish_before_the_worker_exits() -> None:
    app = threaded_app(agent_min_instances="1")
    with running_stack([app]) as stack, ThreadPoolExecutor(THREADS) as pool:
        assert stack.get("/").status == 200
        pid = serving(stack)["pid"]
        held = send(pool, stack, "/hold", 3)
        wait_until(lambda: serving(stack)["sessions"] == 3, timeout=30, what="three requests in flight")
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)  # the worker has the signal and is waiting for its threads
        assert alive(pid)
        release(stack, app)
        answers = [f.result() for f in held]
        assert [a.status for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert {a.text.split()[0] for a in answers} == {str(pid)}
        wait_until(lambda: gone(pid),
                   timeout=30, what="the worker to exit")
        assert stack.get("/").status == 200


# App code runs before the loader's handshake and may write its own line.
BOASTFUL_SOURCE = """
import os
os.write(4, b'{"status": "ready", "pid": %d, "concurrency": 1024}\\n' % os.getpid())
""" + THREADED_SOURCE


def test_a_worker_that_claims_more_threads_gets_no_more_requests_than_its_app_allows() -> None:
    app = threaded_app("direct", agent_thread_count="2")
    app.source = BOASTFUL_SOURCE
    with running_stack([app]) as stack:
        assert stack.get("/").status == 200
        assert serving(stack)["concurrency"] == 2


def test_a_client_that_leaves_frees_its_session_at_once_and_the_worker_serves_on() -> None:
    app = threaded_app()
    with running_stack([app]) as stack:
        assert stack.get("/").status == 200
        pid = serving(stack)["pid"]
        conn = stack.connection()
        conn.request("GET", "/hold")
        wait_until(lambda: serving(stack)["sessions"] == 1, timeout=30, what="the request on a thread")
        conn.close()
        # Its connection to the worker is closed rather than read to the
        # end: the session ends while the app still holds the request.
        wait_until(lambda: serving(stack)["sessions"] == 0, timeout=30, what="the session to end")
        release(stack, app)
        answer = stack.get("/hold")
        assert answer.status == 200 and answer.text.split()[0] == str(pid)
        assert "kept a response going after nginx went away" not in stack.agent_log()
