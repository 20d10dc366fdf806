"""The spawn and memory report: ratios against uWSGI, stacks that are not
available, and the bars, which are never judged on missing figures."""

from __future__ import annotations

import spawn_report
from figures import APP_WORKERS, NOT_AVAILABLE, MemoryFigures, ProcessMemory, SpawnFigures


def memory(stack: str, app: str, workers: int, worker_kib: tuple[int, int], other_kib: int) -> MemoryFigures:
    uss, pss = worker_kib
    processes = [ProcessMemory(APP_WORKERS, 100 + n, uss, pss) for n in range(workers)]
    processes.append(ProcessMemory("app server master", 99, other_kib, other_kib))
    return MemoryFigures(stack, app, workers, processes)


def row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{text}")


def test_spawn_table_gives_median_max_and_the_ratio_to_uwsgi() -> None:
    results = [SpawnFigures("uWSGI", "hello", to_fork=[0.5, 0.5, 2.5], to_answer=[0.004, 0.002, 0.003],
                            total=[0.504, 0.502, 2.503]),
               SpawnFigures("agent direct", "hello", to_fork=[0.003] * 3, to_answer=[0.030, 0.036, 0.033],
                            total=[0.033, 0.039, 0.036], logged=[0.026, 0.027, 0.025]),
               SpawnFigures("agent smart", "hello", error=NOT_AVAILABLE + "unknown directive")]
    text = spawn_report.spawn_table(results, "hello")
    assert row(text, "agent direct")[1:4] == ["3", "33.0 ms / 36.0 ms", "26.0 ms / 27.0 ms"]
    assert row(text, "agent direct")[-1] == "11.00"
    assert row(text, "uWSGI")[2] == "3.0 ms / 4.0 ms" and row(text, "uWSGI")[3] == "-"
    assert row(text, "agent smart")[1] == "not available"


def test_memory_table_sums_every_process_and_divides_by_uwsgi() -> None:
    results = [memory("uWSGI", "django", 4, (20 * 1024, 25 * 1024), 30 * 1024),
               memory("agent direct", "django", 4, (40 * 1024, 42 * 1024), 28 * 1024)]
    cells = row(spawn_report.memory_table(results, "django"), "agent direct")
    assert cells[2:4] == ["40.0 MiB", "42.0 MiB"]
    assert cells[5] == "196.0 MiB"                      # 4 x 42 + 28
    assert cells[6:] == ["2.00", f"{196 / 130:.2f}"]    # uWSGI: 4 x 25 + 30


def test_bars_are_not_measured_without_smart() -> None:
    spawns = [SpawnFigures("agent direct", "django", to_answer=[0.15]), SpawnFigures("uWSGI", "hello",
                                                                                       to_answer=[0.003])]
    text = spawn_report.bars_table(spawns, [memory("uWSGI", "hello", 1, (3000, 5000), 8000)])
    assert text.count("not measured") == 4


def test_bars_are_judged_on_smart_against_direct_and_uwsgi() -> None:
    spawns = [SpawnFigures("agent smart", "hello", to_answer=[0.004, 0.006, 0.012]),
              SpawnFigures("agent smart", "django", to_answer=[0.020]),
              SpawnFigures("agent direct", "django", to_answer=[0.150])]
    mem = [memory("agent smart", "hello", 1, (3000, 5000), 9000), memory("uWSGI", "hello", 1, (3400, 5700), 8000),
           memory("agent smart", "django", 16, (10_000, 15_000), 60_000),
           memory("agent direct", "django", 16, (35_000, 37_000), 28_000)]
    text = spawn_report.bars_table(spawns, mem)
    assert row(text, "hello world: a smart worker's USS ≤ uWSGI's (1 worker)")[2] == "meets the bar"
    assert row(text, "16 Django workers: smart's total PSS ≤ 0.6 x direct's")[2] == "meets the bar"
    assert row(text, "hello world: smart's fork → first answer ≤ 10.0 ms (median)")[2] == "meets the bar"
    assert row(text, "Django: smart's fork → first answer ≤ 0.1 x direct's (medians)")[2] == "misses the bar"
