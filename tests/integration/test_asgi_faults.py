"""The fault scenarios on a Starlette app served as ASGI (agent_app_type
asgi), from examples/asgi's virtualenv: a worker killed under load, a
rolling restart under load and the memory limit, each with what it loses
counted. A worker serves many requests at once here, so a kill loses what
was in flight on it, and nothing else."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.load import losses_under_fault
from tests.integration.stack import REPO, AppSpec, Stack, example_venv, running_stack, wait_until

EXAMPLE = REPO / "examples" / "asgi"
BUILT_VENV = REPO / "build" / "asgi-venv"

# /wait?S answers after S seconds on the event loop; /grow keeps 20 MB more
# for the worker's life (a leak, for the memory limit). Each answer names
# its worker in X-Pid.
SOURCE = """
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

leak = []


async def wait(request):
    await asyncio.sleep(float(request.url.query or "0"))
    return PlainTextResponse(str(os.getpid()), headers={"X-Pid": str(os.getpid())})


async def grow(request):
    leak.append(bytearray(20 * 1024 * 1024))
    return PlainTextResponse(str(os.getpid()), headers={"X-Pid": str(os.getpid())})


app = Starlette(routes=[Route("/wait", wait), Route("/grow", grow)])
"""


@pytest.fixture(scope="module")
def venv_python() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="agent-asgi-faults-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield example_venv(EXAMPLE, BUILT_VENV, root / "venv")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def starlette(python: str, **directives: str) -> AppSpec:
    return AppSpec("starlette", SOURCE, "/", startup_file="asgi.py", python=python,
                   directives={"agent_app_type": "asgi", **directives})


def count_lost(stack: Stack, fault: Callable[[], object]) -> tuple[int, int, dict[int, int]]:
    """(answered, failed, the failed statuses) of a load on 16 connections
    through fault() (tests/integration/load.py)."""
    result = losses_under_fault(stack.port, "/wait?0.02", fault, "asgi faults")
    return result.ok(), result.failed(), dict(result.failed_statuses())


def two_workers(stack: Stack, app: AppSpec) -> set[int]:
    assert stack.get("/wait").status == 200
    wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=30, what="2 workers")
    return stack.worker_pids(app)


def test_a_worker_killed_under_load_loses_only_its_requests_in_flight(venv_python: str) -> None:
    app = starlette(venv_python, agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack:
        victim = min(two_workers(stack, app))
        answered, failed, statuses = count_lost(stack, lambda: os.kill(victim, signal.SIGKILL))
        assert answered > 0
        # 16 clients over 2 workers: what the victim held, at most all 16.
        assert failed <= 16 and set(statuses) <= {502}, statuses
        wait_until(lambda: len(stack.worker_pids(app)) == 2 and victim not in stack.worker_pids(app),
                   timeout=30, what="the worker replaced")


def test_a_rolling_restart_under_load_loses_nothing(venv_python: str) -> None:
    app = starlette(venv_python, agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack:
        before = two_workers(stack, app)
        restart = [str(REPO / ".venv" / "bin" / "python"), "-m", "agent.cli", "--instance", str(stack.instance),
                   "restart-app", str(stack.app_root(app)), "--blocking"]
        answered, failed, statuses = count_lost(
            stack, lambda: subprocess.run(restart, cwd=REPO, check=True, capture_output=True, timeout=120))
        assert answered > 0 and failed == 0, statuses
        wait_until(lambda: not stack.worker_pids(app) & before, timeout=30, what="the old workers to exit")


def test_the_memory_limit_replaces_an_asgi_worker_and_loses_nothing(venv_python: str) -> None:
    app = starlette(venv_python, agent_min_instances="1", agent_max_instances="1", agent_memory_limit="100")
    with running_stack([app]) as stack:
        first = int(stack.get("/grow").text)

        def leak() -> None:
            for _ in range(5):  # 100 MB more than the worker had: over the limit
                stack.get("/grow")

        answered, failed, statuses = count_lost(stack, leak)
        assert answered > 0 and failed == 0, statuses
        wait_until(lambda: not psutil.pid_exists(first), timeout=30, what="the grown worker replaced")
        assert "memory limit" in stack.agent_log()
