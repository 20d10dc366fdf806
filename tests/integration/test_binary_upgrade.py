"""nginx's binary upgrade: USR2 to the master starts a new master on the same
binary and the listening sockets it inherits, then QUIT to the old master ends
it. The agent and its workers serve throughout, and stop with the new master.

nginx refuses USR2 from a master whose parent is still the process that
started it (it could not tell the old binary from the new), so this stack
runs nginx as a daemon, as init systems do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import fault_apps
from tests.integration.load import Load
from tests.integration.stack import AppSpec, Stack, gone, wait_until

APP = AppSpec("app", fault_apps.PID_SLEEP, "/", directives={"agent_min_instances": "2", "agent_max_instances": "2"})


def master_pid(stack: Stack, suffix: str = "") -> int:
    return int((stack.root / f"nginx.pid{suffix}").read_text())


def pid_file_written(path: Path) -> bool:
    try:
        return path.read_text().strip().isdigit()
    except FileNotFoundError:
        return False



@pytest.fixture
def daemon_stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="agent-upgrade-", dir="/tmp"))
    os.chmod(root, 0o755)
    stack = Stack(root, [APP])
    config = stack.write_config()
    config.write_text(config.read_text().replace("daemon off;", "daemon on;"))
    try:
        # No pipes: the daemon would hold them open, and run() wait for their end.
        subprocess.run(stack.nginx_command(), check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: stack.get("/").status == 200, timeout=30, what="the app through nginx")
        wait_until(lambda: pid_file_written(root / "nginx.pid"), timeout=30, what="the daemon's pid file")
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        for suffix in (".oldbin", ""):
            path = root / f"nginx.pid{suffix}"
            if path.exists() and not gone(pid := int(path.read_text())):
                os.kill(pid, signal.SIGQUIT)
                wait_until(lambda: gone(pid), timeout=30, what=f"nginx master {pid} to exit")
        wait_until(lambda: not stack.agent_running(), timeout=30, what="the agent to stop")
        shutil.rmtree(root, ignore_errors=True)


def test_binary_upgrade_keeps_the_agent_and_its_workers_serving(daemon_stack: Stack) -> None:
    stack = daemon_stack
    old_master = master_pid(stack)
    watchdog, core = stack.watchdog_pid(), stack.core_pid()
    wait_until(lambda: len(stack.worker_pids(APP)) == 2, what="two workers")
    workers = stack.worker_pids(APP)

    # A connection per request: the old master's workers close their idle
    # keep-alive connections when they quit, and a request sent on one at
    # that instant is lost as with any upstream (a client retries it). What
    # is counted here is the agent's part: every request nginx passes on.
    with Load(stack.port, "/?sleep=0.005", threads=4, max_requests=100_000, duration=90,
              keep_alive=False) as load:
        wait_until(lambda: load.completed() >= 100, what="the load to run")
        os.kill(old_master, signal.SIGUSR2)
        wait_until(lambda: (stack.root / "nginx.pid.oldbin").exists(), what="the new master")
        # The old master renames its pid file first; the new one writes its own after.
        wait_until(lambda: pid_file_written(stack.root / "nginx.pid"), what="the new master's pid file")
        new_master = master_pid(stack)
        assert new_master != old_master
        wait_until(lambda: "took over the agent" in stack.error_log.read_text(), what="the new master's notice")
        at_quit = load.completed()
        wait_until(lambda: load.completed() >= at_quit + 100, what="load served by both masters")

        os.kill(old_master, signal.SIGQUIT)
        wait_until(lambda: gone(old_master), timeout=30, what="the old master to exit")
        after_quit = load.completed()
        wait_until(lambda: load.completed() >= after_quit + 300, timeout=30,
                   what="load served by the new master alone")
    result = load.result
    print("binary upgrade under load:", result.summary())

    assert result.failed() == 0, result.summary()
    # The same agent, the same workers: the upgrade touched neither.
    assert (stack.watchdog_pid(), stack.core_pid()) == (watchdog, core)
    assert stack.worker_pids(APP) == workers
    assert "nginx has stopped" not in stack.log_file.read_text()

    # The new master now owns the agent's lifetime: its QUIT stops it.
    os.kill(new_master, signal.SIGQUIT)
    wait_until(lambda: gone(new_master), timeout=30, what="the new master to exit")
    wait_until(lambda: not stack.agent_running(), timeout=30, what="the agent to stop with the new master")
    wait_until(lambda: all(gone(pid) for pid in workers | {watchdog, core}), what="every agent process to exit")
