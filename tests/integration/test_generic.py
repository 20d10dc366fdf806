"""Generic apps (agent_app_type generic, agent_app_start_command) on the real
stack, with Node.js apps that use only its standard library: requests and
responses both ways (a body, a chunked response, buffered or not), a killed
worker replaced, a rolling restart under load, the memory limit, status,
start failures, hostile bytes from the app, and nginx -t's check.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from agent.control.client import UnixHTTPConnection
from tests.integration.fastpath_table import FastPathTable
from tests.integration.load import Load
from tests.integration.stack import REPO, AppSpec, Stack, alive, gone, nginx_t_with, running_stack, wait_until

NODE_APP = (REPO / "examples" / "generic-node" / "app.js").read_text()

# Speaks raw TCP (node's net module): what a broken or hostile app may send.
RAW_APP = r"""
"use strict";
const net = require("net");
const answers = {
  "/garbage": "\x00\x01\x02 this is not HTTP\r\n\r\n",
  "/badheader": "HTTP/1.1 200 OK\r\nA header line without a colon\r\n\r\nbody",
  "/badchunk": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\nzz-not-a-size\r\nsecret",
  "/cut": "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
  "/ok": "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
};
const server = net.createServer((sock) => {
  let data = "";
  sock.on("error", () => {});
  sock.on("data", (chunk) => {
    data += chunk;
    if (!data.includes("\r\n\r\n")) return;
    const path = data.split(" ")[1];
    if (path === "/reset") { sock.resetAndDestroy ? sock.resetAndDestroy() : sock.destroy(); return; }
    if (path === "/nothing") { sock.end(); return; }
    if (path === "/unlisten") {   // stays alive, but its port refuses connections
      setInterval(() => {}, 1000);
      server.close();
      sock.end(answers["/ok"]);
      return;
    }
    if (path === "/huge") {
      sock.end("HTTP/1.1 200 OK\r\nX-Big: " + "a".repeat(200000) + "\r\n\r\nbody");
      return;
    }
    sock.end(answers[path] || answers["/ok"]);
  });
}).listen(Number(process.env.PORT), "127.0.0.1");
"""

HELLO_WSGI = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi here"]
"""


def node_app(name: str = "node", source: str = NODE_APP, command: str = "node app.js", location: str = "/",
             **directives: str) -> AppSpec:
    return AppSpec(name, source, location, startup_file="app.js", directives={
        "agent_app_type": "generic", "agent_app_start_command": f'"{command}"', **directives})


def app_status(stack: Stack, app: AppSpec) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), "status", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    apps = json.loads(result.stdout)["pool"]["apps"]
    found: dict[str, Any] = next(a for a in apps if a["name"] == str(stack.app_root(app)))
    return found


def serving_pids(stack: Stack, app: AppSpec) -> set[int]:
    return {p["pid"] for p in app_status(stack, app)["processes"] if p["state"] in ("idle", "serving")}


def node_pid(stack: Stack) -> int:
    response = stack.get("/")
    assert response.status == 200, response.text
    return int(response.headers["x-pid"])



def test_requests_reach_the_app_as_http_and_its_responses_come_back_whole() -> None:
    app = node_app()
    with running_stack([app]) as stack:
        hello = stack.get("/")
        assert hello.status == 200
        assert hello.text.startswith("hello from node, pid ")

        body = os.urandom(300_000)
        echo = stack.request("POST", "/echo?x=1", body=body, headers={"Content-Type": "application/x-test"})
        assert echo.status == 200
        assert echo.body == body
        assert echo.headers["x-method"] == "POST"
        assert echo.headers["x-seen-content-type"] == "application/x-test"

        seen = json.loads(stack.get("/headers?a=b%20c", headers={
            "X-Token": "abc", "X-Forwarded-For": "6.6.6.6", "Proxy": "http://evil"}).body)
        assert seen["method"] == "GET"
        assert seen["url"] == "/headers?a=b%20c"
        assert seen["headers"]["x-token"] == "abc"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"   # the client's own is replaced
        assert seen["headers"]["x-forwarded-proto"] == "http"
        assert seen["headers"]["connection"] == "close"
        assert "proxy" not in seen["headers"]

        # Node chunks a response without Content-Length: the client gets the
        # decoded body, never the chunk sizes.
        chunked = stack.get("/chunked?parts=50")
        assert chunked.status == 200
        assert chunked.text == "".join(f"part {i}\n" for i in range(50))

        head = stack.request("HEAD", "/")
        assert head.status == 200 and head.body == b""


def test_a_chunked_response_is_decoded_when_nginx_does_not_buffer_it() -> None:
    app = node_app(agent_buffer_response="off")
    with running_stack([app]) as stack:
        for parts in (1, 7, 400):
            response = stack.get(f"/chunked?parts={parts}")
            assert response.status == 200
            assert response.text == "".join(f"part {i}\n" for i in range(parts))


