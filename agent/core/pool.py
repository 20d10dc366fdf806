"""The core's view of its apps and worker processes.

A Worker is a small object with plain predicates; an App holds its config,
its workers and its spawn state. Nothing here performs I/O: the core
(agent/core/loop.py) applies the policy's actions and updates these objects.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from agent.core.config import AppConfig
from agent.settings import default


class WorkerState(enum.Enum):
    STARTING = "starting"     # forked, handshake not done
    SERVING = "serving"       # in the engine's routing table
    DETACHING = "detaching"   # gets no new requests, finishing its sessions
    STOPPING = "stopping"     # sent SIGTERM, waiting for it to exit


SPAWN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Observations:
    """Values counted per bucket (upper bounds; one more for the rest), as
    metrics.Histogram shows them."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.total += value


@dataclass(frozen=True)
class ProcessUsage:
    """One sample of a worker's memory (bytes) and CPU."""

    rss: int
    pss: int
    uss: int
    swap: int
    cpu_seconds: float
    cpu_percent: float

    @property
    def private(self) -> int:
        return self.uss + self.swap


@dataclass
class Worker:
    pid: int
    app: str
    socket_path: str
    spawned_at: int                  # monotonic_ms() when forked
    state: WorkerState = WorkerState.STARTING
    concurrency: int = 1
    ready_at: int | None = None
    stop_deadline: int | None = None
    sessions: int = 0
    processed: int = 0
    last_used: int = 0               # monotonic_ms() of its last request's start or end
    memory: int | None = None        # bytes it alone holds (USS + swap), at the last sample
    usage: ProcessUsage | None = None  # the last full sample (status, metrics)
    sampled_at: int = 0              # monotonic_ms() of that sample
    started_at: float = 0.0          # time.time() when forked, for display
    generation: int = 0              # the app's generation it was started for
    max_requests: int = 0            # recycled after this many requests (0: never)
    detach_reason: str = ""
    handshake_closed_at: int | None = None  # monotonic_ms() when its pipe closed without a line
    preloader: int = 0               # pid of the preloader that forked it and reaps it (0: the core's child)
    port: int = 0                    # a generic worker's port on 127.0.0.1 (its socket_path is "")

    def is_starting(self) -> bool:
        return self.state is WorkerState.STARTING

    def is_serving(self) -> bool:
        return self.state is WorkerState.SERVING

    def is_detaching(self) -> bool:
        return self.state is WorkerState.DETACHING

    def is_stopping(self) -> bool:
        return self.state is WorkerState.STOPPING

    def is_live(self) -> bool:
        """Counts toward the pool's bounds: it serves or soon will."""
        return self.state in (WorkerState.STARTING, WorkerState.SERVING)

    def in_engine(self) -> bool:
        """Was handed to the engine's routing table (it finished its handshake)."""
        return self.ready_at is not None

    def is_idle(self) -> bool:
        return self.sessions == 0

    def idle_for(self, now: int) -> int:
        return now - self.last_used if self.is_idle() else 0

    def over_memory_limit(self, limit_mb: int) -> bool:
        return limit_mb > 0 and self.memory is not None and self.memory > limit_mb << 20

    def served_enough(self) -> bool:
        return self.max_requests > 0 and self.processed >= self.max_requests


class PreloaderState(enum.Enum):
    STARTING = "starting"     # loading the app, handshake not done
    READY = "ready"           # forks workers when asked
    STOPPING = "stopping"     # sent SIGTERM (idle, outdated, shutdown)


@dataclass
class Preloader:
    """An app's preloader (agent_spawn_method smart): it loaded the app once
    and forks the workers. It is not a worker: it serves no request and
    does not count toward the pool's bounds."""

    pid: int
    app: str
    generation: int                  # the app's generation whose code it loaded
    spawned_at: int                  # monotonic_ms() when started
    started_at: float = 0.0          # time.time() when started, for display
    state: PreloaderState = PreloaderState.STARTING
    ready_at: int | None = None
    last_fork: int = 0               # monotonic_ms() of its last fork (or of its readiness)
    forks: int = 0
    stop_deadline: int | None = None
    handshake_closed_at: int | None = None
    usage: ProcessUsage | None = None
    sampled_at: int = 0

    def is_starting(self) -> bool:
        return self.state is PreloaderState.STARTING

    def is_ready(self) -> bool:
        return self.state is PreloaderState.READY

    def is_stopping(self) -> bool:
        return self.state is PreloaderState.STOPPING

    def idle_for(self, now: int) -> int:
        return now - self.last_fork if self.is_ready() else 0


