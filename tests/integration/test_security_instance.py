"""Attacks on the instance directory, agent.sock, agentctl's discovery and
serve's run directory, made by an unprivileged local user (issue 7,
findings 1, 4, 10 and 12; docs/security.md).

Each test plants what a local user could plant before root starts nginx or
serve: the directory itself, links from the files root writes to a file of
root's, a locked watchdog.pid naming a root process, its own agent.sock
and status.sock, a token. It then checks that nothing was written through
a link, no foreign process was signalled, no request or token reached the
attacker's sockets, and that a stack still serves.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.control.client import NoAgentError, StatusClient, choose_instance
from agent.instance import Instance
from tests.integration import apps
from tests.integration.stack import APP_PYTHON, REPO, AppSpec, Stack, free_port, hello_answers, wait_until
from tests.integration.users import ATTACKER, ensure_user, run_as

HELLO = AppSpec("hello", apps.HELLO)
AGENTCTL = [sys.executable, "-m", "agent.cli"]
PRECIOUS = "precious: root's file\n"
PLANTED_TOKEN = "planted-by-the-attacker"

# Run as the attacker: an agent of its own in DIR (made with mode 0777),
# links from the files root writes to VICTIM_FILE, watchdog.pid naming
# VICTIM_PID under a lock, and sockets that report every connection.
PLANT = r"""
import fcntl, os, select, socket, sys
directory, victim_pid, victim_file, parent_links = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.makedirs(directory, mode=0o777, exist_ok=True)
os.chmod(directory, 0o777)
for name in parent_links:
    os.symlink(victim_file, os.path.join(os.path.dirname(directory), name))
for name in ("apps.json", "apps.json.tmp", "core.pid", "read.token"):
    os.symlink(victim_file, os.path.join(directory, name))
with open(os.path.join(directory, "admin.token"), "w") as token:
    token.write("planted-by-the-attacker\n")
pid_fd = os.open(os.path.join(directory, "watchdog.pid"), os.O_RDWR | os.O_CREAT, 0o666)
os.write(pid_fd, ("%s\n" % victim_pid).encode())
fcntl.flock(pid_fd, fcntl.LOCK_EX)
listeners = []
for name in ("agent.sock", "status.sock"):
    path = os.path.join(directory, name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(64)
    listeners.append(listener)
print("ready", flush=True)
while True:
    for listener in select.select(listeners, [], [])[0]:
        conn, _ = listener.accept()
        conn.settimeout(1.0)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        print("connection on %s: %r" % (os.path.basename(listener.getsockname()), data[:300]), flush=True)
        conn.close()
"""

# Run as root: a process the attacker would like nginx's master to signal.
VICTIM = r"""
import signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: open(sys.argv[1], "w").write("SIGHUP\n"))
print("ready", flush=True)
time.sleep(300)
"""


@dataclass
class Planted:
    """The attacker's agent, and what it was meant to hurt."""

    process: subprocess.Popen[str]
    directory: Path
    victim_file: Path
    victim_pid: int
    hup_marker: Path

    def connections(self) -> list[str]:
        """What reached the attacker's sockets (ends its process)."""
        if self.process.poll() is None:
            self.process.kill()
        out, _ = self.process.communicate(timeout=10)
        return [line for line in out.splitlines() if line.startswith("connection")]

    def assert_unharmed(self) -> None:
        assert self.victim_file.read_text() == PRECIOUS, "root wrote through the attacker's link"
        assert not self.hup_marker.exists(), f"pid {self.victim_pid} (named in the planted watchdog.pid) got SIGHUP"
        assert psutil.pid_exists(self.victim_pid)
        assert self.connections() == [], "a connection reached the attacker's socket"


