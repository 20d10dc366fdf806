"""The status socket under attack, on the real stack (docs/security.md):
an unprivileged local user and an app's own code try to shut everyone out,
to read other requests' secrets, to crash the server with malformed
requests and to act as an admin; the stack keeps serving throughout."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.control import server as status
from tests.integration.stack import APP_PYTHON, REPO, AppSpec, Stack, running_stack, wait_until
from tests.integration.users import ATTACKER, ensure_user, run_as

# /slow?...: sleeps a while (a request in flight, its secret in the query
# string); /attack: the app's code turns on the status socket.
APP = """
import json, os, socket, sys, time

# The worker runs INSTANCE_DIR/loaders/wsgi_loader.py: the status socket is next door.
STATUS_SOCKET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))), "status.sock")

def status(method, target):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(STATUS_SOCKET)
    length = "Content-Length: 0\\r\\n" if method == "POST" else ""
    sock.sendall(("%s %s HTTP/1.1\\r\\nConnection: close\\r\\n%s\\r\\n" % (method, target, length)).encode())
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    return {"status": int(head.split(b" ")[1]), "body": body.decode()}

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        time.sleep(3)
        body = b"slept"
    elif path == "/attack":
        body = json.dumps({
            "uid": os.getuid(),
            "reopen": status("POST", "/logs/reopen"),
            "restart": status("POST", "/apps/restart?app=" + os.environ.get("AGENT_APP_ROOT", os.getcwd())),
            "requests": status("GET", "/requests"),
        }).encode()
    else:
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""

# Fails to start, with a secret in its error.
BROKEN = """
raise RuntimeError("cannot connect: DB_PASSWORD=hunter2")
"""

SECRET_QUERY = "token=s3cret-value"

# Run by the attacker: many slow connections, a byte every half second on
# each; says what became of them. argv: socket, count, seconds, ready file.
SLOW_CLIENTS = """
import json, socket, sys, time
path, count, seconds, ready = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
conns, outcome, opened = [], {}, time.monotonic()
for index in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(b"GET /server HTTP/1.1\\r\\nX-Slow: ")
    except OSError as error:
        outcome[index] = "connect: %s" % error.strerror
        continue
    sock.setblocking(False)
    conns.append((index, sock))
open(ready, "w").write("ready")
while conns and time.monotonic() - opened < seconds:
    time.sleep(0.5)
    for index, sock in list(conns):
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            try:
                sock.send(b"a")
            except OSError as error:
                outcome[index] = "send: %s" % error.strerror
                conns.remove((index, sock))
            continue
        except OSError as error:
            data = ("recv: %s" % error.strerror).encode()
        outcome[index] = data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else (data.decode() or "closed")
        outcome[index + 100000] = round(time.monotonic() - opened, 1)
        conns.remove((index, sock))
for index, sock in conns:
    outcome[index] = "open"
print(json.dumps(outcome))
"""

# Run by the attacker: one raw request (hex) on the status socket; prints the status and body.
RAW_REQUEST = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
data = b""
while True:
    chunk = sock.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(head.split(b" ")[1].decode(), body.decode())
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ensure_user(ATTACKER)
    shop = AppSpec("shop", APP, location="/", directives={"agent_min_instances": "1", "agent_prestart": "on"})
    broken = AppSpec("broken", BROKEN, location="/broken")
    with running_stack([shop, broken]) as running:
        wait_until(lambda: running.instance.joinpath("status.sock").exists(), what="the status socket")
        wait_until(lambda: running.get("/").status == 200, timeout=20, what="the shop to answer")
        yield running


