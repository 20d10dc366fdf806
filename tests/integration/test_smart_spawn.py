"""Smart spawning (agent_spawn_method smart, the default): a preloader per
app loads it once and forks the workers (docs/policy.md, "Spawn methods")."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from agent.control.client import UnixHTTPConnection
from tests.integration.stack import AppSpec, Stack, running_stack, wait_until
from tests.integration.test_agentctl import agentctl
from tests.integration.test_security_workers import assert_own_cgroups, cgroup_directory, cgroups_available

# Answers with what the worker knows of its making: its pid, the pid that
# imported the app, what its at-fork hook saw, and its random state's digest.
FORKING_APP = """
import hashlib, json, os, random, time
IMPORTED_BY = os.getpid()
BALLAST = bytearray(os.urandom(1 << 20)) * 24   # 24 MiB made at import: shared with the workers
REOPENED = []
os.register_at_fork(after_in_child=lambda: REOPENED.append(os.getpid()))

def application(environ, start_response):
    if environ["PATH_INFO"] == "/grow":
        REOPENED.append(bytearray(os.urandom(1 << 20)) * 64)   # kept: the worker's own memory
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.5)
    body = json.dumps({"pid": os.getpid(), "imported_by": IMPORTED_BY, "reopened": REOPENED[:1],
                       "random": hashlib.sha256(repr(random.getstate()).encode()).hexdigest()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""


def app_spec(**directives: str) -> AppSpec:
    return AppSpec("forking", FORKING_APP, directives={"agent_prestart": "on", **directives})


def answer(stack: Stack, path: str = "/") -> dict[str, Any]:
    response = stack.get(path)
    assert response.status == 200, response.text
    document: dict[str, Any] = json.loads(response.body)
    return document


def the_preloader(stack: Stack, app: AppSpec) -> psutil.Process:
    wait_until(lambda: len(stack.preloader_processes(app)) == 1, timeout=20, what="one preloader")
    return stack.preloader_processes(app)[0]


def smaps_rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def test_workers_are_the_preloaders_children_and_share_its_pages() -> None:
    app = app_spec(agent_min_instances="3")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 3, timeout=20, what="three workers")
        preloader = the_preloader(stack, app)
        assert preloader.ppid() == stack.core_pid()
        for worker in stack.worker_processes(app):
            assert worker.ppid() == preloader.pid
            memory = smaps_rollup(worker.pid)
            # The 24 MiB ballast and the interpreter are the preloader's
            # pages, shared: a fraction of them is this worker's PSS.
            assert memory["Shared_Clean"] + memory["Shared_Dirty"] > 20 << 10
            assert memory["Pss"] < memory["Rss"] / 2
            assert memory["Private_Clean"] + memory["Private_Dirty"] < 20 << 10
        served = answer(stack)
        assert served["imported_by"] == preloader.pid != served["pid"]
        assert preloader.uids().real != 0  # the app's user, never root


def test_workers_are_forked_into_their_own_cgroups_beside_the_preloaders() -> None:
    app = app_spec(agent_min_instances="3")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 3, timeout=20, what="three workers")
        if not cgroups_available():
            assert "supervised by process group" in stack.agent_log()
            return
        users = assert_own_cgroups(stack, app, 3)
        assert cgroup_directory(the_preloader(stack, app).pid).parent == users
        # Forked by clone3 into the cgroup: the preloader says when it cannot.
        assert "clone3 into the worker's cgroup" not in stack.agent_log()
        assert answer(stack)["reopened"]


# A preloader with a second thread forks with os.fork(); its workers move
# into their cgroups after the fork instead.
THREADED_IMPORT = FORKING_APP + """
import threading
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
"""


def test_a_preloader_with_threads_forks_its_workers_and_they_join_their_cgroups() -> None:
    app = AppSpec("forking", THREADED_IMPORT, directives={"agent_prestart": "on", "agent_min_instances": "2"})
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=20, what="two workers")
        served = answer(stack)
        assert served["reopened"] == [served["pid"]] and served["imported_by"] != served["pid"]
        if cgroups_available():
            assert_own_cgroups(stack, app, 2)


