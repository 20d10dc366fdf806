"""The throughput part's report: it runs in rounds, each figure (rate,
latency, CPU, the bars) is its median round, taken apart for each nginx
worker count, and one table shows every round's rate."""

from __future__ import annotations

import report
import run
from figures import AGENT_CORE, APP_WORKERS, NGINX_WORKERS, Run, StackResult


def a_run(connections: int, rate: float, nginx_workers: int = 1, cpu_us: float = 30.0) -> Run:
    requests = int(rate * 5)
    split = {NGINX_WORKERS: cpu_us / 2 * requests / 1e6, APP_WORKERS: cpu_us / 2 * requests / 1e6}
    return Run("hello", connections, rate, 0.001, 0.004, requests, 0, sum(split.values()),
               agent_cpu=0.0, seconds=5.0, nginx_workers=nginx_workers, cpu_split={**split, AGENT_CORE: 0.0})


def rows_of(markdown_table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in markdown_table.splitlines()[2:]]


def results() -> list[StackResult]:
    ours = StackResult("ours", "nginx→agent", runs=[
        a_run(1, 9000, cpu_us=70), a_run(1, 12000, cpu_us=60), a_run(1, 10000, cpu_us=65),   # median 10,000
        a_run(16, 40000, 2), a_run(16, 30000, 2), a_run(16, 50000, 2)])                        # median 40,000
    uwsgi = StackResult("uwsgi", "nginx→uWSGI", runs=[
        a_run(1, 11000, cpu_us=64), a_run(1, 9500, cpu_us=66), a_run(1, 20000, cpu_us=50),  # median 11,000
        a_run(16, 45000, 2), a_run(16, 44000, 2), a_run(16, 46000, 2)])                        # median 45,000
    return [ours, uwsgi]


def test_the_median_round_is_kept_for_each_workload_connections_and_nginx_workers() -> None:
    ours, _ = results()
    ours.worker_pss_kib = [5000, 5100]
    median = ours.median_rounds()
    assert [(r.connections, r.nginx_workers, r.rate) for r in median.runs] == [(1, 1, 10000), (16, 2, 40000)]
    assert median.worker_pss_kib == [5000, 5100]
    assert ours.median_run("hello", 16) is None
    assert len(ours.runs) == 6      # the rounds themselves are left as they were


def test_the_report_shows_the_median_rounds_and_lists_every_round() -> None:
    text = report.results_section(results(), run.WORKLOADS, run.CONNECTIONS, more_nginx_workers=2)
    main = text.split("## Throughput and latency")[1].split("###")[0]
    (hello,) = [row for row in rows_of(main.split("\n\n")[2]) if row[0] == "hello world"]
    assert hello[2] == "10,000" and hello[5] == "11,000" and hello[-1] == f"{10000 / 11000:.2f}"
    rounds = text.split("### Every round")[1].split("## Bars")[0]
    table = rows_of(rounds.strip().split("\n\n")[1])
    assert table == [["hello world", "1", "1", "9,000, 12,000, 10,000", "11,000, 9,500, 20,000"],
                     ["hello world", "16", "2", "40,000, 30,000, 50,000", "45,000, 44,000, 46,000"]]
    # The whole-stack CPU bar is judged on the median round's CPU: 65 µs
    # against uWSGI's 64, not the best or the mean of the rounds.
    bars = text.split("## Bars")[1]
    assert "65.0 vs 64.0 µs at 1" in bars


def test_every_round_runs_each_stack_once_with_a_different_one_first() -> None:
    made: list[tuple[int, str]] = []
    stacks = {key: StackResult(key, key) for key in ("ours", "relay", "uwsgi")}

    def run_one(key: str, number: int, result: StackResult) -> None:
        made.append((number, key))
        if key == "relay":
            result.error = "failed"

    run.in_rounds(3, stacks, run_one)
    # The relay failed in round 1: rounds 2 and 3 leave it out.
    assert made == [(1, "ours"), (1, "relay"), (1, "uwsgi"), (2, "uwsgi"), (2, "ours"), (3, "uwsgi"), (3, "ours")]
