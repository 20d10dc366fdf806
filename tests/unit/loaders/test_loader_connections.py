"""The loader over many connections, as a real process on real sockets: the
engine's connection and one kept by each nginx worker process (docs/design.md,
"The loader's system calls"). Requests are served one at a time, whichever
connection brings one; a connection that closes leaves the others open; only
the uids in AGENT_PEER_UIDS may connect (docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.loaders import wsgi_loader as loader
from tests.integration.users import ATTACKER, ensure_user, run_as

from .test_wsgi_loader import (
    Worker,
    assert_closed,
    assert_open,
    connect,
    receive_reply,
    request,
    request_frame,
    request_on,
    start_worker,
)

# Run as another user: connects to the socket, sends a whole request frame,
# and prints what came back ("closed" for end of file or a reset).
PEER = """
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.settimeout(10)
conn.connect(sys.argv[1])
try:
    conn.sendall(bytes.fromhex(sys.argv[2]))
    data = conn.recv(65536)
except ConnectionResetError:
    data = b""
except BrokenPipeError:
    data = b""
print("closed" if not data else "answered " + data.hex())
"""


# The test's own interpreter may live where other users cannot reach it.
PEER_PYTHON = "/usr/bin/python3"


def pid_on(conn: socket.socket) -> int:
    reply = request_on(conn, "/pid")
    assert reply.ended, reply
    return int(reply.body)


def wait_for_line(worker: Worker, text: str) -> None:
    """The worker may log a refusal just after the peer saw the close."""
    deadline = time.monotonic() + 10
    while text not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.02)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    started = start_worker(tmp_path, "loader_app.py")
    yield started
    assert started.stop() == 0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other local users can reach (pytest's are private)."""
    path = Path(tempfile.mkdtemp(prefix="agent-loader-peers-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def peer_attempt(user: str, worker: Worker) -> str:
    result = run_as(user, [PEER_PYTHON, "-I", "-c", PEER, str(worker.sock_path), request_frame("/pid").hex()])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --------------------------------------------------------------------------
# Many connections


def test_requests_alternate_over_several_connections(worker: Worker) -> None:
    conns = [connect(worker.sock_path) for _ in range(3)]
    try:
        for number in range(30):
            conn = conns[number % 3]
            reply = request_on(conn, f"/echo?mode=read&n={number}", "POST", f"request {number}".encode())
            assert (reply.status, reply.body, reply.ended) == (200, f"request {number}".encode(), True)
        for conn in conns:
            assert_open(conn, wait=0.05)
    finally:
        for conn in conns:
            conn.close()


def test_a_connection_that_closes_leaves_the_others_open(worker: Worker) -> None:
    first, second, third = (connect(worker.sock_path) for _ in range(3))
    try:
        pids = {pid_on(conn) for conn in (first, second, third)}
        second.close()
        assert {pid_on(first), pid_on(third)} == pids
        # A peer that goes away with a response unread resets its end.
        third.sendall(request_frame())
        time.sleep(0.1)
        third.close()
        assert pid_on(first) in pids
        assert request(worker.sock_path).body == b"Hello, world!"
        assert_open(first, wait=0.05)
    finally:
        for conn in (first, second, third):
            conn.close()


def test_a_malformed_frame_closes_only_its_connection(worker: Worker) -> None:
    good, bad = connect(worker.sock_path), connect(worker.sock_path)
    try:
        assert pid_on(good)
        bad.sendall(b"\0\0\0\0garbage")
        assert_closed(bad)
        assert "malformed request frame" in worker.log()
        assert pid_on(good)
    finally:
        good.close()
        bad.close()


def test_a_request_waits_for_the_one_in_hand(worker: Worker) -> None:
    """Concurrency 1: a frame that arrives during a request on another
    connection is served when that request ends."""
    slow, quick = connect(worker.sock_path), connect(worker.sock_path)
    try:
        assert pid_on(slow) and pid_on(quick)
        slow.sendall(request_frame("/slow?seconds=0.5"))
        time.sleep(0.1)
        quick.sendall(request_frame())
        assert_open(quick, wait=0.2)
        assert receive_reply(slow).body == b"slept"
        assert receive_reply(quick).body == b"Hello, world!"
    finally:
        slow.close()
        quick.close()


def test_past_the_cap_the_connection_idle_longest_is_closed(worker: Worker) -> None:
    conns: list[socket.socket] = []
    try:
        for _ in range(loader.MAX_CONNECTIONS):  # each served as it comes: the backlog is short
            conns.append(connect(worker.sock_path))
            assert pid_on(conns[-1])
        # The first is now the one used most recently: the second is the oldest.
        assert pid_on(conns[0])
        extra = connect(worker.sock_path)
        conns.append(extra)
        assert pid_on(extra)
        assert_closed(conns[1])
        assert pid_on(conns[0]) and pid_on(conns[2])
    finally:
        for conn in conns:
            conn.close()


def test_sigterm_when_idle_closes_every_connection(tmp_path: Path) -> None:
    started = start_worker(tmp_path, "loader_app.py")
    conns = [connect(started.sock_path) for _ in range(3)]
    try:
        for conn in conns:
            assert pid_on(conn)
        time.sleep(0.1)  # the worker waits in poll()
        began = time.monotonic()
        assert started.stop() == 0
        assert time.monotonic() - began < 2
        for conn in conns:
            assert_closed(conn)
    finally:
        for conn in conns:
            conn.close()


def test_sigterm_storm_while_idle_never_hangs(tmp_path: Path) -> None:
    """SIGTERM at every moment of the idle loop: the worker always exits,
    whether it lands in poll() or just before it."""
    for delay in (0.0, 0.001, 0.003, 0.01):
        started = start_worker(tmp_path, "loader_app.py")
        with connect(started.sock_path) as conn:
            for _ in range(20):
                assert request_on(conn).ended
            conn.sendall(request_frame())
            time.sleep(delay)
            started.process.send_signal(signal.SIGTERM)
            assert started.process.wait(timeout=10) == 0


# --------------------------------------------------------------------------
# Who may connect


def test_a_peer_whose_uid_is_not_allowed_is_closed_unread(open_dir: Path) -> None:
    ensure_user(ATTACKER)
    started = start_worker(open_dir, "loader_app.py", socket_mode=0o666)
    try:
        with connect(started.sock_path) as kept:
            assert pid_on(kept)
            assert peer_attempt(ATTACKER, started) == "closed"
            assert peer_attempt(ATTACKER, started) == "closed"
            uid = pwd.getpwnam(ATTACKER).pw_uid
            wait_for_line(started, f"refused a connection from uid {uid}")
            assert pid_on(kept)  # the second refusal is logged by now, or never
            assert started.log().count("refused a connection") == 1  # one line per 10 s
            # The refused frames got no answer; the worker serves on.
            assert pid_on(kept) == started.process.pid
            assert request(started.sock_path).body == b"Hello, world!"
    finally:
        assert started.stop() == 0


def test_the_uids_in_agent_peer_uids_may_connect_and_no_other(open_dir: Path) -> None:
    attacker = ensure_user(ATTACKER)
    started = start_worker(open_dir, "loader_app.py", socket_mode=0o666,
                           extra_env={"AGENT_PEER_UIDS": f"{attacker.pw_uid}"})
    try:
        answer = peer_attempt(ATTACKER, started)
        assert answer.startswith("answered "), answer
        assert str(started.process.pid).encode().hex() in answer
        with connect(started.sock_path) as conn:  # root is not listed
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed already
                conn.sendall(request_frame())
            assert_closed(conn)
        wait_for_line(started, f"refused a connection from uid {os.geteuid()}")
    finally:
        assert started.stop() == 0


@pytest.mark.parametrize("value", ["", "33,", "x", "1;2", "٣"])
def test_a_malformed_agent_peer_uids_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="AGENT_PEER_UIDS"):
        loader.allowed_peer_uids(value)


def test_a_malformed_agent_peer_uids_is_a_start_error(tmp_path: Path) -> None:
    started = start_worker(tmp_path, "loader_app.py", extra_env={"AGENT_PEER_UIDS": "33;0"})
    assert started.handshake["status"] == "error"
    assert "AGENT_PEER_UIDS '33;0' is not a list of uids" in str(started.handshake["summary"])
    assert started.process.wait(timeout=10) == 1


def test_agent_peer_uids_parses_and_defaults() -> None:
    assert loader.allowed_peer_uids("0,33,33") == frozenset({0, 33})
    assert loader.allowed_peer_uids(None) == frozenset({0, os.geteuid()})


def test_the_core_gives_the_worker_its_peers_and_agent_env_cannot_change_them() -> None:
    from agent.core.config import AppConfig
    from agent.core.spawner import worker_env

    config = AppConfig(name="a", app_root="/srv/a", env=(("AGENT_PEER_UIDS", "1234"), ("LD_X", "1")))
    env = worker_env(config, None, nginx_uid=33)
    assert env["AGENT_PEER_UIDS"] == f"{os.geteuid()},33"
    assert worker_env(config, None, nginx_uid=os.geteuid())["AGENT_PEER_UIDS"] == str(os.geteuid())
    assert worker_env(config, None)["AGENT_PEER_UIDS"] == str(os.geteuid())
