"""The benchmark's report, as Markdown (printed and written to docs/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from figures import APP_MASTER, ROLES, Run, StackResult
from procfs import CLOCK_TICKS
from stacks import THREADS, WORKERS

AGENT_CPU_BAR_US = 5.0
GUNICORN_FACTOR = 3.0
NOISY_PERCENT = 10.0
SHORT = {"ours": "agent", "relay": "agent relay", "uwsgi": "uWSGI", "gunicorn": "gunicorn", "uvicorn": "uvicorn",
         "granian": "Granian"}
ROLE_TITLES = {APP_MASTER: "uWSGI master / gunicorn arbiter"}


@dataclass
class Machine:
    date: str
    cpu: str
    cores: int
    kernel: str
    memory_gib: float
    nginx: str
    wrk: str
    app_python: str
    agent_python: str
    gunicorn: str
    uwsgi: str
    duration: float
    load: str
    load_end: str = "?"
    buffers: list[tuple[str, str]] = field(default_factory=list)    # (stack, the directives it is given)
    more_nginx_workers: int = 1    # nginx's worker_processes in the second pass (1: none)
    uvicorn: str = "-"             # the asgi part's peers, and its WebSocket load client's library
    granian: str = "-"
    websockets: str = "-"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def ms(value: float) -> str:
    return f"{value * 1e3:.2f} ms"


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with aligned columns, readable as plain text too."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def by_key(results: Sequence[StackResult]) -> dict[str, StackResult]:
    return {r.key: r for r in results}


def ratio(a: Run | None, b: Run | None) -> str:
    if a is None or b is None or b.rate == 0:
        return "-"
    return f"{a.rate / b.rate:.2f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets the bar" if ok else "misses the bar")


def agent_us(run: Run | None) -> float | None:
    if run is None or run.agent_cpu is None or run.requests == 0:
        return None
    return run.agent_cpu / run.requests * 1e6


def run_keys(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
             connections: Sequence[int], nginx_workers: int) -> list[tuple[str, str, int]]:
    """(workload, title, connections) of the runs made with nginx_workers,
    in the order of workloads and connections."""
    made = {(run.workload, run.connections) for r in results for run in r.runs if run.nginx_workers == nginx_workers}
    return [(key, title, c) for key, title, _ in workloads for c in connections if (key, c) in made]


def throughput_table(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                     connections: Sequence[int], nginx_workers: int = 1) -> str:
    ran = [r for r in results if r.runs]
    header = ["workload", "conns"]
    for r in ran:
        header += [f"{SHORT[r.key]} req/s", "p50", "p99"]
    found = by_key(ran)
    ratios = [k for k in ("uwsgi", "gunicorn") if "ours" in found and k in found]
    header += [f"agent/{SHORT[k]}" for k in ratios]
    rows = []
    for key, title, c in run_keys(ran, workloads, connections, nginx_workers):
        row = [title, str(c)]
        for r in ran:
            run = r.run(key, c, nginx_workers)
            row += ["-", "-", "-"] if run is None else [f"{run.rate:,.0f}", ms(run.p50), ms(run.p99)]
        row += [ratio(found["ours"].run(key, c, nginx_workers), found[k].run(key, c, nginx_workers))
                for k in ratios]
        rows.append(row)
    return table(header, rows)


def us(seconds: float | None, run: Run | None) -> float | None:
    return None if run is None else run.us_per_request(seconds)


def fraction(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def cpu_split_table(results: Sequence[StackResult], workload: str, connections: int, nginx_workers: int,
                    base: str = "uwsgi", role_titles: dict[str, str] | None = None) -> str:
    """µs of CPU per request by process role, each stack a column, with
    totals, and each stack's figures divided by base's (uWSGI's)."""
    titles = ROLE_TITLES if role_titles is None else role_titles
    ran: list[tuple[StackResult, Run]] = []
    for r in results:
        found = r.run(workload, connections, nginx_workers)
        if found is not None:
            ran.append((r, found))
    peer = next((run for r, run in ran if r.key == base), None)
    ratios = [(r, run) for r, run in ran if r.key != base] if peer is not None else []
    roles = [role for role in ROLES if any(role in run.cpu_split for _, run in ran)]
    rows = []
    for role in roles:
        row = [titles.get(role, role)]
        row += ["-" if role not in run.cpu_split else f"{us(run.cpu_split[role], run):.1f}" for _, run in ran]
        row += [fraction(us(run.cpu_split.get(role), run), us(peer.cpu_split.get(role), peer)) if peer else "-"
                for _, run in ratios]
        rows.append(row)
    def total(run: Run) -> float | None:
        return us(sum(run.cpu_split.values()), run)
    rows.append(["**total**", *(f"**{total(run) or 0:.1f}**" for _, run in ran),
                 *(f"**{fraction(total(run), total(peer))}**" if peer else "-" for _, run in ratios)])
    rows.append(["requests", *(f"{run.requests:,}" for _, run in ran), *("" for _ in ratios)])
    rows.append(["one clock tick (resolution)", *(f"{us(1 / CLOCK_TICKS, run) or 0:.2f}" for _, run in ran),
                 *("" for _ in ratios)])
    header = ["process", *(f"{SHORT[r.key]} µs/req" for r, _ in ran),
              *(f"{SHORT[r.key]}/{SHORT[base]}" for r, _ in ratios)]
    return table(header, rows)


def cpu_split_section(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                      connections: Sequence[int], more_nginx_workers: int) -> list[str]:
    parts = ["## CPU per request, by process", "",
             "utime + stime (from /proc/PID/stat, every thread) of each process of the stack over the wrk run, "
             "divided by the requests wrk completed, summed by role: nginx's master and workers (told apart by "
             "the title nginx gives them), `agentctl serve`, the agent's watchdog and core (by their pid files), "
             "uWSGI's master and gunicorn's arbiter (the process the benchmark starts), the app workers (those the "
             "agent's status API lists; the children of uWSGI's master, of gunicorn's arbiter), and the agent's "
             "preloader (any other process below the core). A process that exited "
             "during a run is not counted; one that started during it counts whole. The ratio columns divide "
             "each stack's figure by uWSGI's (below 1: less CPU than uWSGI). wrk is not counted. The kernel "
             f"counts CPU time in clock ticks ({1000 / CLOCK_TICKS:g} ms here): the last row of each table is one "
             "tick in µs per request, the resolution of that column.", ""]
    for nginx_workers in dict.fromkeys([1, more_nginx_workers]):
        for key, title, c in run_keys(results, workloads, connections, nginx_workers):
            where = f", nginx with {nginx_workers} worker processes" if nginx_workers != 1 else ""
            parts += [f"### {title}, {c} connection{'s' if c != 1 else ''}{where}", "",
                      cpu_split_table(results, key, c, nginx_workers), ""]
    return parts


def agent_cpu_table(ours: StackResult, connections: Sequence[int]) -> str:
    rows = []
    for c in connections:
        run = ours.run("hello", c)
        us = agent_us(run)
        if run is None or us is None or run.agent_cpu is None:
            continue
        rows.append([str(c), f"{run.requests:,}", f"{run.agent_cpu:.2f} s", f"{us:.1f}",
                     verdict(us <= AGENT_CPU_BAR_US)])
    return table(["connections", "requests", "agent core CPU", "µs per request", f"bar: ≤ {AGENT_CPU_BAR_US:g} µs"],
                 rows)


def bars_table(results: Sequence[StackResult], connections: Sequence[int]) -> str:
    """The bars of the data-path issue: the agent against uWSGI in the same
    run, its core's CPU, and the whole stack's CPU."""
    found = by_key(results)
    ours, peer = found.get("ours"), found.get("uwsgi")
    rows = []

    def pairs(workload: str, conns: Sequence[int]) -> list[tuple[int, Run, Run]]:
        if ours is None or peer is None:
            return []
        got = [(c, ours.run(workload, c), peer.run(workload, c)) for c in conns]
        return [(c, a, b) for c, a, b in got if a is not None and b is not None]

    def rate_row(name: str, workload: str, conns: Sequence[int]) -> None:
        got = pairs(workload, conns)
        if len(got) != len(conns):
            rows.append([name, "not measured", "-"])
            return
        rows.append([name, ", ".join(f"{a.rate / b.rate:.2f}x at {c}" for c, a, b in got),
                     verdict(all(a.rate >= b.rate for _, a, b in got))])

    rate_row("hello world at 1, 16, 64 connections: ≥ uWSGI's rate", "hello", [1, 16, 64])
    rate_row("100 KB body at 16 connections: ≥ uWSGI's rate", "100k", [16])
    got = pairs("hello", [16])
    rows.append(["hello world at 16 connections: p99 ≤ uWSGI's",
                 f"{ms(got[0][1].p99)} vs {ms(got[0][2].p99)}" if got else "not measured",
                 verdict(got[0][1].p99 <= got[0][2].p99) if got else "-"])
    name = f"agent core CPU ≤ {AGENT_CPU_BAR_US:g} µs per request (hello world)"
    costs = [(c, agent_us(ours.run("hello", c))) for c in connections] if ours else []
    measured = [(c, cost) for c, cost in costs if cost is not None]
    if measured:
        rows.append([name, ", ".join(f"{cost:.1f} µs at {c}" for c, cost in measured),
                     verdict(max(cost for _, cost in measured) <= AGENT_CPU_BAR_US)])
    else:
        rows.append([name, "not measured", "-"])
    got = pairs("hello", connections)
    if got:
        rows.append(["whole-stack CPU per request ≤ uWSGI's (hello world)",
                     ", ".join(f"{a.stack_cpu / a.requests * 1e6:.1f} vs {b.stack_cpu / b.requests * 1e6:.1f} µs "
                               f"at {c}" for c, a, b in got if a.requests and b.requests),
                     verdict(all(a.requests and b.requests and a.stack_cpu / a.requests <= b.stack_cpu / b.requests
                                 for _, a, b in got))])
    else:
        rows.append(["whole-stack CPU per request ≤ uWSGI's (hello world)", "not measured", "-"])
    mine = ours.run("hello", 16) if ours else None
    other = found["gunicorn"].run("hello", 16) if "gunicorn" in found else None
    name = f"hello world at 16 connections: ≥ {GUNICORN_FACTOR:g}x gunicorn's rate (an earlier bar)"
    if mine is None or other is None:
        rows.append([name, "not measured", "-"])
    else:
        rows.append([name, f"{mine.rate:,.0f} vs {other.rate:,.0f} req/s ({mine.rate / other.rate:.2f}x)",
                     verdict(mine.rate >= GUNICORN_FACTOR * other.rate)])
    return table(["bar", "measured", "result"], rows)


def stack_cpu_table(results: Sequence[StackResult], connections: Sequence[int]) -> str:
    ran = [r for r in results if r.runs]
    rows = [["at rest (% of a core)",
             *(f"{r.idle_stack_cpu / r.idle_seconds * 100:.1f} %" if r.idle_seconds else "-" for r in ran)]]
    for c in connections:
        row = [str(c)]
        for r in ran:
            run = r.run("hello", c)
            row.append("-" if run is None or not run.requests else f"{run.stack_cpu / run.requests * 1e6:.1f}")
        rows.append(row)
    return table(["connections", *(f"{SHORT[r.key]} µs/request" for r in ran)], rows)


def memory_table(results: Sequence[StackResult]) -> str:
    rows = []
    for r in results:
        if not r.runs or not (r.worker_pss_kib or r.other_memory):
            continue  # the relay's pass measures no memory: its workers are the fast path's
        each = ", ".join(mib(k) for k in r.worker_pss_kib) or "?"
        mean = mib(sum(r.worker_pss_kib) // len(r.worker_pss_kib)) if r.worker_pss_kib else "?"
        others = "; ".join(f"{what} {mib(kib)}" for what, kib in r.other_memory) or "-"
        rows.append([r.label, each, mean, others])
    return table(["stack", "worker PSS (each)", "mean", "other processes"], rows)


def settings_section(machine: Machine) -> str:
    """The nginx settings that are the same in every stack, as given."""
    rows = [[stack, f"`{directives}`"] for stack, directives in machine.buffers]
    workers = ("1; then " + f"{machine.more_nginx_workers} for the second pass" if machine.more_nginx_workers > 1
               else "1")
    return "\n".join(["## nginx settings, the same in every stack", "",
                      f"`worker_processes` {workers}; upstream response buffers (proxy_*'s meanings, under "
                      "each stack's prefix), set in one place (bench/stacks.py, Buffers; run.py's "
                      "--buffer-size, --buffers and --busy-buffers-size):", "",
                      table(["stack", "buffer directives"], rows), ""])


def rounds_table(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                 connections: Sequence[int], more_nginx_workers: int) -> str:
    """Every round's rate of each run, in the order made."""
    ran = [r for r in results if r.runs]
    rows = []
    for workers in dict.fromkeys((1, more_nginx_workers)):
        for key, title, c in run_keys(ran, workloads, connections, workers):
            rows.append([title, str(c), str(workers),
                         *(", ".join(f"{run.rate:,.0f}" for run in r.runs_of(key, c, workers)) or "-" for r in ran)])
    return table(["workload", "conns", "nginx workers", *(f"{SHORT[r.key]} req/s, each round" for r in ran)], rows)


def results_section(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                    connections: Sequence[int], more_nginx_workers: int = 1) -> str:
    """results: every round; the tables show each figure's median round
    (its rate, latency and CPU), and one table every round's rate."""
    if not any(r.runs for r in results):
        reasons = "".join(f"- {r.label}: {r.error}\n" for r in results)
        return f"## Results\n\nNo stack ran.\n\n{reasons}"
    every, results = results, [r.median_rounds() for r in results]
    parts = ["## Throughput and latency", "",
             "Requests per second and wrk's 50th and 99th latency percentiles of each figure's median round, "
             "nginx with one worker process; the last columns divide the agent's rate by each peer's.", "",
             throughput_table(results, workloads, connections), ""]
    if more_nginx_workers > 1 and run_keys(results, workloads, connections, more_nginx_workers):
        parts += [f"### nginx with {more_nginx_workers} worker processes", "",
                  f"Each stack started again with `worker_processes {more_nginx_workers}`, everything else "
                  "the same.", "",
                  throughput_table(results, workloads, connections, more_nginx_workers), ""]
    parts += ["### Every round", "",
              "Each round started every stack in turn, a different one first each round; the tables above "
              "and below show the round with the median rate (its latency and CPU with it).", "",
              rounds_table(every, workloads, connections, more_nginx_workers), ""]
    parts += ["## Bars", "", bars_table(results, connections), ""]
    ours = by_key(results).get("ours")
    if ours and ours.runs:
        parts += ["## Agent core CPU per request (hello world)", "",
                  "utime + stime of the agent core process (every thread, from /proc/PID/stat) over the "
                  "run, divided by the requests wrk completed.", "",
                  agent_cpu_table(ours, connections), ""]
        if ours.idle_agent_cpu is not None and ours.idle_seconds:
            parts += [f"At rest ({ours.idle_seconds:g} s without load, after the warm-up) the agent core used "
                      f"{ours.idle_agent_cpu / ours.idle_seconds * 100:.1f} % of a core; that share is part of "
                      "the figures above, and weighs most where the rate is lowest.", ""]
    parts += ["## CPU of the whole stack per request (hello world)", "",
              "utime + stime of every process of the stack (nginx master and worker; the app server's "
              "master and workers, or the agent's watchdog, core and workers) over the run, divided by "
              "the requests. wrk runs on the same cores and is not counted.", "",
              stack_cpu_table(results, connections), "",
              *cpu_split_section(results, workloads, connections, more_nginx_workers),
              "## Memory", "",
              "PSS (from /proc/PID/smaps_rollup) of each app worker, and of the peers' masters, after all "
              "the runs; RSS (from /proc/PID/status) of the agent's core and watchdog.", "",
              memory_table(results), ""]
    errors = [(r.label, run) for r in every for run in r.runs if run.errors]
    if errors:
        parts += ["## Failed requests", "",
                  "In every round.", "",
                  table(["stack", "workload", "conns", "nginx workers", "errors (non-2xx + socket errors)"],
                        [[label, run.workload, str(run.connections), str(run.nginx_workers), str(run.errors)]
                         for label, run in errors]),
                  ""]
    failed = [r for r in results if r.error]
    if failed:
        parts += ["## Stacks that did not run", ""]
        parts += [f"- {r.label}: {r.error}" for r in failed]
        parts.append("")
    return "\n".join(parts)


def noise_note(results: Sequence[StackResult], cores: int) -> str:
    """How much CPU processes outside the stack under test and wrk used
    during the measured runs: the run's noise."""
    shares = [(r, run, run.other_cpu / (run.seconds * cores) * 100)
              for r in results for run in r.runs if run.seconds]
    if not shares:
        return ""
    mean = sum(share for _, _, share in shares) / len(shares)
    text = (f"Processes other than the stack under test and wrk used {mean:.1f} % of the machine's CPU "
            f"on average during the measured runs")
    noisy = [f"{SHORT[r.key]} {run.workload} at {run.connections}"
             f"{'' if run.nginx_workers == 1 else f' with {run.nginx_workers} nginx workers'} ({share:.0f} %)"
             for r, run, share in shares if share >= NOISY_PERCENT]
    if noisy:
        return (text + f"; {NOISY_PERCENT:g} % or more during these runs: {', '.join(noisy)}. "
                "Those figures are noisier than an idle machine's.")
    return text + "."


def machine_table(machine: Machine, agent_python: bool, wrk: bool, asgi: bool = False) -> str:
    """The report's table of the machine and the programs' versions (with
    asgi, the asgi part's peers in place of the WSGI ones)."""
    rows = [
        ["date", machine.date],
        ["CPU", f"{machine.cpu}, {machine.cores} cores"],
        ["memory", f"{machine.memory_gib:.1f} GiB"],
        ["kernel", machine.kernel],
        ["load average (1, 5, 15 min) at start, at end", f"{machine.load}; {machine.load_end}"],
        ["nginx", machine.nginx],
        ["app workers' Python (every stack)", machine.app_python],
        *([["agent core's Python", machine.agent_python]] if agent_python else []),
        *([["uvicorn", machine.uvicorn], ["Granian", machine.granian],
           ["websockets (the WebSocket load client)", machine.websockets]] if asgi else
          [["gunicorn", machine.gunicorn], ["uWSGI", machine.uwsgi]]),
        *([["wrk", machine.wrk]] if wrk else []),
    ]
    return table(["", ""], rows)


def markdown(machine: Machine, results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
             connections: Sequence[int], quick: bool, rounds: int) -> str:
    each = (f"{rounds} round{'s' if rounds != 1 else ''} of {machine.duration:g} s per wrk run; each figure is "
            "its median round")
    kind = f"a quick run ({each})" if quick else f"one run of `make bench` ({each})"
    info = machine_table(machine, agent_python=True, wrk=True)
    busy_note = f"\n{noise_note(results, machine.cores)}\n"
    second_pass = (f"- After a stack's runs it starts again with nginx at {machine.more_nginx_workers} worker\n"
                   "  processes, for hello world at 16 and 64 connections (`--more-nginx-workers`).\n"
                   if machine.more_nginx_workers > 1 else "")
    return f"""# Benchmarks

The figures below come from {kind}, as measured; nothing is adjusted.
{busy_note}
## How to reproduce

    make bench                                  # installs what is missing, builds, runs (about 20 minutes)
    .venv/bin/python bench/run.py --only throughput   # this page's runs alone (about 15 minutes)
    .venv/bin/python bench/run.py --quick       # 3 s per run; report in bench/results/quick.md
    .venv/bin/python bench/run.py --help        # --duration, --stacks, --buffers, --more-nginx-workers, ...

`make bench` also runs the spawn and memory part (`make bench-spawn` runs
it alone): spawn-to-ready times, and each worker's and the whole app's
memory at 1, 4 and 16 workers, for hello world and a Django app
(examples/django), with the agent's two spawn methods, uWSGI, and gunicorn
with and without `--preload`. Its report is docs/benchmarks-spawn.md.

It runs the threads part too (`bench/run.py --only threads` runs it
alone): the 10 ms sleep on {WORKERS} workers of {THREADS} threads each, the agent's
`agent_concurrency_model thread` against gunicorn's gthread workers and
uWSGI's threads, in rounds. Its report is
[docs/benchmarks-threads.md](benchmarks-threads.md).

And the asgi part (`bench/run.py --only asgi` runs it alone): an ASGI
hello world and a WebSocket echo (bench/apps/asgi.py) on {WORKERS} workers, the
agent's `agent_app_type asgi` against uvicorn and Granian, in rounds. Its
report is [docs/benchmarks-asgi.md](benchmarks-asgi.md).

The script installs what it lacks when run as root (wrk and nginx with
apt-get; gunicorn, uWSGI, uvicorn, Granian and websockets with pip, from
bench/requirements.txt, into a
virtualenv made from the apps' interpreter, bench/results/peers-venv), or
names what to install. It stops every process it started, also on Ctrl-C.
wrk's full output is kept in bench/results/wrk-STACK.txt, the figures in
bench/results/last.json.

## Machine

{info}

## What runs

Four stacks, one after another, in {rounds} rounds, on the same machine, with the same app
(bench/apps/wsgi.py) under the same interpreter. The agent's stack is
`agentctl serve APP --min-instances 2 --max-instances 2`, which writes its
own nginx configuration; the peers' configurations are written by
bench/stacks.py to match it.

| stack | front | app server | workers |
| --- | --- | --- | --- |
| agent | nginx with ngx_http_agent_module | the agent: watchdog and core | 2 (min and max instances) |
| agent relay | the same, `--fast-path off`: every request through the relay | the same | 2 |
| uWSGI | nginx, `uwsgi_pass` to a Unix socket | uWSGI, `--master --processes 2` | 2 |
| gunicorn | nginx, `proxy_pass` to a Unix socket | gunicorn, `--workers 2 --worker-class sync` | 2 |

- nginx is the system's, one worker process, `access_log off`, `sendfile on`,
  4096 worker connections. The agent's fast path keeps one connection from
  each nginx worker to each app worker; the relay and both peers make one
  upstream connection per request.
- The relay runs hello world at 1, 16 and 64 connections and 100 KB at 16:
  the before of the fast path, measured in the same run.
- nginx's upstream buffers are the same in every stack, set from one place
  (bench/stacks.py) as `agent_*`, `uwsgi_*` and `proxy_*` directives: see
  "nginx settings" below.
{second_pass}- Our stack's nginx configuration is written by `agentctl serve`, given
  the worker processes and the buffers as flags (`--nginx-workers`,
  `--buffer-size`, `--buffers`, `--busy-buffers-size`).
- The workers run as `nobody` in every stack (the agent drops to nobody when
  it runs as root; gunicorn with `--user`, uWSGI with `--uid`).
- Workloads: `/` answers a 13-byte "Hello, world"; `/100k` a 100 KB body;
  `/sleep` sleeps 10 ms, then answers (a worker is busy without using CPU).
- Load: `wrk -t2 -cN -dD --latency` at N = 1, 16, 64 connections (one thread
  at 1 connection), after a 1 s warm-up of each path, in each round. wrk keeps its
  connections to nginx alive. wrk runs on the same {machine.cores} cores as
  the stack under test, so the figures compare the stacks with each other on
  this machine; they are not the capacity of a machine given to the server.

{settings_section(machine)}
"""  + results_section(results, workloads, connections, machine.more_nginx_workers)
