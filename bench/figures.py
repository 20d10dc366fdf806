"""The benchmark's figures: one wrk run, and everything about one stack."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def run(self, workload: str, connections: int) -> Run | None:
        for run in self.runs:
            if run.workload == workload and run.connections == connections:
                return run
        return None
