"""A WebSocket echo load: N connections, each sending a message and waiting
for its echo, over and over, for D seconds.

    PYTHON bench/wsload.py ws://127.0.0.1:8080/ws --connections 16 --duration 5

Runs in the peers' virtualenv (bench/requirements.txt: websockets, and
uvloop when it is there). The connections are split over --processes
processes (2, as wrk's two threads), each an asyncio event loop. Every
process opens all its connections first; then each connection loops for
the duration: send a message of --size bytes (text), wait for the answer,
check it is the same message, take the time. A connection whose handshake
fails, that closes, or that answers something else counts one error and
stops.

Prints one JSON object: round_trips, seconds (the longest process's
measured time), rate (round trips per second: the sum of each process's
rate), p50 and p99 (seconds, over every round trip), errors, the first
error's text, and loop (asyncio or uvloop).

The figures' arithmetic (percentile, combine) needs no websockets: the
benchmark's tests import this module without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 10.0


@dataclass
class Part:
    """What one process measured."""

    round_trips: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    loop: str = "asyncio"


@dataclass(frozen=True)
class Summary:
    round_trips: int
    seconds: float
    rate: float
    p50: float
    p99: float
    errors: int
    first_error: str | None
    loop: str


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of values sorted ascending; 0 when none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def combine(parts: Sequence[Part]) -> Summary:
    """One figure from the processes' parts: the rates add up (each process
    measured over its own time), the latencies are pooled."""
    latencies = sorted(value for part in parts for value in part.latencies)
    errors = [part.first_error for part in parts if part.first_error]
    return Summary(
        round_trips=sum(part.round_trips for part in parts),
        seconds=max((part.seconds for part in parts), default=0.0),
        rate=sum(part.round_trips / part.seconds for part in parts if part.seconds > 0),
        p50=percentile(latencies, 0.50), p99=percentile(latencies, 0.99),
        errors=sum(part.errors for part in parts), first_error=errors[0] if errors else None,
        loop=parts[0].loop if parts else "asyncio")


def split(connections: int, processes: int) -> list[int]:
    """connections spread over at most processes, none of them empty."""
    processes = max(1, min(processes, connections))
    return [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]


async def run_part(url: str, connections: int, duration: float, size: int) -> Part:
    import websockets.asyncio.client as client  # the peers' virtualenv has it; the tests' need not

    part = Part()
    message = "x" * size

    def failed(why: str) -> None:
        part.errors += 1
        if part.first_error is None:
            part.first_error = why

    async def connect() -> Any:
        try:
            return await asyncio.wait_for(client.connect(url, compression=None, max_size=None, ping_interval=None),
                                          CONNECT_TIMEOUT)
        except Exception as e:      # any failure is the stack's: counted, reported
            failed(f"connect: {type(e).__name__}: {e}")
            return None

    sockets = [ws for ws in await asyncio.gather(*(connect() for _ in range(connections))) if ws is not None]
    started = time.monotonic()
    deadline = started + duration

    async def loop(ws: Any) -> None:
        latencies = part.latencies
        try:
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                await ws.send(message)
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    answer = await ws.recv()
                latencies.append(time.perf_counter() - sent)
                if answer != message:
                    failed(f"the echo differs: {len(answer)} characters for {len(message)}")
                    return
                part.round_trips += 1
        except Exception as e:
            failed(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(loop(ws) for ws in sockets))
    part.seconds = time.monotonic() - started
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return part


def part_in_process(job: tuple[str, int, float, int]) -> Part:
    url, connections, duration, size = job
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(run_part(url, connections, duration, size))
    part = uvloop.run(run_part(url, connections, duration, size))
    part.loop = "uvloop"
    assert isinstance(part, Part)
    return part


class LoadError(Exception):
    """The load client failed or printed something unreadable."""


def run(python: str, url: str, connections: int, duration: float, processes: int = 2) -> tuple[Summary, float]:
    """This script under python (an interpreter with websockets): the
    summary, and the CPU seconds the client used (its processes')."""
    command = [python, __file__, url, "--connections", str(connections), "--duration", f"{duration:g}",
               "--processes", str(processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"the WebSocket load did not finish within {duration + 60:g} s: {' '.join(command)}") from e
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise LoadError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    try:
        summary = Summary(**json.loads(done.stdout))
    except (ValueError, TypeError) as e:
        raise LoadError(f"unreadable output of {' '.join(command)}: {done.stdout!r}") from e
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return summary, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WebSocket echo round trips over N connections for D seconds.")
    parser.add_argument("url", help="ws://HOST:PORT/PATH")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="bytes per message")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.processes < 1 or args.size < 1:
        parser.error("--connections, --processes and --size must be at least 1, --duration above 0")
    jobs = [(args.url, n, args.duration, args.size) for n in split(args.connections, args.processes)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        parts = pool.map(part_in_process, jobs)
    json.dump(asdict(combine(parts)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
