"""The spawn and memory runs' own rules: reading the agent's log, finding a
new child among real processes, and the command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import procfs
import pytest
import run
import spawnmem
from figures import NOT_AVAILABLE, MemoryFigures, SpawnFigures


def test_logged_ready_times_are_read_from_every_log_of_the_run(tmp_path: Path) -> None:
    (tmp_path / "nginx.log").write_text(
        "2026-01-01 10:00:00,000 [core 10] INFO app /a: spawned worker 41\n"
        "2026-01-01 10:00:00,030 [core 10] INFO app /a: worker 41 ready in 29 ms\n"
        "2026-01-01 10:00:01,000 [core 10] INFO app /a: worker 42 ready in 151 ms\n")
    (tmp_path / "agentctl-serve.log").write_text("app /a: worker 43 ready in 7 ms\n")
    (tmp_path / "notes.txt").write_text("worker 44 ready in 1 ms\n")   # not a log
    assert spawnmem.logged_ready_ms(tmp_path) == {41: 29, 42: 151, 43: 7}


def test_new_child_finds_a_real_child_once() -> None:
    seen = set(procfs.all_pids())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert spawnmem.new_child(os.getpid(), seen) == child.pid
        assert child.pid in seen
        assert spawnmem.new_child(os.getpid(), seen) is None
    finally:
        child.kill()
        child.wait()


def test_new_child_ignores_processes_of_other_parents() -> None:
    seen = set(procfs.all_pids())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert spawnmem.new_child(child.pid, seen) is None
    finally:
        child.kill()
        child.wait()


def test_summary_is_median_and_max() -> None:
    assert spawnmem.summary([0.003, 0.001, 0.010, 0.002]) == (0.0025, 0.010)
    assert spawnmem.summary([]) is None


def test_only_and_the_spawn_options_are_checked() -> None:
    args = run.parse_args(["--only", "spawn,memory", "--apps", "django", "--spawn-stacks", "direct,uwsgi",
                           "--spawns", "5", "--memory-workers", "1,2"])
    assert args.only == ["spawn", "memory"] and args.apps == ["django"]
    assert args.spawn_stacks == ["direct", "uwsgi"] and args.spawns == 5 and args.memory_workers == [1, 2]
    assert args.spawn_output.name == "benchmarks-spawn.md"
    assert run.parse_args([]).only == ["throughput", "threads", "asgi", "spawn", "memory"]
    threads = run.parse_args(["--only", "threads", "--rounds", "5"])
    assert threads.only == ["threads"] and threads.rounds == 5
    assert threads.threads_output.name == "benchmarks-threads.md"
    for wrong in (["--only", "speed"], ["--spawn-stacks", "lazy"], ["--apps", ""], ["--spawns", "0"],
                  ["--memory-workers", "1,x"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            run.parse_args(wrong)


def test_a_stack_this_build_cannot_run_is_not_a_failed_run() -> None:
    spawn = SpawnFigures("agent smart", "hello", error=NOT_AVAILABLE + "nginx refused it")
    memory = MemoryFigures("agent smart", "hello", 1, error=NOT_AVAILABLE + "nginx refused it")
    assert run.failures([], [spawn], [memory]) == []
    broken = SpawnFigures("uWSGI", "hello", error="no replacement answered within 60 s")
    assert run.failures([], [spawn, broken], [memory]) == ["no replacement answered within 60 s"]
