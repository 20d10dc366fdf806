"""Attacks on the boundaries around app workers, on the real stack: as the
local user who owns an app, and as app code (docs/security.md).

- the worker's user is never taken through a symbolic link, nor from a file
  that is not the app root owner's, and a file swapped after the core's
  check never runs;
- an app never runs as nginx's worker user;
- apps that share a user cannot read each other's environment nor ptrace
  each other (workers are not dumpable);
- whatever a worker starts dies with it, and the core keeps no fd of it;
- a worker's socket admits nginx's workers and root, nobody else: its mode
  and its directory's, and the loader's check of the peer's uid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.integration import apps
from tests.integration.stack import NGINX_USER, AppSpec, Response, Stack, alive, running_stack, wait_until
from tests.integration.users import ATTACKER, ensure_user, run_as
from tests.unit.loaders.test_wsgi_loader import request_frame

VICTIM = "agent-victim"
BYSTANDER = AppSpec("bystander", apps.HELLO, "/bystander/")

# Another user's program, which imports a module from the directory it is
# run in: the way an app owner would get code run as that user.
VICTIM_TOOL = "from helper import application\n"

# Planted by the attacker next to the link: records who ran it.
HELPER = """
import os

open(os.path.join({scratch!r}, "helper-ran-as-%d" % os.getuid()), "w").close()

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"helper"]
"""

CHECKED = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the checked file"]
"""

# Reads another worker's environment and tries to ptrace it.
PROBE = """
import ctypes, json, os

PTRACE_ATTACH, PTRACE_DETACH = 16, 17

def probe(pid):
    found = {}
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            found["environ"] = f.read().decode("latin-1")
    except OSError as e:
        found["environ_errno"] = e.errno
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        found["ptrace"] = "attached"
        os.waitpid(pid, 0)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    else:
        found["ptrace_errno"] = ctypes.get_errno()
    return found

def application(environ, start_response):
    body = {"pid": os.getpid(), "uid": os.getuid()}
    if environ["QUERY_STRING"]:
        body.update(probe(int(environ["QUERY_STRING"])))
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""

# /fork starts two children that hold the output pipe (one leaves the
# process group with setsid); /crash ends the worker. The worker clears its
# own PDEATHSIG, so the core's death does not take it.
FORKER = """
import ctypes, json, os, time

PR_SET_PDEATHSIG = 1
ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)

def child(leave_group):
    pid = os.fork()
    if pid == 0:
        if leave_group:
            os.setsid()
        os.closerange(3, 65536)   # keeps stdout and stderr: the core's pipe
        time.sleep(3600)
        os._exit(0)
    return pid

def application(environ, start_response):
    if environ["PATH_INFO"].endswith("/crash"):
        os._exit(3)
    body = {"pid": os.getpid()}
    if environ["PATH_INFO"].endswith("/fork"):
        body["children"] = [child(False), child(True)]
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""



def log_text(stack: Stack) -> str:
    return stack.log_file.read_text(errors="replace") if stack.log_file.exists() else ""


def still_serving(stack: Stack) -> None:
    response = stack.get("/bystander/")
    assert response.status == 200 and response.body.startswith(b"hello from"), response


def give_app_to(stack: Stack, app: AppSpec, user: pwd.struct_passwd) -> Path:
    """The app root becomes the user's, emptied of the startup file."""
    root = stack.app_root(app)
    (root / app.startup_file).unlink()
    os.chown(root, user.pw_uid, user.pw_gid)
    return root


def victim_tool(stack: Stack) -> Path:
    """A program of the victim's that imports `helper` from its cwd."""
    victim = ensure_user(VICTIM)
    directory = stack.root / "victim"
    directory.mkdir(exist_ok=True)
    tool = directory / "tool.py"
    tool.write_text(VICTIM_TOOL)
    os.chown(tool, victim.pw_uid, victim.pw_gid)
    return tool


def plant_helper(stack: Stack, root: Path) -> None:
    result = run_as(ATTACKER, ["sh", "-c", f"cat > {root}/helper.py"],
                    input_text=HELPER.format(scratch=str(stack.scratch)))
    assert result.returncode == 0, result.stderr


