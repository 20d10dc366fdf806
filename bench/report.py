"""The benchmark's report, as Markdown (printed and written to docs/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from figures import Run, StackResult

AGENT_CPU_BAR_US = 15.0
GUNICORN_FACTOR = 3.0
NOISY_PERCENT = 10.0
SHORT = {"ours": "agent", "uwsgi": "uWSGI", "gunicorn": "gunicorn"}


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


def throughput_table(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                     connections: Sequence[int]) -> str:
    ran = [r for r in results if r.runs]
    header = ["workload", "conns"]
    for r in ran:
        header += [f"{SHORT[r.key]} req/s", "p50", "p99"]
    found = by_key(ran)
    ratios = [k for k in ("uwsgi", "gunicorn") if "ours" in found and k in found]
    header += [f"agent/{SHORT[k]}" for k in ratios]
    rows = []
    for key, title, _ in workloads:
        for c in connections:
            row = [title, str(c)]
            for r in ran:
                run = r.run(key, c)
                row += ["-", "-", "-"] if run is None else [f"{run.rate:,.0f}", ms(run.p50), ms(run.p99)]
            row += [ratio(found["ours"].run(key, c), found[k].run(key, c)) for k in ratios]
            rows.append(row)
    return table(header, rows)


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
    found = by_key(results)
    ours = found.get("ours")
    rows = []
    costs = [(c, agent_us(ours.run("hello", c))) for c in connections] if ours else []
    measured = [(c, us) for c, us in costs if us is not None]
    if measured:
        worst = max(us for _, us in measured)
        rows.append([f"agent core CPU ≤ {AGENT_CPU_BAR_US:g} µs per request (hello world)",
                     ", ".join(f"{us:.1f} µs at {c}" for c, us in measured), verdict(worst <= AGENT_CPU_BAR_US)])
    else:
        rows.append([f"agent core CPU ≤ {AGENT_CPU_BAR_US:g} µs per request (hello world)", "not measured", "-"])
    mine = ours.run("hello", 16) if ours else None
    for key, factor in (("uwsgi", 1.0), ("gunicorn", GUNICORN_FACTOR)):
        peer = found[key].run("hello", 16) if key in found else None
        name = f"hello world, 16 connections: ≥ {'' if factor == 1 else f'{factor:g}x '}{SHORT[key]}'s rate"
        if mine is None or peer is None:
            rows.append([name, "not measured", "-"])
            continue
        rows.append([name, f"{mine.rate:,.0f} vs {peer.rate:,.0f} req/s ({mine.rate / peer.rate:.2f}x)",
                     verdict(mine.rate >= factor * peer.rate)])
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
        if not r.runs:
            continue
        each = ", ".join(mib(k) for k in r.worker_pss_kib) or "?"
        mean = mib(sum(r.worker_pss_kib) // len(r.worker_pss_kib)) if r.worker_pss_kib else "?"
        others = "; ".join(f"{what} {mib(kib)}" for what, kib in r.other_memory) or "-"
        rows.append([r.label, each, mean, others])
    return table(["stack", "worker PSS (each)", "mean", "other processes"], rows)


def results_section(results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
                    connections: Sequence[int]) -> str:
    if not any(r.runs for r in results):
        reasons = "".join(f"- {r.label}: {r.error}\n" for r in results)
        return f"## Results\n\nNo stack ran.\n\n{reasons}"
    parts = ["## Throughput and latency", "",
             "Requests per second and wrk's 50th and 99th latency percentiles; the last columns divide "
             "the agent's rate by each peer's.", "",
             throughput_table(results, workloads, connections), "",
             "## Bars", "", bars_table(results, connections), ""]
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
              "## Memory", "",
              "PSS (from /proc/PID/smaps_rollup) of each app worker, and of the peers' masters, after all "
              "the runs; RSS (from /proc/PID/status) of the agent's core and watchdog.", "",
              memory_table(results), ""]
    errors = [(r.label, run) for r in results for run in r.runs if run.errors]
    if errors:
        parts += ["## Failed requests", "",
                  table(["stack", "workload", "conns", "errors (non-2xx + socket errors)"],
                        [[label, run.workload, str(run.connections), str(run.errors)] for label, run in errors]),
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
    noisy = [f"{SHORT[r.key]} {run.workload} at {run.connections} ({share:.0f} %)"
             for r, run, share in shares if share >= NOISY_PERCENT]
    if noisy:
        return (text + f"; {NOISY_PERCENT:g} % or more during these runs: {', '.join(noisy)}. "
                "Those figures are noisier than an idle machine's.")
    return text + "."


def markdown(machine: Machine, results: Sequence[StackResult], workloads: Sequence[tuple[str, str, str]],
             connections: Sequence[int], quick: bool) -> str:
    kind = f"a quick run ({machine.duration:g} s per wrk run)" if quick else \
        f"one run of `make bench` ({machine.duration:g} s per wrk run)"
    info = table(["", ""], [
        ["date", machine.date],
        ["CPU", f"{machine.cpu}, {machine.cores} cores"],
        ["memory", f"{machine.memory_gib:.1f} GiB"],
        ["kernel", machine.kernel],
        ["load average (1, 5, 15 min) at start, at end", f"{machine.load}; {machine.load_end}"],
        ["nginx", machine.nginx],
        ["app workers' Python (every stack)", machine.app_python],
        ["agent core's Python", machine.agent_python],
        ["gunicorn", machine.gunicorn],
        ["uWSGI", machine.uwsgi],
        ["wrk", machine.wrk],
    ])
    busy_note = f"\n{noise_note(results, machine.cores)}\n"
    return f"""# Benchmarks

