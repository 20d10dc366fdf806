"""The status socket of a real agent: what `agentctl status` shows right after
a start, and the request framings any HTTP/1.1 client may use
(docs/status-api.md)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from tests.integration.stack import REPO, AppSpec, Stack, running_stack, wait_until

# Workers that take a while to load: they stay "starting" while the test
# reads the status, and the policy loop's own rounds sample only serving ones.
SLOW_START = AppSpec("slow", """
import time
time.sleep(20)

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ready"]
""", "/", directives={"agent_prestart": "on", "agent_min_instances": "2", "agent_start_timeout": "60s",
                      "agent_spawn_method": "direct"})
# The same app under smart spawning: its preloader loads it, and is the
# process that is starting.
SLOW_PRELOAD = AppSpec("slow-smart", SLOW_START.source, "/", directives={
    "agent_prestart": "on", "agent_min_instances": "2", "agent_start_timeout": "60s", "agent_spawn_method": "smart"})


def status_pool(stack: Stack) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--instance", str(stack.instance), "status", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)["pool"]
    return document


def test_agentctl_status_right_after_a_start_shows_every_process_memory() -> None:
    with running_stack([SLOW_START]) as stack:
        # Workers start one at a time: the first is still loading the app.
        wait_until(lambda: stack.worker_pids(SLOW_START), what="a starting worker")
        processes = status_pool(stack)["apps"][0]["processes"]
        assert processes
        for process in processes:
            assert process["state"] == "starting", process
            memory = process["memory"]
            assert memory is not None, process
            assert memory["rss"] > 0 and memory["private"] > 0, process


def test_agentctl_status_right_after_a_start_shows_the_loading_preloaders_memory() -> None:
    with running_stack([SLOW_PRELOAD]) as stack:
        wait_until(lambda: stack.preloader_processes(SLOW_PRELOAD), what="a preloader loading the app")
        app = status_pool(stack)["apps"][0]
        assert app["processes"] == []
        (preloader,) = app["preloaders"]
        assert preloader["state"] == "starting", preloader
        memory = preloader["memory"]
        assert memory is not None, preloader
        assert memory["rss"] > 0 and memory["private"] > 0, preloader


def exchange(path: str, data: bytes, then: bytes = b"") -> tuple[bytes, bytes]:
    """Sends data; returns what came first (up to the end of a head), and
    the rest until the server closes after `then` was sent."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(path)
        sock.sendall(data)
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        sock.sendall(then)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        return first, rest


def test_the_status_socket_takes_chunked_bodies_and_100_continue() -> None:
    with running_stack([AppSpec("app", "def application(e, s):\n    s('200 OK', [])\n    return [b'']\n")]) as stack:
        path = str(stack.instance / "status.sock")
        wait_until(lambda: (stack.instance / "status.sock").exists(), what="the status socket")
        head = (b"POST /logs/reopen HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        first, rest = exchange(path, head, b"4\r\nbody\r\n0\r\n\r\n")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest
        assert rest.endswith(b'{"ok":true}'), rest
        assert "log file reopened" in stack.log_file.read_text()
