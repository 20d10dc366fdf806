"""Runs wrk and reads its report."""

from __future__ import annotations

import dataclasses
import re
import resource
import subprocess
from dataclasses import dataclass

UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION = r"([0-9.]+)(us|ms|s|m|h)"


class WrkError(Exception):
    """wrk failed or printed something this module cannot read."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rate: float              # requests per second, as wrk reports it
    p50: float               # seconds
    p99: float               # seconds
    non_2xx: int
    socket_errors: int       # connect + read + write + timeout
    output: str
    cpu: float = 0.0         # wrk's own CPU time, seconds

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def seconds(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]


def parse(output: str) -> WrkResult:
    """Reads the report wrk prints with --latency."""
    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise WrkError(f"no match for {pattern!r} in wrk's output:\n{output}")
        return match

    total = need(r"^\s*(\d+) requests in " + DURATION)
    rate = need(r"^Requests/sec:\s*([0-9.]+)")
    p50 = need(r"^\s*50(?:\.0+)?%\s+" + DURATION)
    p99 = need(r"^\s*99(?:\.0+)?%\s+" + DURATION)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=seconds(total.group(2), total.group(3)),
        rate=float(rate.group(1)),
        p50=seconds(p50.group(1), p50.group(2)),
        p99=seconds(p99.group(1), p99.group(2)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
        output=output,
    )


def run(wrk: str, url: str, connections: int, duration: float) -> WrkResult:
    """wrk with two threads (one when there is a single connection: wrk
    needs a connection per thread), for duration seconds, with --latency."""
    threads = min(2, connections)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as e:
        raise WrkError(f"wrk did not finish within {duration + 30:g} s: {' '.join(command)}") from e
    if done.returncode != 0:
        raise WrkError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result = dataclasses.replace(parse(done.stdout), cpu=cpu)
    if result.requests == 0:
        raise WrkError(f"no request completed in {duration:g} s ({' '.join(command)}): the stack stopped answering")
    return result