@contextlib.contextmanager
def planted_agent(directory: Path, scratch: Path, parent_links: tuple[str, ...] = ()) -> Iterator[Planted]:
    attacker = ensure_user(ATTACKER)
    victim_file = scratch / "victim.txt"
    victim_file.write_text(PRECIOUS)
    hup_marker = scratch / "victim-got-sighup"
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(hup_marker)], stdout=subprocess.PIPE, text=True)
    plant = None
    try:
        assert victim.stdout is not None and victim.stdout.readline() == "ready\n"
        plant = subprocess.Popen([APP_PYTHON, "-c", PLANT, str(directory), str(victim.pid), str(victim_file),
                                  *parent_links],
                                 user=attacker.pw_uid, group=attacker.pw_gid, extra_groups=[], cwd="/",
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert plant.stdout is not None
        line = plant.stdout.readline()
        problem = plant.stderr.read() if plant.stderr and not line else ""
        assert line == "ready\n", f"the attacker could not plant {directory}: {line}{problem}"
        yield Planted(plant, directory, victim_file, victim.pid, hup_marker)
    finally:
        for process in (plant, victim):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()


@contextlib.contextmanager
def scratch_dir(mode: int = 0o755) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agent-it-sec-", dir="/tmp"))
    os.chmod(root, mode)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_until_exit(stack: Stack, timeout: float = 20.0) -> tuple[int | None, str]:
    """nginx in the foreground: its exit code and what it said, or None if
    it was still running after timeout (then it is stopped)."""
    process = subprocess.Popen(stack.nginx_command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        code: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        process.send_signal(signal.SIGQUIT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    log = stack.error_log.read_text(errors="replace") if stack.error_log.exists() else ""
    return code, stderr + log


def assert_serves(stack: Stack) -> None:
    response = stack.get("/")
    assert response.status == 200 and response.body.startswith(b"hello from"), response


# -- the instance directory (finding 1) -------------------------------------------------------


def test_nginx_refuses_an_instance_directory_another_user_made_first() -> None:
    attacker = ensure_user(ATTACKER)
    with scratch_dir() as root:
        stack = Stack(root, [HELLO])
        stack.write_config()
        os.chmod(root, 0o1777)  # like /tmp: anyone may make the instance directory first
        with planted_agent(stack.instance, root) as planted:
            code, said = run_until_exit(stack)
            planted.assert_unharmed()
        assert code not in (None, 0), "nginx ran with the attacker's instance directory"
        assert f'refusing the instance directory "{stack.instance}"' in said, said
        assert f"owner uid {attacker.pw_uid}" in said and "mode 0777" in said, said
        assert "set agent_instance_dir to another path" in said, said

        # Once the planted directory is gone, the same configuration serves.
        shutil.rmtree(stack.instance)
        os.chmod(root, 0o755)
        try:
            stack.start()
            assert_serves(stack)
            info = os.lstat(stack.instance)
            assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o755
        finally:
            stack.stop()


def test_nginx_refuses_an_instance_directory_that_is_a_link_to_the_attackers() -> None:
    attacker = ensure_user(ATTACKER)
    with scratch_dir() as root:
        stack = Stack(root, [HELLO])
        stack.write_config()
        os.chmod(root, 0o1777)
        elsewhere = root / "attackers"
        with planted_agent(elsewhere, root) as planted:
            run_as(ATTACKER, ["ln", "-s", str(elsewhere), str(stack.instance)]).check_returncode()
            code, said = run_until_exit(stack)
            planted.assert_unharmed()
        assert code not in (None, 0), "nginx ran with the attacker's instance directory"
        assert f'refusing the instance directory "{stack.instance}"' in said, said
        assert f"owner uid {attacker.pw_uid}" in said, said


class DefaultInstanceStack(Stack):
    """A stack without agent_instance_dir: the module picks the directory
    from the configuration file's path (unique per test)."""

    def __init__(self, root: Path, apps_: list[AppSpec]) -> None:
        super().__init__(root, apps_)
        crc = zlib.crc32(str(root / "nginx.conf").encode())
        self.instance = Path(f"/run/agent-{crc:08x}")
        self.old_default = Path(f"/tmp/agent-{crc:08x}")

    def config_text(self) -> str:
        lines = super().config_text().splitlines(keepends=True)
        return "".join(line for line in lines if "agent_instance_dir" not in line)


def test_the_default_instance_directory_is_one_no_local_user_can_make_first() -> None:
    with scratch_dir() as root:
        stack = DefaultInstanceStack(root, [HELLO])
        refused = run_as(ATTACKER, ["mkdir", str(stack.instance)])
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        try:
            # The attacker plants an agent where the default used to be.
            with planted_agent(stack.old_default, root) as planted:
                stack.start()
                assert_serves(stack)
                assert stack.agent_running()
                info = os.lstat(stack.instance)
                assert stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o755
                assert (stack.instance / "admin.token").read_text().strip() != PLANTED_TOKEN
                planted.assert_unharmed()
        finally:
            stack.stop()
            shutil.rmtree(stack.instance, ignore_errors=True)
            shutil.rmtree(stack.old_default, ignore_errors=True)


# -- agent.sock in a deployment without root (finding 10) ----------------------------------------


def test_agent_socket_of_a_non_root_agent_is_private() -> None:
    operator = ensure_user("agent-operator")
    with scratch_dir() as root:
        os.chown(root, operator.pw_uid, operator.pw_gid)
        instance = Instance(root / "instance")
        watchdog = subprocess.Popen([APP_PYTHON, "-m", "agent", "watchdog", "--instance-dir", str(instance.root)],
                                    user=operator.pw_uid, group=operator.pw_gid, extra_groups=[], cwd="/",
                                    env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(instance.agent_socket.exists, what="the watchdog's agent.sock")
            info = os.lstat(instance.agent_socket)
            assert info.st_uid == operator.pw_uid
            assert stat.S_IMODE(info.st_mode) == 0o600, f"agent.sock has mode {stat.S_IMODE(info.st_mode):04o}"
            connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
            attempt = run_as(ATTACKER, [APP_PYTHON, "-c", connect, str(instance.agent_socket)])
            assert attempt.returncode != 0 and "PermissionError" in attempt.stderr
            assert watchdog.poll() is None, "the watchdog stopped"
        finally:
            watchdog.send_signal(signal.SIGTERM)
            watchdog.communicate(timeout=30)


# -- agentctl's discovery (finding 12) --------------------------------------------------------------


def test_agentctl_never_sends_a_token_to_a_planted_instance(capsys: pytest.CaptureFixture[str]) -> None:
    with scratch_dir(0o1777) as base:
        planted_dir = base / "agent-0badc0de"
        with planted_agent(planted_dir, base) as planted:
            with pytest.raises(NoAgentError):
                StatusClient(choose_instance(None, {}, base) / "status.sock", "operator-secret").get("/server")
            warned = capsys.readouterr().err
            assert f"ignoring {planted_dir}" in warned and "not root's or yours" in warned, warned
            planted.assert_unharmed()


def test_agentctl_ignores_a_planted_directory_in_tmp_with_a_warning() -> None:
    with scratch_dir() as scratch:
        planted_dir = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp"))
        planted_dir.rmdir()  # a free name the attacker takes
        try:
            with planted_agent(planted_dir, scratch) as planted:
                env = {k: v for k, v in os.environ.items() if k != "AGENT_INSTANCE_DIR"}
                result = subprocess.run([*AGENTCTL, "--token", "operator-secret", "list-instances"],
                                        capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
                assert f"ignoring {planted_dir}" in result.stderr, result.stderr
                assert str(planted_dir) not in result.stdout
                planted.assert_unharmed()
        finally:
            shutil.rmtree(planted_dir, ignore_errors=True)


# -- agentctl serve (findings 1 and 4) ----------------------------------------------------------------


@contextlib.contextmanager
def hello_app() -> Iterator[Path]:
    with scratch_dir() as root:
        shutil.copytree(REPO / "examples" / "hello", root / "hello")
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        yield root / "hello"


def test_serve_ignores_a_planted_run_dir_and_gives_nginx_workers_their_own_user() -> None:
    port = free_port()
    old_default, run_dir = Path(f"/tmp/agent-serve-{port}"), Path(f"/run/agent-serve-{port}")
    with hello_app() as app, scratch_dir() as scratch:
        try:
            with planted_agent(old_default / "instance", scratch, parent_links=("nginx.conf", "nginx.pid")) as planted:
                process = subprocess.Popen([*AGENTCTL, "serve", str(app), "--port", str(port)], cwd=REPO,
                                           stderr=subprocess.PIPE, start_new_session=True)
                try:
                    wait_until(lambda: hello_answers(port), timeout=30, what="agentctl serve to answer")
                    assert "\nuser www-data;\n" in (run_dir / "nginx.conf").read_text()
                    master = next(p for p in psutil.process_iter(["cmdline"])
                                  if str(run_dir / "nginx.conf") in " ".join(p.info["cmdline"] or []))
                    workers = [p for p in master.children() if "nginx" in p.name()]
                    assert workers and {p.username() for p in workers} == {"www-data"}
                    assert pwd.getpwnam("www-data").pw_uid != pwd.getpwnam("nobody").pw_uid
                finally:
                    os.killpg(process.pid, signal.SIGINT)
                    process.wait(timeout=60)
                planted.assert_unharmed()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(old_default, ignore_errors=True)


def test_serve_refuses_a_run_dir_of_another_user() -> None:
    attacker = ensure_user(ATTACKER)
    with hello_app() as app, scratch_dir(0o1777) as base:
        run_dir = base / "run"
        with planted_agent(run_dir / "instance", base) as planted:
            os.chmod(run_dir, 0o755)  # not even writable by others: still the attacker's
            os.chown(run_dir, attacker.pw_uid, attacker.pw_gid)
            process = subprocess.Popen([*AGENTCTL, "serve", str(app), "--port", str(free_port()), "--run-dir",
                                        str(run_dir)], stderr=subprocess.PIPE, text=True, cwd=REPO,
                                       start_new_session=True)
            try:
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGINT)  # it serves from the attacker's directory
                _, stderr = process.communicate(timeout=60)
            assert process.returncode == 1, "serve ran in the attacker's directory"
            assert f"refusing the directory {run_dir}" in stderr, stderr
            assert f"owner uid {attacker.pw_uid}" in stderr and "--run-dir" in stderr
            assert not (run_dir / "nginx.conf").exists()
            planted.assert_unharmed()