def test_the_fast_path_never_lists_a_generic_worker() -> None:
    node = node_app("node", location="/")
    wsgi = AppSpec("other", HELLO_WSGI, "/other/")
    with running_stack([node, wsgi]) as stack:
        for _ in range(5):
            assert stack.get("/").status == 200
            assert stack.get("/other/").status == 200
        table = FastPathTable(stack.instance)
        try:
            # The pool may have grown either app to a second worker while the
            # requests came; every worker of each is checked.
            generic = serving_pids(stack, node)
            python = serving_pids(stack, wsgi)
            assert generic and python
            wait_until(
                lambda: all(table.worker_slot(pid) is not None for pid in python),
                what="the WSGI workers' slots",
            )
            assert all(table.worker_slot(pid) is None for pid in generic)
            assert not table.serving_pids(str(stack.app_root(node)))
        finally:
            table.close()


def test_with_the_thread_model_one_generic_worker_takes_its_thread_count_at_once() -> None:
    app = node_app(agent_concurrency_model="thread", agent_thread_count="4", agent_max_instances="1")
    with running_stack([app]) as stack, ThreadPoolExecutor(4) as pool:
        pid = node_pid(stack)
        started = time.monotonic()
        responses = list(pool.map(lambda _: stack.get("/sleep?ms=1500", timeout=60), range(4)))
        elapsed = time.monotonic() - started
        assert [r.status for r in responses] == [200] * 4
        assert {int(r.headers["x-pid"]) for r in responses} == {pid}
        assert elapsed < 2 * 1.5, f"4 requests of 1.5 s took {elapsed:.1f} s: not served at once"
        process = app_status(stack, app)["processes"][0]
        assert process["concurrency"] == 4, process


def test_a_killed_worker_is_replaced_and_its_app_serves_on() -> None:
    app = node_app()
    with running_stack([app]) as stack:
        first = node_pid(stack)
        worker = serving_pids(stack, app)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: serving_pids(stack, app) - worker, timeout=30, what="a new worker")
        second = node_pid(stack)
        assert second != first
        assert "unexpectedly" in stack.log_file.read_text()


def test_restart_app_replaces_the_worker_under_load_with_no_failed_request() -> None:
    app = node_app(agent_min_instances="2")
    with running_stack([app]) as stack:
        node_pid(stack)    # min_instances applies once the app has had a request
        wait_until(lambda: len(serving_pids(stack, app)) == 2, timeout=30, what="two workers")
        before = serving_pids(stack, app)
        with Load(stack.port, "/", threads=4, max_requests=100_000, duration=60) as load:
            wait_until(lambda: load.completed() > 50, timeout=30)
            restart = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance),
                                      "restart-app", str(stack.app_root(app)), "--blocking"],
                                     cwd=REPO, capture_output=True, text=True, timeout=120)
            assert restart.returncode == 0, restart.stderr
            done = load.completed()
            wait_until(lambda: load.completed() > done + 50, timeout=30)
        result = load.result
        after = serving_pids(stack, app)
        assert after and not after & before
        assert result.failed() == 0, result.summary()
        assert len(result.pids) >= 3, result.summary()    # node pids: the old ones and the new
        wait_until(lambda: all(gone(pid) for pid in before), timeout=30, what="the old workers to exit")


def test_the_memory_limit_replaces_a_worker_that_grows_and_status_shows_its_memory() -> None:
    app = node_app(agent_memory_limit="150")
    with running_stack([app]) as stack:
        first = node_pid(stack)
        wait_until(lambda: all(p["memory"] for p in app_status(stack, app)["processes"]), timeout=10,
                   what="a memory sample")
        process = app_status(stack, app)["processes"][0]
        # The worker's pid is the shell running the command; its memory counts node's.
        assert process["memory"]["private"] > 10 * 2**20, process
        connection = UnixHTTPConnection(stack.instance / "status.sock")
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        connection.close()
        assert f'agent_process_memory_bytes{{app="{stack.app_root(app)}",pid="{process["pid"]}",kind="rss"}}' \
            in metrics
        text = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), "status"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert text.returncode == 0, text.stderr
        assert str(process["pid"]) in text.stdout
        assert stack.get("/grow?mb=200").status == 200
        wait_until(lambda: gone(first), timeout=30, what="the grown worker to be replaced")
        assert node_pid(stack) != first
        assert "memory limit" in stack.log_file.read_text()


def test_a_command_that_exits_at_once_shows_its_output_and_other_apps_serve_on() -> None:
    broken = node_app("broken", command="echo starting; echo fatal: no config file >&2; exit 3",
                      agent_friendly_error_pages="on")
    wsgi = AppSpec("other", HELLO_WSGI, "/other/")
    with running_stack([broken, wsgi]) as stack:
        page = stack.get("/", timeout=60)
        assert page.status == 500
        assert "exited with status 3" in page.text
        assert "fatal: no config file" in page.text
        other = stack.get("/other/")
        assert other.status == 200 and other.text == "wsgi here"
        assert "could not start" in stack.log_file.read_text()


