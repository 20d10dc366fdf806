"""examples/shared-state on the real stack: 4 workers, a real redis-server.

The app counts each visit in a module-level variable and in Redis. The
tests show what process isolation means for state: each worker's count is
its own share (they diverge, and add up to the requests answered), while
Redis's count is exact, through a rolling restart and worker kills too
(docs/shared-state.md quotes the figures these tests print).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.load import Load, LoadResult
from tests.integration.stack import APP_PYTHON, REPO, AppSpec, Stack, wait_until
from tests.integration.stores import RedisServer, app_virtualenv, redis_server

EXAMPLE = REPO / "examples" / "shared-state" / "wsgi.py"
WORKERS = 4
KEY = "visits"


def report(test: str, **figures: object) -> None:
    print(f"\n[{test}] " + " ".join(f"{k}={v}" for k, v in figures.items()))


class VenvStack(Stack):
    """A Stack whose app runs under the given interpreter (a virtualenv)."""

    def __init__(self, root: Path, apps: list[AppSpec], python: Path) -> None:
        super().__init__(root, apps)
        self.python = python

    def location_block(self, app: AppSpec) -> str:
        return super().location_block(app).replace(f"agent_python {APP_PYTHON};", f"agent_python {self.python};")


@dataclass
class Answers:
    """The JSON bodies of the 200 responses: which worker, its own count,
    Redis's count."""

    local: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    shared: list[int] = field(default_factory=list)

    def add(self, body: bytes) -> None:
        answer = json.loads(body)
        self.local[answer["pid"]].append(answer["local"])
        self.shared.append(answer["redis"])

    def last_per_pid(self) -> dict[int, int]:
        return {pid: max(counts) for pid, counts in self.local.items()}


class CountingLoad(Load):
    """Load that keeps the body of every 200 response (its outcomes are
    counted as Load counts them)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.answers = Answers()

    def one_request(self, conn: http.client.HTTPConnection) -> bool:
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            body = response.read()
        except TimeoutError:
            self.record_error("timeout")
            return False
        except ConnectionRefusedError:
            self.record_error("refused")
            return False
        except (OSError, http.client.HTTPException):
            self.record_error("error")
            return False
        with self.lock:
            self.result.statuses[response.status] += 1
            if response.status == 200:
                self.answers.add(body)
        return not response.will_close


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[Path, RedisServer]]:
    """The app's virtualenv and a redis-server, for the whole module."""
    root = Path(tempfile.mkdtemp(prefix="agent-state-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        python = app_virtualenv(root / "venv")
        with redis_server(root / "redis") as server:
            yield python, server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def counter_stack(store: tuple[Path, RedisServer]) -> Iterator[tuple[Stack, AppSpec, RedisServer]]:
    python, server = store
    app = AppSpec("counter", EXAMPLE.read_text(), env={"REDIS_URL": server.url, "VISITS_KEY": KEY},
                  directives={"agent_min_instances": str(WORKERS), "agent_max_instances": str(WORKERS),
                              "agent_prestart": "on"})
    root = Path(tempfile.mkdtemp(prefix="agent-it-", dir="/tmp"))
    os.chmod(root, 0o755)
    stack = VenvStack(root, [app], python)
    try:
        stack.start()
        wait_until(lambda: len(stack.worker_pids(app)) == WORKERS, timeout=30, what=f"{WORKERS} workers")
        server.cli("FLUSHALL")
        yield stack, app, server
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_more(load: Load, count: int) -> None:
    target = load.completed() + count
    wait_until(lambda: load.completed() >= target, timeout=60, what=f"{count} more responses")


def assert_counts_hold(result: LoadResult, answers: Answers, redis_count: int) -> None:
    """Each worker's count is its own 200s, with no gap; the 200s' Redis
    values are distinct (no answered visit was lost or counted twice)."""
    for pid, counts in answers.local.items():
        assert sorted(counts) == list(range(1, len(counts) + 1)), f"worker {pid} skipped a count"
    assert sum(answers.last_per_pid().values()) == result.ok()
    assert len(set(answers.shared)) == len(answers.shared) == result.ok()
    assert max(answers.shared, default=0) <= redis_count


def test_process_counts_diverge_and_add_up_while_redis_is_exact(store: tuple[Path, RedisServer]) -> None:
    with counter_stack(store) as (stack, _app, server):
        load = CountingLoad(stack.port, "/", threads=8, max_requests=2000, duration=120)
        result = load.start().join()
        answers = load.answers
        redis_count = server.get_int(KEY)
    last = answers.last_per_pid()
    report("shared state, steady", result=result.summary(), per_worker=sorted(last.values()),
           sum_of_workers=sum(last.values()), redis=redis_count)
    assert result.total == 2000 and result.ok() == 2000, result.summary()
    assert len(last) >= 2, last
    assert all(count < result.ok() for count in last.values()), last
    assert_counts_hold(result, answers, redis_count)
    assert redis_count == result.ok() == sorted(answers.shared)[-1]


def test_rolling_restart_loses_no_answered_visit(store: tuple[Path, RedisServer]) -> None:
    with counter_stack(store) as (stack, app, server):
        old = stack.worker_pids(app)
        with CountingLoad(stack.port, "/", threads=8, max_requests=100_000, duration=120) as load:
            wait_for_more(load, 300)
            restart = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance),
                                      "restart-app", str(stack.app_root(app)), "--blocking"],
                                     cwd=REPO, capture_output=True, text=True, timeout=120)
            wait_for_more(load, 300)
        result, answers = load.result, load.answers
        redis_count = server.get_int(KEY)
        # A replaced worker may still be exiting when the restart returns.
        wait_until(lambda: not old & stack.worker_pids(app), timeout=30, what="the old workers to exit")
    last = answers.last_per_pid()
    report("shared state, rolling restart", result=result.summary(), workers_seen=len(last),
           per_worker=sorted(last.values()), sum_of_workers=sum(last.values()), redis=redis_count)
    assert restart.returncode == 0, restart.stderr
    assert len(last) > WORKERS and set(last) - old, last
    assert result.failed() == 0, result.summary()
    assert_counts_hold(result, answers, redis_count)
    assert redis_count == result.ok()


def test_worker_kills_lose_no_answered_visit(store: tuple[Path, RedisServer]) -> None:
    kills = 3
    with counter_stack(store) as (stack, app, server):
        with CountingLoad(stack.port, "/", threads=8, max_requests=100_000, duration=120) as load:
            for _ in range(kills):
                wait_for_more(load, 300)
                victim = sorted(stack.worker_pids(app))[0]
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda v=victim: v not in stack.worker_pids(app), what="the killed worker to go")
                time.sleep(0.1)
            wait_for_more(load, 300)
        result, answers = load.result, load.answers
        redis_count = server.get_int(KEY)
    last = answers.last_per_pid()
    report("shared state, worker kills", kills=kills, result=result.summary(), workers_seen=len(last),
           per_worker=sorted(last.values()), sum_of_workers=sum(last.values()), redis=redis_count)
    # A killed worker serves one request at a time: it fails at most that
    # one, which it may have counted in Redis before it died.
    assert result.failed() <= kills, result.summary()
    assert_counts_hold(result, answers, redis_count)
    assert result.ok() <= redis_count <= result.ok() + kills
