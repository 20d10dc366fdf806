"""The benchmark's figures: one wrk run, and everything about one stack."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

# The roles of a stack's processes, in the order the report lists them.
NGINX_MASTER = "nginx master"
NGINX_WORKERS = "nginx workers"
SERVE = "agentctl serve"
AGENT_WATCHDOG = "agent watchdog"
AGENT_CORE = "agent core"
AGENT_PRELOADER = "agent preloader"   # any other process below the core: the workers' preloader
APP_MASTER = "app server master"      # uWSGI's master, gunicorn's arbiter
APP_WORKERS = "app workers"
OTHER = "other"
# The start of the error of a stack this build cannot run (smart spawning
# before the module has `agent_spawn_method`): reported, never measured.
NOT_AVAILABLE = "not available: "
ROLES = [NGINX_MASTER, NGINX_WORKERS, SERVE, AGENT_WATCHDOG, AGENT_CORE, AGENT_PRELOADER, APP_MASTER, APP_WORKERS,
         OTHER]


@dataclass
class Run:
    workload: str
    connections: int
    rate: float
    p50: float
    p99: float
    requests: int
    errors: int
    stack_cpu: float                  # seconds of CPU, every process of the stack
    agent_cpu: float | None = None    # seconds of CPU, the agent core alone
    other_cpu: float = 0.0            # seconds of CPU, every other process but wrk (noise)
    seconds: float = 0.0              # how long the run took
    nginx_workers: int = 1            # nginx's worker_processes
    cpu_split: dict[str, float] = field(default_factory=dict)   # seconds of CPU by role (ROLES)
    client_cpu: float = 0.0           # seconds of CPU, the load client (wrk, bench/wsload.py)

    def us_per_request(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.requests else seconds / self.requests * 1e6


@dataclass
class StackResult:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    worker_pss_kib: list[int] = field(default_factory=list)
    other_memory: list[tuple[str, int | None]] = field(default_factory=list)
    idle_seconds: float = 0.0
    idle_stack_cpu: float = 0.0              # seconds of CPU over idle_seconds without load
    idle_agent_cpu: float | None = None
    error: str | None = None
    not_measured: dict[str, str] = field(default_factory=dict)   # workload → why it was not run

    def run(self, workload: str, connections: int, nginx_workers: int = 1) -> Run | None:
        found = self.runs_of(workload, connections, nginx_workers)
        return found[0] if found else None

    def runs_of(self, workload: str, connections: int, nginx_workers: int = 1) -> list[Run]:
        """Every run of workload at connections, in the order made (the
        threads part makes one per round)."""
        return [run for run in self.runs
                if run.workload == workload and run.connections == connections and run.nginx_workers == nginx_workers]

    def median_run(self, workload: str, connections: int, nginx_workers: int = 1) -> Run | None:
        """The round with the median rate (every part runs in rounds; of
        an even number, the lower); None when no round ran."""
        runs = sorted(self.runs_of(workload, connections, nginx_workers), key=lambda run: run.rate)
        return runs[(len(runs) - 1) // 2] if runs else None

    def medians(self, plan: Iterable[tuple[str, int]]) -> StackResult:
        """Itself with only its median rounds of each (workload,
        connections) in plan: what the tables show."""
        return StackResult(self.key, self.label, runs=[run for workload, connections in plan
                                                       if (run := self.median_run(workload, connections)) is not None])

    def median_rounds(self) -> StackResult:
        """Itself with only the median round of each (workload, connections,
        nginx workers) it ran; everything else (memory, the stack at rest,
        the error) as it is."""
        made = dict.fromkeys((run.workload, run.connections, run.nginx_workers) for run in self.runs)
        return replace(self, runs=[run for key in made if (run := self.median_run(*key)) is not None])


@dataclass
class SpawnFigures:
    """One stack's spawns of one app: each a worker killed with SIGKILL and
    the replacement the server starts on its own. Seconds, one per spawn."""

    stack: str
    app: str
    to_fork: list[float] = field(default_factory=list)      # kill → the new process exists
    to_answer: list[float] = field(default_factory=list)    # the new process exists → it answered a request
    total: list[float] = field(default_factory=list)        # kill → answered
    logged: list[float] = field(default_factory=list)       # the agent's log: fork → ready handshake
    note: str | None = None
    error: str | None = None


@dataclass
class ProcessMemory:
    role: str
    pid: int
    uss_kib: int
    pss_kib: int


@dataclass
class MemoryFigures:
    """One stack running one app with a number of workers: each process's
    USS and PSS (psutil's memory_full_info)."""

    stack: str
    app: str
    workers: int
    processes: list[ProcessMemory] = field(default_factory=list)
    note: str | None = None
    error: str | None = None

    def of_workers(self) -> list[ProcessMemory]:
        return [p for p in self.processes if p.role == APP_WORKERS]

    def of_others(self) -> list[ProcessMemory]:
        return [p for p in self.processes if p.role != APP_WORKERS]

    def total_pss_kib(self) -> int:
        return sum(p.pss_kib for p in self.processes)