@dataclass
class App:
    id: int
    config: AppConfig
    workers: dict[int, Worker] = field(default_factory=dict)
    activated: bool = False          # a request has arrived (or prestart): keep min_instances
    queue_length: int = 0
    spawn_failures: int = 0          # consecutive
    failed_until: int = 0            # monotonic_ms(): no spawn before this time
    outside_kills: int = 0           # starting workers killed from outside in a row (none ready since)
    start_not_before: int = 0        # monotonic_ms(): spacing after outside kills (policy.outside_kill_spacing_ms)
    stat_errors: set[tuple[str, int]] = field(default_factory=set)  # (app file, errno) already logged
    failure_shown: bool = False      # the engine answers with the error page
    last_error: str = ""
    removed: bool = False            # gone from the app table; stops when drained
    generation: int = 0              # bumped by a restart; older workers are replaced
    restart_target: int = 0          # live workers when the current restart began
    restart_mtime: float | None = None   # tmp/restart.txt's mtime when last seen
    always_restart: bool = False     # tmp/always_restart.txt exists
    last_error_at: float | None = None   # time.time() of the last failed start
    spawns: int = 0
    spawn_failures_total: int = 0
    restarts: int = 0                # rolling restarts begun
    replaced: Counter[str] = field(default_factory=Counter)   # workers replaced, by cause
    spawn_durations: Observations = field(default_factory=lambda: Observations(SPAWN_BUCKETS))
    preloaders: dict[int, Preloader] = field(default_factory=dict)  # the current one, and old ones stopping
    preloader_wanted: bool = False   # a preloader that dies is started again (not after an idle stop)
    preloader_losses: int = 0        # ready preloaders lost in a row (no fork since)
    preloader_starts: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_live()]

    def starting_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_starting()]

    def in_backoff(self, now: int) -> bool:
        return now < self.failed_until

    def serving_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_serving()]

    def outdated_workers(self) -> list[Worker]:
        """Serving workers started before the current restart, oldest first."""
        old = [w for w in self.serving_workers() if w.generation < self.generation]
        return sorted(old, key=lambda w: w.spawned_at)

    def restarting(self) -> bool:
        return bool(self.outdated_workers())

    def current_preloader(self) -> Preloader | None:
        """The preloader of the app's current code that is not stopping."""
        return next((p for p in self.preloaders.values()
                     if p.generation == self.generation and not p.is_stopping()), None)


@dataclass
class Pool:
    max_pool_size: int
    pool_idle_time_ms: int = default("pool_idle_time")
    apps: dict[str, App] = field(default_factory=dict)
    _next_app_id: int = 0

    def new_app_id(self) -> int:
        self._next_app_id += 1
        return self._next_app_id

    def workers(self) -> list[Worker]:
        return [w for app in self.apps.values() for w in app.workers.values()]

    def find_worker(self, pid: int) -> tuple[App, Worker] | None:
        for app in self.apps.values():
            worker = app.workers.get(pid)
            if worker is not None:
                return app, worker
        return None

    def preloaders(self) -> list[Preloader]:
        return [p for app in self.apps.values() for p in app.preloaders.values()]

    def find_preloader(self, pid: int) -> tuple[App, Preloader] | None:
        for app in self.apps.values():
            preloader = app.preloaders.get(pid)
            if preloader is not None:
                return app, preloader
        return None

    def app_by_id(self, app_id: int) -> App | None:
        return next((a for a in self.apps.values() if a.id == app_id), None)

    def live_count(self) -> int:
        return sum(1 for w in self.workers() if w.is_live())

    def room(self) -> int:
        return self.max_pool_size - self.live_count()
