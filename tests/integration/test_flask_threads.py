"""examples/flask-threads: a Flask app in its own virtualenv, served by one
threaded worker process per few threads, through nginx and the agent: its
threads serve requests at once, its server-sent events reach a real client
as they are written, and the fault scenarios count what they lose.

The virtualenv is `make flask-venv`'s (build/flask-venv, which `make test`
makes), copied where the workers' user can read it; without it the test
makes one with examples/flask-threads/make-venv.sh (pip needs PyPI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.integration.load import losses_under_fault
from tests.integration.stack import REPO, AppSpec, Stack, example_venv, running_stack, unsanitized_env, wait_until

EXAMPLE = REPO / "examples" / "flask-threads"
BUILT_VENV = REPO / "build" / "flask-venv"
THREADS = 8


@pytest.fixture(scope="module")
def venv_python() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="agent-flask-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield example_venv(EXAMPLE, BUILT_VENV, root / "venv")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def flask_app(python: str, location: str = "/", **directives: str) -> AppSpec:
    return AppSpec("flask", (EXAMPLE / "wsgi.py").read_text(), location, python=python, directives={
        "agent_concurrency_model": "thread", "agent_thread_count": str(THREADS), **directives})


def test_one_worker_s_threads_serve_the_app_at_once(venv_python: str) -> None:
    app = flask_app(venv_python, agent_min_instances="1", agent_max_instances="1")
    with running_stack([app]) as stack, ThreadPoolExecutor(THREADS) as pool:
        assert stack.get("/").text == "Hello from Flask\n"
        # Answered only once all of them are in the worker at the same time.
        answers = list(pool.map(lambda _: stack.get(f"/together?n={THREADS}", timeout=60), range(THREADS)))
        assert [a.status for a in answers] == [200] * THREADS, [a.text for a in answers]
        bodies = [json.loads(a.body) for a in answers]
        assert len({b["pid"] for b in bodies}) == 1
        assert len({b["thread"] for b in bodies}) == THREADS
        quote = json.loads(stack.get("/api/quote").body)
        assert quote["multithread"] is True


def test_server_sent_events_reach_curl_as_they_are_written(venv_python: str) -> None:
    directives = {"agent_max_request_time": "1s"}
    apps = [flask_app(venv_python, **directives), flask_app(venv_python, "/events", **directives,
                                                            agent_long_responses="on")]
    with running_stack(apps) as stack:
        curl = subprocess.Popen(["curl", "-sN", f"http://127.0.0.1:{stack.port}/events?count=10&interval=0.3"],
                                stdout=subprocess.PIPE, env=unsanitized_env())
        assert curl.stdout is not None
        try:
            events = []
            for line in curl.stdout:
                if line.startswith(b"data: {"):
                    events.append(json.loads(line[6:]))
                    # The app sleeps 0.3 s between events: this one came
                    # before the app wrote the rest.
                    if len(events) == 1:
                        assert curl.poll() is None
                if line == b"data: bye\n":
                    break
        finally:
            curl.kill()
            curl.wait()
        # Ten events over 3 s, past the 1 s request time limit.
        assert [e["n"] for e in events] == list(range(10))


def count_lost(stack: Stack, fault: Callable[[], object]) -> tuple[int, int, dict[int, int]]:
    """(answered, failed, the failed statuses) of a load on 16 connections
    through fault() (tests/integration/load.py)."""
    result = losses_under_fault(stack.port, "/api/quote?wait=0.02", fault, "flask threads")
    return result.ok(), result.failed(), dict(result.failed_statuses())


def test_a_worker_killed_under_load_loses_only_the_requests_on_its_threads(venv_python: str) -> None:
    app = flask_app(venv_python, agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack:
        assert stack.get("/").status == 200
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=30, what="2 workers")
        victim = min(stack.worker_pids(app))
        answered, failed, statuses = count_lost(stack, lambda: os.kill(victim, signal.SIGKILL))
        assert answered > 0
        # What a worker had on its threads is lost with it, and nothing else.
        assert failed <= THREADS, statuses
        assert set(statuses) <= {502}, statuses
        wait_until(lambda: len(stack.worker_pids(app)) == 2 and victim not in stack.worker_pids(app),
                   timeout=30, what="the worker replaced")


def test_a_rolling_restart_under_load_loses_nothing(venv_python: str) -> None:
    app = flask_app(venv_python, agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack:
        assert stack.get("/").status == 200
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=30, what="2 workers")
        before = stack.worker_pids(app)
        restart = [REPO / ".venv" / "bin" / "python", "-m", "agent.cli", "--instance", str(stack.instance),
                   "restart-app", str(stack.app_root(app)), "--blocking"]
        answered, failed, statuses = count_lost(
            stack, lambda: subprocess.run(restart, cwd=REPO, check=True, capture_output=True, timeout=120))
        assert answered > 0 and failed == 0, statuses
        wait_until(lambda: not stack.worker_pids(app) & before, timeout=30, what="the old workers to exit")


def test_the_memory_limit_replaces_a_threaded_worker_and_loses_nothing(venv_python: str) -> None:
    app = flask_app(venv_python, agent_min_instances="1", agent_max_instances="1", agent_memory_limit="80")
    with running_stack([app]) as stack:
        first = int(stack.get("/grow").text)
        grown = {first}

        def leak() -> None:
            for _ in range(4):  # 80 MB more than the worker had: over the limit
                grown.add(int(stack.get("/grow").text))

        answered, failed, statuses = count_lost(stack, leak)
        assert answered > 0 and failed == 0, statuses
        wait_until(lambda: not psutil.pid_exists(first), timeout=30, what="the grown worker replaced")
        assert "memory limit" in stack.agent_log()
