"""The report of the spawn and memory runs, as Markdown."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from figures import NOT_AVAILABLE, MemoryFigures, SpawnFigures
from report import Machine, machine_table, table

PEER = "uWSGI"                   # the stack the ratios divide by
SMART, DIRECT = "agent smart", "agent direct"
HELLO_SPAWN_BAR_S = 0.010        # smart: a hello world worker ready in ≤ 10 ms
DJANGO_SPAWN_FACTOR = 0.1        # smart: a Django worker ready in ≤ 1/10 of direct's time
DJANGO_PSS_FACTOR = 0.6          # smart: 16 Django workers' total PSS ≤ 0.6 x direct's
BAR_WORKERS = 16
APP_TITLES = {"hello": "hello world (bench/apps/wsgi.py)", "django": "Django (examples/django, its own virtualenv)"}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def median_max(values: Sequence[float]) -> str:
    return "-" if not values else f"{ms(statistics.median(values))} / {ms(max(values))}"


def ratio(mine: float | None, theirs: float | None) -> str:
    return "-" if mine is None or not theirs else f"{mine / theirs:.2f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets the bar" if ok else "misses the bar")


def median_of(figures: SpawnFigures | None) -> float | None:
    return statistics.median(figures.to_answer) if figures and figures.to_answer else None


def find_spawn(results: Sequence[SpawnFigures], stack: str, app: str) -> SpawnFigures | None:
    return next((r for r in results if r.stack == stack and r.app == app and not r.error), None)


def find_memory(results: Sequence[MemoryFigures], stack: str, app: str, workers: int) -> MemoryFigures | None:
    return next((r for r in results if r.stack == stack and r.app == app and r.workers == workers
                 and not r.error), None)


def spawn_table(results: Sequence[SpawnFigures], app: str) -> str:
    rows = []
    peer = median_of(find_spawn(results, PEER, app))
    for r in (r for r in results if r.app == app):
        if r.error:
            rows.append([r.stack, "not available" if r.error.startswith(NOT_AVAILABLE) else "failed",
                         "-", "-", "-", "-", "-"])
            continue
        rows.append([r.stack, str(len(r.total)), median_max(r.to_answer), median_max(r.logged),
                     median_max(r.to_fork), median_max(r.total), ratio(median_of(r), peer)])
    return table(["stack", "spawns", "fork → first answer (median / max)", "agent log: fork → ready",
                  "kill → fork", "kill → answer", f"fork → answer / {PEER}'s"], rows)


def mean(values: Sequence[int]) -> float:
    return sum(values) / len(values)


def memory_table(results: Sequence[MemoryFigures], app: str) -> str:
    rows = []
    for r in (r for r in results if r.app == app):
        if r.error:
            rows.append([r.stack, str(r.workers), "not available" if r.error.startswith(NOT_AVAILABLE) else "failed",
                         "-", "-", "-", "-", "-"])
            continue
        peer = find_memory(results, PEER, app, r.workers)
        workers = r.of_workers()
        uss, pss = mean([p.uss_kib for p in workers]), mean([p.pss_kib for p in workers])
        peer_uss = mean([p.uss_kib for p in peer.of_workers()]) if peer else None
        others = ", ".join(f"{p.role} {mib(p.pss_kib)}" for p in r.of_others()) or "-"
        rows.append([r.stack, str(r.workers), mib(uss), mib(pss), others, mib(r.total_pss_kib()),
                     ratio(uss, peer_uss), ratio(r.total_pss_kib(), peer.total_pss_kib() if peer else None)])
    return table(["stack", "workers", "worker USS (mean)", "worker PSS (mean)", "other processes (PSS)",
                  "whole app PSS", f"worker USS / {PEER}'s", f"whole app / {PEER}'s"], rows)


def bars_table(spawns: Sequence[SpawnFigures], memory: Sequence[MemoryFigures]) -> str:
    """The smart-spawning issue's bars, from this run; a bar whose figures
    are missing is "not measured", never guessed."""
    rows = []
    smart, peer = find_memory(memory, SMART, "hello", 1), find_memory(memory, PEER, "hello", 1)
    if smart and peer:
        mine, theirs = (mean([p.uss_kib for p in m.of_workers()]) for m in (smart, peer))
        rows.append(["hello world: a smart worker's USS ≤ uWSGI's (1 worker)", f"{mib(mine)} vs {mib(theirs)}",
                     verdict(mine <= theirs)])
    else:
        rows.append(["hello world: a smart worker's USS ≤ uWSGI's (1 worker)", "not measured", "-"])
    smart, direct = (find_memory(memory, s, "django", BAR_WORKERS) for s in (SMART, DIRECT))
    name = f"{BAR_WORKERS} Django workers: smart's total PSS ≤ {DJANGO_PSS_FACTOR:g} x direct's"
    if smart and direct:
        rows.append([name, f"{mib(smart.total_pss_kib())} vs {mib(direct.total_pss_kib())} "
                     f"({smart.total_pss_kib() / direct.total_pss_kib():.2f} x)",
                     verdict(smart.total_pss_kib() <= DJANGO_PSS_FACTOR * direct.total_pss_kib())])
    else:
        rows.append([name, "not measured", "-"])
    hello = median_of(find_spawn(spawns, SMART, "hello"))
    name = f"hello world: smart's fork → first answer ≤ {ms(HELLO_SPAWN_BAR_S)} (median)"
    rows.append([name, ms(hello), verdict(hello <= HELLO_SPAWN_BAR_S)] if hello is not None
                else [name, "not measured", "-"])
    smart_s, direct_s = (median_of(find_spawn(spawns, s, "django")) for s in (SMART, DIRECT))
    name = f"Django: smart's fork → first answer ≤ {DJANGO_SPAWN_FACTOR:g} x direct's (medians)"
    rows.append([name, f"{ms(smart_s)} vs {ms(direct_s)}", verdict(smart_s <= DJANGO_SPAWN_FACTOR * direct_s)]
                if smart_s is not None and direct_s is not None else [name, "not measured", "-"])
    return table(["bar", "measured", "result"], rows)


def notes(spawns: Sequence[SpawnFigures], memory: Sequence[MemoryFigures]) -> list[str]:
    found: dict[str, str] = {}
    every: list[SpawnFigures | MemoryFigures] = [*spawns, *memory]
    for r in every:
        if r.note:
            found.setdefault(f"{r.stack}: {r.note}", "")
        if r.error:
            found.setdefault(f"{r.stack}, {APP_TITLES.get(r.app, r.app)}: {r.error}", "")
    return [f"- {line}" for line in found]


def results_section(spawns: Sequence[SpawnFigures], memory: Sequence[MemoryFigures]) -> str:
    apps = list(dict.fromkeys([r.app for r in spawns] + [r.app for r in memory]))
    parts = []
    if spawns:
        parts += ["## Spawn-to-ready", "",
                  "Each stack runs one worker, which is killed with SIGKILL 20 times, each time once its "
                  "replacement has answered; a request is sent right after each kill and waits for the "
                  "replacement. **fork → first answer** is the spawn-to-ready time: from the moment the "
                  "replacement process exists (a new child of the process that forked the dead worker, seen "
                  "by polling /proc every 0.5 ms) to its answer to that request, through nginx; it is "
                  "measured from outside in the same way for every server. **agent log** is the agent's own "
                  "figure for the same spawns: from its fork to the worker's ready handshake (docs/protocol.md), "
                  "in whole milliseconds. **kill → fork** is how long the server took to notice the death and "
                  "fork; **kill → answer** is the whole outage of a one-worker app.", ""]
        for app in apps:
            parts += [f"### {APP_TITLES.get(app, app)}", "", spawn_table(spawns, app), ""]
    if memory:
        parts += ["## Memory", "",
                  "USS (the process's private pages) and PSS (private pages plus its share of every shared "
                  "page) of each process, from psutil's memory_full_info (/proc/PID/smaps), after a warm-up "
                  "(every path of the app, wrk at 2 connections per worker for 2 s) and once the workers' USS "
                  "has stopped moving. The worker columns are the mean over the workers. **whole app PSS** "
                  "adds up every process of the app server: the workers and the uWSGI master, the gunicorn "
                  "arbiter, or the agent's watchdog, core and (smart) preloader; nginx is not counted. PSS "
                  "adds up honestly across processes, so it is the whole app's memory; USS leaves out what "
                  "the workers share.", ""]
        for app in apps:
            parts += [f"### {APP_TITLES.get(app, app)}", "", memory_table(memory, app), ""]
    parts += ["## Bars of smart spawning", "", bars_table(spawns, memory), ""]
    extra = notes(spawns, memory)
    if extra:
        parts += ["## Notes", "", *extra, ""]
    return "\n".join(parts)


def markdown(machine: Machine, spawns: Sequence[SpawnFigures], memory: Sequence[MemoryFigures]) -> str:
    info = machine_table(machine, agent_python=False, wrk=False)
    return f"""# Benchmarks: spawning and memory

