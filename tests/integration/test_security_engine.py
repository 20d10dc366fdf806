"""The engine's trust boundary on the real stack: only nginx's workers (and
the agent) may hand it requests on agent.sock, and a response nobody reads
any more cannot hold a worker for good (issue 7, findings 4 and 11).

nginx's workers run as www-data here, apps whose files belong to root as
nobody, and the attacker is a local user of its own (tests/integration/users.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest

from tests.integration.fastpath_table import FastPathTable
from tests.integration.stack import APP_PYTHON, AppSpec, Stack, gone, running_stack, wait_until
from tests.integration.users import ATTACKER, ensure_user, run_as

# Sends one request frame to an agent socket, as nginx would, for the app
# named on the command line, with a forged client address, HTTPS and
# Authorization; prints what came back. Run by app code and by the attacker.
FORGE = r'''
import errno, socket, struct, sys

def pairs(items):
    out = b""
    for key, value in items:
        out += struct.pack(">I", len(key)) + key + struct.pack(">I", len(value)) + value
    return out

def forge(path, app):
    items = [(b"AGENT_APP", app.encode()), (b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/witness/forged"),
             (b"PATH_INFO", b"/witness/forged"), (b"QUERY_STRING", b""), (b"SCRIPT_NAME", b""),
             (b"SERVER_NAME", b"localhost"), (b"SERVER_PORT", b"443"), (b"SERVER_PROTOCOL", b"HTTP/1.1"),
             (b"REMOTE_ADDR", b"6.6.6.6"), (b"REMOTE_PORT", b"1"), (b"CONTENT_LENGTH", b"0"),
             (b"HTTPS", b"on"), (b"HTTP_AUTHORIZATION", b"Bearer forged")]
    body = pairs(items)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except OSError as e:
        return "connect: " + errno.errorcode.get(e.errno, str(e.errno))
    try:
        sock.sendall(struct.pack(">I", len(body)) + body)
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    finally:
        sock.close()
    if not answer:
        return "closed unanswered"
    return "answer: " + answer.split(b"\r\n", 1)[0].decode("latin-1")
'''

FORGER_APP = FORGE + r'''
from urllib.parse import parse_qs

def application(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    result = forge(query["sock"][0], query["app"][0])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [result.encode()]
'''

FORGE_SCRIPT = FORGE + "\nprint(forge(sys.argv[1], sys.argv[2]))\n"

# Notes every request it sees, with the client address nginx vouched for.
WITNESS_APP = r'''
import os

def application(environ, start_response):
    log = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "scratch", "witness.log")
    with open(log, "a") as f:
        f.write("%s %s %s\n" % (environ.get("REMOTE_ADDR"), environ.get("REQUEST_URI"),
                                environ.get("HTTP_AUTHORIZATION", "-")))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"seen\n"]
'''

# ?finite: a short answer. Otherwise a response that never ends: fast (64 KiB
# chunks, the drain's byte bound ends it) or, with ?trickle, a byte every
# 200 ms (its time bound does). The first line is the worker's pid; when the
# server stops reading, the generator is closed and says so in scratch/.
ENDLESS_APP = r'''
import os, time

def application(environ, start_response):
    query = environ["QUERY_STRING"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Accel-Buffering", "no")])
    if query == "finite":
        return [b"finite\n"]
    scratch = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "scratch")
    def chunks():
        try:
            yield b"%d\n" % os.getpid()
            while True:
                if query == "trickle":
                    time.sleep(0.2)
                    yield b"."
                else:
                    yield b"x" * 65536
        finally:
            open(os.path.join(scratch, "closed-%d" % os.getpid()), "w").close()
    return chunks()
'''

WITNESS = AppSpec("witness", WITNESS_APP, "/witness/")
FORGER = AppSpec("forger", FORGER_APP, "/forger/")
# The relay's drain bound is what the first test attacks: that app stays
# off the fast path, where nginx itself closes an abandoned response.
ENDLESS = AppSpec("endless", ENDLESS_APP, "/endless/", directives={"agent_fast_path": "off"})
ENDLESS_FAST = AppSpec("endless-fast", ENDLESS_APP, "/endless-fast/", directives={"agent_min_instances": "1"})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack([WITNESS, FORGER, ENDLESS, ENDLESS_FAST]) as s:
        yield s


def app_name(stack: Stack, spec: AppSpec) -> str:
    table = json.loads((stack.instance / "apps.json").read_text())
    return next(app["name"] for app in table["apps"] if app["app_root"] == str(stack.app_root(spec)))


def witness_lines(stack: Stack) -> list[str]:
    path = stack.scratch / "witness.log"
    return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def open_socket_path(stack: Stack) -> Iterator[Path]:
    """A path to agent.sock that the file system lets anyone through: a hard
    link in a world-writable directory, the socket's mode 0666 for the while.
    It stands for every way a mode can fail to guard the socket (a non-root
    agent's 0666 socket, an operator's chmod, an app running as nginx's
    group): the engine's own check must hold by itself."""
    original = stack.instance / "agent.sock"
    link = stack.scratch / "agent-open.sock"
    mode = original.stat().st_mode & 0o7777
    os.link(original, link)
    os.chmod(link, 0o666)
    try:
        yield link
    finally:
        os.chmod(original, mode)
        link.unlink()