def test_an_apps_at_fork_hook_runs_in_each_worker_and_seeds_differ() -> None:
    app = app_spec(agent_min_instances="3")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 3, timeout=20, what="three workers")
        answers: list[dict[str, Any]] = []
        # Three slow requests at once: each is served by its own worker.
        threads = [threading.Thread(target=lambda: answers.append(answer(stack, "/slow"))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({a["pid"] for a in answers}) == 3
        for served in answers:
            assert served["reopened"] == [served["pid"]]
        assert len({a["random"] for a in answers}) == 3


def test_a_preloader_killed_under_load_costs_no_request_and_is_replaced() -> None:
    # max 2 as well: under load the pool would otherwise grow past 2.
    app = app_spec(agent_min_instances="2", agent_max_instances="2")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=20, what="two workers")
        preloader = the_preloader(stack, app)
        workers = stack.worker_pids(app)
        failures: list[str] = []
        served = [0]
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    response = stack.get("/")
                    served[0] += 1
                    if response.status != 200:
                        failures.append(f"{response.status} {response.text[:80]}")
                except OSError as e:
                    failures.append(repr(e))

        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            wait_until(lambda: served[0] > 50, what="requests before the kill")
            os.kill(preloader.pid, signal.SIGKILL)
            wait_until(lambda: any(p.pid != preloader.pid for p in stack.preloader_processes(app)),
                       timeout=20, what="a new preloader")
            before = served[0]
            wait_until(lambda: served[0] > before + 50, what="requests after the kill")
        finally:
            done.set()
            for client in clients:
                client.join()
        assert failures == []
        # The workers it forked serve on, now the core's children.
        assert stack.worker_pids(app) == workers
        for worker in stack.worker_processes(app):
            assert worker.ppid() == stack.core_pid()


def test_a_restart_with_broken_code_leaves_the_old_workers_serving() -> None:
    app = app_spec(agent_min_instances="2")
    with running_stack([app], http_directives={"agent_stat_throttle_rate": "0"}) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=20, what="two workers")
        old_preloader = the_preloader(stack, app).pid
        workers = stack.worker_pids(app)
        startup = stack.app_root(app) / "wsgi.py"
        startup.write_text("raise RuntimeError('the new code is broken')\n")
        (stack.app_root(app) / "tmp").mkdir(exist_ok=True)
        (stack.app_root(app) / "tmp" / "restart.txt").touch()
        wait_until(lambda: "rolling restart abandoned" in stack.agent_log(), timeout=30, what="the restart abandoned")
        assert "the new code is broken" in stack.agent_log()
        assert not psutil.pid_exists(old_preloader) or psutil.Process(old_preloader).status() == "zombie"
        for _ in range(20):
            assert answer(stack)["pid"] in workers
        assert stack.worker_pids(app) == workers


def test_the_memory_limit_counts_a_workers_own_memory_only() -> None:
    # Each worker's RSS holds the 24 MiB ballast it shares with the
    # preloader: over the limit, but not its own. One that grows its own
    # memory past the limit is replaced.
    app = app_spec(agent_min_instances="2", agent_memory_limit="20")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=20, what="two workers")
        workers = stack.worker_pids(app)
        for _ in range(10):
            answer(stack)
        time.sleep(1.5)  # a memory sample or more
        assert all(psutil.Process(pid).memory_info().rss > 20 << 20 for pid in workers)
        assert workers <= stack.worker_pids(app)   # none replaced (a queued request may add one)
        grown = answer(stack, "/grow")["pid"]
        wait_until(lambda: grown not in stack.worker_pids(app), timeout=20, what="the grown worker to go")
        assert workers - {grown} <= stack.worker_pids(app)
        assert "memory" in stack.agent_log()


def test_an_idle_preloader_is_stopped_and_a_later_spawn_starts_one() -> None:
    app = app_spec(agent_min_instances="1", agent_max_preloader_idle_time="1s")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 1, timeout=20, what="a worker")
        first = the_preloader(stack, app).pid
        wait_until(lambda: not stack.preloader_processes(app), timeout=20, what="the idle preloader to stop")
        assert answer(stack)["imported_by"] == first
        worker = next(iter(stack.worker_pids(app)))
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: stack.worker_pids(app) - {worker}, timeout=20, what="a new worker")
        second = answer(stack)
        assert second["imported_by"] not in (first, second["pid"])
        assert psutil.Process(second["pid"]).ppid() == second["imported_by"]


def test_status_and_metrics_show_the_preloader_with_its_memory() -> None:
    app = app_spec(agent_min_instances="1")
    with running_stack([app]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 1, timeout=20, what="a worker")
        preloader = the_preloader(stack, app).pid
        wait_until(lambda: stack.instance.joinpath("status.sock").exists(), what="the status socket")

        def documented() -> dict[str, Any] | None:
            result = agentctl(stack, "status", "--json")
            assert result.returncode == 0, result.stderr
            apps = json.loads(result.stdout)["pool"]["apps"]
            listed = apps[0]["preloaders"]
            return listed[0] if listed and listed[0]["memory"] else None

        wait_until(lambda: documented() is not None, what="the preloader's memory in the status")
        shown = documented()
        assert shown is not None and shown["pid"] == preloader and shown["state"] == "ready"
        assert shown["memory"]["rss"] > 20 << 20
        assert preloader not in [p["pid"] for p in json.loads(agentctl(stack, "status", "--json").stdout)
                                 ["pool"]["apps"][0]["processes"]]
        text = agentctl(stack, "status").stdout
        assert f"Preloader: pid {preloader}, ready" in text
        connection = UnixHTTPConnection(stack.instance / "status.sock")
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        assert f'agent_preloader_memory_bytes{{app="{stack.app_root(app)}",pid="{preloader}",kind="rss"}}' \
            in metrics