The figures below come from {kind}, as measured; nothing is adjusted.
{busy_note}
## How to reproduce

    make bench                                  # installs what is missing, builds, runs (about 5 minutes)
    .venv/bin/python bench/run.py --quick       # 3 s per run; report in bench/results/quick.md
    .venv/bin/python bench/run.py --help        # --duration, --stacks, --app-python, --output

The script installs what it lacks when run as root (wrk and nginx with
apt-get; gunicorn and uWSGI with pip, from bench/requirements.txt, into a
virtualenv made from the apps' interpreter, bench/results/peers-venv), or
names what to install. It stops every process it started, also on Ctrl-C.
wrk's full output is kept in bench/results/wrk-STACK.txt, the figures in
bench/results/last.json.

## Machine

{info}

## What runs

Three stacks, one after another, on the same machine, with the same app
(bench/apps/wsgi.py) under the same interpreter. The agent's stack is
`agentctl serve APP --min-instances 2 --max-instances 2`, which writes its
own nginx configuration; the peers' configurations are written by
bench/stacks.py to match it.

| stack | front | app server | workers |
| --- | --- | --- | --- |
| agent | nginx with ngx_http_agent_module | the agent: watchdog and core | 2 (min and max instances) |
| uWSGI | nginx, `uwsgi_pass` to a Unix socket | uWSGI, `--master --processes 2` | 2 |
| gunicorn | nginx, `proxy_pass` to a Unix socket | gunicorn, `--workers 2 --worker-class sync` | 2 |

- nginx is the system's, one worker process, `access_log off`, `sendfile on`,
  4096 worker connections; one request per upstream connection in every
  stack (none of the three backends keeps upstream connections alive).
- nginx's upstream buffers are the same in every stack: the agent module's
  defaults (8k header buffer, 8 x 8k buffers, 16k busy), set for the peers
  with `proxy_*`/`uwsgi_*` directives.
- The workers run as `nobody` in every stack (the agent drops to nobody when
  it runs as root; gunicorn with `--user`, uWSGI with `--uid`).
- Workloads: `/` answers a 13-byte "Hello, world"; `/100k` a 100 KB body;
  `/sleep` sleeps 10 ms, then answers (a worker is busy without using CPU).
- Load: `wrk -t2 -cN -dD --latency` at N = 1, 16, 64 connections (one thread
  at 1 connection), after a 1 s warm-up of each path. wrk keeps its
  connections to nginx alive. wrk runs on the same {machine.cores} cores as
  the stack under test, so the figures compare the stacks with each other on
  this machine; they are not the capacity of a machine given to the server.

"""  + results_section(results, workloads, connections)
