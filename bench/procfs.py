"""What the benchmark reads about processes, straight from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    """A process, named by pid and start time so that a reused pid is never
    mistaken for it."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        fields = stat_fields(pid)
        return None if fields is None else cls(pid, int(fields[19]))

    def alive(self) -> bool:
        fields = stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start and fields[0] != "Z"


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: fields[0] is the state (field 3
    of proc(5)), so field N of proc(5) is fields[N - 3]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of the process, in seconds."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def parent(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent(int(entry)) == pid:
            found.append(int(entry))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Every process below pid, found by parent links (a process that
    re-parented itself away, like a daemon, is not among them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent(int(entry))
            if ppid is not None:
                parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def _kib_field(path: str, name: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size: the process's own pages plus its share of the
    pages it shares with others."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


def rss_kib(pid: int) -> int | None:
    return _kib_field(f"/proc/{pid}/status", "VmRSS")


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def machine_busy_seconds() -> float:
    """CPU time spent by every core on anything but idling, since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def cpu_split(before: dict[Proc, tuple[str, float]], after: dict[Proc, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by role between two snapshots of (role, CPU seconds so
    far) by process: a process in both counts its difference; one that
    started in between counts all of its time; one that exited in between
    cannot be read any more and counts nothing."""
    split: dict[str, float] = {}
    for proc, (role, seconds) in after.items():
        earlier = before.get(proc)
        used = seconds - earlier[1] if earlier is not None else seconds
        split[role] = split.get(role, 0.0) + max(0.0, used)
    return split