def agent_log(stack: Stack) -> str:
    return stack.log_file.read_text(errors="replace")


# -- finding 4: who may connect to agent.sock --------------------------------


def test_app_code_cannot_send_frames_for_another_app(stack: Stack) -> None:
    assert stack.get("/witness/").status == 200
    assert stack.get("/forger/?" + urlencode({"sock": "/nonexistent", "app": "x"})).text == "connect: ENOENT"
    assert {psutil.Process(pid).username() for pid in stack.worker_pids(FORGER)} == {"nobody"}
    victim = app_name(stack, WITNESS)
    # The socket's mode is the first gate: nobody cannot even connect.
    guarded = stack.get("/forger/?" + urlencode({"sock": str(stack.instance / "agent.sock"), "app": victim}))
    assert guarded.text == "connect: EACCES"
    with open_socket_path(stack) as path:
        attack = stack.get("/forger/?" + urlencode({"sock": str(path), "app": victim}))
    assert attack.status == 200
    assert attack.text == "closed unanswered"
    assert not [line for line in witness_lines(stack) if "6.6.6.6" in line or "forged" in line]
    nobody = pwd.getpwnam("nobody").pw_uid
    wait_until(lambda: f"latest: uid {nobody}" in agent_log(stack), what="the refusal in the agent's log")
    # nginx's own traffic is served as before, with the address nginx saw.
    assert stack.get("/witness/after").status == 200
    assert witness_lines(stack)[-1] == "127.0.0.1 /witness/after -"


def test_local_user_cannot_send_frames(stack: Stack) -> None:
    ensure_user(ATTACKER)
    victim = app_name(stack, WITNESS)
    guarded = run_as(ATTACKER, [APP_PYTHON, "-c", FORGE_SCRIPT, str(stack.instance / "agent.sock"), victim])
    assert guarded.stdout.strip() in ("connect: EACCES", "connect: ENOENT"), guarded.stderr
    with open_socket_path(stack) as path:
        attack = run_as(ATTACKER, [APP_PYTHON, "-c", FORGE_SCRIPT, str(path), victim])
    assert attack.stdout.strip() == "closed unanswered", attack.stderr
    assert not [line for line in witness_lines(stack) if "6.6.6.6" in line]
    # (The refusal's log line may be folded into the next one: one per 10 s.)
    assert stack.get("/witness/still").status == 200


# -- finding 11: draining an abandoned response is bounded --------------------


def abandon(stack: Stack, path: str) -> int:
    """Starts an endless response, reads its first line (the worker's pid)
    and goes away; returns the pid."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or b"\n" not in data.split(b"\r\n\r\n", 1)[1]:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1]
    line = body.split(b"\n", 1)[0]
    # Chunked transfer encoding: the first chunk's size line comes first.
    if b"\r\n" in body:
        line = body.split(b"\r\n", 1)[1].split(b"\n", 1)[0]
    return int(line)


@pytest.mark.parametrize("mode, bound", [("", "bytes"), ("trickle", "time")])
def test_an_endless_response_nobody_reads_does_not_hold_its_worker(stack: Stack, mode: str, bound: str) -> None:
    pid = abandon(stack, f"/endless/?{mode}")
    started = time.monotonic()
    # The engine closes the worker's connection: its writes fail, and it is
    # replaced (it exits) rather than kept streaming into the void.
    wait_until(lambda: (stack.scratch / f"closed-{pid}").exists(), timeout=15,
               what=f"worker {pid}'s response to be cut off")
    wait_until(lambda: gone(pid),
               timeout=15, what=f"worker {pid} to stop")
    elapsed = time.monotonic() - started
    assert elapsed < 12, elapsed
    wait_until(lambda: f"worker pid {pid} kept a response going" in agent_log(stack), what="the log line")
    assert f"past the drain's bound in {bound}" in agent_log(stack)
    response = stack.get("/endless/?finite")
    assert (response.status, response.text) == (200, "finite\n")
    assert stack.get("/witness/").status == 200


@pytest.mark.parametrize("mode", ["", "trickle"])
def test_on_the_fast_path_an_abandoned_endless_response_ends_with_nginx_s_connection(stack: Stack,
                                                                                       mode: str) -> None:
    """nginx talks to the worker itself: when the client goes, nginx closes
    its connection to the worker, whose next write fails, and the worker is
    free again without being given up."""
    assert stack.get("/endless-fast/?finite").status == 200
    wait_until(lambda: FastPathTable(stack.instance).serving_pids(str(stack.app_root(ENDLESS_FAST))),
               what="the fast path open for the app")
    pid = abandon(stack, f"/endless-fast/?{mode}")
    wait_until(lambda: (stack.scratch / f"closed-{pid}").exists(), timeout=15,
               what=f"worker {pid}'s response to end")
    for _ in range(5):
        response = stack.get("/endless-fast/?finite")
        assert (response.status, response.text) == (200, "finite\n")
    assert psutil.pid_exists(pid)
    assert f"worker pid {pid} kept a response going" not in agent_log(stack)
