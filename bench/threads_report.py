"""The threads part's report (docs/benchmarks-threads.md): threaded WSGI
workers, the agent's (agent_concurrency_model thread) against gunicorn's
gthread workers and uWSGI's threads, on the app's 10 ms sleep.

Each stack ran ROUNDS times at each connection count; the report takes, for
each stack and connection count, the round with the median rate (of an even
number of rounds, the lower of the middle two), and shows every round's
rate beside it."""

from __future__ import annotations

from collections.abc import Sequence

from apps.wsgi import SLEEP_SECONDS
from figures import Run, StackResult
from report import (
    NOISY_PERCENT,
    SHORT,
    Machine,
    cpu_split_table,
    machine_table,
    ms,
    ratio,
    table,
    verdict,
)
from stacks import THREADS, WORKERS

WORKLOAD = ("sleep", "10 ms sleep", "/sleep")
# The bar: the agent serves at least this share of what WORKERS workers of
# THREADS threads can at most, each request taking SLEEP_SECONDS.
BAR_FACTOR = 0.9


def ceiling_rate(threads: int = THREADS, workers: int = WORKERS) -> float:
    """Requests per second when every thread of every worker sleeps all the time."""
    return threads * workers / SLEEP_SECONDS


def bar_rate(threads: int = THREADS, workers: int = WORKERS) -> float:
    return BAR_FACTOR * ceiling_rate(threads, workers)


def bar_text() -> str:
    return (f"{BAR_FACTOR:g} x {THREADS} threads x {WORKERS} workers x {1 / SLEEP_SECONDS:g} req/s "
            f"= {bar_rate():,.0f} req/s")


def median_run(result: StackResult, connections: int) -> Run | None:
    return result.median_run(WORKLOAD[0], connections)


def medians(results: Sequence[StackResult], connections: Sequence[int]) -> list[StackResult]:
    return [r.medians((WORKLOAD[0], c) for c in connections) for r in results if r.runs]


def made(results: Sequence[StackResult], connections: Sequence[int]) -> list[int]:
    return [c for c in connections if any(r.runs_of(WORKLOAD[0], c) for r in results)]


def rate_table(results: Sequence[StackResult], connections: Sequence[int]) -> str:
    """req/s of each stack (median round), the agent's rate divided by each
    peer's, and the bar."""
    ran = [r for r in results if r.runs]
    ours = next((r for r in ran if r.key == "ours"), None)
    peers = [r for r in ran if r.key != "ours"] if ours else []
    header = ["conns", *(f"{SHORT[r.key]} req/s" for r in ran), *(f"agent/{SHORT[r.key]}" for r in peers),
              f"bar: agent ≥ {bar_rate():,.0f} req/s"]
    rows = []
    for c in made(ran, connections):
        mine = median_run(ours, c) if ours else None
        row = [str(c)]
        row += [f"{run.rate:,.0f}" if (run := median_run(r, c)) else "-" for r in ran]
        row += [ratio(mine, median_run(r, c)) for r in peers]
        row.append(verdict(None if mine is None else mine.rate >= bar_rate()))
        rows.append(row)
    return table(header, rows)


def rounds_table(results: Sequence[StackResult], connections: Sequence[int]) -> str:
    """Every round's rate, and the median round's latency and errors."""
    rows = []
    for r in results:
        for c in connections:
            runs = r.runs_of(WORKLOAD[0], c)
            run = median_run(r, c)
            if run is None:
                continue
            rows.append([SHORT[r.key], str(c), ", ".join(f"{each.rate:,.0f}" for each in runs), ms(run.p50),
                         ms(run.p99), str(sum(each.errors for each in runs))])
    return table(["stack", "conns", "req/s, each round", "p50 (median round)", "p99 (median round)",
                  "errors (all rounds)"], rows)


def bars_table(results: Sequence[StackResult], connections: Sequence[int]) -> str:
    ours = next((r for r in results if r.key == "ours" and r.runs), None)
    name = f"10 ms sleep, every connection count: agent ≥ {bar_text()}"
    got = [(c, run) for c in connections if ours and (run := median_run(ours, c)) is not None]
    if not got:
        return table(["bar", "measured", "result"], [[name, "not measured", "-"]])
    measured = ", ".join(f"{run.rate:,.0f} at {c}" for c, run in got)
    return table(["bar", "measured", "result"],
                 [[name, measured, verdict(all(run.rate >= bar_rate() for _, run in got))]])


def noise_note(results: Sequence[StackResult], cores: int, client: str = "wrk") -> str:
    """How much CPU processes other than the stack under test and the load
    client (client: what the text calls it) used
    during the runs, on average, by stack (the rounds interleave the
    stacks, so that a busy spell falls on each alike), and how many runs
    it disturbed."""
    shares = [(r, run.other_cpu / (run.seconds * cores) * 100) for r in results for run in r.runs if run.seconds]
    if not shares:
        return ""
    mean = sum(share for _, share in shares) / len(shares)
    by_stack = ", ".join(f"{SHORT[r.key]} {sum(s for o, s in shares if o is r) / n:.1f} %"
                         for r in results if (n := sum(1 for o, _ in shares if o is r)))
    noisy = sum(1 for _, share in shares if share >= NOISY_PERCENT)
    text = (f"Processes other than the stack under test and {client} used {mean:.1f} % of the machine's CPU on average "
            f"during the measured runs ({by_stack}); the most during one run was "
            f"{max(share for _, share in shares):.0f} %.")
    if noisy:
        text += (f" {noisy} of the {len(shares)} runs had {NOISY_PERCENT:g} % or more: those figures are noisier "
                 "than an idle machine's.")
    return text