def helper_runs(stack: Stack) -> list[str]:
    return sorted(p.name for p in stack.scratch.glob("helper-ran-as-*"))


# -- finding 3: the user switch and the startup file ---------------------------


def test_a_startup_file_linked_to_another_users_file_is_refused() -> None:
    app = AppSpec("linked", CHECKED, "/linked/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        attacker = ensure_user(ATTACKER)
        root = give_app_to(stack, app, attacker)
        tool = victim_tool(stack)
        plant_helper(stack, root)
        made = run_as(ATTACKER, ["ln", "-s", str(tool), str(root / "wsgi.py")])
        assert made.returncode == 0, made.stderr

        response = stack.get("/linked/")
        assert response.status == 500 and "could not be started" in response.text
        assert f"the startup file {root / 'wsgi.py'} is a symbolic link" in log_text(stack)
        assert helper_runs(stack) == []
        still_serving(stack)


def test_a_startup_file_of_another_user_in_the_app_root_is_refused() -> None:
    """As a hard link to another user's file would be."""
    app = AppSpec("foreign", CHECKED, "/foreign/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        attacker = ensure_user(ATTACKER)
        victim = ensure_user(VICTIM)
        root = give_app_to(stack, app, attacker)
        plant_helper(stack, root)
        (root / "wsgi.py").write_text(VICTIM_TOOL)
        os.chown(root / "wsgi.py", victim.pw_uid, victim.pw_gid)

        response = stack.get("/foreign/")
        assert response.status == 500 and "could not be started" in response.text
        assert f"belongs to {VICTIM} (uid {victim.pw_uid}), but the app root" in log_text(stack)
        assert helper_runs(stack) == []
        still_serving(stack)


def test_a_startup_file_swapped_after_the_check_runs_nothing_of_the_new_file() -> None:
    """The interpreter is made slow to start (a sitecustomize that sleeps),
    which opens a window between the core's check and the app's load: the
    attacker replaces the startup file with a link to the victim's file in
    it. The worker still runs the file the core checked."""
    slow = Path(tempfile.mkdtemp(prefix="agent-slow-start-", dir="/tmp"))
    os.chmod(slow, 0o755)
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(2)\n")
    os.chmod(slow / "sitecustomize.py", 0o644)
    app = AppSpec("swapped", CHECKED, "/swapped/", env={"PYTHONPATH": str(slow)})
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, slow, ignore_errors=True)
        stack = cleanup.enter_context(running_stack([app, BYSTANDER]))
        still_serving(stack)  # the agent is up
        attacker = ensure_user(ATTACKER)
        root = give_app_to(stack, app, attacker)
        made = run_as(ATTACKER, ["sh", "-c", f"cat > {root}/wsgi.py"], input_text=CHECKED)
        assert made.returncode == 0, made.stderr
        tool = victim_tool(stack)
        plant_helper(stack, root)

        answer: list[Response] = []
        asking = threading.Thread(target=lambda: answer.append(stack.get("/swapped/")))
        asking.start()
        wait_until(lambda: f"app {root}: spawned worker" in log_text(stack), what="the spawn")
        swapped = run_as(ATTACKER, ["sh", "-c", f"ln -s {tool} {root}/new && mv -T {root}/new {root}/wsgi.py"])
        assert swapped.returncode == 0, swapped.stderr
        asking.join(timeout=30)

        assert answer and answer[0].status == 200, answer
        assert answer[0].body == b"the checked file"
        assert helper_runs(stack) == []
        still_serving(stack)


# -- finding 4: nginx's worker user ------------------------------------------------


def test_an_app_never_runs_as_nginx_worker_user() -> None:
    owned = AppSpec("owned", apps.INTROSPECT, "/owned/")
    defaulted = AppSpec("defaulted", apps.INTROSPECT, "/defaulted/",
                        directives={"agent_default_user": NGINX_USER})
    with running_stack([owned, defaulted, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        nginx = pwd.getpwnam(NGINX_USER)
        os.chown(stack.app_root(owned), nginx.pw_uid, nginx.pw_gid)
        os.chown(stack.app_root(owned) / "wsgi.py", nginx.pw_uid, nginx.pw_gid)
        message = (f"app would run as nginx's worker user {NGINX_USER} (uid {nginx.pw_uid}): "
                   "set agent_user or agent_default_user")
        for app in (owned, defaulted):
            response = stack.get(app.location)
            assert response.status == 500 and "could not be started" in response.text
            assert f"app {stack.app_root(app)} could not start" in log_text(stack)
        assert log_text(stack).count(message) >= 2
        assert not any(p.uids().real == nginx.pw_uid for p in stack.worker_processes())
        still_serving(stack)


# -- finding 5: apps under one user ---------------------------------------------


def test_an_app_cannot_read_nor_trace_another_app_of_the_same_user() -> None:
    prober = AppSpec("prober", PROBE, "/prober/")
    target = AppSpec("target", PROBE, "/target/", env={"SECRET": "s3cr3t-token"})
    with running_stack([prober, target, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        victim = json.loads(stack.get("/target/").body)
        found = json.loads(stack.get(f"/prober/?{victim['pid']}").body)
        assert found["uid"] == victim["uid"]  # both nobody: the case at hand
        assert "environ" not in found and found["environ_errno"] == errno.EACCES, found
        assert "ptrace" not in found and found["ptrace_errno"] == errno.EPERM, found
        assert json.loads(stack.get("/target/").body)["pid"] == victim["pid"]
        wait_until(lambda: "give each app its own user" in log_text(stack), what="the shared-user warning")
        still_serving(stack)


# What an app's environment holds, as the app sees it.
ENV_REPORTER = """
import json, os

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    keys = ("SECRET", "PYTHONDONTWRITEBYTECODE", "AGENT_ENV_FD")
    return [json.dumps({"pid": os.getpid(), "env": {k: os.environ.get(k) for k in keys}}).encode()]
"""


def test_agent_env_values_never_show_in_the_workers_proc_environ() -> None:
    """agent_env reaches the app through a private descriptor once the worker
    is undumpable: its values are never in /proc/PID/environ, not even in
    the moments before the loader runs. What the interpreter reads at exec
    (PYTHON*) stays in the exec environment."""
    app = AppSpec("env", ENV_REPORTER, "/env/", env={"SECRET": "s3cr3t-token", "PYTHONDONTWRITEBYTECODE": "1"})
    with running_stack([app, BYSTANDER]) as stack:
        seen = json.loads(stack.get("/env/").body)
        assert seen["env"] == {"SECRET": "s3cr3t-token", "PYTHONDONTWRITEBYTECODE": "1", "AGENT_ENV_FD": None}
        exec_env = Path(f"/proc/{seen['pid']}/environ").read_bytes()  # root reads any process's
        assert b"s3cr3t-token" not in exec_env
        assert b"PYTHONDONTWRITEBYTECODE=1" in exec_env
        still_serving(stack)


# -- finding 7: supervision --------------------------------------------------


def cgroups_available() -> bool:
    """A cgroup v2 hierarchy this (root) process may write to, with
    cgroup.kill (Linux 5.14): where the agent must use cgroups."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    mount = next((line.split()[1] for line in mounts if line.split()[2] == "cgroup2"), None)
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")), None)
    if mount is None or own is None or os.geteuid() != 0:
        return False
    probe = Path(mount) / own.lstrip("/") / f"agent-test-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return (probe / "cgroup.kill").exists()
    finally:
        probe.rmdir()


def test_what_a_crashed_worker_started_dies_with_it() -> None:
    app = AppSpec("forker", FORKER, "/forker/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        started = json.loads(stack.get("/forker/fork").body)
        in_group, left_group = started["children"]
        assert alive(in_group) and alive(left_group)
        assert stack.get("/forker/crash").status >= 500
        wait_until(lambda: not alive(started["pid"]), what="the worker to exit")
        wait_until(lambda: not alive(in_group), what="the child in the worker's group to die")
        if cgroups_available():
            assert "workers are supervised by cgroup" in log_text(stack)
            wait_until(lambda: not alive(left_group), what="the child that left the group to die")
        else:
            os.kill(left_group, signal.SIGKILL)  # only a cgroup holds it
        assert stack.get("/forker/").status == 200
        still_serving(stack)


def test_a_worker_that_cleared_its_pdeathsig_dies_when_its_core_does() -> None:
    app = AppSpec("orphan", FORKER, "/orphan/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        if not cgroups_available():
            return  # only a cgroup holds a worker that left its core's reach
        started = json.loads(stack.get("/orphan/fork").body)
        old_core = stack.core_pid()
        os.kill(old_core, signal.SIGKILL)
        wait_until(lambda: stack.core_pid() != old_core, timeout=15, what="a new core")
        for pid in (started["pid"], *started["children"]):
            wait_until(lambda pid=pid: not alive(pid), timeout=15, what=f"process {pid} to die")
        assert json.loads(stack.get("/orphan/").body)["pid"] != started["pid"]
        still_serving(stack)


def test_a_crash_loop_of_workers_whose_children_hold_the_output_leaks_no_fd() -> None:
    app = AppSpec("crashloop", FORKER, "/crashloop/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up

        def crash_once() -> None:
            assert stack.get("/crashloop/fork").status == 200
            assert stack.get("/crashloop/crash").status >= 500

        def core_fds() -> int:
            return len(os.listdir(f"/proc/{stack.core_pid()}/fd"))

        still_serving(stack)
        crash_once()
        time.sleep(0.5)
        before = core_fds()
        for _ in range(15):
            crash_once()
        wait_until(lambda: core_fds() <= before + 2, timeout=5, what=f"the core's fds back to {before}")
        # A new worker may be starting already; no child is left.
        wait_until(lambda: len(stack.worker_pids(app)) <= 1, what="the crashed workers' children to go")
        still_serving(stack)


# -- the cgroups delegated to an app's user ----------------------------------

# In the preloader, before each fork (while it holds what the core sent for
# the worker): every descriptor that names a cgroup is used to move the
# victim, a process of root's, into it, written to it and through a
# cgroup.procs opened from it; what happened is kept for /tried.
CGROUP_GRABBER = """
import json, os

TRIED = []

def grab():
    victim = os.environ["VICTIM_PID"]
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if "cgroup" not in target:
            continue
        for how in ("write", "openat"):
            try:
                if how == "write":
                    os.write(int(name), victim.encode())
                else:
                    fd = os.open("cgroup.procs", os.O_WRONLY, dir_fd=int(name))
                    try:
                        os.write(fd, victim.encode())
                    finally:
                        os.close(fd)
                TRIED.append([target, how, "moved"])
            except OSError as e:
                TRIED.append([target, how, e.errno])

os.register_at_fork(before=grab)

def application(environ, start_response):
    if environ["PATH_INFO"].endswith("/crash"):
        os._exit(3)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"pid": os.getpid(), "tried": TRIED}).encode()]
"""


def cgroup_of(pid: int) -> str:
    return next(line[3:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if line.startswith("0::"))


def test_app_code_cannot_move_anothers_process_into_its_workers_cgroup() -> None:
    """The preloader is app code, and it holds, for each worker it forks,
    what the core opened for that worker's cgroup. Were that root's opened
    cgroup.procs, the kernel would check root's rights on each write
    (Linux 5.16 and later): app code could move any process into its
    worker's cgroup, and the worker's end would kill it. It is the
    cgroup's directory, whose use is checked against the app's user."""
    victim = subprocess_sleeper()
    try:
        app = AppSpec("grabber", CGROUP_GRABBER, "/grabber/", env={"VICTIM_PID": str(victim.pid)},
                      directives={"agent_spawn_method": "smart"})
        with running_stack([app, BYSTANDER]) as stack:
            still_serving(stack)  # the agent is up
            where = cgroup_of(victim.pid)
            seen = json.loads(stack.get("/grabber/").body)
            if cgroups_available():
                assert seen["tried"], "the preloader was handed no cgroup"
            assert all(outcome != "moved" for _, _, outcome in seen["tried"]), seen["tried"]
            assert stack.get("/grabber/crash").status >= 500
            wait_until(lambda: not alive(seen["pid"]), what="the worker to exit")
            assert stack.get("/grabber/").status == 200  # a worker forked since
            assert victim.poll() is None and cgroup_of(victim.pid) == where
            still_serving(stack)
    finally:
        victim.kill()
        victim.wait()


def subprocess_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


# /escape: a child leaves the worker's session, and tries to leave its
# cgroup for the instance's (refused) and for its user's (allowed: the
# user may write there, so that its preloader can fork into its cgroups).
ESCAPER = """
import json, os, time

def escape(report):
    os.setsid()
    own = [l[3:] for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0]
    mount = [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "cgroup2"][0]
    users = os.path.dirname(mount + own)
    result = {}
    for name, where in (("instance", os.path.dirname(users)), ("user", users)):
        try:
            with open(where + "/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            result[name] = "moved"
        except OSError as e:
            result[name] = e.errno
    os.write(report, json.dumps(result).encode())
    os.close(report)
    os.closerange(3, 65536)
    time.sleep(3600)

def application(environ, start_response):
    if environ["PATH_INFO"].endswith("/crash"):
        os._exit(3)
    body = {"pid": os.getpid()}
    if environ["PATH_INFO"].endswith("/escape"):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            escape(w)
        os.close(w)
        body.update(child=child, result=json.loads(os.read(r, 4096)))
        os.close(r)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""


@pytest.mark.parametrize("method", ["smart", "direct"])
def test_each_worker_has_its_own_cgroup_in_its_users(method: str) -> None:
    app = AppSpec("layout", apps.HELLO, "/layout/", directives={"agent_spawn_method": method,
                                                                "agent_min_instances": "2", "agent_prestart": "on"})
    with running_stack([app, BYSTANDER]) as stack:
        wait_until(lambda: len(stack.worker_pids(app)) == 2, timeout=20, what="two workers")
        if not cgroups_available():
            assert "supervised by process group" in log_text(stack)
            return
        assert_own_cgroups(stack, app, 2)
        still_serving(stack)


def assert_own_cgroups(stack: Stack, app: AppSpec, count: int) -> Path:
    """Each of the app's count workers in a cgroup of its own, in its
    user's (INSTANCE/u<uid>/w<n>, agent/core/supervision.py), where the
    user may write the cgroup.procs files and root keeps every other
    file. Returns the user's cgroup."""
    workers = [psutil.Process(pid) for pid in stack.worker_pids(app)]
    uid = workers[0].uids().real
    cgroups = {cgroup_directory(worker.pid) for worker in workers}
    assert len(cgroups) == count and {path.parent.name for path in cgroups} == {f"u{uid}"}
    users = next(iter(cgroups)).parent
    assert users.parent.name.startswith("agent-")
    for path in (users, *cgroups):
        assert (path / "cgroup.procs").stat().st_uid == uid
        assert (path / "cgroup.kill").stat().st_uid == 0
    assert (users.parent / "cgroup.procs").stat().st_uid == 0
    return users


def cgroup_directory(pid: int) -> Path:
    mount = next(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                 if line.split()[2] == "cgroup2")
    return Path(mount) / cgroup_of(pid).lstrip("/")


def test_a_process_moved_out_of_its_workers_cgroup_dies_with_the_worker() -> None:
    app = AppSpec("escaper", ESCAPER, "/escaper/")
    with running_stack([app, BYSTANDER]) as stack:
        still_serving(stack)  # the agent is up
        if not cgroups_available():
            return  # without cgroups, the process group is all there is (the test above)
        seen = json.loads(stack.get("/escaper/escape").body)
        assert seen["result"]["instance"] == errno.EACCES
        assert seen["result"]["user"] == "moved"
        assert alive(seen["child"])
        assert stack.get("/escaper/crash").status >= 500
        wait_until(lambda: not alive(seen["child"]), what="the process that moved into its user's cgroup to die")
        assert "which an app moved out of its worker's cgroup" in log_text(stack)
        assert stack.get("/escaper/").status == 200
        still_serving(stack)


# -- the worker sockets: nginx's workers and root may connect, nobody else ----

# Run as a local user: connects to a worker socket, sends a request frame and
# prints what came back: the errno of a refused connect, "closed" when the
# worker closed the connection unread, else the bytes of the answer.
SOCKET_PEER = """
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.settimeout(10)
try:
    conn.connect(sys.argv[1])
except OSError as e:
    print("errno", e.errno)
    sys.exit(0)
try:
    conn.sendall(bytes.fromhex(sys.argv[2]))
    data = b""
    while not data.endswith(b"\\0\\0\\0\\0"):
        more = conn.recv(65536)
        if not more:
            break
        data += more
except (ConnectionResetError, BrokenPipeError):
    data = b""
print("answered " + data.hex() if data else "closed")
"""
# Another user cannot run the test's own interpreter (it may live in a
# private directory): the system's runs the peer.
PEER_PYTHON = "/usr/bin/python3"


def worker_socket_of(stack: Stack, pid: int) -> Path:
    """The socket the worker listens on, found through its fd 3's inode."""
    inode = os.stat(f"/proc/{pid}/fd/3").st_ino
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) == inode:
            return Path(fields[7])
    raise AssertionError(f"no socket path for worker {pid}")


def socket_attempt(user: str, path: Path) -> str:
    frame = request_frame("/bystander/").hex()
    result = run_as(user, [PEER_PYTHON, "-I", "-c", SOCKET_PEER, str(path), frame])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_workers_directory_and_sockets_belong_to_nginx_workers_and_root() -> None:
    with running_stack([BYSTANDER]) as stack:
        still_serving(stack)
        nginx = pwd.getpwnam(NGINX_USER)
        workers_dir = stack.instance / "workers"
        info = os.lstat(workers_dir)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, nginx.pw_gid, 0o710)
        pids = stack.worker_pids(BYSTANDER)
        assert pids
        for pid in pids:
            path = worker_socket_of(stack, pid)
            assert path.parent == workers_dir
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (nginx.pw_uid, nginx.pw_gid, 0o600)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"AGENT_PEER_UIDS=0,{nginx.pw_uid}".encode() in environ


def test_nginx_worker_user_can_reach_a_worker_socket() -> None:
    with running_stack([BYSTANDER]) as stack:
        still_serving(stack)
        pid = next(iter(stack.worker_pids(BYSTANDER)))
        answer = socket_attempt(NGINX_USER, worker_socket_of(stack, pid))
        assert answer.startswith("answered "), answer
        assert f"hello from {pid}".encode() in bytes.fromhex(answer.split()[1])
        still_serving(stack)


def test_a_local_user_cannot_reach_a_worker_socket_nor_be_served_through_it() -> None:
    """EACCES from the modes; and with the modes opened (by root, here), the
    loader's own check of the peer's uid still closes the connection unread."""
    with running_stack([BYSTANDER]) as stack:
        still_serving(stack)
        attacker = ensure_user(ATTACKER)
        pid = next(iter(stack.worker_pids(BYSTANDER)))
        path = worker_socket_of(stack, pid)
        assert socket_attempt(ATTACKER, path) == f"errno {errno.EACCES}"
        os.chmod(path.parent, 0o711)
        assert socket_attempt(ATTACKER, path) == f"errno {errno.EACCES}"  # the socket's own mode
        os.chmod(path, 0o666)
        assert socket_attempt(ATTACKER, path) == "closed"
        wait_until(lambda: f"refused a connection from uid {attacker.pw_uid}" in log_text(stack),
                   what="the refusal in the log")
        assert stack.worker_pids(BYSTANDER) >= {pid}
        still_serving(stack)
