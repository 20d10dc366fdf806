"""The asgi part's report: each figure is its median round, the ratios and
the bar (agent ≥ 1.0 x uvicorn) are judged on the medians, a WebSocket echo
the agent cannot serve yet is "not yet measured" rather than a miss; and
the WebSocket load client's arithmetic."""

from __future__ import annotations

import asgi_report
import pytest
import run
import wsload
from figures import Run, StackResult

HELLO, ECHO = asgi_report.HELLO[0], asgi_report.ECHO[0]


def a_run(workload: str, connections: int, rate: float, p50: float = 0.002, client_cpu: float = 0.0) -> Run:
    return Run(workload, connections, rate, p50, p50 * 4, int(rate * 5), 0, 1.0, client_cpu=client_cpu)


def rows_of(markdown_table: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (the header and rule left out)."""
    return {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in markdown_table.splitlines()[2:]}


def results() -> list[StackResult]:
    ours = StackResult("ours", "nginx→agent ASGI", runs=[
        a_run(HELLO, 16, 900), a_run(HELLO, 16, 1200, 0.001, 0.3), a_run(HELLO, 16, 5000),   # median 1,200
        a_run(HELLO, 256, 1000), a_run(HELLO, 256, 700), a_run(HELLO, 256, 1500)])           # median 1,000
    ours.not_measured[ECHO] = "/ws answered 'HTTP/1.1 404 Not Found' to the WebSocket handshake"
    uvicorn = StackResult("uvicorn", "nginx→uvicorn", runs=[
        a_run(HELLO, 16, 1000), a_run(HELLO, 16, 1100), a_run(HELLO, 16, 100),               # median 1,000
        a_run(HELLO, 256, 1100), a_run(HELLO, 256, 1200), a_run(HELLO, 256, 1000),           # median 1,100
        a_run(ECHO, 16, 3000), a_run(ECHO, 256, 6000)])
    granian = StackResult("granian", "nginx→Granian", runs=[
        a_run(HELLO, 16, 2400), a_run(HELLO, 256, 2000), a_run(ECHO, 16, 2500)])             # one round
    return [ours, uvicorn, granian]


def test_the_median_round_is_taken_of_each_stack_workload_and_connection_count() -> None:
    ours, uvicorn, granian = results()
    median = asgi_report.median_run(ours, HELLO, 16)
    assert median is not None and median.rate == 1200 and median.p50 == 0.001
    assert asgi_report.median_run(uvicorn, HELLO, 256).rate == 1100     # type: ignore[union-attr]
    even = StackResult("uvicorn", "u", runs=[a_run(HELLO, 16, r) for r in (4, 1, 3, 2)])
    assert asgi_report.median_run(even, HELLO, 16).rate == 2             # type: ignore[union-attr]  # the lower
    assert asgi_report.median_run(granian, ECHO, 256) is None
    assert asgi_report.median_run(None, HELLO, 16) is None
    shown = asgi_report.medians(results())
    assert [(r.key, [(run.workload, run.connections, run.rate) for run in r.runs]) for r in shown] == [
        ("ours", [(HELLO, 16, 1200), (HELLO, 256, 1000)]),
        ("uvicorn", [(HELLO, 16, 1000), (HELLO, 256, 1100), (ECHO, 16, 3000), (ECHO, 256, 6000)]),
        ("granian", [(HELLO, 16, 2400), (HELLO, 256, 2000), (ECHO, 16, 2500)])]


def test_the_hello_table_divides_the_medians_and_judges_the_bar_at_each_connection_count() -> None:
    rows = rows_of(asgi_report.rate_table(results(), asgi_report.HELLO))
    assert rows["16"] == ["1,200", "1,000", "2,400", "1.20", "0.50", "meets the bar"]
    assert rows["256"] == ["1,000", "1,100", "2,000", f"{1000 / 1100:.2f}", "0.50", "misses the bar"]
    assert asgi_report.bar_met(a_run(HELLO, 16, 1000), a_run(HELLO, 16, 1000)) is True    # equal meets it
    assert asgi_report.bar_met(None, a_run(HELLO, 16, 1000)) is None


def test_an_echo_the_agent_cannot_serve_is_not_yet_measured_not_missed() -> None:
    rows = rows_of(asgi_report.rate_table(results(), asgi_report.ECHO))
    assert rows["16"] == ["not yet measured", "3,000", "2,500", "-", "-", "not yet measured"]
    assert rows["256"] == ["not yet measured", "6,000", "-", "-", "-", "not yet measured"]
    bars = rows_of(asgi_report.bars_table(results()))
    hello_bar, echo_bar = (f"{title}, every connection count: agent ≥ 1.0 x uvicorn"
                           for _, title, _, _ in asgi_report.WORKLOADS)
    assert bars[hello_bar] == [f"1.20 x at 16, {1000 / 1100:.2f} x at 256", "misses the bar"]
    assert bars[echo_bar][1] == "not yet measured" and "404 Not Found" in bars[echo_bar][0]
    assert "misses the bar" not in asgi_report.rate_table(results(), asgi_report.ECHO)


def test_the_every_round_table_lists_each_round_and_the_median_rounds_latency() -> None:
    rows = asgi_report.latency_table(results(), asgi_report.HELLO).splitlines()[2:]
    first = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert first == ["agent", "16", "900, 1,200, 5,000", "1.00 ms", "4.00 ms", "0", "50.0"]
    assert len(rows) == 6     # 3 stacks x 2 connection counts


def test_the_markdown_report_carries_the_tables_and_names_what_did_not_run() -> None:
    args = run.parse_args(["--only", "asgi"])
    assert args.only == ["asgi"] and args.asgi_output.name == "benchmarks-asgi.md"
    info = run.report.Machine(date="d", cpu="c", cores=2, kernel="k", memory_gib=1.0, nginx="n", wrk="w",
                              app_python="p", agent_python="a", gunicorn="g", uwsgi="u", duration=5.0, load="l",
                              buffers=run.buffer_settings(args), uvicorn="0.54.0", granian="2.8.9")
    broken = StackResult("granian", "nginx→Granian", error="round 2 of 3: nginx→Granian not ready")
    text = asgi_report.markdown(info, [*results()[:2], broken], rounds=3, quick=False)
    assert "## ASGI hello world (`/`)" in text and "## WebSocket echo (`/ws`)" in text
    assert "| uvicorn, Granian |" in text and "proxy_buffers 4 32k;" in text
    assert "- nginx→Granian: round 2 of 3: nginx→Granian not ready" in text
    assert "### ASGI hello world, 256 connections" in text


def test_the_load_clients_figures_pool_latencies_and_add_up_rates() -> None:
    assert wsload.percentile([], 0.5) == 0.0
    values = [float(n) for n in range(1, 101)]
    assert wsload.percentile(values, 0.50) == 50.0 and wsload.percentile(values, 0.99) == 99.0
    assert wsload.percentile([7.0], 0.99) == 7.0
    parts = [wsload.Part(100, 2.0, [0.003, 0.001], loop="uvloop"),
             wsload.Part(300, 3.0, [0.002], errors=2, first_error="connect: refused")]
    summary = wsload.combine(parts)
    assert summary.rate == pytest.approx(100 / 2.0 + 300 / 3.0)
    assert (summary.round_trips, summary.seconds, summary.p50, summary.p99) == (400, 3.0, 0.002, 0.003)
    assert (summary.errors, summary.first_error, summary.loop) == (2, "connect: refused", "uvloop")
    assert wsload.split(256, 2) == [128, 128] and wsload.split(5, 2) == [3, 2] and wsload.split(1, 2) == [1]