def results_section(results: Sequence[StackResult], connections: Sequence[int], rounds: int) -> str:
    if not any(r.runs for r in results):
        reasons = "".join(f"- {r.label}: {r.error}\n" for r in results)
        return f"## Results\n\nNo stack ran.\n\n{reasons}"
    shown = medians(results, connections)
    parts = ["## Threads: throughput", "",
             f"Requests per second on the 10 ms sleep, {WORKERS} workers of {THREADS} threads in every stack, "
             f"nginx with one worker process; each figure is the median of {rounds} round"
             f"{'s' if rounds != 1 else ''}. The ratio columns divide the agent's rate by each peer's. At most "
             f"{ceiling_rate():,.0f} req/s are possible ({THREADS} x {WORKERS} requests at once, 10 ms each).", "",
             rate_table(results, connections), "",
             "## Threads: bars", "", bars_table(results, connections), "",
             "## Threads: every round", "", rounds_table(results, connections), "",
             "## Threads: CPU per request, by process", "",
             "utime + stime (from /proc/PID/stat, every thread) of each process of the stack over the median "
             "round's wrk run, divided by the requests wrk completed, summed by role, as in docs/benchmarks.md. "
             "The ratio columns divide each stack's figure by uWSGI's. wrk is not counted.", ""]
    for c in made(shown, connections):
        parts += [f"### 10 ms sleep, {c} connections", "", cpu_split_table(shown, WORKLOAD[0], c, 1), ""]
    failed = [r for r in results if r.error]
    if failed:
        parts += ["## Stacks that did not run (or not every round)", ""]
        parts += [f"- {r.label}: {r.error}" for r in failed]
        parts.append("")
    return "\n".join(parts)


def stacks_table() -> str:
    each = f"{WORKERS} x {THREADS} threads"
    rows = [["agent", f"`agentctl serve APP --min-instances {WORKERS} --max-instances {WORKERS} "
             f"--concurrency-model thread --thread-count {THREADS}`", each],
            ["gunicorn", f"`gunicorn --workers {WORKERS} --worker-class gthread --threads {THREADS}`, nginx "
             "`proxy_pass` to a Unix socket", each],
            ["uWSGI", f"`uwsgi --master --processes {WORKERS} --enable-threads --threads {THREADS}`, nginx "
             "`uwsgi_pass` to a Unix socket", each]]
    return table(["stack", "app server", "workers"], rows)


def markdown(machine: Machine, results: Sequence[StackResult], connections: Sequence[int], rounds: int,
             quick: bool) -> str:
    kind = (f"a quick run ({machine.duration:g} s per wrk run)" if quick else
            f"one run of `bench/run.py --only threads` ({machine.duration:g} s per wrk run)")
    buffers = table(["stack", "buffer directives"], [[stack, f"`{directives}`"] for stack, directives in
                                                      machine.buffers])
    conns = ", ".join(str(c) for c in connections)
    return f"""# Benchmarks: threaded workers

The figures below come from {kind}, as measured; nothing is adjusted.

{noise_note(results, machine.cores)}

This is the threads part of the benchmark (docs/benchmarks.md has the
throughput part, docs/benchmarks-spawn.md spawn times and memory).

## How to reproduce

    make bench                                          # every part, this one included
    .venv/bin/python bench/run.py --only threads        # this part alone (about 6 minutes)
    .venv/bin/python bench/run.py --only threads --duration 5 --rounds 3   # about 3 minutes
    .venv/bin/python bench/run.py --only threads --stacks ours,uwsgi

wrk's full output is kept in bench/results/wrk-STACK-threads-roundN.txt,
the figures in bench/results/threads.json.

## Machine

{machine_table(machine, agent_python=True, wrk=True)}

## What runs

Three stacks, each with {WORKERS} worker processes of {THREADS} threads (bench/stacks.py,
THREADS), serving the same app (bench/apps/wsgi.py) under the same
interpreter, behind the system nginx with one worker process and the same
upstream buffers:

{stacks_table()}

- The workload is `/sleep`: the app sleeps 10 ms, then answers 13 bytes (a
  worker waiting on a database or another service, not using CPU). With
  {THREADS * WORKERS} requests in the app at once, {ceiling_rate():,.0f} req/s is the most any stack
  can serve; the bar asks {BAR_FACTOR:g} of that of the agent.
- nginx hands the agent's threaded workers their requests itself, on its
  direct path: each worker has a lane per thread in the table nginx
  shares with the engine (docs/protocol.md §5, "Lanes"; docs/policy.md,
  "Threads").
- Load: `wrk -t2 -cN -dD --latency` at N = {conns} connections, after a
  1 s warm-up. {rounds} round{'s' if rounds != 1 else ''}: in each, every stack starts, runs each connection
  count, and stops, the stacks taking turns to go first; the tables show
  each figure's median round.
- The run shares the machine's {machine.cores} cores with wrk, and with whatever else the
  machine runs (the note at the top): the figures compare the stacks with
  each other on this machine; they are not the capacity of a machine given
  to the server.
- The workers run as `nobody` in every stack.

## nginx settings, the same in every stack

`worker_processes` 1; upstream response buffers (bench/stacks.py, Buffers):

{buffers}

""" + results_section(results, connections, rounds)