The figures below come from one run of the spawn and memory part of the
benchmark, as measured; nothing is adjusted. Memory figures do not depend on
the machine's load; spawn times do: the machine's cores are shared with
whatever else runs, and the load average below says how busy it was.

## How to reproduce

    make bench-spawn                                        # this part alone (about 5 minutes)
    .venv/bin/python bench/run.py --only spawn,memory       # the same
    .venv/bin/python bench/run.py --only spawn --apps django --spawn-stacks direct,uwsgi

`make bench` runs it too, after the throughput runs (docs/benchmarks.md).
The Django app runs in its own virtualenv, made by
examples/django/make-venv.sh into bench/results/django-venv.

## Machine

{info}

## What runs

| stack | how its workers start |
| --- | --- |
| agent smart | `agent_spawn_method smart`: forked from the app's preloader, which has imported the app |
| agent direct | `agent_spawn_method direct`: each worker a new interpreter that imports the app |
| uWSGI | `--master --processes N` (its default, no `--lazy-apps`): forked from the master, which has loaded the app |
| gunicorn --preload | `--preload --workers N`: forked from the arbiter, which has imported the app |
| gunicorn | `--workers N`: forked from the arbiter, then each imports the app |

Each stack is nginx (one worker process) in front of the app server on a
Unix socket, as in docs/benchmarks.md; our stack's nginx configuration is
the one `agentctl serve` prints, with `agent_spawn_method` added to its
location. The workers run as `nobody`. The apps: bench/apps/wsgi.py under
the system's Python, and examples/django in its virtualenv (ours:
`agent_python VENV/bin/python`; uWSGI and gunicorn, which run from their
own virtualenv: `--pythonpath VENV/lib/python3.X/site-packages`).

""" + results_section(spawns, memory)

