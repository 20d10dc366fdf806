"""THROWAWAY PROTOTYPE harness (issue 9, item 1): runs dataplane.c's five
paths and prints per-request CPU, wake-ups and system calls per role.

    python3 bench/prototypes/measure.py [--requests N] [--repeats R] [--output FILE]

CPU: utime+stime from wait4() of each process over N requests, median of R
runs. Wake-ups: voluntary context switches (a process that blocked and was
woken again). System calls: strace -ff over two runs of different lengths,
the difference divided by the difference in requests (start-up cancels out).
Not part of the build or the tests; see docs/design.md, "The data path:
candidates measured".
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ["relay", "relay_ka", "fdpass", "direct", "direct_ka"]
ROLES = ["nginx", "core", "worker"]


def build() -> str:
    out = os.path.join(tempfile.gettempdir(), "dataplane-proto")
    src = os.path.join(HERE, "dataplane.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o", out, src], check=True)
    return out


def run_once(exe: str, mode: str, conc: int, requests: int, procs: int, workers: int) -> dict[str, list[float]]:
    res = subprocess.run(
        [exe, mode, str(conc), str(requests), str(procs), str(workers)], check=True, capture_output=True, text=True
    )
    per: dict[str, list[float]] = {r: [0.0, 0.0, 0.0] for r in ROLES}  # cpu us, nvcsw, nivcsw
    elapsed = 0.0
    for line in res.stdout.splitlines():
        f = line.split()
        if f[0] in per:
            per[f[0]][0] += int(f[3]) + int(f[4])
            per[f[0]][1] += int(f[5])
            per[f[0]][2] += int(f[6])
        elif f[0] == "elapsed":
            elapsed = float(f[1])
    out = {r: [v / requests for v in per[r]] for r in ROLES}
    out["rate"] = [requests / elapsed]
    return out


def syscalls(
    exe: str, mode: str, conc: int, procs: int, workers: int, n1: int = 2000, n2: int = 6000
) -> dict[str, dict[str, float]]:
    counts = []
    for n in (n1, n2):
        d = tempfile.mkdtemp(prefix="dp-strace-")
        try:
            res = subprocess.run(
                [
                    "strace",
                    "-f",
                    "-ff",
                    "-o",
                    os.path.join(d, "t"),
                    exe,
                    mode,
                    str(conc),
                    str(n),
                    str(procs),
                    str(workers),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            role_of = {}
            for line in res.stdout.splitlines():
                f = line.split()
                if f[0] in ROLES:
                    role_of[f[1]] = f[0]
            per: dict[str, collections.Counter[str]] = {r: collections.Counter() for r in ROLES}
            for name in os.listdir(d):
                pid = name.rsplit(".", 1)[1]
                role = role_of.get(pid)
                if role is None:
                    continue
                with open(os.path.join(d, name)) as fh:
                    for line in fh:
                        m = re.match(r"([a-z0-9_]+)\(", line)
                        if m:
                            per[role][m.group(1)] += 1
            counts.append(per)
        finally:
            shutil.rmtree(d)
    diff: dict[str, dict[str, float]] = {}
    for r in ROLES:
        c: dict[str, float] = {}
        for k in set(counts[0][r]) | set(counts[1][r]):
            v = (counts[1][r][k] - counts[0][r][k]) / (n2 - n1)
            if v > 0.05:
                c[k] = round(v, 1)
        diff[r] = c
    return diff


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output")
    ap.add_argument("--cases", default="1x1,16x1,16x2", help="CONCxNGINX_PROCS,... (concurrency per nginx process)")
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    exe = build()
    lines = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    emit(
        f"{a.workers} workers; {a.requests} requests per run; median of {a.repeats} runs; "
        "CPU in µs per request; wake-ups = voluntary context switches per request; "
        "syscalls per request from strace -ff"
    )
    emit("")
    head = ["path", "conns x nginx procs"]
    head += [f"{r} CPU" for r in ROLES] + ["total CPU"]
    head += [f"{r} wake-ups" for r in ROLES] + [f"{r} syscalls" for r in ROLES]
    head += ["req/s (no app, noisy)"]
    emit("| " + " | ".join(head) + " |")
    emit("|" + " --- |" * len(head))
    details = []
    for case in a.cases.split(","):
        conc, procs = (int(x) for x in case.split("x"))
        for mode in a.modes.split(","):
            runs = [run_once(exe, mode, conc, a.requests, procs, a.workers) for _ in range(a.repeats)]
            med = {r: [statistics.median(run[r][i] for run in runs) for i in range(3)] for r in ROLES}
            rate = statistics.median(run["rate"][0] for run in runs)
            sc = syscalls(exe, mode, conc, procs, a.workers)
            tot = sum(med[r][0] for r in ROLES)
            row = [mode, f"{conc} x {procs}"]
            row += [f"{med[r][0]:.1f}" for r in ROLES] + [f"{tot:.1f}"]
            row += [f"{med[r][1]:.2f}" for r in ROLES]
            row += [f"{sum(sc[r].values()):.1f}" if sc[r] else "—" for r in ROLES]
            row += [f"{rate:,.0f}"]
            emit("| " + " | ".join(row) + " |")
            by_role = []
            for r in ROLES:
                if sc[r]:
                    names = sorted(sc[r].items(), key=lambda kv: -kv[1])
                    by_role.append(f"{r}: " + ", ".join(f"{k} {v}" for k, v in names))
            details.append(f"- {mode} {conc}x{procs}: " + "; ".join(by_role))
    emit("")
    emit("System calls per request, by name:")
    emit("")
    for d in details:
        emit(d)
    if a.output:
        with open(a.output, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
