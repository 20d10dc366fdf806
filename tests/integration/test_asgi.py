"""ASGI apps (agent_app_type asgi) on the real stack, with both spawn
methods: the http scope, a streamed request body and response, lifespan
(state, a failed startup, an app without it), many requests at once on one
worker's event loop, SIGTERM with requests in flight, a client that goes
away, and a malformed frame on the worker's socket. Then examples/asgi, a
Starlette app, in its own virtualenv (`make asgi-venv`, build/asgi-venv,
which `make test` makes; without it the test makes one with
examples/asgi/make-venv.sh, and pip needs PyPI)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.integration import asgi_apps
from tests.integration.stack import REPO, AppSpec, Stack, alive, example_venv, gone, running_stack, started, wait_until
from tests.integration.test_security_workers import worker_socket_of

GATHER = 50


def asgi_app(name: str, source: str, location: str, **directives: str) -> AppSpec:
    return AppSpec(name, source, location, startup_file="main.py",
                   directives={"agent_app_type": "asgi", **directives})


@pytest.fixture(scope="module", params=["smart", "direct"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    method = {"agent_spawn_method": request.param}
    apps = [
        asgi_app("main", asgi_apps.APP, "/", agent_max_instances="1", agent_buffer_response="off", **method),
        asgi_app("failing", asgi_apps.FAILING_STARTUP, "/failing/", agent_friendly_error_pages="on", **method),
        asgi_app("raising", asgi_apps.RAISING_STARTUP, "/raising/", agent_friendly_error_pages="on", **method),
        asgi_app("nolifespan", asgi_apps.NO_LIFESPAN, "/nolifespan/", **method),
    ]
    with running_stack(apps, {"agent_max_pool_size": "20"}) as s:
        yield s


def main_app(stack: Stack) -> AppSpec:
    return stack.apps[0]


def one_worker(stack: Stack) -> int:
    wait_until(lambda: len(stack.worker_pids(main_app(stack))) == 1, timeout=30, what="the app's one worker")
    (pid,) = stack.worker_pids(main_app(stack))
    return pid


def test_json_response_shows_the_http_scope_and_the_lifespan_state(stack: Stack) -> None:
    response = stack.get("/json?a=1&b=%20", headers={"X-Test": "yes", "Cookie": "c=d"})
    assert response.status == 200, response.text
    assert response.headers["content-type"] == "application/json"
    scope = json.loads(response.body)
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    assert (scope["path"], scope["raw_path"], scope["root_path"]) == ("/json", "/json", "")
    assert scope["query_string"] == "a=1&b=%20"
    assert ["x-test", "yes"] in scope["headers"] and ["cookie", "c=d"] in scope["headers"]
    assert all(name == name.lower() for name, _ in scope["headers"])
    assert scope["client"][0] == "127.0.0.1" and isinstance(scope["client"][1], int) and scope["client"][1] > 0
    assert scope["server"][1] == stack.port
    # The state lifespan's startup set, in this same worker.
    assert scope["state"] == {"started_by": scope["pid"]}
    assert scope["pid"] in stack.worker_pids(main_app(stack))


def test_a_percent_encoded_path_is_decoded_and_raw_path_is_not(stack: Stack) -> None:
    scope = json.loads(stack.get("/json%C3%A9%20x?y").body)
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/json\u00e9 x", "/json%C3%A9%20x", "y")
    scope = json.loads(stack.request("POST", "/json", body=b"abc", headers={"Content-Type": "text/x-test"}).body)
    assert scope["method"] == "POST"
    assert ["content-type", "text/x-test"] in scope["headers"] and ["content-length", "3"] in scope["headers"]


def test_a_large_post_is_streamed_to_the_app_in_chunks(stack: Stack) -> None:
    payload = os.urandom(8 * 1024 * 1024 + 123)
    response = stack.request("POST", "/echo", body=payload, timeout=60)
    assert response.status == 200, response.text
    size, digest, largest = response.text.split()
    assert int(size) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    # One buffer at a time: never the whole body in one message.
    assert 0 < int(largest) <= 64 * 1024


def test_a_streamed_response_reaches_the_client_as_the_app_sends_it(stack: Stack) -> None:
    gate = stack.app_root(main_app(stack)) / f"gate-{time.monotonic_ns()}"
    conn = stack.connection()
    try:
        conn.request("GET", f"/stream?{gate.name}")
        response = conn.getresponse()
        assert response.status == 200
        # The app waits for the gate before its second chunk: the first
        # arrives while the response is still open.
        assert response.readline() == b"first\n"
        gate.touch()
        assert response.read() == b"second\n"
    finally:
        conn.close()


def test_many_requests_are_served_at_once_by_one_worker(stack: Stack) -> None:
    pid = one_worker(stack)
    with ThreadPoolExecutor(GATHER) as pool:
        # Each waits inside the app until all have arrived: they can only
        # finish if the worker holds every one of them at once.
        answers = list(pool.map(lambda _: stack.get(f"/gather?{GATHER}", timeout=90), range(GATHER)))
    assert [a.status for a in answers] == [200] * GATHER, [a.text for a in answers if a.status != 200][:3]
    assert {a.text for a in answers} == {str(pid)}


def test_an_exception_before_the_response_gives_500_and_the_worker_keeps_serving(stack: Stack) -> None:
    pid = one_worker(stack)
    response = stack.get("/raise")
    assert response.status == 500
    assert response.text == "500 Internal Server Error: the app raised an exception\n"
    wait_until(lambda: "the app failed on purpose" in stack.agent_log(), what="the traceback in the log")
    assert stack.get("/json").status == 200
    assert stack.worker_pids(main_app(stack)) == {pid}


def test_an_exception_after_the_response_started_cuts_it_off(stack: Stack) -> None:
    conn = stack.connection()
    try:
        conn.request("GET", "/cut")
        response = conn.getresponse()
        assert response.status == 200
        # The connection closes before the announced length.
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
    assert stack.get("/json").status == 200


def test_a_client_that_goes_away_makes_the_app_see_http_disconnect(stack: Stack) -> None:
    name = f"gone-{time.monotonic_ns()}"
    began, gone = stack.scratch / f"{name}-began", stack.scratch / f"{name}-http.disconnect"
    client = socket.create_connection(("127.0.0.1", stack.port))
    client.sendall(f"GET /disconnect?{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_until(began.exists, timeout=30, what="the request inside the app")
    client.close()
    wait_until(gone.exists, timeout=30, what="the app to see http.disconnect")
    assert stack.get("/json").status == 200
    # At once, not after a drain that gives the worker up.
    assert "kept a response going after nginx went away" not in stack.agent_log()


def test_a_malformed_frame_on_the_worker_socket_is_dropped_and_the_worker_keeps_serving(stack: Stack) -> None:
    pid = one_worker(stack)
    assert stack.get("/json").status == 200
    path = worker_socket_of(stack, pid)
    for garbage in (b"\0\0\0\0", b"\xff\xff\xff\xffrandom bytes", b"\0\0\0\x10\0\0\0\x01K\0\0\0\xffV"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.settimeout(10)
            peer.connect(str(path))
            peer.sendall(garbage)
            peer.shutdown(socket.SHUT_WR)
            assert peer.recv(100) == b""  # closed, unanswered
    wait_until(lambda: "malformed request frame" in stack.agent_log(), what="the log line")
    response = stack.get("/json")
    assert response.status == 200 and json.loads(response.body)["pid"] == pid


def test_sigterm_lets_requests_in_flight_finish_then_runs_the_lifespan_shutdown(stack: Stack) -> None:
    root = stack.app_root(main_app(stack))
    (root / "release").unlink(missing_ok=True)
    pid = one_worker(stack)
    names = [f"held-{time.monotonic_ns()}-{n}" for n in range(3)]
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(stack.get, f"/hold?{name}", timeout=90) for name in names]
        wait_until(lambda: all((stack.scratch / name).exists() for name in names), timeout=30,
                   what="three requests inside the app")
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)  # the worker has the signal and waits for its requests
        assert alive(pid)
        assert not (stack.scratch / f"shutdown-{pid}").exists()
        (root / "release").touch()
        answers = [f.result() for f in held]
    (root / "release").unlink()
    assert [a.status for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert {a.text for a in answers} == {str(pid)}
    wait_until(lambda: (stack.scratch / f"shutdown-{pid}").exists(), timeout=30, what="the lifespan shutdown")
    wait_until(lambda: gone(pid),
               timeout=30, what="the worker to exit")
    assert stack.get("/json").status == 200


@pytest.mark.parametrize(("location", "error"), [("/failing/", "lifespan startup failed: the database is not there"),
                                                  ("/raising/", "startup went wrong on purpose")])
def test_a_failed_lifespan_startup_gives_the_error_page_and_backs_off(stack: Stack, location: str, error: str) -> None:
    app = next(a for a in stack.apps if a.location == location)

    def spawns() -> int:
        return stack.log_file.read_text().count(f"app {stack.app_root(app)}: spawned worker")

    response = stack.get(location)
    assert response.status == 500
    assert "could not be started" in response.text
    assert error in response.text
    log = stack.log_file.read_text()
    assert f"app {stack.app_root(app)} could not start" in log
    before, started = spawns(), time.monotonic()
    for _ in range(20):
        assert stack.get(location).status == 500
    elapsed = time.monotonic() - started
    # Back-off doubles from 1 s: in `elapsed` seconds at most log2(elapsed) + 2 more starts.
    assert spawns() - before <= max(2, int(elapsed).bit_length() + 1)


def test_an_app_without_lifespan_support_is_served(stack: Stack) -> None:
    response = stack.get("/nolifespan/")
    assert response.status == 200
    pid = int(response.text.split()[-1])
    assert pid in stack.worker_pids()
    wait_until(lambda: "served without lifespan events" in stack.agent_log(), what="the log line")


# -- examples/asgi: Starlette, in its own virtualenv ------------------------------

EXAMPLE = REPO / "examples" / "asgi"
BUILT_VENV = REPO / "build" / "asgi-venv"


class StarletteStack(Stack):
    """examples/asgi, copied in by the fixture, under its virtualenv's interpreter."""

    def __init__(self, root: Path, spawn_method: str, python: str) -> None:
        app = AppSpec("starlette", "", "/", startup_file="asgi.py", python=python,
                      directives={"agent_app_type": "asgi", "agent_spawn_method": spawn_method,
                                  "agent_max_instances": "1"})
        super().__init__(root, [app])

    def write_apps(self) -> None:
        """The example is copied in by the fixture, not written from a source."""


