"""Prometheus text exposition (format 0.0.4) of the agent's counters.

The core fills a MetricsSnapshot from its pool and the engine's counters;
render() turns it into the text served at GET /metrics. Names and labels
are those of docs/status-api.md. No client library is needed at runtime:
the format is small, and the snapshot is plain data so that it can be
built and rendered without a running agent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PROCESS_STATES = ("starting", "serving", "idle", "detaching", "stopping")
REJECT_REASONS = ("queue_full", "queue_timeout", "request_timeout", "worker_failed")
RESTART_CAUSES = ("crash", "memory_limit", "max_requests", "request_time", "idle", "pool_full",
                  "rolling_restart", "always_restart", "detached")
MEMORY_KINDS = ("rss", "pss", "private", "swap")


@dataclass(frozen=True)
class Histogram:
    """Observations counted per bucket, as the engine keeps them.

    `bounds` are the buckets' upper bounds in seconds, ascending, without
    +Inf. `counts` holds one count per bucket, not cumulative, plus a last
    one for the observations above the highest bound; so
    len(counts) == len(bounds) + 1. `total` is the sum of all observed
    values in seconds.
    """

    bounds: Sequence[float]
    counts: Sequence[int]
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"a histogram with {len(self.bounds)} bounds needs {len(self.bounds) + 1} counts")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError("histogram bounds must be strictly ascending")

    @classmethod
    def empty(cls, bounds: Sequence[float]) -> Histogram:
        return cls(bounds=tuple(bounds), counts=(0,) * (len(bounds) + 1), total=0.0)

    def cumulative(self) -> Iterator[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf."""
        running = 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += count
            yield bound, running

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class ProcessMetrics:
    pid: int
    state: str                                   # one of PROCESS_STATES
    memory: Mapping[str, int]                    # MEMORY_KINDS -> bytes
    cpu_seconds: float = 0.0                     # user + system since the worker started
    requests: int = 0                            # requests the worker has finished


@dataclass(frozen=True)
class PreloaderMetrics:
    pid: int
    memory: Mapping[str, int]                    # MEMORY_KINDS -> bytes


@dataclass(frozen=True)
class AppMetrics:
    name: str
    requests: int = 0
    duration: Histogram | None = None            # request durations; None: not measured
    rejected: Mapping[str, int] = field(default_factory=dict)   # REJECT_REASONS -> count
    queue_length: int = 0
    processes: Sequence[ProcessMetrics] = ()
    spawns: int = 0
    spawn_failures: int = 0
    spawn_duration: Histogram | None = None      # start-to-ready times; None: not measured
    restarts: Mapping[str, int] = field(default_factory=dict)   # RESTART_CAUSES -> count
    preloaders: Sequence[PreloaderMetrics] = ()  # smart spawning: the app's preloader(s)


@dataclass(frozen=True)
class MetricsSnapshot:
    uptime: float                                # seconds since the core started
    apps: Sequence[AppMetrics] = ()


Labels = Sequence[tuple[str, str]]
Sample = tuple[str, Labels, float]


@dataclass(frozen=True)
class Family:
    name: str
    kind: str          # counter | gauge | histogram
    help: str
    samples: Sequence[Sample]


def render(snapshot: MetricsSnapshot) -> str:
    """The whole exposition, every family with its HELP and TYPE lines."""
    return "".join(render_family(family) for family in families(snapshot))


