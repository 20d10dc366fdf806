"""The benchmark's agent stacks against the real nginx and module: a spawn
method nginx refuses is reported as not available, never run; the threads
part's agent stack runs workers that serve stacks.THREADS requests at once;
the threads report takes each figure's median round and judges the bar;
the asgi part's agent stack serves bench/apps/asgi.py on event-loop
workers."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.stack import NGINX, REPO, free_port, wait_until

sys.path.insert(0, str(REPO / "bench"))
import threads_report
from figures import Run, StackResult
from run import HELLO_BODY, websocket_handshake
from stacks import (
    ASGI_CONCURRENCY,
    THREADS,
    AgentAsgiStack,
    AgentStack,
    AgentThreadStack,
    Buffers,
    SpawnMethodUnavailable,
    http_fetch,
)

# /hold waits until the file "release" appears in the app's directory (its
# cwd), then answers with the thread that served it.
HOLDING_APP = """
import os
import threading
import time

# Requests meet here before they wait for "release": with THREADS of them
# in the worker at once, each holds a thread of its own.
meeting = threading.Barrier(%d)

def application(environ, start_response):
    if environ["PATH_INFO"] == "/hold":
        meeting.wait(60)
        deadline = time.monotonic() + 60
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.01)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(threading.get_ident()).encode()]
"""


@pytest.fixture
def run_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agent-bench-it-", dir="/tmp"))
    (root / "app").mkdir()
    (root / "app" / "wsgi.py").write_text("def application(environ, start_response):\n    return []\n")
    (root / "run").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_spawn_method_nginx_refuses_is_not_available(run_dir: Path) -> None:
    stack = AgentStack(run_dir / "run", free_port(), run_dir / "app", 1, Buffers(), NGINX, REPO, sys.executable,
                       "/usr/bin/python3", worker_count=1, spawn_method="bogus")
    with pytest.raises(SpawnMethodUnavailable, match="agent_spawn_method bogus"):
        stack.start()
    assert stack.processes == []      # nothing was started
    config = (run_dir / "run" / "nginx.conf").read_text()
    assert "agent_enabled on;\n            agent_spawn_method bogus;" in config


def test_the_threaded_agent_stack_serves_threads_requests_at_once_in_one_worker(run_dir: Path) -> None:
    (run_dir / "app" / "wsgi.py").write_text(HOLDING_APP % THREADS)
    for path in (run_dir, run_dir / "app", run_dir / "run"):
        path.chmod(0o755)     # the workers run as nobody
    (run_dir / "app" / "wsgi.py").chmod(0o644)
    stack = AgentThreadStack(run_dir / "run", free_port(), run_dir / "app", 1, Buffers(), NGINX, REPO,
                             sys.executable, "/usr/bin/python3", worker_count=1)
    assert f" --concurrency-model thread --thread-count {THREADS} " in " ".join(stack.serve_command())
    try:
        stack.start()
        stack.wait_ready()
        [worker] = stack.pool_processes()
        assert worker["concurrency"] == THREADS
        with ThreadPoolExecutor(THREADS) as pool:
            answers = [pool.submit(http_fetch, stack.port, "/hold", 60.0) for _ in range(THREADS)]
            wait_until(lambda: [p["sessions"] for p in stack.pool_processes()] == [THREADS], timeout=30,
                       what=f"one worker serving {THREADS} requests at once")
            (run_dir / "app" / "release").touch()
            got = [answer.result(timeout=60) for answer in answers]
        assert [status for status, _ in got] == [200] * THREADS
        assert len({body for _, body in got}) == THREADS      # each on a thread of its own
    finally:
        stack.stop()
    assert stack.survivors() == []


def sleep_run(connections: int, rate: float) -> Run:
    return Run("sleep", connections, rate, 0.01, 0.02, int(rate * 10), 0, 1.0)


def test_the_threads_report_takes_the_median_round_and_judges_the_bar() -> None:
    bar = threads_report.bar_rate()
    assert bar == pytest.approx(0.9 * THREADS * 2 * 100)
    ours = StackResult("ours", AgentThreadStack.label,
                       runs=[sleep_run(16, bar + 100), sleep_run(16, bar - 500), sleep_run(16, bar + 10),
                             sleep_run(64, bar - 1), sleep_run(64, bar + 200), sleep_run(64, bar - 300)])
    peer = StackResult("uwsgi", "nginx→uWSGI threads", runs=[sleep_run(16, (bar + 10) / 2), sleep_run(64, bar)])
    median = threads_report.median_run(ours, 16)
    assert median is not None and median.rate == bar + 10
    rates = threads_report.rate_table([ours, peer], [16, 32, 64])
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in rates.splitlines()[2:]}
    assert set(rows) == {"16", "64"}      # 32 did not run
    assert rows["16"] == [f"{bar + 10:,.0f}", f"{(bar + 10) / 2:,.0f}", "2.00", "meets the bar"]
    assert rows["64"] == [f"{bar - 1:,.0f}", f"{bar:,.0f}", f"{(bar - 1) / bar:.2f}", "misses the bar"]
    assert "misses the bar" in threads_report.bars_table([ours, peer], [16, 64])
    assert "meets the bar" in threads_report.bars_table([ours, peer], [16])


def test_the_asgi_agent_stack_serves_the_bench_app_on_event_loop_workers(run_dir: Path) -> None:
    shutil.copy(REPO / "bench" / "apps" / "asgi.py", run_dir / "app" / "asgi.py")
    for path in (run_dir, run_dir / "app", run_dir / "run"):
        path.chmod(0o755)     # the workers run as nobody
    (run_dir / "app" / "asgi.py").chmod(0o644)
    stack = AgentAsgiStack(run_dir / "run", free_port(), run_dir / "app", 1, Buffers(), NGINX, REPO,
                           sys.executable, "/usr/bin/python3", worker_count=1)
    try:
        stack.start()
        stack.wait_ready()
        [worker] = stack.pool_processes()
        assert worker["concurrency"] == ASGI_CONCURRENCY
        stack.check_answers({"/": HELLO_BODY})
        assert http_fetch(stack.port, "/nothing-here") == (404, b"not found\n")
        # The echo's /ws upgrades, and the stack goes on serving requests.
        assert websocket_handshake(stack.port, "/ws") == "HTTP/1.1 101 Switching Protocols"
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: http_fetch(stack.port, "/"), range(32)))
        assert got == [(200, HELLO_BODY)] * 32
        stack.check_running()
    finally:
        stack.stop()
    assert stack.survivors() == []