def agentctl_as_root(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def raw_request_as_attacker(stack: Stack, request: str) -> tuple[int, str]:
    result = run_as(ATTACKER, [APP_PYTHON, "-c", RAW_REQUEST, str(stack.instance / "status.sock"),
                                         request.encode("latin-1").hex()])
    assert result.returncode == 0, result.stderr
    code, _, body = result.stdout.strip().partition(" ")
    return int(code), body


def get_as_attacker(stack: Stack, target: str) -> Any:
    code, body = raw_request_as_attacker(stack, f"GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert code == 200, body
    return json.loads(body)


def agent_tracebacks(stack: Stack) -> list[str]:
    """The status server's failures that the agent logged with a traceback
    (log.exception in agent/control/server.py), or the core's own death."""
    lines = stack.log_file.read_text(errors="replace").splitlines()
    return [line for line in lines if "core failed" in line
            or ("status socket:" in line and ("failed" in line or "unparsable" in line))]


def assert_still_serving(stack: Stack) -> None:
    assert stack.get("/").status == 200
    result = agentctl_as_root(stack, "status", "--json")
    assert result.returncode == 0, result.stderr


# -- finding 6 -------------------------------------------------------------------------


def test_a_local_users_slow_connections_do_not_shut_out_root(stack: Stack) -> None:
    ready = stack.scratch / "slow-clients-ready"
    ready.unlink(missing_ok=True)
    seconds = status.REQUEST_LIMIT + 4
    attack: dict[str, subprocess.CompletedProcess[str]] = {}

    def run_attack() -> None:
        attack["result"] = run_as(ATTACKER, [APP_PYTHON, "-c", SLOW_CLIENTS, str(stack.instance / "status.sock"),
                                             "200", str(seconds), str(ready)], timeout=seconds + 30)

    attacker = threading.Thread(target=run_attack)
    attacker.start()
    try:
        wait_until(ready.exists, timeout=20, what="the attacker's connections")
        # While the attacker holds every connection it could get, root is answered.
        for _ in range(3):
            result = agentctl_as_root(stack, "status", "--json")
            assert result.returncode == 0, result.stderr
            time.sleep(0.5)
        assert stack.get("/").status == 200
    finally:
        attacker.join()
    result = attack["result"]
    assert result.returncode == 0, result.stderr
    outcome = {int(k): v for k, v in json.loads(result.stdout).items()}
    fates = [outcome[i] for i in range(200)]
    kept = [i for i, fate in enumerate(fates) if fate == "408"]
    # One uid has its share and no more; the rest were refused at once (503, or reset before it was read).
    assert len(kept) == status.MAX_PER_UID, fates
    assert fates.count("open") == 0, fates
    # The deadline of a request is not reset by each byte: each slow one had its 408 in time.
    assert max(outcome[i + 100000] for i in kept) <= status.REQUEST_LIMIT + 2.5, outcome
    assert "status socket: connections refused at the connection limits (uid " in stack.agent_log()
    assert agent_tracebacks(stack) == []
    assert_still_serving(stack)


# -- finding 8 ---------------------------------------------------------------------------


def test_a_local_user_sees_no_query_strings_nor_error_details(stack: Stack) -> None:
    assert stack.get("/broken/").status == 500
    slow = threading.Thread(target=lambda: stack.get(f"/slow?{SECRET_QUERY}"))
    slow.start()
    try:
        wait_until(lambda: any(r["path"].startswith("/slow") for r in get_as_attacker(stack, "/requests")["requests"]),
                   timeout=5, what="the slow request in /requests")
        seen = get_as_attacker(stack, "/requests")["requests"]
        assert [r["path"] for r in seen if r["path"].startswith("/slow")] == ["/slow"]
        # Root, the admin, sees the whole URI.
        assert f"/slow?{SECRET_QUERY}" in agentctl_as_root(stack, "requests").stdout
    finally:
        slow.join()
    broken = [a for a in get_as_attacker(stack, "/pool")["apps"] if a["name"].endswith("/broken")]
    error = broken[0]["last_spawn_error"]
    assert error is not None and "hunter2" not in json.dumps(error), error
    full = json.loads(agentctl_as_root(stack, "status", "--json").stdout)["pool"]
    assert "hunter2" in json.dumps(full)
    assert_still_serving(stack)


# -- finding 9 ---------------------------------------------------------------------------


@pytest.mark.parametrize("request_text", [
    "POST /logs/reopen HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
    "GET //[x HTTP/1.1\r\n\r\n",
    "POST /apps/restart?app=%zz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "GET /server HTTP/1.1\r\nX: a\x00b\r\n\r\n",
])
def test_malformed_status_requests_get_a_short_400(stack: Stack, request_text: str) -> None:
    code, body = raw_request_as_attacker(stack, request_text)
    assert code == 400
    assert 0 < len(body) < 200 and json.loads(body)["error"]
    assert agent_tracebacks(stack) == []
    assert_still_serving(stack)


# -- finding 10 --------------------------------------------------------------------------


def test_app_code_may_read_but_not_act_on_the_status_socket(stack: Stack) -> None:
    reply = stack.get(f"/attack?{SECRET_QUERY}")
    assert reply.status == 200, reply.text
    seen = json.loads(reply.body)
    assert seen["uid"] != 0
    assert seen["reopen"]["status"] == 403
    assert seen["restart"]["status"] == 403
    assert seen["requests"]["status"] == 200
    paths = [r["path"] for r in json.loads(seen["requests"]["body"])["requests"]]
    assert "/attack" in paths and not any(SECRET_QUERY in path for path in paths), paths
    assert_still_serving(stack)
