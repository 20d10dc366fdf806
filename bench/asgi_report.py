"""The asgi part's report (docs/benchmarks-asgi.md): the agent serving an
ASGI app (agent_app_type asgi) against uvicorn and Granian, each with
WORKERS worker processes behind nginx, on bench/apps/asgi.py's hello world
(wrk) and its WebSocket echo (bench/wsload.py).

Each stack ran ROUNDS times at each connection count; the report takes, for
each stack, workload and connection count, the round with the median rate
(of an even number of rounds, the lower of the middle two), and shows every
round's rate beside it. The bar: the agent serves at least BAR_FACTOR times
uvicorn's rate."""

from __future__ import annotations

from collections.abc import Sequence

from figures import APP_MASTER, Run, StackResult
from report import (
    SHORT,
    Machine,
    cpu_split_table,
    machine_table,
    ms,
    ratio,
    table,
)
from stacks import ASGI_CONCURRENCY, WORKERS
from threads_report import noise_note as runs_noise_note

# (key, title, path, unit of its rate)
HELLO = ("asgi-hello", "ASGI hello world", "/", "req/s")
ECHO = ("ws-echo", "WebSocket echo", "/ws", "round trips/s")
WORKLOADS = [HELLO, ECHO]
CONNECTIONS = [16, 256]
BAR_FACTOR = 1.0
BAR_PEER = "uvicorn"
NOT_YET = "not yet measured"
ROLE_TITLES = {APP_MASTER: "uvicorn supervisor / Granian main process"}


def median_run(result: StackResult | None, workload: str, connections: int) -> Run | None:
    return None if result is None else result.median_run(workload, connections)


def medians(results: Sequence[StackResult]) -> list[StackResult]:
    return [r.medians((key, c) for key, *_ in WORKLOADS for c in CONNECTIONS) for r in results if r.runs]


def bar_met(ours: Run | None, peer: Run | None) -> bool | None:
    """Whether the agent's rate is at least BAR_FACTOR times the peer's;
    None when either did not run."""
    if ours is None or peer is None:
        return None
    return ours.rate >= BAR_FACTOR * peer.rate


def verdict(ok: bool | None, not_measured: bool = False) -> str:
    if not_measured:
        return NOT_YET
    return "-" if ok is None else ("meets the bar" if ok else "misses the bar")


def bar_text() -> str:
    return f"agent ≥ {BAR_FACTOR:.1f} x {SHORT[BAR_PEER]}"


def noise_note(results: Sequence[StackResult], cores: int) -> str:
    return runs_noise_note(results, cores, client="the load client (wrk, bench/wsload.py)")


def by_key(results: Sequence[StackResult]) -> dict[str, StackResult]:
    return {r.key: r for r in results}


def rate_table(results: Sequence[StackResult], workload: tuple[str, str, str, str],
               connections: Sequence[int] = CONNECTIONS) -> str:
    """Each stack's rate (median round) at each connection count, the
    agent's divided by each peer's, and the bar's verdict."""
    key, _, _, unit = workload
    shown = [r for r in results if r.runs or key in r.not_measured]
    found = by_key(shown)
    ours = found.get("ours")
    skipped = ours is not None and key in ours.not_measured
    peers = [r for r in shown if r.key != "ours"]
    header = ["conns", *(f"{SHORT[r.key]} {unit}" for r in shown), *(f"agent/{SHORT[r.key]}" for r in peers),
              f"bar: {bar_text()}"]
    rows = []
    for c in connections:
        if not any(r.runs_of(key, c) for r in shown) and not skipped:
            continue
        mine = median_run(ours, key, c)
        row = [str(c)]
        for r in shown:
            run = median_run(r, key, c)
            row.append(NOT_YET if r.key == "ours" and skipped else f"{run.rate:,.0f}" if run else "-")
        row += [ratio(mine, median_run(r, key, c)) for r in peers]
        row.append(verdict(bar_met(mine, median_run(found.get(BAR_PEER), key, c)), skipped))
        rows.append(row)
    return table(header, rows)


