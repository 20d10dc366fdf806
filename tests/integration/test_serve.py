"""agentctl serve: one app behind nginx and the agent, in the foreground."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.stack import REPO, free_port, hello_answers, wait_until

AGENTCTL = [sys.executable, "-m", "agent.cli"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agent-serve-", dir="/tmp"))
    shutil.copytree(REPO / "examples" / "hello", root / "hello")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "name"]):
        if text in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_print_config_names_the_module_and_the_app(workdir: Path) -> None:
    result = subprocess.run([*AGENTCTL, "serve", str(workdir / "hello"), "--port", "9999",
                             "--min-instances", "3", "--print-config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "load_module" in result.stdout and "ngx_http_agent_module.so" in result.stdout
    assert "listen 127.0.0.1:9999;" in result.stdout
    assert "agent_min_instances 3;" in result.stdout
    assert f'agent_app_root "{workdir / "hello"}";' in result.stdout


def test_serve_refuses_a_directory_without_the_startup_file(workdir: Path) -> None:
    result = subprocess.run([*AGENTCTL, "serve", str(workdir)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "wsgi.py does not exist" in result.stderr


def test_serve_runs_the_app_and_ctrl_c_leaves_nothing_behind(workdir: Path) -> None:
    port = free_port()
    run_dir = workdir / "run"
    process = subprocess.Popen([*AGENTCTL, "serve", str(workdir / "hello"), "--port", str(port),
                                "--run-dir", str(run_dir), "--min-instances", "2"],
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: hello_answers(port), timeout=20, what="agentctl serve to answer")
        loaders = str(run_dir / "instance" / "loaders")
        # The loader runs the preloader (smart spawning, the default) and the workers.
        wait_until(lambda: [p.info["name"] for p in processes_mentioning(loaders)].count("agent-preloader") == 1
                   and len(processes_mentioning(loaders)) == 3, what="two workers (--min-instances 2) and a preloader")
        assert processes_mentioning(str(run_dir))
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
        assert process.wait(timeout=60) == 0
        assert processes_mentioning(str(run_dir)) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
