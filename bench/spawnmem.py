"""The spawn and memory part of the benchmark (run.py --only spawn,memory).

Five stacks, each in front of the same app under the same interpreter:
ours with `agent_spawn_method smart` and with `direct`, uWSGI (its default:
the master loads the app and forks the workers), gunicorn --preload (the
same) and gunicorn without it (each worker imports the app). Two apps:
bench/apps/wsgi.py (hello world) and examples/django in its own virtualenv.

Spawn: one worker; it is killed with SIGKILL and a request is sent at once.
Every server replaces a worker that died on its own, and the request waits
for the replacement (in the agent's queue; in the listening socket's
backlog of uWSGI and gunicorn). Three instants are taken from outside, the
same way for every server: the kill, the moment the replacement process
exists (a new child of the process that forked the dead worker, seen by
polling /proc every POLL_SECONDS), and the answer. "fork → answer" is the
spawn-to-ready time: loading (or, forked from a loaded process, just
starting) the worker until it has answered its first request. The agent
also logs its own fork → ready-handshake time for each worker; it is
reported beside it.

Memory: 1, 4 and 16 workers; after a warm-up (every path, wrk at 2
connections a worker) and once the workers' memory has settled, each
process's USS (its private pages) and PSS (private pages plus its share of
shared ones) from psutil's memory_full_info (/proc/PID/smaps). The whole
app is every process of the app server (master, arbiter, agent watchdog,
core, preloader, and the workers); nginx is not counted. PSS adds up across
processes; USS does not count what they share.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import procfs
import psutil
import wrk
from figures import (
    APP_WORKERS,
    NGINX_MASTER,
    NGINX_WORKERS,
    NOT_AVAILABLE,
    SERVE,
    MemoryFigures,
    ProcessMemory,
    SpawnFigures,
)
from stacks import (
    AgentStack,
    Buffers,
    GunicornPreloadStack,
    GunicornStack,
    SpawnMethodUnavailable,
    Stack,
    StackError,
    UwsgiStack,
    free_port,
    http_fetch,
)

SPAWNS = 20
MEMORY_WORKERS = [1, 4, 16]
SPAWN_STACKS = ["smart", "direct", "uwsgi", "gunicorn-preload", "gunicorn"]
SPAWN_LABELS = {"smart": "agent smart", "direct": "agent direct", "uwsgi": "uWSGI",
                "gunicorn-preload": "gunicorn --preload", "gunicorn": "gunicorn"}
POLL_SECONDS = 0.0005
ANSWER_TIMEOUT = 60.0
SETTLE_SECONDS = 0.5          # after a replacement has answered, before the next kill
WARMUP_SECONDS = 2.0
SETTLED_CHANGE = 0.02         # the workers' USS moves less than this between two looks 1 s apart
SETTLE_TIMEOUT = 30.0
NOT_COUNTED = (NGINX_MASTER, NGINX_WORKERS, SERVE)
READY_LOG = re.compile(r"worker (\d+) ready in (\d+) ms")


@dataclass(frozen=True)
class BenchApp:
    """An app the spawn and memory runs serve."""

    key: str                       # hello, django
    title: str
    app_dir: Path
    python: str                    # the app's interpreter (ours: agent_python)
    python_path: Path | None       # its virtualenv's site-packages, for uWSGI's and gunicorn's --pythonpath
    paths: tuple[str, ...]         # warmed up before memory is read
    hello: bytes = b"Hello, world\n"   # what / answers


@dataclass
class Answer:
    """The request sent after a kill, as its thread saw it."""

    status: int = 0
    body: bytes = b""
    error: OSError | None = None
    at: float | None = None      # time.perf_counter() when it ended


class SpawnError(Exception):
    """A spawn could not be measured; the message says why."""


# -- spawn -------------------------------------------------------------------

def new_child(parent: int, seen: set[int]) -> int | None:
    """A process that is not in seen and whose parent is parent; every pid
    looked at joins seen, so that each poll reads only new processes."""
    found = None
    for pid in procfs.all_pids():
        if pid in seen:
            continue
        seen.add(pid)
        if procfs.parent(pid) == parent:
            found = pid
    return found


def one_spawn(stack: Stack, app: BenchApp) -> tuple[int, float, float, float]:
    """Kills the stack's only worker; returns (new pid, kill → fork seen,
    fork seen → answer, kill → answer)."""
    workers = stack.workers()
    if len(workers) != 1:
        raise SpawnError(f"{stack.label}: {len(workers)} workers ready, expected 1")
    old = workers[0]
    spawner = procfs.parent(old)
    if spawner is None:
        raise SpawnError(f"{stack.label}: worker {old} is gone before the kill")
    seen = set(procfs.all_pids())
    answer = Answer()

    def ask() -> None:
        try:
            answer.status, answer.body = http_fetch(stack.port, "/", timeout=ANSWER_TIMEOUT)
        except OSError as e:
            answer.error = e
        answer.at = time.perf_counter()

    killed_at = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    new, forked_at = None, None
    deadline = killed_at + ANSWER_TIMEOUT
    while new is None and time.perf_counter() < deadline:
        new = new_child(spawner, seen)
        if new is None:
            time.sleep(POLL_SECONDS)
        else:
            forked_at = time.perf_counter()
    asker.join(max(0.0, deadline - time.perf_counter()))
    if new is None or forked_at is None or answer.at is None:
        raise SpawnError(f"{stack.label}: no replacement answered within {ANSWER_TIMEOUT:g} s")
    if answer.error is not None:
        raise SpawnError(f"{stack.label}: the request after the kill failed: {answer.error}")
    if answer.status != 200 or answer.body != app.hello:
        raise SpawnError(f"{stack.label}: the request after the kill got {answer.status} with "
                         f"{len(answer.body)} bytes")
    return new, forked_at - killed_at, answer.at - forked_at, answer.at - killed_at


def logged_ready_ms(run_dir: Path) -> dict[int, int]:
    """The agent's own fork → ready-handshake times by worker pid, from its
    log lines `worker PID ready in N ms` (the logs of nginx, which the
    agent's log goes to, or of agentctl serve)."""
    found: dict[int, int] = {}
    for log in run_dir.glob("*.log"):
        for match in READY_LOG.finditer(log.read_text(errors="replace")):
            found[int(match.group(1))] = int(match.group(2))
    return found


def wait_replaced(stack: Stack, pid: int) -> None:
    """Until the stack counts the new worker as its one ready worker."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while time.monotonic() < deadline:
        if stack.workers() == [pid]:
            return
        time.sleep(0.02)
    raise SpawnError(f"{stack.label}: worker {pid} answered but is not the stack's one worker")


def measure_spawns(stack: Stack, app: BenchApp, figures: SpawnFigures, count: int = SPAWNS) -> None:
    for _ in range(count):
        stack.check_running()
        pid, to_fork, to_answer, total = one_spawn(stack, app)
        figures.to_fork.append(to_fork)
        figures.to_answer.append(to_answer)
        figures.total.append(total)
        wait_replaced(stack, pid)
        figures.logged += [ms / 1000 for p, ms in logged_ready_ms(stack.run_dir).items() if p == pid]
        time.sleep(SETTLE_SECONDS)
        print(f"  {figures.stack:18} {app.key:6} spawn {len(figures.total):2}: kill→fork {to_fork * 1e3:7.1f} ms"
              f"  fork→answer {to_answer * 1e3:7.1f} ms", flush=True)


# -- memory ------------------------------------------------------------------

def memory_of(pid: int) -> tuple[int, int] | None:
    """(USS, PSS) in KiB, or None for a process that is gone."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    return info.uss // 1024, info.pss // 1024


def app_processes(stack: Stack) -> list[ProcessMemory]:
    """Every process of the app server, with its role and memory; nginx and
    agentctl serve are not counted."""
    found = []
    workers = set(stack.workers())
    for pid in stack.pids():
        role = APP_WORKERS if pid in workers else stack.role(pid)
        if role in NOT_COUNTED or (role == APP_WORKERS and pid not in workers):
            continue
        memory = memory_of(pid)
        if memory is not None:
            found.append(ProcessMemory(role, pid, *memory))
    return found


def wait_settled(stack: Stack, look: Callable[[Stack], list[ProcessMemory]] = app_processes) -> list[ProcessMemory]:
    """The processes' memory once the workers' USS has stopped moving (a
    worker that imports the app lazily is still growing after it started)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    before = look(stack)
    while True:
        time.sleep(1.0)
        after = look(stack)
        old, new = (sum(p.uss_kib for p in got if p.role == APP_WORKERS) for got in (before, after))
        if (old and abs(new - old) <= SETTLED_CHANGE * old) or time.monotonic() > deadline:
            return after
        before = after


def measure_memory(stack: Stack, app: BenchApp, wrk_bin: str, figures: MemoryFigures) -> None:
    for path in app.paths:
        wrk.run(wrk_bin, f"http://127.0.0.1:{stack.port}{path}", max(2, 2 * stack.worker_count), WARMUP_SECONDS)
    stack.check_running()
    figures.processes = wait_settled(stack)
    if len(figures.of_workers()) != stack.worker_count:
        raise StackError(f"{stack.label}: {len(figures.of_workers())} workers measured, expected "
                         f"{stack.worker_count}")


def summary(values: list[float]) -> tuple[float, float] | None:
    """(median, max), or None when nothing was measured."""
    return (statistics.median(values), max(values)) if values else None


# -- the runs ----------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What every stack of the spawn and memory runs is made from."""

    base: Path              # the run's temporary directory
    nginx: str
    wrk_bin: str
    peers_bin: Path | None
    repo: Path
    agent_python: str
    buffers: Buffers


DIRECT_FALLBACK_NOTE = ("this build's nginx module has no `agent_spawn_method`: measured without the directive, "
                        "which spawns directly")


def make_stack(kind: str, app: BenchApp, setup: Setup, workers: int, name: str,
               spawn_method: str | None) -> Stack:
    run_dir = setup.base / name
    run_dir.mkdir(mode=0o755)
    port = free_port()
    if kind in ("smart", "direct"):
        return AgentStack(run_dir, port, app.app_dir, 1, setup.buffers, setup.nginx, setup.repo,
                          setup.agent_python, app.python, worker_count=workers, spawn_method=spawn_method)
    if setup.peers_bin is None:
        raise StackError("gunicorn and uWSGI are not installed")
    peer = {"uwsgi": UwsgiStack, "gunicorn": GunicornStack, "gunicorn-preload": GunicornPreloadStack}[kind]
    return peer(run_dir, port, app.app_dir, 1, setup.buffers, setup.nginx, setup.peers_bin,
                worker_count=workers, python_path=app.python_path)


class Runner:
    """Runs one kind of stack for one app: it remembers whether `direct`
    had to run without the directive, and stops every stack it started."""

    def __init__(self, kind: str, app: BenchApp, setup: Setup) -> None:
        self.kind, self.app, self.setup = kind, app, setup
        self.spawn_method: str | None = kind if kind in ("smart", "direct") else None
        self.note: str | None = None
        self.names = 0

    def started(self, workers: int) -> Stack:
        """A started stack with workers ready; `direct` falls back to no
        directive when the module does not know it (the module spawns
        directly then); `smart` never does."""
        self.names += 1
        name = f"{self.app.key}-{self.kind}-{self.names}"
        stack = make_stack(self.kind, self.app, self.setup, workers, name, self.spawn_method)
        try:
            stack.start()
        except SpawnMethodUnavailable:
            stack.stop()
            if self.kind != "direct" or self.spawn_method is None:
                raise
            self.spawn_method, self.note = None, DIRECT_FALLBACK_NOTE
            return self.started(workers)
        try:
            stack.wait_ready()
            stack.check_answers({"/": self.app.hello})
        except BaseException:
            stack.stop()
            raise
        return stack


@contextlib.contextmanager
def measuring(runner: Runner, figures: SpawnFigures | MemoryFigures, workers: int, what: str) -> Iterator[Stack]:
    """A started stack for one measurement: a method the module refuses, or
    a failure, becomes the figures' error; the stack is stopped whatever
    happens, and the runner's note goes with the figures."""
    stack = None
    try:
        stack = runner.started(workers)
        yield stack
    except SpawnMethodUnavailable as e:
        figures.error = NOT_AVAILABLE + first_line(e)
        print(f"bench: {figures.stack}: {figures.error}", flush=True)
    except (StackError, SpawnError, wrk.WrkError, OSError) as e:
        figures.error = first_line(e)
        print(f"bench: {figures.stack}, {runner.app.title}: {what} failed: {e}", flush=True)
    finally:
        if stack is not None:
            stack.stop()
        figures.note = runner.note


def run_spawns(runner: Runner, count: int) -> SpawnFigures:
    figures = SpawnFigures(SPAWN_LABELS[runner.kind], runner.app.key)
    with measuring(runner, figures, 1, "spawns") as stack:
        print(f"bench: {figures.stack}, {runner.app.title}: {count} spawns (run dir {stack.run_dir})", flush=True)
        measure_spawns(stack, runner.app, figures, count)
    return figures


def run_memory(runner: Runner, workers: int) -> MemoryFigures:
    figures = MemoryFigures(SPAWN_LABELS[runner.kind], runner.app.key, workers)
    with measuring(runner, figures, workers, f"{workers} workers: memory") as stack:
        measure_memory(stack, runner.app, runner.setup.wrk_bin, figures)
        mine = figures.of_workers()
        print(f"  {figures.stack:18} {runner.app.key:6} {workers:2} workers: worker USS "
              f"{sum(p.uss_kib for p in mine) / len(mine) / 1024:6.1f} MiB, PSS "
              f"{sum(p.pss_kib for p in mine) / len(mine) / 1024:6.1f} MiB; whole app PSS "
              f"{figures.total_pss_kib() / 1024:7.1f} MiB", flush=True)
    return figures


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_all(setup: Setup, apps: list[BenchApp], kinds: list[str], parts: set[str], spawns: int = SPAWNS,
            memory_workers: list[int] = MEMORY_WORKERS) -> tuple[list[SpawnFigures], list[MemoryFigures]]:
    spawn_results: list[SpawnFigures] = []
    memory_results: list[MemoryFigures] = []
    for app in apps:
        for kind in kinds:
            runner = Runner(kind, app, setup)
            unavailable = None
            if "spawn" in parts:
                spawn_results.append(run_spawns(runner, spawns))
                error = spawn_results[-1].error
                unavailable = error if error and error.startswith(NOT_AVAILABLE) else None
            if "memory" in parts:
                # A stack the module refused once is refused at every size.
                memory_results += [run_memory(runner, n) if unavailable is None else
                                   MemoryFigures(SPAWN_LABELS[kind], app.key, n, error=unavailable)
                                   for n in memory_workers]
    return spawn_results, memory_results
