"""Starting, reloading and stopping: nginx drives the agent's lifetime."""

from __future__ import annotations

import os
import pwd
import re

import psutil
import pytest

from tests.integration import apps
from tests.integration.stack import AppSpec, nginx_t_with, running_stack, wait_until

ONE = AppSpec("one", apps.INTROSPECT, "/one/", env={"COLOR": "one"})
TWO = AppSpec("two", apps.INTROSPECT, "/two/", env={"COLOR": "two"})


def test_reload_keeps_unchanged_apps_and_replaces_changed_ones() -> None:
    with running_stack([ONE, TWO]) as stack:
        assert stack.get("/one/").status == 200
        assert stack.get("/two/").status == 200
        one_before, two_before = stack.worker_pids(ONE), stack.worker_pids(TWO)
        watchdog, core = stack.watchdog_pid(), stack.core_pid()
        assert one_before and two_before

        stack.reload()  # nothing changed
        assert stack.get("/one/").status == 200
        assert stack.worker_pids(ONE) == one_before
        assert stack.worker_pids(TWO) == two_before

        TWO.env["COLOR"] = "two-again"
        try:
            stack.reload()
            wait_until(lambda: not stack.worker_pids(TWO) & two_before, what="old workers of app two to stop")
            assert stack.get("/two/").body.count(b"two-again") == 1
            assert stack.worker_pids(ONE) == one_before
            assert (stack.watchdog_pid(), stack.core_pid()) == (watchdog, core)
        finally:
            TWO.env["COLOR"] = "two"


def test_nginx_stop_stops_the_agent_and_every_worker() -> None:
    with running_stack([ONE, TWO]) as stack:
        assert stack.get("/one/").status == 200
        assert stack.get("/two/").status == 200
        pids = stack.all_agent_pids()
        assert len(pids) >= 4  # watchdog, core, two workers
        stack.stop()
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                   for p in pids), what="every agent process to exit")
        assert not stack.instance.joinpath("agent.sock").exists()
        # nginx's workers left nothing of the module's open ("open socket
        # ... left in connection", then "aborting")
        assert "[alert]" not in stack.error_log.read_text()


# The worker's start lasts long enough that the agent's stop lands inside
# it: a forked worker's in an at-fork hook, before it has made its own
# process group or joined its cgroup, while its preloader, slow to exit,
# outlives that hook (the preloader's end kills what is left in its group);
# a direct worker's in the app's import.
SLOW_START = {
    "smart": apps.HELLO + "\nimport atexit, os, time\nos.register_at_fork(after_in_child=lambda: time.sleep(0.5))"
                          "\natexit.register(lambda: time.sleep(2))\n",
    "direct": "import time\ntime.sleep(5)\n" + apps.HELLO,
}


@pytest.mark.parametrize("spawn_method", ["smart", "direct"])
def test_nginx_stop_kills_a_worker_that_is_still_starting(spawn_method: str) -> None:
    app = AppSpec("slow", SLOW_START[spawn_method], "/",
                  directives={"agent_spawn_method": spawn_method, "agent_prestart": "on"})
    with running_stack([app]) as stack:
        wait_until(lambda: "spawned worker" in stack.agent_log(), what="the worker's spawn")
        # by its pid: a forked worker still has its preloader's name
        starting = int(re.findall(r"spawned worker (\d+)", stack.log_file.read_text())[0])
        assert psutil.pid_exists(starting)
        pids = stack.all_agent_pids() | {starting}
        stack.stop()
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                   for p in pids), what="every agent process to exit")
        log = stack.log_file.read_text()
        assert "killing worker" in log and "agent shutdown" in log
        assert "ready in" not in log.split("shutting down")[1]


def test_workers_run_as_the_owner_of_the_startup_file() -> None:
    owner = pwd.getpwnam("daemon")
    with running_stack([ONE]) as stack:
        # The app root and its startup file belong to one user (a startup
        # file of another user's is refused: test_security_workers.py).
        os.chown(stack.app_root(ONE), owner.pw_uid, owner.pw_gid)
        os.chown(stack.app_root(ONE) / "wsgi.py", owner.pw_uid, owner.pw_gid)
        response = stack.get("/one/")
        pid = int(response.text.split('"pid": ')[1].split(",")[0])
        assert psutil.Process(pid).uids().real == owner.pw_uid


def test_root_runs_workers_only_when_asked() -> None:
    as_root = AppSpec("root", apps.INTROSPECT, "/", directives={"agent_user": "root"})
    with running_stack([as_root]) as stack:
        assert '"uid": 0' in stack.get("/").text


def test_valid_configuration_passes_nginx_t() -> None:
    result = nginx_t_with("agent_min_instances 2; agent_max_instances 3; agent_env A b;")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("line", "directive"), [
    ("agent_min_instances lots;", "agent_min_instances"),
    ("agent_max_instances -1;", "agent_max_instances"),
    ("agent_app_type rack;", "agent_app_type"),
    ("agent_enabled maybe;", "agent_enabled"),
    ("agent_min_instances 5; agent_max_instances 2;", "agent_min_instances"),
    ("agent_env ONLY_NAME;", "agent_env"),
])
def test_bad_values_are_rejected_by_nginx_t_naming_the_directive(line: str, directive: str) -> None:
    result = nginx_t_with(line)
    assert result.returncode != 0
    assert directive in result.stderr, result.stderr


def test_nginx_t_does_not_start_an_agent() -> None:
    result = nginx_t_with("")
    assert result.returncode == 0, result.stderr
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "agent-conf-" in " ".join(p.info["cmdline"] or [])]
