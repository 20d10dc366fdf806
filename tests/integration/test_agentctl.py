"""agentctl against a real agent: nginx, the agent it starts, and workers,
read and driven through the status socket (docs/agentctl.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.stack import REPO, AppSpec, Stack, gone, running_stack, wait_until

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Says which worker answered, notes every request in the agent's log (through
# the worker's stderr), and sleeps on /slow?SECONDS.
APP = """
import os, sys, time

def application(environ, start_response):
    path = environ["PATH_INFO"]
    print("serving %s" % path, file=sys.stderr, flush=True)
    if path == "/slow":
        time.sleep(float(environ["QUERY_STRING"] or 0))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

SHOP = AppSpec("shop", APP, directives={"agent_min_instances": "2", "agent_prestart": "on"})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack([SHOP]) as running:
        wait_until(lambda: len(running.worker_pids(SHOP)) == 2, timeout=20, what="two prestarted workers")
        wait_until(lambda: running.instance.joinpath("status.sock").exists(), what="the status socket")
        yield running


def agentctl(stack: Stack | None, *argv: str, as_nobody: bool = False,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    instance = ["--instance", str(stack.instance)] if stack else []
    command = [*(NOBODY if as_nobody else []), sys.executable, "-m", "agent.cli", *instance, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def pool(stack: Stack) -> dict[str, Any]:
    result = agentctl(stack, "status", "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)["pool"]
    return document


def serving_pids(stack: Stack) -> set[int]:
    apps = pool(stack)["apps"]
    return {p["pid"] for app in apps for p in app["processes"] if p["state"] in ("serving", "idle")}


def listed_pids(stack: Stack) -> set[int]:
    return {p["pid"] for app in pool(stack)["apps"] for p in app["processes"]}



def test_status_shows_every_worker_pid(stack: Stack) -> None:
    workers = stack.worker_pids(SHOP)
    result = agentctl(stack, "status")
    assert result.returncode == 0, result.stderr
    assert f"{stack.app_root(SHOP)} (wsgi)" in result.stdout
    rows = {int(line.split()[0]) for line in result.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert rows == workers


def test_status_json_is_the_status_socket_documents(stack: Stack) -> None:
    result = agentctl(stack, "status", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["server"]["instance_dir"] == str(stack.instance)
    assert document["server"]["watchdog_pid"] == stack.watchdog_pid()
    assert [app["name"] for app in document["pool"]["apps"]] == [str(stack.app_root(SHOP))]


def test_the_instance_is_found_through_the_environment(stack: Stack) -> None:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "memory-stats"], cwd=REPO, capture_output=True,
                            text=True, env={"AGENT_INSTANCE_DIR": str(stack.instance), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert {int(line.split()[1]) for line in lines[1:-1]} == stack.worker_pids(SHOP)
    assert lines[-1].startswith("total (2 processes)")


def test_top_redraws_the_table(stack: Stack) -> None:
    result = agentctl(stack, "top", "--interval", "0.2", "--iterations", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\x1b[H\x1b[2J") == 2
    assert result.stdout.count(f"{stack.app_root(SHOP)} (wsgi)") == 2


def test_requests_shows_a_request_in_flight(stack: Stack) -> None:
    answered: list[str] = []
    slow = threading.Thread(target=lambda: answered.append(stack.get("/slow?3").text))
    slow.start()
    try:
        def listed() -> bool:
            return "/slow" in agentctl(stack, "requests").stdout

        wait_until(listed, timeout=3, interval=0.1, what="the slow request in agentctl requests")
        row = next(line for line in agentctl(stack, "requests").stdout.splitlines() if "/slow" in line).split()
        assert row[0] == str(stack.app_root(SHOP)) and row[1] == "GET"
        assert int(row[3]) in stack.worker_pids(SHOP)
    finally:
        slow.join()
    assert answered and answered[0].isdigit()


def test_restart_app_blocking_replaces_every_worker(stack: Stack) -> None:
    before = stack.worker_pids(SHOP)
    result = agentctl(stack, "restart-app", str(stack.app_root(SHOP)) + "/", "--blocking")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"restarted {stack.app_root(SHOP)}\n"
    after = serving_pids(stack)
    assert after and not after & before
    wait_until(lambda: all(gone(pid) for pid in before), timeout=30, what="the old workers to exit")


def test_detach_process_removes_that_worker(stack: Stack) -> None:
    pid = min(serving_pids(stack))
    result = agentctl(stack, "detach-process", str(pid))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: pid not in listed_pids(stack), timeout=30, what=f"{pid} to leave the pool")
    wait_until(lambda: gone(pid), timeout=30, what=f"{pid} to exit")


def test_reopen_logs_starts_a_new_file(stack: Stack) -> None:
    rotated = stack.log_file.with_name("agent.log.1")
    stack.log_file.rename(rotated)
    result = agentctl(stack, "reopen-logs")
    assert result.returncode == 0, result.stderr
    assert stack.log_file.exists()
    marker = f"/after-rotation-{uuid.uuid4().hex}"
    assert stack.get(marker).status == 200
    wait_until(lambda: marker in stack.log_file.read_text(), what="the request in the new log file")
    assert marker not in rotated.read_text()


def test_an_unknown_app_or_pid_is_exit_5(stack: Stack) -> None:
    result = agentctl(stack, "restart-app", "/srv/no-such-app")
    assert result.returncode == 5, result.stderr
    assert "unknown app" in result.stderr
    not_a_worker = agentctl(stack, "detach-process", "1")
    assert not_a_worker.returncode == 5, not_a_worker.stderr


def test_no_agent_is_exit_3(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(tmp_path), "status"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert f"no agent answers on {tmp_path / 'status.sock'}" in result.stderr


def test_another_user_reads_but_may_not_act(stack: Stack) -> None:
    status = agentctl(stack, "status", as_nobody=True)
    assert status.returncode == 0, status.stderr
    assert all(str(pid) in status.stdout for pid in stack.worker_pids(SHOP))
    before = stack.worker_pids(SHOP)
    restart = agentctl(stack, "restart-app", str(stack.app_root(SHOP)), as_nobody=True)
    assert restart.returncode == 4, restart.stderr
    assert "no rights" in restart.stderr
    assert stack.worker_pids(SHOP) == before


def test_list_instances_names_the_agent(stack: Stack) -> None:
    result = agentctl(stack, "list-instances")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == [str(stack.instance), str(stack.watchdog_pid()), "1"]