def test_an_app_that_never_listens_fails_its_start_at_the_start_timeout() -> None:
    app = node_app("deaf", command="exec sleep 600", agent_start_timeout="2s", agent_friendly_error_pages="on")
    with running_stack([app]) as stack:
        started = time.monotonic()
        page = stack.get("/", timeout=60)
        assert page.status == 500
        assert "did not finish starting within 2 s" in page.text, page.text
        assert time.monotonic() - started >= 2


@pytest.mark.parametrize("path", ["/garbage", "/reset", "/nothing", "/badheader"])
def test_bytes_that_are_not_a_response_get_502_and_the_agent_serves_on(path: str) -> None:
    app = node_app("raw", source=RAW_APP)
    with running_stack([app]) as stack:
        assert stack.get("/ok").text == "ok"
        core = stack.core_pid()
        for _ in range(3):
            assert stack.get(path).status == 502
        assert stack.get("/ok").text == "ok"
        assert stack.core_pid() == core


def test_a_worker_that_stops_listening_is_replaced_and_the_request_waits_for_the_new_one() -> None:
    app = node_app("raw", source=RAW_APP)
    with running_stack([app]) as stack:
        assert stack.get("/unlisten").text == "ok"      # alive, but its port refuses connections now
        before = serving_pids(stack, app)
        assert stack.get("/ok", timeout=60).text == "ok"
        assert serving_pids(stack, app) - before
        assert "cannot connect to worker pid" in stack.log_file.read_text()


@pytest.mark.parametrize("path", ["/badchunk", "/cut", "/huge"])
def test_a_broken_body_is_cut_off_or_refused_and_never_passed_on(path: str) -> None:
    app = node_app("raw", source=RAW_APP)
    with running_stack([app]) as stack:
        assert stack.get("/ok").text == "ok"
        core = stack.core_pid()
        for _ in range(3):
            conn = stack.connection(timeout=30)
            try:
                conn.request("GET", path)
                try:
                    response = conn.getresponse()
                except http.client.RemoteDisconnected:
                    continue    # cut off before the status line reached the client
                if response.status == 200:
                    # the header went out: the body is cut off, never completed
                    try:
                        body = response.read()
                    except http.client.IncompleteRead as e:
                        body = e.partial
                    except ConnectionError:
                        body = b""
                    else:
                        pytest.fail(f"a broken response reached the client whole: {body[:100]!r}")
                    assert b"secret" not in body and b"zz" not in body
                else:
                    assert response.status == 502
                    assert b"secret" not in response.read()
            finally:
                conn.close()
        assert stack.get("/ok").text == "ok"
        assert stack.core_pid() == core


def test_the_workers_die_with_the_core() -> None:
    app = node_app()
    with running_stack([app]) as stack:
        pid = node_pid(stack)
        os.kill(stack.core_pid(), signal.SIGKILL)
        wait_until(lambda: gone(pid), timeout=10, what="node to die with the core (its lifeline)")
        wait_until(lambda: stack.get("/").status == 200, timeout=60, what="a new core serving")


def test_nginx_refuses_a_generic_app_without_its_start_command() -> None:
    result = nginx_t_with("agent_app_type generic;")
    assert result.returncode != 0
    assert 'has "agent_app_type generic" but no "agent_app_start_command"' in result.stderr
    good = nginx_t_with('agent_app_type generic;\nagent_app_start_command "node app.js";')
    assert good.returncode == 0, good.stderr


def test_a_websocket_reaches_the_app_and_echoes_both_ways_until_either_side_closes() -> None:
    """The Upgrade goes to the app with Connection: Upgrade; after its 101
    the engine carries the app's protocol both ways (docs/policy.md,
    "Generic apps"), as long as the connection lasts: past the app's
    request time limit too."""
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    app = node_app(agent_max_request_time="2s")
    with running_stack([app]) as stack:
        pid = node_pid(stack)
        with connect(f"ws://127.0.0.1:{stack.port}/ws", open_timeout=10) as ws:
            assert ws.response is not None and ws.response.headers["X-Pid"] == str(pid)
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            big = os.urandom(200_000)
            ws.send(big)
            assert ws.recv(timeout=10) == big
            time.sleep(3)                    # past agent_max_request_time: a tunnel has no limit
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
            ws.ping().wait(timeout=10)
            # The tunnel holds its worker's one session: another request
            # gets another worker, which the pool starts for it.
            assert node_pid(stack) != pid
        # The client's close came back from the app: the close handshake completed.
        assert isinstance(ws.protocol.close_exc, ConnectionClosedOK)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
        assert alive(pid)                    # a tunnel that ended is no failure of its worker

        with connect(f"ws://127.0.0.1:{stack.port}/ws", open_timeout=10) as ws:
            ws.send("before the app stops")
            assert ws.recv(timeout=10) == "before the app stops"
            assert ws.response is not None
            serving = int(ws.response.headers["X-Pid"])
            os.kill(serving, signal.SIGKILL)  # the app's end goes: the client's connection ends too
            with pytest.raises(Exception):  # noqa: B017 - a close without a frame, whichever class says it
                ws.recv(timeout=10)
        wait_until(lambda: gone(serving), what="the killed app to be reaped")
        assert stack.get("/").status == 200