def latency_table(results: Sequence[StackResult], workload: tuple[str, str, str, str],
                  connections: Sequence[int] = CONNECTIONS) -> str:
    """Every round's rate, and the median round's latency and load client
    CPU per request or round trip; the errors of all rounds."""
    key = workload[0]
    rows = []
    for r in results:
        for c in connections:
            runs = r.runs_of(key, c)
            run = median_run(r, key, c)
            if run is None:
                continue
            client = run.us_per_request(run.client_cpu)
            rows.append([SHORT[r.key], str(c), ", ".join(f"{each.rate:,.0f}" for each in runs), ms(run.p50),
                         ms(run.p99), str(sum(each.errors for each in runs)), f"{client or 0:.1f}"])
    return table(["stack", "conns", f"{workload[3]}, each round", "p50 (median round)", "p99 (median round)",
                  "errors (all rounds)", "load client µs CPU each (median round)"], rows)


def bars_table(results: Sequence[StackResult], connections: Sequence[int] = CONNECTIONS) -> str:
    """One bar per workload: the agent against uvicorn at every connection
    count measured."""
    found = by_key(results)
    ours, peer = found.get("ours"), found.get(BAR_PEER)
    rows = []
    for key, title, _, _ in WORKLOADS:
        name = f"{title}, every connection count: {bar_text()}"
        if ours is not None and key in ours.not_measured:
            rows.append([name, f"{NOT_YET}: {ours.not_measured[key]}", NOT_YET])
            continue
        got = [(c, mine, theirs) for c in connections
               if (mine := median_run(ours, key, c)) is not None and (theirs := median_run(peer, key, c)) is not None]
        if not got:
            rows.append([name, "not measured", "-"])
            continue
        measured = ", ".join(f"{mine.rate / theirs.rate:.2f} x at {c}" for c, mine, theirs in got)
        rows.append([name, measured, verdict(all(bar_met(mine, theirs) for _, mine, theirs in got))])
    return table(["bar", "measured", "result"], rows)


def results_section(results: Sequence[StackResult], rounds: int) -> str:
    if not any(r.runs for r in results):
        reasons = "".join(f"- {r.label}: {r.error}\n" for r in results)
        return f"## Results\n\nNo stack ran.\n\n{reasons}"
    shown = medians(results)
    each = f"the median of {rounds} round{'s' if rounds != 1 else ''}"
    parts = ["## ASGI: bars", "", bars_table(results), ""]
    for workload in WORKLOADS:
        key, title, path, unit = workload
        client = "wrk" if key == HELLO[0] else "bench/wsload.py"
        parts += [f"## {title} (`{path}`)", "",
                  f"{unit} of each stack, {each}; the ratio columns divide the agent's rate by each peer's.", "",
                  rate_table(results, workload), "", f"Every round, and latency ({client}):", "",
                  latency_table(results, workload), ""]
    parts += ["## ASGI hello world: CPU per request, by process", "",
              "utime + stime (from /proc/PID/stat, every thread) of each process of the stack over the median "
              "round's wrk run, divided by the requests wrk completed, summed by role, as in docs/benchmarks.md "
              "(the app server master: uvicorn's supervisor, Granian's main process; the app workers: their "
              "children). The ratio columns divide each stack's figure by uvicorn's. wrk is not counted.", ""]
    for c in CONNECTIONS:
        if any(r.run(HELLO[0], c) for r in shown):
            parts += [f"### ASGI hello world, {c} connections", "",
                      cpu_split_table(shown, HELLO[0], c, 1, base=BAR_PEER, role_titles=ROLE_TITLES), ""]
    failed = [r for r in results if r.error]
    if failed:
        parts += ["## Stacks that did not run (or not every round)", ""]
        parts += [f"- {r.label}: {r.error}" for r in failed]
        parts.append("")
    return "\n".join(parts)


def stacks_table() -> str:
    rows = [["agent", f"`agentctl serve APP --app-type asgi --startup-file asgi.py --concurrency {ASGI_CONCURRENCY} "
             f"--min-instances {WORKERS} --max-instances {WORKERS} --python PEERS-VENV/bin/python` "
             "(`agent_asgi_loop auto`, the default)", f"{WORKERS} x a uvloop loop"],
            ["uvicorn", f"`uvicorn --workers {WORKERS} --uds SOCKET --loop uvloop --http httptools --ws websockets "
             "asgi:application`, nginx `proxy_pass` to the Unix socket", f"{WORKERS} x a uvloop loop"],
            ["Granian", f"`granian --interface asgi --workers {WORKERS} --uds SOCKET --loop uvloop "
             "asgi:application`, nginx `proxy_pass` to the Unix socket", f"{WORKERS} x a uvloop loop"]]
    return table(["stack", "app server", "workers"], rows)


