"""Long responses (agent_long_responses on): server-sent events reach the
client as the app writes them, outlive agent_max_request_time, end the
app's response when the client leaves without costing the worker, and do
not keep the pool from trimming the workers that are idle.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from tests.integration.stack import AppSpec, Stack, running_stack, wait_until

# /events streams server-sent events: "data: 0" at once; then, once the
# file "next" exists in the app root (its cwd), a heartbeat every 0.2 s
# until ?N seconds have passed, then "data: end". Closed early (the
# loader closes the iterator when a write fails), it writes
# /tmp/agent-sse-closed-<pid> (the app root is not the app's to write).
SOURCE = """
import os
import time

def events(seconds):
    try:
        yield b"data: 0\\n\\n"
        while not os.path.exists("next"):
            time.sleep(0.01)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.2)
            yield b":\\n\\n"
        yield b"data: end\\n\\n"
    except GeneratorExit:
        open("/tmp/agent-sse-closed-%d" % os.getpid(), "w").close()
        raise

def application(environ, start_response):
    path = environ["PATH_INFO"]
    seconds = float(environ["QUERY_STRING"] or "0")
    if path.endswith("/events"):
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("X-Accel-Buffering", "no"),
                                  ("X-Pid", str(os.getpid()))])
        return events(seconds)
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [b"%d" % os.getpid()]
"""

LIMITS = {"agent_max_request_time": "2s", "agent_min_instances": "1"}


def locations(**directives: str) -> list[AppSpec]:
    """One app at two locations: / with the request time limit, /stream/
    with agent_long_responses on."""
    app = {**LIMITS, **directives}
    return [AppSpec("sse", SOURCE, "/", directives=app),
            AppSpec("sse", SOURCE, "/stream/", directives={**app, "agent_long_responses": "on"})]


class EventStream:
    """A client of /stream/events: reads the stream line by line."""

    def __init__(self, stack: Stack, seconds: float) -> None:
        self.conn = stack.connection(timeout=30)
        self.conn.request("GET", f"/stream/events?{seconds}")
        self.response = self.conn.getresponse()
        self.pid = int(self.response.getheader("X-Pid") or 0)

    def next_line(self) -> bytes:
        while True:
            line = self.response.readline()
            if line != b"\n":
                return line

    def close(self) -> None:
        self.conn.close()


def app_root(stack: Stack) -> Path:
    return stack.app_root(stack.apps[0])


def test_events_reach_the_client_as_written_and_outlive_the_request_time_limit() -> None:
    with running_stack(locations(agent_max_instances="2")) as stack:
        stream = EventStream(stack, seconds=4)
        try:
            assert stream.response.status == 200
            assert stream.response.getheader("Content-Type") == "text/event-stream"
            # The app writes nothing more until "next" exists: this event came as written.
            assert stream.next_line() == b"data: 0\n"
            (app_root(stack) / "next").touch()
            started = time.monotonic()
            lines = []
            while (line := stream.next_line()) not in (b"", b"data: end\n"):
                lines.append(line)
            assert line == b"data: end\n", lines
            assert time.monotonic() - started >= 3.5  # past the 2 s limit, not cut off
            assert lines and set(lines) == {b":\n"}
        finally:
            stream.close()
        # The limit still holds on the app's other location.
        assert stack.get("/slow?4").status == 504


def test_a_client_that_leaves_a_stream_ends_the_app_s_response_and_keeps_the_worker() -> None:
    with running_stack(locations(agent_max_instances="1")) as stack:
        stream = EventStream(stack, seconds=600)
        assert stream.next_line() == b"data: 0\n"
        (app_root(stack) / "next").touch()
        assert stream.next_line() == b":\n"
        stream.close()
        marker = Path(f"/tmp/agent-sse-closed-{stream.pid}")
        wait_until(marker.exists, timeout=20, what="the app's response to end")
        marker.unlink()
        answer = stack.get("/")
        assert answer.status == 200
        assert answer.text == str(stream.pid)  # the same worker, not a replacement
        assert psutil.pid_exists(stream.pid)
        assert "kept a response going after nginx went away" not in stack.agent_log()


def test_a_stream_does_not_keep_the_pool_from_trimming_idle_workers() -> None:
    apps = locations(agent_max_instances="2")
    with running_stack(apps, http_directives={"agent_pool_idle_time": "2s"}) as stack:
        stream = EventStream(stack, seconds=600)
        try:
            assert stream.next_line() == b"data: 0\n"
            (app_root(stack) / "next").touch()
            # The stream's worker is busy: this request needs a second one.
            answer = stack.get("/")
            assert answer.status == 200 and answer.text != str(stream.pid)
            other = int(answer.text)
            wait_until(lambda: not psutil.pid_exists(other), timeout=60, what="the idle worker to be stopped")
            assert stack.worker_pids(apps[0]) == {stream.pid}
            assert stream.next_line() == b":\n"  # the stream goes on
        finally:
            stream.close()
