"""Capacity figures for docs/scaling.md: requests per second per core and
memory per worker, measured on this machine.

For each app it runs `agentctl serve APP` (nginx with one worker process,
the agent, WORKERS app workers), warms it with wrk, then runs wrk at
CONNECTIONS connections for DURATION seconds while it reads, from /proc,
the CPU time of every process of the stack (nginx, the agent, the workers,
and redis-server for the app that uses it). Requests per core is requests
divided by the stack's CPU seconds: what one fully busy core serves, wrk's
own CPU left out. Memory per worker is each worker's PSS and USS (private)
after the run.

    .venv/bin/python bench/capacity.py [--duration 10] [--apps hello,shared-state,django]
                                       [--spawn-methods direct,smart]

Each app runs once per spawn method (agent_spawn_method). Needs root (the
agent runs workers as nobody), wrk, redis-server, the built module (`make
build`) and PyPI for the apps' virtualenvs (shared-state's redis client,
examples/django's Django). Prints a Markdown table and writes
bench/results/capacity.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import procfs
import wrk

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
APP_PYTHON = "/usr/bin/python3"
RESULTS = BENCH / "results"


@dataclass
class Figures:
    app: str
    spawn_method: str
    workers: int
    connections: int
    seconds: float
    requests: int
    errors: int
    rate: float                 # requests per second, as wrk measured
    stack_cpu: float            # CPU seconds of every process of the stack
    wrk_cpu: float
    machine_busy: float         # CPU seconds the whole machine was busy
    per_core: float             # requests per CPU second of the stack
    pss_mib: list[float]        # per worker
    uss_mib: list[float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uss_kib(pid: int) -> int | None:
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    sock = directory / "redis.sock"
    process = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "777",
                                "--save", "", "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)


def app_virtualenv(directory: Path, app: str) -> Path:
    """The example's own virtualenv, with its requirements.txt."""
    if not (directory / "bin" / "python").exists():
        subprocess.run([APP_PYTHON, "-m", "venv", str(directory)], check=True)
        subprocess.run([str(directory / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(REPO / "examples" / app / "requirements.txt")], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(directory)], check=True)
    return directory / "bin" / "python"


@contextlib.contextmanager
def serving(app_dir: Path, run_dir: Path, workers: int, extra: list[str]) -> Iterator[tuple[int, int]]:
    """`agentctl serve`; yields (port, serve's pid)."""
    port = free_port()
    command = [sys.executable, "-m", "agent.cli", "serve", str(app_dir), "--port", str(port), "--run-dir",
               str(run_dir), "--min-instances", str(workers), "--max-instances", str(workers), "--prestart", "on",
               *extra]
    with open(run_dir.parent / f"serve-{app_dir.name}.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not answers(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not answer; see {log.name}")
                time.sleep(0.1)
            yield port, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


PRELOADER_NAME = "agent-preloader"


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def workers_of(root: int) -> list[int]:
    """The app workers under root: the loader's processes but the preloader."""
    return [pid for pid in procfs.descendants(root)
            if "/loaders/" in procfs.command_line(pid) and process_name(pid) != PRELOADER_NAME]


def stack_cpu(pids: list[int]) -> dict[int, float]:
    seconds = {pid: procfs.cpu_seconds(pid) for pid in pids}
    return {pid: s for pid, s in seconds.items() if s is not None}


def measure(name: str, method: str, port: int, roots: list[int], workers: int, connections: int,
            duration: float) -> Figures:
    url = f"http://127.0.0.1:{port}/"
    wrk.run("wrk", url, connections, 2)                      # warm-up: imports, caches, connections
    pids = sorted({p for root in roots for p in [root, *procfs.descendants(root)]})
    before, busy_before = stack_cpu(pids), procfs.machine_busy_seconds()
    result = wrk.run("wrk", url, connections, duration)
    after, busy_after = stack_cpu(pids), procfs.machine_busy_seconds()
    used = sum(after[pid] - before[pid] for pid in after if pid in before)
    worker_pids = [pid for root in roots for pid in workers_of(root)]
    mib = 1024.0
    return Figures(name, method, workers, connections, result.seconds, result.requests, result.errors, result.rate,
                   used, result.cpu, busy_after - busy_before, result.requests / used if used else 0.0,
                   [round((procfs.pss_kib(p) or 0) / mib, 1) for p in worker_pids],
                   [round((uss_kib(p) or 0) / mib, 1) for p in worker_pids])


def run_app(name: str, method: str, scratch: Path, workers: int, connections: int, duration: float) -> Figures:
    app_dir = scratch / f"{name}-{method}"
    shutil.copytree(REPO / "examples" / name, app_dir, ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3"))
    run_dir = scratch / f"run-{name}-{method}"
    subprocess.run(["chmod", "-R", "a+rX", str(scratch)], check=True)
    extra = ["--spawn-method", method]
    if name == "hello":
        with serving(app_dir, run_dir, workers, extra) as (port, pid):
            return measure(name, method, port, [pid], workers, connections, duration)
    python = app_virtualenv(scratch / f"venv-{name}", name)
    extra += ["--python", str(python)]
    if name == "django":
        with serving(app_dir, run_dir, workers, extra) as (port, pid):
            return measure(name, method, port, [pid], workers, connections, duration)
    store = scratch / f"redis-{method}"
    store.mkdir()
    os.chmod(store, 0o755)
    with redis_server(store) as redis:
        extra += ["--env", f"REDIS_URL=unix://{store / 'redis.sock'}"]
        with serving(app_dir, run_dir, workers, extra) as (port, pid):
            return measure(name, method, port, [pid, redis.pid], workers, connections, duration)


def table(rows: list[Figures]) -> str:
    lines = ["| app | spawn method | workers | connections | req/s | stack CPU s | req per CPU second | errors | "
             "PSS per worker (MiB) | USS per worker (MiB) |", "| --- " * 10 + "|"]
    for f in rows:
        lines.append(f"| {f.app} | {f.spawn_method} | {f.workers} | {f.connections} | {f.rate:,.0f} | "
                     f"{f.stack_cpu:.1f} | "
                     f"{f.per_core:,.0f} | {f.errors} | {', '.join(map(str, f.pss_mib))} | "
                     f"{', '.join(map(str, f.uss_mib))} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--apps", default="hello,shared-state,django")
    parser.add_argument("--spawn-methods", default="direct,smart")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="agent-capacity-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    try:
        rows = [run_app(name, method, scratch, args.workers, args.connections, args.duration)
                for name in args.apps.split(",") for method in args.spawn_methods.split(",")]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capacity.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
