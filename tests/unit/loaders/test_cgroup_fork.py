"""The preloader's fork into a worker's cgroup (wsgi_loader.CgroupFork):
clone3 with CLONE_INTO_CGROUP through ctypes, run by an unprivileged user
in cgroups delegated to it as the core delegates them
(agent/core/supervision.py), on the real kernel."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_security_workers import cgroups_available
from tests.integration.users import ATTACKER, ensure_user

LOADER = Path(__file__).resolve().parents[3] / "agent" / "loaders" / "wsgi_loader.py"

# Forks once into the cgroup argv[1] names and reports, from the child's
# first steps, where it was born and what Python and glibc hold there.
FORKER = """
import ctypes, json, os, sys, threading, time
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import wsgi_loader

if sys.argv[2] == "threaded":
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
events = []
os.register_at_fork(before=lambda: events.append("before"), after_in_parent=lambda: events.append("parent"),
                    after_in_child=lambda: events.append("child"))
fork = wsgi_loader.CgroupFork.make()
target = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
r, w = os.pipe()
pid = fork.fork(target)
if pid == 0:
    cgroup = [l[3:] for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0]
    thread = threading.Thread(target=events.append, args=("thread",))
    thread.start()
    thread.join()
    os.write(w, json.dumps({"cgroup": cgroup, "pid": os.getpid(), "events": events,
                            "glibc_tid": ctypes.c_int.from_address(fork.tid_address).value,
                            "native_id": threading.get_native_id()}).encode())
    os._exit(7)
report = {"forked": pid, "refused": fork.refused, "events": events}
if pid is not None:
    os.close(w)
    report["child"] = json.loads(os.read(r, 65536))
    report["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(report))
"""


@contextlib.contextmanager
def delegated_cgroups(uid: int, delegate_destination: bool = True) -> Iterator[tuple[Path, Path]]:
    """PARENT/src and PARENT/dst, with PARENT's and (delegate_destination)
    dst's cgroup.procs the user's, as the core makes u<uid> and w<n>."""
    mount = next(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                 if line.split()[2] == "cgroup2")
    own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    parent = Path(mount) / own.lstrip("/") / f"cgroup-fork-test-{os.getpid()}"
    src, dst = parent / "src", parent / "dst"
    for path in (parent, src, dst):
        path.mkdir()
    os.chown(parent / "cgroup.procs", uid, -1)
    if delegate_destination:
        os.chown(dst / "cgroup.procs", uid, -1)
    try:
        yield src, dst
    finally:
        for path in (src, dst):
            with contextlib.suppress(OSError):
                (path / "cgroup.kill").write_text("1")
        for path in (src, dst, parent):
            for _ in range(100):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def run_forker(src: Path, dst: Path, mode: str = "alone") -> dict[str, object]:
    user = ensure_user(ATTACKER)
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        shutil.copy(LOADER, Path(scratch) / "wsgi_loader.py")
        script = Path(scratch) / "forker.py"
        script.write_text(FORKER)
        # Put into src as root, then the user's for good: the forker's
        # cgroup and the destination share only the delegated parent.
        done = subprocess.run(
            ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec setpriv --reuid="$2" --regid="$3" --clear-groups '
             '/usr/bin/python3 "$4" "$5" "$6"', "sh", str(src), str(user.pw_uid), str(user.pw_gid), str(script),
             str(dst), mode], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    report["stderr"] = done.stderr
    return report


needs_cgroups = pytest.mark.skipif(not cgroups_available(), reason="needs root and a writable cgroup v2 hierarchy")


@needs_cgroups
def test_the_child_is_born_in_the_cgroup_with_python_and_glibc_made_its_own() -> None:
    with delegated_cgroups(ensure_user(ATTACKER).pw_uid) as (src, dst):
        report = run_forker(src, dst)
        assert report["refused"] is None and isinstance(report["forked"], int) and report["forked"] > 0
        child = report["child"]
        assert isinstance(child, dict)
        # Its first look at /proc/self/cgroup: it never was in src.
        assert child["cgroup"].endswith(f"/{dst.parent.name}/dst"), child
        assert child["pid"] == report["forked"]
        assert child["glibc_tid"] == child["pid"] == child["native_id"]  # CLONE_CHILD_SETTID
        assert child["events"] == ["before", "child", "thread"]           # Python's hooks, a new thread works
        assert report["events"] == ["before", "parent"]
        assert report["status"] == 7


@needs_cgroups
def test_a_cgroup_not_delegated_is_refused_and_said_once() -> None:
    with delegated_cgroups(ensure_user(ATTACKER).pw_uid, delegate_destination=False) as (src, dst):
        report = run_forker(src, dst)
        assert report["forked"] is None and report["refused"] == os.strerror(13)
        assert report["events"] == ["before", "parent"]  # the hooks' state given back
        assert "clone3 into the worker's cgroup: Permission denied" in str(report["stderr"])


@needs_cgroups
def test_a_process_with_other_threads_does_not_fork_that_way() -> None:
    with delegated_cgroups(ensure_user(ATTACKER).pw_uid) as (src, dst):
        report = run_forker(src, dst, mode="threaded")
        assert report["forked"] is None and report["refused"] is None and report["events"] == []