def markdown(machine: Machine, results: Sequence[StackResult], rounds: int, quick: bool) -> str:
    kind = (f"a quick run ({machine.duration:g} s per run)" if quick else
            f"one run of `bench/run.py --only asgi` ({machine.duration:g} s per run)")
    # machine.buffers names the WSGI peers: uvicorn and Granian get gunicorn's proxy_* lines.
    names = {SHORT["ours"]: SHORT["ours"], SHORT["gunicorn"]: f"{SHORT['uvicorn']}, {SHORT['granian']}"}
    buffers = table(["stack", "buffer directives"], [[names[stack], f"`{directives}`"]
                                                     for stack, directives in machine.buffers if stack in names])
    conns = " and ".join(str(c) for c in CONNECTIONS)
    return f"""# Benchmarks: ASGI

The figures below come from {kind}, as measured; nothing is adjusted.

{noise_note(results, machine.cores)}

This is the asgi part of the benchmark (docs/benchmarks.md has the
throughput part, docs/benchmarks-threads.md threaded workers,
docs/benchmarks-spawn.md spawn times and memory).

## How to reproduce

    make bench                                          # every part, this one included
    .venv/bin/python bench/run.py --only asgi           # this part alone
    .venv/bin/python bench/run.py --only asgi --duration 5 --rounds 3
    .venv/bin/python bench/run.py --only asgi --stacks ours,uvicorn

wrk's full output is kept in bench/results/wrk-STACK-roundN.txt, the
figures in bench/results/asgi.json.

## Machine

{machine_table(machine, agent_python=True, wrk=True, asgi=True)}

## What runs

Three stacks, each with {WORKERS} worker processes serving the same app
(bench/apps/asgi.py: no framework, standard library only) under the same
interpreter, behind the system nginx with one worker process and the same
upstream buffers:

{stacks_table()}

- uvicorn runs with its documented production extras (`uvicorn[standard]`:
  uvloop, httptools, websockets), Granian with uvloop. The agent's workers
  run under the interpreter of the same virtualenv (bench/results/peers-venv,
  made from the apps' Python), so that `agent_asgi_loop auto` finds uvloop
  there as uvicorn's `--loop auto` would: every stack runs uvloop's loop.
  The agent's loader itself uses only the standard library and HTTP on its
  own frames (no httptools).
- nginx in front of uvicorn and Granian has the configuration of uvicorn's
  deployment guide: `proxy_http_version 1.1`, and `Upgrade` and `Connection`
  passed on (a `map` of `$http_upgrade`), so that `/ws` becomes a WebSocket.
  It opens a connection to the server per request, as that guide's
  configuration does (no upstream keepalive). The agent's nginx keeps its
  connections to the workers, one per lane.
- Hello world: `wrk -t2 -cN -dD --latency` on `/` (`Hello, world!`,
  text/plain), after a 1 s warm-up.
- WebSocket echo: bench/wsload.py, N connections over two processes (as
  wrk's two threads), each process an event loop (uvloop); every connection
  sends a 32-byte text message to `/ws`, waits for its echo, checks it, and
  again, for D seconds. The rate is round trips per second; p50 and p99 are
  over every round trip.
- N = {conns} connections. {rounds} round{'s' if rounds != 1 else ''}: in each, every stack starts, runs
  both workloads at each connection count, and stops, the stacks taking
  turns to go first; the tables show each figure's median round.
- The agent's workers serve up to {ASGI_CONCURRENCY} requests at once each (`agent_concurrency`;
  its default is 100): together they take every connection of the largest
  run at once, as uvicorn and Granian do, which set no such limit by
  default. On nginx's direct path each worker has a lane per request
  (docs/protocol.md §5, "Lanes"), so nginx reaches the workers without
  the engine, WebSockets included.
- The run shares the machine's {machine.cores} cores with the load clients, and with
  whatever else the machine runs (the note at the top): the figures compare
  the stacks with each other on this machine; they are not the capacity of
  a machine given to the server. The WebSocket client is Python: it takes
  more CPU per round trip than wrk per request (the last column of the
  "every round" tables), CPU the stack under test does not get, the same
  for every stack. On a busy machine the rounds of one stack can differ by
  half or more (the "every round" tables): read a ratio near 1.0 as a tie,
  and the CPU per request as the steadier comparison.
- The workers run as `nobody` in every stack (uvicorn and Granian started
  under `setpriv`).

## nginx settings, the same in every stack

`worker_processes` 1; upstream response buffers (bench/stacks.py, Buffers):

{buffers}

""" + results_section(results, rounds)
