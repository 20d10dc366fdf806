"""The benchmark: nginx→agent against nginx→uWSGI and nginx→gunicorn.

    make bench                         # = .venv/bin/python bench/run.py
    make bench-spawn                   # = .venv/bin/python bench/run.py --only spawn,memory
    .venv/bin/python bench/run.py --only threads --duration 5
    .venv/bin/python bench/run.py --only asgi --duration 5 --rounds 3
    .venv/bin/python bench/run.py --quick
    .venv/bin/python bench/run.py --stacks uwsgi,gunicorn --duration 5

Four parts. Throughput (below) reports to docs/benchmarks.md; threads
(the 10 ms sleep on 2 workers of stacks.THREADS threads each: the agent's
thread model against gunicorn's gthread and uWSGI's threads, at 16, 32 and
64 connections, --rounds rounds, medians) reports to
docs/benchmarks-threads.md; asgi (bench/apps/asgi.py on 2 workers: the
agent's agent_app_type asgi against uvicorn and Granian, hello world with
wrk and a WebSocket echo with bench/wsload.py, each at 16 and 256
connections, --rounds rounds, medians; an echo the agent's /ws does not
upgrade yet is reported as not yet measured) reports to
docs/benchmarks-asgi.md; spawn and memory (spawnmem.py: spawn-to-ready
times, and each worker's and the whole app's memory at 1, 4 and 16
workers, for hello world and a Django app) report to
docs/benchmarks-spawn.md.

Each stack runs behind the system nginx (one worker process) with two app
workers serving bench/apps/wsgi.py under the same interpreter
(/usr/bin/python3), with the same upstream buffers (stacks.Buffers). wrk
loads each workload (hello world, a 100 KB body, a 10 ms sleep) at 1, 16 and
64 connections; then each stack starts again with nginx at two worker
processes for hello world at 16 and 64 connections; all of it in --rounds
rounds (a different stack first each round), the report taking each
figure's median round. Every run's CPU time is
read from /proc for each process of the stack and split by role (nginx,
agent core and watchdog, app server master, app workers). The report goes to
stdout and, as Markdown, to docs/benchmarks.md (bench/results/quick.md for
--quick); the raw figures go to bench/results/last.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import asgi_report
import procfs
import report
import spawn_report
import spawnmem
import threads_report
import wrk
import wsload
from figures import AGENT_CORE, NOT_AVAILABLE, MemoryFigures, Run, SpawnFigures, StackResult
from stacks import (
    AgentAsgiStack,
    AgentStack,
    AgentThreadStack,
    Buffers,
    GranianStack,
    GunicornStack,
    GunicornThreadStack,
    RelayStack,
    Stack,
    StackError,
    UvicornStack,
    UwsgiStack,
    UwsgiThreadStack,
    free_port,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
APP_SOURCE = BENCH / "apps"
REQUIREMENTS = BENCH / "requirements.txt"
DJANGO_SOURCE = REPO / "examples" / "django"
PARTS = ["throughput", "threads", "asgi", "spawn", "memory"]
APPS = ["hello", "django"]

WORKLOADS = [("hello", "hello world", "/"), ("100k", "100 KB body", "/100k"), ("sleep", "10 ms sleep", "/sleep")]
CONNECTIONS = [1, 16, 64]
# The second pass, with nginx at --more-nginx-workers worker processes.
MORE_WORKERS_RUNS = [("hello", 16), ("hello", 64)]
# The relay (agent_fast_path off) runs what the before-table has.
RELAY_RUNS = [("hello", 1), ("hello", 16), ("hello", 64), ("100k", 16)]
THROUGHPUT_KEYS = ["ours", "relay", "uwsgi", "gunicorn"]
STACK_LABELS = {"ours": AgentStack.label, "relay": RelayStack.label, "uwsgi": UwsgiStack.label,
                "gunicorn": GunicornStack.label}
# The threads part: each stack's threaded kind, under the key of --stacks
# that selects it; the workload and connection counts.
THREAD_STACKS: dict[str, type[AgentThreadStack | UwsgiThreadStack | GunicornThreadStack]] = {
    "ours": AgentThreadStack, "gunicorn": GunicornThreadStack, "uwsgi": UwsgiThreadStack}
THREAD_CONNECTIONS = [16, 32, 64]
# The asgi part: each stack serving bench/apps/asgi.py, under the key of
# --stacks that selects it (its workloads and connection counts: asgi_report).
ASGI_STACKS: dict[str, type[AgentAsgiStack | UvicornStack | GranianStack]] = {
    "ours": AgentAsgiStack, "uvicorn": UvicornStack, "granian": GranianStack}
STACK_KEYS = [*THROUGHPUT_KEYS, *(key for key in ASGI_STACKS if key not in THROUGHPUT_KEYS)]
ROUNDS = 3
WARMUP_SECONDS = 1.0
IDLE_SECONDS = 3.0
HELLO_BODY = b"Hello, world!"      # bench/apps/asgi.py's answer to /
# What the peers' virtualenv has in its bin/ once bench/requirements.txt is in.
PEER_PROGRAMS = ["gunicorn", "uwsgi", "uvicorn", "granian", "websockets"]
APT_HINT = "apt-get install nginx wrk build-essential python3-dev python3-venv"


class SetupError(Exception):
    """Something the benchmark needs is missing; the message names it."""


# -- what the benchmark needs ------------------------------------------------

def find_program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def apt_install(packages: list[str], allowed: bool) -> None:
    if not allowed or os.geteuid() != 0:
        raise SetupError(f"missing: {' '.join(packages)}; install with: apt-get install {' '.join(packages)}")
    print(f"bench: installing {' '.join(packages)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=subprocess.DEVNULL)


def ensure_program(name: str, package: str, install: bool) -> str:
    found = find_program(name)
    if found is None:
        apt_install([package], install)
        found = find_program(name)
    if found is None:
        raise SetupError(f"{name} not found even after installing {package}")
    return found


def ensure_peers(venv: Path, app_python: str, install: bool) -> Path:
    """A virtualenv made from the apps' interpreter, holding gunicorn,
    uWSGI, uvicorn, Granian and websockets (bench/requirements.txt); uWSGI
    compiles against that interpreter's headers."""
    bin_dir = venv / "bin"
    if all((bin_dir / name).exists() for name in PEER_PROGRAMS):
        return bin_dir
    if not install:
        raise SetupError(f"{', '.join(PEER_PROGRAMS)} not all found in {venv}; make it with: {app_python} -m venv "
                         f"{venv} && {bin_dir}/pip install -r {REQUIREMENTS}")
    missing = [p for p, ok in (("build-essential", find_program("gcc")),
                               ("python3-dev", Path("/usr/include/python3.11/Python.h").exists()))
               if not ok]
    if missing:
        apt_install(missing, install)
    print(f"bench: installing {REQUIREMENTS.name} into {venv} (uWSGI compiles: about a minute)", flush=True)
    if not (bin_dir / "pip").exists():
        made = subprocess.run([app_python, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            apt_install(["python3-venv"], install)
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([app_python, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(bin_dir / "pip"), "install", "-q", "-r", str(REQUIREMENTS)],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise SetupError(f"pip could not install {REQUIREMENTS} into {venv}:\n{pip.stdout}{pip.stderr}\n"
                         f"(uWSGI needs gcc and Python headers: {APT_HINT})")
    return bin_dir


def ensure_django_venv(venv: Path, app_python: str, install: bool) -> Path:
    """examples/django's virtualenv (its requirements.txt), made by its
    make-venv.sh from the apps' interpreter."""
    if not (venv / "bin" / "python").exists() or not list(venv.glob("lib/python3*/site-packages/django")):
        script = DJANGO_SOURCE / "make-venv.sh"
        if not install:
            raise SetupError(f"no Django virtualenv in {venv}; make it with: {script} {venv} {app_python}")
        print(f"bench: making the Django virtualenv {venv} (pip install: a few seconds)", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([str(script), str(venv), app_python], capture_output=True, text=True)
        if made.returncode != 0:
            raise SetupError(f"{script} failed:\n{made.stdout}{made.stderr}")
    return venv


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SetupError(f"no lib/python3*/site-packages in {venv}")
    return found[0]


def agent_missing() -> str | None:
    """Why our stack cannot run yet, or None when it can."""
    if not (REPO / "build" / "ngx_http_agent_module.so").is_file():
        return "build/ngx_http_agent_module.so is not built (run `make build`)"
    if not list((REPO / "agent").glob("_native*.so")):
        return "agent/_native*.so is not built (run `make build`)"
    return None


def version_of(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


# -- running -----------------------------------------------------------------

def prepare_app(base: Path, source: Path = APP_SOURCE, name: str = "app") -> Path:
    """A copy of an app that the workers (user nobody) can read."""
    app_dir = base / name
    shutil.copytree(source, app_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3"))
    for path in [base, app_dir, *app_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return app_dir


def bench_apps(args: argparse.Namespace, base: Path) -> list[spawnmem.BenchApp]:
    """The apps of the spawn and memory runs, copied into base."""
    apps = []
    if "hello" in args.apps:
        apps.append(spawnmem.BenchApp("hello", "hello world", prepare_app(base, APP_SOURCE, "hello"),
                                      args.app_python, None, ("/",)))
    if "django" in args.apps:
        venv = args.django_venv
        apps.append(spawnmem.BenchApp("django", "Django", prepare_app(base, DJANGO_SOURCE, "django"),
                                      str(venv / "bin" / "python"), site_packages(venv), ("/", "/page")))
    return apps


Plan = list[tuple[str, str, str, int]]     # (workload, title, path, connections)


@dataclass(frozen=True)
class LoadFigures:
    """What a load client measured: wrk's or bench/wsload.py's."""

    rate: float
    p50: float
    p99: float
    requests: int
    errors: int
    cpu: float      # the client's own CPU seconds


def full_plan() -> Plan:
    return [(key, title, path, c) for key, title, path in WORKLOADS for c in CONNECTIONS]


def partial_plan(runs: list[tuple[str, int]]) -> Plan:
    titles = {key: (title, path) for key, title, path in WORKLOADS}
    return [(key, *titles[key], c) for key, c in runs]


def measure(stack: Stack, wrk_bin: str, duration: float, log: list[str], result: StackResult, plan: Plan,
            full: bool) -> None:
    """Runs wrk for each entry of plan, adding a Run to result for each.
    full: also every path's warm-up, the stack at rest, and memory."""
    stack.check_answers({"/": b"Hello, world\n", "/100k": b"x" * 102400, "/sleep": b"Hello, world\n"})
    for path in dict.fromkeys(path for _, _, path, _ in (full_plan() if full else plan)):
        wrk.run(wrk_bin, f"http://127.0.0.1:{stack.port}{path}", 16, WARMUP_SECONDS)
    if full:
        before = stack.cpu_by_process()
        time.sleep(IDLE_SECONDS)
        idle = procfs.cpu_split(before, stack.cpu_by_process())
        result.idle_seconds = IDLE_SECONDS
        result.idle_stack_cpu = sum(idle.values())
        if isinstance(stack, AgentStack):
            result.idle_agent_cpu = idle.get(AGENT_CORE, 0.0)
    where = f" ({stack.nginx_workers} nginx workers)" if stack.nginx_workers != 1 else ""
    for workload, title, path, connections in plan:
        stack.check_running()
        before = stack.cpu_by_process()
        machine_before, started = procfs.machine_busy_seconds(), time.monotonic()
        got = wrk.run(wrk_bin, f"http://127.0.0.1:{stack.port}{path}", connections, duration)
        machine_cpu, elapsed = procfs.machine_busy_seconds() - machine_before, time.monotonic() - started
        split = procfs.cpu_split(before, stack.cpu_by_process())
        stack_cpu = sum(split.values())
        agent_cpu = split.get(AGENT_CORE, 0.0) if isinstance(stack, AgentStack) else None
        run = Run(workload, connections, got.rate, got.p50, got.p99, got.requests, got.errors,
                  stack_cpu, agent_cpu, other_cpu=max(0.0, machine_cpu - stack_cpu - got.cpu),
                  seconds=elapsed, nginx_workers=stack.nginx_workers, cpu_split=split)
        result.runs.append(run)
        line = (f"  {stack.label:15} {title:12} c={connections:<3} {got.rate:10,.0f} req/s  "
                f"p50 {report.ms(got.p50):>8}  p99 {report.ms(got.p99):>8}  "
                f"stack {run.us_per_request(stack_cpu) or 0:6.1f} µs/req")
        if agent_cpu is not None:
            line += f"  agent core {run.us_per_request(agent_cpu) or 0:5.1f}"
        if got.errors:
            line += f"  errors {got.errors}"
        print(line + where, flush=True)
        log.append(got.output)
    if full:
        for pid in stack.workers():
            pss = procfs.pss_kib(pid)
            if pss is not None:
                result.worker_pss_kib.append(pss)
        result.other_memory = stack.other_memory()


def bench_stack(stack: Stack, wrk_bin: str, duration: float, result: StackResult, plan: Plan, full: bool,
                log_name: str | None = None, context: str | None = None,
                measurer: Callable[[list[str]], None] | None = None) -> None:
    """Starts stack, measures plan, stops it. log_name: the file in RESULTS
    for wrk's output (wrk-KEY.txt); context: what an error is prefixed with
    in result (else the nginx workers, when not a full run); measurer:
    what measures instead of measure() (given the log to add to)."""
    what = f"{stack.label} with {stack.nginx_workers} nginx worker{'s' if stack.nginx_workers > 1 else ''}"
    if context:
        what += f", {context}"
    print(f"bench: {what}: starting (run dir {stack.run_dir}, port {stack.port})", flush=True)
    log: list[str] = []
    try:
        stack.start()
        stack.wait_ready()
        if measurer is not None:
            measurer(log)
        else:
            measure(stack, wrk_bin, duration, log, result, plan, full)
    except (StackError, wrk.WrkError, wsload.LoadError, OSError) as e:
        print(f"bench: {what} failed: {e}", file=sys.stderr, flush=True)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if context:
            error = f"{context}: {first}"
        else:
            error = first if full else f"with {stack.nginx_workers} nginx workers: {first}"
        result.error = error if result.error is None else f"{result.error}; {error}"
    finally:
        stack.stop()
        suffix = "" if stack.nginx_workers == 1 else f"-nginx{stack.nginx_workers}"
        (RESULTS / (log_name or f"wrk-{stack.key}{suffix}.txt")).write_text("\n".join(log))


def make_stack(key: str, base: Path, app_dir: Path, nginx: str, peers_bin: Path | None, args: argparse.Namespace,
               nginx_workers: int, round_number: int) -> Stack:
    run_dir = base / (f"{key}-round{round_number}" if nginx_workers == 1
                      else f"{key}-nginx{nginx_workers}-round{round_number}")
    run_dir.mkdir()
    port = free_port()
    if key in ("ours", "relay"):
        kind = AgentStack if key == "ours" else RelayStack
        return kind(run_dir, port, app_dir, nginx_workers, args.buffers, nginx, REPO, sys.executable,
                          args.app_python)
    assert peers_bin is not None
    if key == "uwsgi":
        return UwsgiStack(run_dir, port, app_dir, nginx_workers, args.buffers, nginx, peers_bin)
    return GunicornStack(run_dir, port, app_dir, nginx_workers, args.buffers, nginx, peers_bin)


def make_thread_stack(key: str, base: Path, app_dir: Path, nginx: str, peers_bin: Path | None,
                      args: argparse.Namespace, round_number: int) -> Stack:
    kind = THREAD_STACKS[key]
    run_dir = base / f"{kind.key}-round{round_number}"
    run_dir.mkdir()
    port = free_port()
    if kind is AgentThreadStack:
        return AgentThreadStack(run_dir, port, app_dir, 1, args.buffers, nginx, REPO, sys.executable,
                                args.app_python)
    assert peers_bin is not None
    if kind is UwsgiThreadStack:
        return UwsgiThreadStack(run_dir, port, app_dir, 1, args.buffers, nginx, peers_bin)
    return GunicornThreadStack(run_dir, port, app_dir, 1, args.buffers, nginx, peers_bin)


def make_asgi_stack(key: str, base: Path, app_dir: Path, nginx: str, peers_bin: Path | None,
                    args: argparse.Namespace, round_number: int) -> Stack:
    kind = ASGI_STACKS[key]
    run_dir = base / f"{kind.key}-round{round_number}"
    run_dir.mkdir()
    port = free_port()
    if kind is AgentAsgiStack:
        # The peers' interpreter, which has uvloop: agent_asgi_loop auto takes it, as uvicorn's --loop auto does.
        assert peers_bin is not None
        return AgentAsgiStack(run_dir, port, app_dir, 1, args.buffers, nginx, REPO, sys.executable,
                              str(peers_bin / "python"))
    assert peers_bin is not None
    if kind is UvicornStack:
        return UvicornStack(run_dir, port, app_dir, 1, args.buffers, nginx, peers_bin)
    return GranianStack(run_dir, port, app_dir, 1, args.buffers, nginx, peers_bin)


def websocket_handshake(port: int, path: str, timeout: float = 10.0) -> str:
    """The status line the stack answers to a WebSocket opening handshake
    on path ("HTTP/1.1 101 Switching Protocols" when it upgrades)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request.encode())
        got = b""
        while b"\r\n" not in got:
            chunk = connection.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.split(b"\r\n", 1)[0].decode("latin-1").strip() or "nothing (the connection closed)"


def timed_run(stack: Stack, workload: str, connections: int, load: Callable[[], LoadFigures]) -> Run:
    """load() under stack, its CPU split by process role, and the machine's
    other CPU use (noise) over it."""
    stack.check_running()
    before = stack.cpu_by_process()
    machine_before, started = procfs.machine_busy_seconds(), time.monotonic()
    got = load()
    machine_cpu, elapsed = procfs.machine_busy_seconds() - machine_before, time.monotonic() - started
    split = procfs.cpu_split(before, stack.cpu_by_process())
    stack_cpu = sum(split.values())
    agent_cpu = split.get(AGENT_CORE, 0.0) if isinstance(stack, AgentStack) else None
    return Run(workload, connections, got.rate, got.p50, got.p99, got.requests, got.errors, stack_cpu, agent_cpu,
               other_cpu=max(0.0, machine_cpu - stack_cpu - got.cpu), seconds=elapsed,
               nginx_workers=stack.nginx_workers, cpu_split=split, client_cpu=got.cpu)


def measure_asgi(stack: Stack, wrk_bin: str, client_python: str, duration: float, result: StackResult,
                 log: list[str]) -> None:
    """The asgi part's runs of one round on a started stack: hello world
    with wrk, then the WebSocket echo with bench/wsload.py, at each of
    asgi_report.CONNECTIONS; the echo is noted as not measured for the
    agent when its /ws does not upgrade."""
    hello_key, hello_title, hello_path, hello_unit = asgi_report.HELLO
    echo_key, echo_title, echo_path, echo_unit = asgi_report.ECHO
    stack.check_answers({hello_path: HELLO_BODY})
    hello_url = f"http://127.0.0.1:{stack.port}{hello_path}"
    echo_url = f"ws://127.0.0.1:{stack.port}{echo_path}"
    wrk.run(wrk_bin, hello_url, 16, WARMUP_SECONDS)

    def report_line(title: str, unit: str, run: Run) -> None:
        line = (f"  {stack.label:17} {title:16} c={run.connections:<3} {run.rate:10,.0f} {unit:13}  "
                f"p50 {report.ms(run.p50):>8}  p99 {report.ms(run.p99):>8}  "
                f"stack {run.us_per_request(run.stack_cpu) or 0:6.1f} µs/each")
        if run.errors:
            line += f"  errors {run.errors}"
        print(line, flush=True)

    for connections in asgi_report.CONNECTIONS:
        def hello(connections: int = connections) -> LoadFigures:
            got = wrk.run(wrk_bin, hello_url, connections, duration)
            log.append(got.output)
            return LoadFigures(got.rate, got.p50, got.p99, got.requests, got.errors, got.cpu)
        run = timed_run(stack, hello_key, connections, hello)
        result.runs.append(run)
        report_line(hello_title, hello_unit, run)

    answer = websocket_handshake(stack.port, echo_path)
    if " 101 " not in f"{answer} ":
        why = f"{echo_path} answered {answer!r} to the WebSocket handshake"
        if result.key != "ours":
            raise StackError(f"{stack.label}: {why}")
        result.not_measured[echo_key] = why
        print(f"  {stack.label:17} {echo_title:16} {asgi_report.NOT_YET}: {why}", flush=True)
        return
    wsload.run(client_python, echo_url, 16, WARMUP_SECONDS)
    for connections in asgi_report.CONNECTIONS:
        def echo(connections: int = connections) -> LoadFigures:
            got, cpu = wsload.run(client_python, echo_url, connections, duration)
            log.append(f"wsload {echo_url} --connections {connections}: {asdict(got)}")
            if got.round_trips == 0:
                raise StackError(f"{stack.label}: no WebSocket round trip in {duration:g} s: {got.first_error}")
            return LoadFigures(got.rate, got.p50, got.p99, got.round_trips, got.errors, cpu)
        run = timed_run(stack, echo_key, connections, echo)
        result.runs.append(run)
        report_line(echo_title, echo_unit, run)


def run_asgi(args: argparse.Namespace, base: Path, nginx: str, wrk_bin: str, peers_bin: Path | None,
             stacks: list[Stack]) -> list[StackResult]:
    """The asgi part: args.rounds rounds, each starting every stack in turn
    (a different one first each round), running measure_asgi() and stopping
    it. A stack that fails is left out of the rounds after."""
    keys = [key for key in args.stacks if key in ASGI_STACKS]
    if not keys:
        print(f"bench: asgi part: none of --stacks is among {', '.join(ASGI_STACKS)}", file=sys.stderr, flush=True)
        return []
    assert peers_bin is not None     # the WebSocket load client runs in the peers' virtualenv
    client_python = str(peers_bin / "python")
    results = {key: StackResult(key, ASGI_STACKS[key].label) for key in keys}
    if "ours" in results and (why := agent_missing()):
        print(f"bench: {AgentAsgiStack.label} skipped: {why}", file=sys.stderr, flush=True)
        results["ours"].error = why
    app_dir = prepare_app(base, APP_SOURCE, "asgi-app")

    def run_one(stack_key: str, number: int, result: StackResult) -> None:
        stack = make_asgi_stack(stack_key, base, app_dir, nginx, peers_bin, args, number)
        stacks.append(stack)

        def measurer(log: list[str]) -> None:
            measure_asgi(stack, wrk_bin, client_python, args.duration, result, log)
        bench_stack(stack, wrk_bin, args.duration, result, [], full=False,
                    log_name=f"wrk-{stack.key}-round{number}.txt", context=f"round {number} of {args.rounds}",
                    measurer=measurer)
    in_rounds(args.rounds, results, run_one)
    return list(results.values())


def in_rounds(rounds: int, results: dict[str, StackResult], run_one: Callable[[str, int, StackResult], None]) -> None:
    """rounds rounds, each running every stack of results once, a
    different one first each round. A stack that failed (its result's
    error set) is left out of the rounds after."""
    keys = list(results)
    for number in range(1, rounds + 1):
        shift = (number - 1) % len(keys)
        for stack_key in keys[shift:] + keys[:shift]:
            if results[stack_key].error is None:
                run_one(stack_key, number, results[stack_key])


def buffer_settings(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(stack, directives) for the report."""
    rows = [(report.SHORT["gunicorn"], " ".join(args.buffers.directives("proxy"))),
            (report.SHORT["uwsgi"], " ".join(args.buffers.directives("uwsgi")))]
    return [(report.SHORT["ours"], " ".join(args.buffers.directives("agent"))), *rows]


def nginx_size(text: str) -> str:
    if re.fullmatch(r"[1-9][0-9]*[kKmM]?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an nginx size (like 8k)")
    return text


def nginx_buffers(text: str) -> str:
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not NUMBER SIZE (like '8 8k'; NUMBER at least 2)")
    return f"{int(parts[0])} {nginx_size(parts[1])}"


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark nginx→agent against nginx→uWSGI and nginx→gunicorn.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    parser.add_argument("--quick", action="store_true", help="3 s per run, report to bench/results/quick.md")
    parser.add_argument("--stacks", default=",".join(STACK_KEYS),
                        help=f"comma-separated, from {','.join(STACK_KEYS)} (all)")
    parser.add_argument("--app-python", default="/usr/bin/python3",
                        help="the interpreter of every stack's workers (/usr/bin/python3)")
    parser.add_argument("--peers-venv", type=Path, default=RESULTS / "peers-venv",
                        help="virtualenv for gunicorn and uWSGI, made from --app-python (bench/results/peers-venv)")
    parser.add_argument("--output", type=Path, help="the Markdown report (docs/benchmarks.md; "
                        "bench/results/quick.md with --quick)")
    parser.add_argument("--no-install", action="store_true", help="never install anything; name what is missing")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (configs, logs) under /tmp")
    defaults = Buffers()
    parser.add_argument("--buffer-size", type=nginx_size, default=defaults.buffer_size,
                        help=f"every stack's *_buffer_size ({defaults.buffer_size})")
    parser.add_argument("--buffers", type=nginx_buffers, default=defaults.buffers,
                        help=f"every stack's *_buffers, NUMBER SIZE ({defaults.buffers})")
    parser.add_argument("--busy-buffers-size", type=nginx_size, default=defaults.busy_buffers_size,
                        help=f"every stack's *_busy_buffers_size ({defaults.busy_buffers_size})")
    parser.add_argument("--more-nginx-workers", type=int, default=2, metavar="N",
                        help="nginx's worker_processes in the second pass (hello world at 16 and 64 "
                        "connections); 0 or 1 skips it (2)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts, from {','.join(PARTS)} (all); "
                        "`--only spawn,memory` is `make bench-spawn`")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"every part's rounds but spawn and memory; the report takes each figure's "
                        f"median ({ROUNDS})")
    parser.add_argument("--threads-output", type=Path, help="the threads part's report "
                        "(docs/benchmarks-threads.md; bench/results/quick-threads.md with --quick)")
    parser.add_argument("--asgi-output", type=Path, help="the asgi part's report "
                        "(docs/benchmarks-asgi.md; bench/results/quick-asgi.md with --quick)")
    parser.add_argument("--apps", default=",".join(APPS),
                        help=f"the spawn and memory runs' apps, from {','.join(APPS)} (both)")
    parser.add_argument("--spawn-stacks", default=",".join(spawnmem.SPAWN_STACKS),
                        help=f"the spawn and memory runs' stacks, from {','.join(spawnmem.SPAWN_STACKS)} (all)")
    parser.add_argument("--spawns", type=int, default=spawnmem.SPAWNS,
                        help=f"spawns measured per stack and app ({spawnmem.SPAWNS})")
    parser.add_argument("--memory-workers", default=",".join(map(str, spawnmem.MEMORY_WORKERS)),
                        help="the worker counts of the memory runs (1,4,16)")
    parser.add_argument("--django-venv", type=Path, default=RESULTS / "django-venv",
                        help="examples/django's virtualenv, made when missing (bench/results/django-venv)")
    parser.add_argument("--spawn-output", type=Path, help="the spawn and memory report "
                        "(docs/benchmarks-spawn.md; bench/results/quick-spawn.md with --quick)")
    args = parser.parse_args(argv)
    args.buffers = Buffers(args.buffer_size, args.buffers, args.busy_buffers_size)
    for name, allowed in (("only", PARTS), ("apps", APPS), ("spawn_stacks", spawnmem.SPAWN_STACKS)):
        chosen = [item.strip() for item in getattr(args, name).split(",") if item.strip()]
        wrong = [item for item in chosen if item not in allowed]
        if wrong or not chosen:
            parser.error(f"--{name.replace('_', '-')}: {', '.join(wrong) or 'nothing'} "
                         f"not among {', '.join(allowed)}")
        setattr(args, name, chosen)
    try:
        args.memory_workers = [int(n) for n in args.memory_workers.split(",")]
    except ValueError:
        parser.error(f"--memory-workers: {args.memory_workers!r} is not a list of numbers")
    if args.spawns < 1 or min(args.memory_workers) < 1:
        parser.error("--spawns and --memory-workers must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads_output is None:
        args.threads_output = RESULTS / "quick-threads.md" if args.quick else REPO / "docs" / "benchmarks-threads.md"
    if args.asgi_output is None:
        args.asgi_output = RESULTS / "quick-asgi.md" if args.quick else REPO / "docs" / "benchmarks-asgi.md"
    if args.spawn_output is None:
        args.spawn_output = RESULTS / "quick-spawn.md" if args.quick else REPO / "docs" / "benchmarks-spawn.md"
    if args.quick:
        args.duration = 3.0
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in args.stacks if s not in STACK_KEYS]
    if unknown:
        parser.error(f"unknown stack(s) {', '.join(unknown)}; choose from {', '.join(STACK_KEYS)}")
    if args.output is None:
        args.output = RESULTS / "quick.md" if args.quick else REPO / "docs" / "benchmarks.md"
    return args


def needs_peers(args: argparse.Namespace) -> bool:
    throughput = "throughput" in args.only and any(s in ("uwsgi", "gunicorn") for s in args.stacks)
    threads = "threads" in args.only and any(s in ("uwsgi", "gunicorn") for s in args.stacks)
    # The asgi part's WebSocket load client runs in the peers' virtualenv, whatever the stacks.
    asgi = "asgi" in args.only and any(s in ASGI_STACKS for s in args.stacks)
    spawn = bool({"spawn", "memory"} & set(args.only)) and any(s not in ("smart", "direct")
                                                               for s in args.spawn_stacks)
    return throughput or threads or asgi or spawn


def machine_info(args: argparse.Namespace, nginx: str, wrk_bin: str, peers_bin: Path | None) -> report.Machine:
    load = os.getloadavg()
    return report.Machine(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=report.cpu_model(), cores=os.cpu_count() or 0, kernel=platform.release(),
        memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        nginx=version_of([nginx, "-v"]).split("/")[-1], wrk=version_of([wrk_bin, "--version"]).split()[1],
        app_python=version_of([args.app_python, "--version"]).split()[-1] + f" ({args.app_python})",
        agent_python=platform.python_version() + f" ({sys.executable})",
        gunicorn=version_of([str(peers_bin / "gunicorn"), "--version"]).split()[-1].strip(")") if peers_bin
        else "-",
        uwsgi=version_of([str(peers_bin / "uwsgi"), "--version"]) if peers_bin else "-",
        uvicorn=version_of([str(peers_bin / "uvicorn"), "--version"]).split(" with ")[0].split()[-1]
        if peers_bin else "-",
        granian=version_of([str(peers_bin / "granian"), "--version"]).split()[-1] if peers_bin else "-",
        websockets=version_of([str(peers_bin / "python"), "-c", "import websockets; print(websockets.__version__)"])
        if peers_bin else "-",
        duration=args.duration, load=f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        buffers=buffer_settings(args), more_nginx_workers=max(1, args.more_nginx_workers))


def run_throughput(args: argparse.Namespace, base: Path, nginx: str, wrk_bin: str, peers_bin: Path | None,
                   stacks: list[Stack]) -> list[StackResult]:
    """The throughput part: args.rounds rounds, each starting every stack in
    turn (a different one first each round), running its plan and stopping
    it, then starting it again with nginx at args.more_nginx_workers worker
    processes for MORE_WORKERS_RUNS. The first round also measures each
    stack at rest and its memory. A stack that fails is left out of the
    rounds after."""
    results = {key: StackResult(key, STACK_LABELS[key]) for key in args.stacks if key in THROUGHPUT_KEYS}
    for key in ("ours", "relay"):
        if key in results and (why := agent_missing()):
            print(f"bench: {STACK_LABELS[key]} skipped: {why}", file=sys.stderr, flush=True)
            results[key].error = why
    app_dir = prepare_app(base)

    def run_one(stack_key: str, number: int, result: StackResult) -> None:
        context = f"round {number} of {args.rounds}"
        stack = make_stack(stack_key, base, app_dir, nginx, peers_bin, args, 1, number)
        stacks.append(stack)
        plan = partial_plan(RELAY_RUNS) if stack_key == "relay" else full_plan()
        bench_stack(stack, wrk_bin, args.duration, result, plan, full=stack_key != "relay" and number == 1,
                    log_name=f"wrk-{stack_key}-round{number}.txt", context=context)
        if args.more_nginx_workers > 1 and result.error is None and stack_key != "relay":
            workers = args.more_nginx_workers
            stack = make_stack(stack_key, base, app_dir, nginx, peers_bin, args, workers, number)
            stacks.append(stack)
            bench_stack(stack, wrk_bin, args.duration, result, partial_plan(MORE_WORKERS_RUNS), full=False,
                        log_name=f"wrk-{stack_key}-nginx{workers}-round{number}.txt",
                        context=f"{context}, with {workers} nginx workers")
    in_rounds(args.rounds, results, run_one)
    return list(results.values())


def run_threads(args: argparse.Namespace, base: Path, nginx: str, wrk_bin: str, peers_bin: Path | None,
                stacks: list[Stack]) -> list[StackResult]:
    """The threads part: args.rounds rounds, each starting every stack in
    turn (a different one first each round), running the sleep at each of
    THREAD_CONNECTIONS, and stopping it. A stack that fails is left out of
    the rounds after."""
    keys = [key for key in args.stacks if key in THREAD_STACKS]
    if not keys:
        print(f"bench: threads part: none of --stacks is among {', '.join(THREAD_STACKS)}", file=sys.stderr,
              flush=True)
        return []
    results = {key: StackResult(key, THREAD_STACKS[key].label) for key in keys}
    if "ours" in results and (why := agent_missing()):
        print(f"bench: {AgentThreadStack.label} skipped: {why}", file=sys.stderr, flush=True)
        results["ours"].error = why
    app_dir = prepare_app(base, APP_SOURCE, "threads-app")
    key, title, path = threads_report.WORKLOAD
    plan = [(key, title, path, c) for c in THREAD_CONNECTIONS]

    def run_one(stack_key: str, number: int, result: StackResult) -> None:
        stack = make_thread_stack(stack_key, base, app_dir, nginx, peers_bin, args, number)
        stacks.append(stack)
        bench_stack(stack, wrk_bin, args.duration, result, plan, full=False,
                    log_name=f"wrk-{stack.key}-round{number}.txt", context=f"round {number} of {args.rounds}")
    in_rounds(args.rounds, results, run_one)
    return list(results.values())


def run_spawn_memory(args: argparse.Namespace, base: Path, nginx: str, wrk_bin: str,
                     peers_bin: Path | None) -> tuple[list[SpawnFigures], list[MemoryFigures]]:
    kinds = list(args.spawn_stacks)
    if (why := agent_missing()) and any(k in ("smart", "direct") for k in kinds):
        print(f"bench: the agent's stacks skipped: {why}", file=sys.stderr, flush=True)
        kinds = [k for k in kinds if k not in ("smart", "direct")]
    setup = spawnmem.Setup(base, nginx, wrk_bin, peers_bin, REPO, sys.executable, args.buffers)
    parts = {p for p in args.only if p != "throughput"}
    return spawnmem.run_all(setup, bench_apps(args, base), kinds, parts, args.spawns, args.memory_workers)


def write_throughput_report(args: argparse.Namespace, info: report.Machine, results: list[StackResult]) -> None:
    text = report.markdown(info, results, WORKLOADS, CONNECTIONS, quick=args.quick, rounds=args.rounds)
    print()
    print(report.settings_section(info))
    print(report.results_section(results, WORKLOADS, CONNECTIONS, info.more_nginx_workers))
    print(report.noise_note(results, info.cores))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    (RESULTS / "last.json").write_text(json.dumps(
        {"machine": asdict(info), "results": [asdict(r) for r in results]}, indent=2, default=str))
    print(f"bench: report written to {args.output}")


def write_threads_report(args: argparse.Namespace, info: report.Machine, results: list[StackResult]) -> None:
    print()
    print(threads_report.results_section(results, THREAD_CONNECTIONS, args.rounds))
    print(threads_report.noise_note(results, info.cores))
    args.threads_output.parent.mkdir(parents=True, exist_ok=True)
    args.threads_output.write_text(threads_report.markdown(info, results, THREAD_CONNECTIONS, args.rounds,
                                                           quick=args.quick))
    (RESULTS / "threads.json").write_text(json.dumps(
        {"machine": asdict(info), "rounds": args.rounds, "results": [asdict(r) for r in results]},
        indent=2, default=str))
    print(f"bench: threads report written to {args.threads_output}")


def write_asgi_report(args: argparse.Namespace, info: report.Machine, results: list[StackResult]) -> None:
    print()
    print(asgi_report.results_section(results, args.rounds))
    print(asgi_report.noise_note(results, info.cores))
    args.asgi_output.parent.mkdir(parents=True, exist_ok=True)
    args.asgi_output.write_text(asgi_report.markdown(info, results, args.rounds, quick=args.quick))
    (RESULTS / "asgi.json").write_text(json.dumps(
        {"machine": asdict(info), "rounds": args.rounds, "results": [asdict(r) for r in results]},
        indent=2, default=str))
    print(f"bench: asgi report written to {args.asgi_output}")


def write_spawn_report(args: argparse.Namespace, info: report.Machine, spawns: list[SpawnFigures],
                       memory: list[MemoryFigures]) -> None:
    print()
    print(spawn_report.results_section(spawns, memory))
    args.spawn_output.parent.mkdir(parents=True, exist_ok=True)
    args.spawn_output.write_text(spawn_report.markdown(info, spawns, memory))
    (RESULTS / "spawn.json").write_text(json.dumps(
        {"machine": asdict(info), "spawn": [asdict(r) for r in spawns], "memory": [asdict(r) for r in memory]},
        indent=2, default=str))
    print(f"bench: spawn and memory report written to {args.spawn_output}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    RESULTS.mkdir(exist_ok=True)
    install = not args.no_install
    try:
        nginx = ensure_program("nginx", "nginx", install)
        wrk_bin = ensure_program("wrk", "wrk", install)
        if not Path(args.app_python).is_file():
            raise SetupError(f"the app interpreter {args.app_python} does not exist (apt-get install python3)")
        peers_bin = ensure_peers(args.peers_venv, args.app_python, install) if needs_peers(args) else None
        if "django" in args.apps and {"spawn", "memory"} & set(args.only):
            args.django_venv = ensure_django_venv(args.django_venv.resolve(), args.app_python, install)
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130

    info = machine_info(args, nginx, wrk_bin, peers_bin)
    results: list[StackResult] = []
    thread_results: list[StackResult] = []
    asgi_results: list[StackResult] = []
    spawns: list[SpawnFigures] = []
    memory: list[MemoryFigures] = []
    base = Path(tempfile.mkdtemp(prefix="agent-bench-", dir="/tmp"))
    stacks: list[Stack] = []
    try:
        if "throughput" in args.only:
            results = run_throughput(args, base, nginx, wrk_bin, peers_bin, stacks)
        if "threads" in args.only:
            thread_results = run_threads(args, base, nginx, wrk_bin, peers_bin, stacks)
        if "asgi" in args.only:
            asgi_results = run_asgi(args, base, nginx, wrk_bin, peers_bin, stacks)
        if {"spawn", "memory"} & set(args.only):
            spawns, memory = run_spawn_memory(args, base, nginx, wrk_bin, peers_bin)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping what was started", file=sys.stderr)
        return 130
    finally:
        for stack in stacks:
            stack.stop()
        if args.keep:
            print(f"bench: run directory kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    end = os.getloadavg()
    info.load_end = f"{end[0]:.2f} {end[1]:.2f} {end[2]:.2f}"
    if "throughput" in args.only:
        write_throughput_report(args, info, results)
    if "threads" in args.only:
        write_threads_report(args, info, thread_results)
    if "asgi" in args.only:
        write_asgi_report(args, info, asgi_results)
    if spawns or memory:
        write_spawn_report(args, info, spawns, memory)
    return 0 if not failures([*results, *thread_results, *asgi_results], spawns, memory) else 1


def failures(results: list[StackResult], spawns: list[SpawnFigures], memory: list[MemoryFigures]) -> list[str]:
    """What failed the run: a stack this build cannot run is in the report
    as not available, and is not a failure."""
    every: list[StackResult | SpawnFigures | MemoryFigures] = [*results, *spawns, *memory]
    errors = [r.error for r in every if r.error]
    return [e for e in errors if not e.startswith(NOT_AVAILABLE)]


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