def families(snapshot: MetricsSnapshot) -> list[Family]:
    apps = snapshot.apps
    return [
        Family("agent_requests_total", "counter", "Requests routed to the app.",
               [("agent_requests_total", [("app", a.name)], a.requests) for a in apps]),
        Family("agent_request_duration_seconds", "histogram", "Time from reading the request to its response's end.",
               list(histogram_samples("agent_request_duration_seconds",
                                      [(a.name, a.duration) for a in apps]))),
        Family("agent_requests_rejected_total", "counter", "Requests answered with an error by the agent, by reason.",
               [("agent_requests_rejected_total", [("app", a.name), ("reason", reason)], count)
                for a in apps for reason, count in with_all_keys(a.rejected, REJECT_REASONS)]),
        Family("agent_queue_length", "gauge", "Requests waiting for a worker.",
               [("agent_queue_length", [("app", a.name)], a.queue_length) for a in apps]),
        Family("agent_processes", "gauge", "Worker processes, by state.",
               [("agent_processes", [("app", a.name), ("state", state)], count)
                for a in apps for state, count in processes_by_state(a.processes)]),
        Family("agent_process_memory_bytes", "gauge", "Memory of one worker process, by kind.",
               [("agent_process_memory_bytes", [("app", a.name), ("pid", str(p.pid)), ("kind", kind)], size)
                for a in apps for p in a.processes for kind, size in with_all_keys(p.memory, MEMORY_KINDS)]),
        Family("agent_preloader_memory_bytes", "gauge",
               "Memory of an app's preloader (smart spawning), by kind; its workers' shared pages count here too.",
               [("agent_preloader_memory_bytes", [("app", a.name), ("pid", str(p.pid)), ("kind", kind)], size)
                for a in apps for p in a.preloaders for kind, size in with_all_keys(p.memory, MEMORY_KINDS)]),
        Family("agent_process_cpu_seconds_total", "counter", "CPU time (user and system) of one worker process.",
               [("agent_process_cpu_seconds_total", [("app", a.name), ("pid", str(p.pid))], p.cpu_seconds)
                for a in apps for p in a.processes]),
        Family("agent_process_requests_total", "counter", "Requests finished by one worker process.",
               [("agent_process_requests_total", [("app", a.name), ("pid", str(p.pid))], p.requests)
                for a in apps for p in a.processes]),
        Family("agent_spawns_total", "counter", "Worker processes started.",
               [("agent_spawns_total", [("app", a.name)], a.spawns) for a in apps]),
        Family("agent_spawn_failures_total", "counter", "Worker processes that failed to start.",
               [("agent_spawn_failures_total", [("app", a.name)], a.spawn_failures) for a in apps]),
        Family("agent_spawn_duration_seconds", "histogram", "Time from fork to the worker's readiness.",
               list(histogram_samples("agent_spawn_duration_seconds",
                                      [(a.name, a.spawn_duration) for a in apps]))),
        Family("agent_restarts_total", "counter", "Worker processes replaced, by cause.",
               [("agent_restarts_total", [("app", a.name), ("cause", cause)], count)
                for a in apps for cause, count in with_all_keys(a.restarts, RESTART_CAUSES)]),
        Family("agent_uptime_seconds", "gauge", "Seconds since the agent core started.",
               [("agent_uptime_seconds", [], snapshot.uptime)]),
    ]


def with_all_keys(counts: Mapping[str, int], known: Sequence[str]) -> list[tuple[str, int]]:
    """Every documented label value, zero when absent, so that a series
    exists before its first event (rate() needs the zero); then any other
    key the snapshot carries, in a stable order."""
    extra = sorted(k for k in counts if k not in known)
    return [(key, counts.get(key, 0)) for key in [*known, *extra]]


def processes_by_state(processes: Iterable[ProcessMetrics]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for process in processes:
        counts[process.state] = counts.get(process.state, 0) + 1
    return with_all_keys(counts, PROCESS_STATES)


def histogram_samples(name: str, per_app: Iterable[tuple[str, Histogram | None]]) -> Iterator[Sample]:
    for app, histogram in per_app:
        if histogram is None:
            continue
        for bound, running in histogram.cumulative():
            yield f"{name}_bucket", [("app", app), ("le", format_value(bound))], running
        yield f"{name}_sum", [("app", app)], histogram.total
        yield f"{name}_count", [("app", app)], histogram.count


def render_family(family: Family) -> str:
    lines = [f"# HELP {family.name} {escape_help(family.help)}", f"# TYPE {family.name} {family.kind}"]
    lines.extend(render_sample(sample) for sample in family.samples)
    return "\n".join(lines) + "\n"


def render_sample(sample: Sample) -> str:
    name, labels, value = sample
    if not labels:
        return f"{name} {format_value(value)}"
    pairs = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels)
    return f"{name}{{{pairs}}} {format_value(value)}"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a fraction, floats as Python writes them, and the
    three special values as the format spells them."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