@pytest.fixture(scope="module", params=["smart", "direct"])
def starlette(request: pytest.FixtureRequest) -> Iterator[StarletteStack]:
    root = Path(tempfile.mkdtemp(prefix="agent-asgi-", dir="/tmp"))
    try:
        shutil.copytree(EXAMPLE, root / "apps" / "starlette", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        python = example_venv(EXAMPLE, BUILT_VENV, root / "venv")
        with started(StarletteStack(root, request.param, python)) as stack:
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_starlette_answers_json_from_its_virtualenv_with_its_lifespan_state(starlette: StarletteStack) -> None:
    response = starlette.get("/")
    assert response.status == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = json.loads(response.body)
    assert document["hello"] == "world" and document["path"] == "/"
    assert document["started_by"] == document["pid"]
    worker = psutil.Process(document["pid"])
    assert worker.cmdline()[0] == starlette.apps[0].python


def test_starlette_streams_each_line_as_it_is_made(starlette: StarletteStack) -> None:
    conn = starlette.connection(timeout=60)
    try:
        started = time.monotonic()
        # Two lines 20 s apart: the first must come long before the second is made.
        conn.request("GET", "/stream?count=2&delay=20")
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline() == b"line 0\n"
        assert time.monotonic() - started < 15
    finally:
        conn.close()
    whole = starlette.get("/stream?count=3&delay=0")
    assert (whole.status, whole.text) == (200, "line 0\nline 1\nline 2\n")


# -- agent_asgi_loop: uvloop's loop where the app's environment has it -----------

# Answers with the module of the loop it runs on, over HTTP and a WebSocket
# echo (the loader's socket calls on that loop both ways).
LOOP_REPORTER = """
import asyncio

async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": loop + " " + message["text"]})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": loop.encode()})
"""


@pytest.fixture(scope="module")
def venv_with_uvloop() -> Iterator[str]:
    """examples/asgi's virtualenv, which has uvloop, as the workers' Python."""
    root = Path(tempfile.mkdtemp(prefix="agent-asgi-loop-", dir="/tmp"))
    root.chmod(0o755)  # the workers' user reaches the interpreter through it
    try:
        yield example_venv(EXAMPLE, BUILT_VENV, root / "venv")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_loop_is_uvloops_where_the_apps_python_has_it(venv_with_uvloop: str, choice: str, expected: str) -> None:
    from websockets.sync.client import connect

    app = AppSpec("loop", LOOP_REPORTER, "/", python=venv_with_uvloop,
                  directives={"agent_app_type": "asgi", "agent_asgi_loop": choice})
    with running_stack([app]) as stack:
        response = stack.get("/")
        assert (response.status, response.text) == (200, expected)
        with connect(f"ws://127.0.0.1:{stack.port}/ws", open_timeout=10) as ws:
            ws.send("echo")
            assert ws.recv(timeout=10) == f"{expected} echo"


def test_auto_takes_asyncios_loop_where_uvloop_is_missing_and_uvloop_fails_the_start() -> None:
    auto = AppSpec("auto", LOOP_REPORTER, "/auto/", directives={"agent_app_type": "asgi"})
    forced = AppSpec("forced", LOOP_REPORTER, "/forced/", directives={
        "agent_app_type": "asgi", "agent_asgi_loop": "uvloop", "agent_friendly_error_pages": "on"})
    with running_stack([auto, forced]) as stack:
        assert stack.get("/auto/").text == "asyncio"  # the system's Python has no uvloop
        failed = stack.get("/forced/")
        assert failed.status == 500
        assert "could not be started" in failed.text and "cannot import uvloop" in failed.text
        assert "cannot import uvloop" in stack.agent_log()
        assert stack.get("/auto/").text == "asyncio"
