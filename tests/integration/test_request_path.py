"""The request path end to end: nginx with the module, the agent, workers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.integration import apps
from tests.integration.stack import AppSpec, Stack, running_stack, wait_until

HELLO = AppSpec("hello", apps.HELLO, "/", public_files={"static.txt": "served by nginx\n"})
RED = AppSpec("red", apps.INTROSPECT, "/red/", env={"COLOR": "red"})
BLUE = AppSpec("blue", apps.INTROSPECT, "/blue/", env={"COLOR": "blue"})
SHA = AppSpec("sha", apps.ECHO_SHA, "/sha/")
ECHO = AppSpec("echo", apps.ECHO, "/echo/")
STREAM = AppSpec("stream", apps.STREAM, "/stream/")
RAISES = AppSpec("raises", apps.RAISES, "/raises/")
# Friendly pages on: the test below reads the error on the page.
BROKEN = AppSpec("broken", apps.IMPORT_ERROR, "/broken/", directives={"agent_friendly_error_pages": "on"})
VICTIM = AppSpec("victim", apps.SLOW, "/victim/", directives={"agent_max_instances": "1"})
SPREAD = AppSpec("spread", apps.SLOW, "/spread/",
                 directives={"agent_min_instances": "4", "agent_max_instances": "4"})
ALL_APPS = [HELLO, RED, BLUE, SHA, ECHO, STREAM, RAISES, BROKEN, VICTIM, SPREAD]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(ALL_APPS, {"agent_max_pool_size": "20"}) as s:
        yield s


def test_hello_world(stack: Stack) -> None:
    response = stack.get("/")
    assert response.status == 200
    assert response.text.startswith("hello from ")
    pid = int(response.text.split()[-1])
    assert pid in stack.worker_pids(HELLO)


def test_workers_run_the_loader_with_its_c_speedups(stack: Stack) -> None:
    # The core copies the speedups next to the loader in the instance
    # directory; a worker (running as an unprivileged user) loads that copy.
    installed = stack.instance / "loaders" / "_agent_loader_speedups.abi3.so"
    assert stack.get("/").status == 200
    pids = stack.worker_pids(HELLO)
    assert pids
    for pid in pids:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        maps = {line.split()[-1] for line in lines if len(line.split()) >= 6}
        assert str(installed) in maps


def test_static_files_are_served_by_nginx(stack: Stack) -> None:
    response = stack.get("/static.txt")
    assert response.status == 200
    assert response.text == "served by nginx\n"


def test_query_headers_and_method_reach_the_app(stack: Stack) -> None:
    response = stack.request("DELETE", "/red/some/path?a=1&b=two", headers={"X-Test": "yes"})
    seen = json.loads(response.body)
    assert (seen["method"], seen["path"], seen["query"], seen["header"]) == ("DELETE", "/red/some/path",
                                                                            "a=1&b=two", "yes")


def test_two_apps_are_isolated(stack: Stack) -> None:
    red = json.loads(stack.get("/red/").body)
    blue = json.loads(stack.get("/blue/").body)
    assert red["color"] == "red" and blue["color"] == "blue"
    assert red["cwd"] == str(stack.app_root(RED)) and blue["cwd"] == str(stack.app_root(BLUE))
    assert red["pid"] != blue["pid"]
    assert red["pid"] in stack.worker_pids(RED) and blue["pid"] in stack.worker_pids(BLUE)
    assert not stack.worker_pids(RED) & stack.worker_pids(BLUE)


def test_workers_do_not_run_as_root(stack: Stack) -> None:
    seen = json.loads(stack.get("/red/").body)
    assert seen["uid"] != 0
    assert psutil.Process(seen["pid"]).username() == "nobody"


class RssSampler(threading.Thread):
    """Samples a process's RSS until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def generated_body(size: int, chunk: int = 1 << 20) -> tuple[Iterator[bytes], str]:
    """A deterministic body streamed in chunks, and its sha256."""
    block = hashlib.sha256(b"agent").digest() * (chunk // 32)
    digest = hashlib.sha256()
    for _ in range(size // chunk):
        digest.update(block)

    def chunks() -> Iterator[bytes]:
        for _ in range(size // chunk):
            yield block

    return chunks(), digest.hexdigest()


def test_200_mb_upload_is_streamed_through_the_agent(stack: Stack) -> None:
    stack.get("/sha/")  # the worker is up, so the sample sees only the upload
    sampler = RssSampler(stack.core_pid())
    baseline = sampler.peak
    sampler.start()
    size = 200 << 20
    chunks, expected = generated_body(size)
    conn = stack.connection(timeout=120)
    conn.putrequest("POST", "/sha/")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    for chunk in chunks:
        conn.send(chunk)
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    sampler.stopped.set()
    sampler.join()
    assert response.status == 200
    assert body == f"{size} {expected}"
    assert sampler.peak - baseline < 30 << 20, f"agent core grew by {(sampler.peak - baseline) >> 20} MiB"


def test_large_body_echoed_back_intact(stack: Stack) -> None:
    payload = os.urandom(8 << 20)
    response = stack.request("POST", "/echo/", body=payload, timeout=60)
    assert response.status == 200
    assert hashlib.sha256(response.body).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_chunked_upload(stack: Stack) -> None:
    pieces = [os.urandom(1000 + i * 777) for i in range(50)]
    conn = stack.connection()
    conn.request("POST", "/sha/", body=iter(pieces), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    whole = b"".join(pieces)
    assert response.status == 200
    assert body == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}"


def test_streamed_response_reaches_the_client_before_the_app_finishes(stack: Stack) -> None:
    gate = stack.root / "stream-gate"
    conn = stack.connection()
    conn.request("GET", f"/stream/?{gate}")
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first == b"first\n"
    gate.touch()
    assert response.read() == b"second\n"
    conn.close()


def test_app_exception_gives_500_and_the_worker_keeps_serving(stack: Stack) -> None:
    response = stack.get("/raises/")
    assert response.status == 500
    wait_until(lambda: "the app failed on purpose" in stack.log_file.read_text(), what="traceback in the log")
    assert stack.get("/").status == 200


def test_import_error_gives_an_error_page_and_a_log_line(stack: Stack) -> None:
    response = stack.get("/broken/")
    assert response.status == 500
    assert "module_that_does_not_exist_here" in response.text
    assert "could not be started" in response.text
    log = stack.log_file.read_text()
    assert "app " + str(stack.app_root(BROKEN)) + " could not start" in log
    assert "ModuleNotFoundError" in log


def test_failing_app_does_not_cause_a_spawn_storm(stack: Stack) -> None:
    def spawns() -> int:
        return stack.log_file.read_text().count(f"app {stack.app_root(BROKEN)}: spawned worker")

    stack.get("/broken/")
    before = spawns()
    started = time.monotonic()
    for _ in range(30):
        assert stack.get("/broken/").status == 500
    elapsed = time.monotonic() - started
    # Back-off doubles from 1 s: in `elapsed` seconds at most log2(elapsed) + 2 more starts.
    assert spawns() - before <= max(2, int(elapsed).bit_length() + 1)


def test_killed_worker_costs_no_request_it_held_before_answering(stack: Stack) -> None:
    """A GET whose worker dies before any byte of its response is sent once
    more, to another worker (nginx's next-upstream rule; a POST that was
    sent is not: test_fastpath_faults.py)."""
    assert stack.get("/victim/?0").status == 200
    (victim,) = stack.worker_pids(VICTIM)
    marker = stack.scratch / "victim-began"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(stack.get, f"/victim/?1:{marker}")
        wait_until(marker.exists, what="the request to reach the worker")
        os.kill(victim, signal.SIGKILL)
        again = slow.result()
        assert again.status == 200 and int(again.text) != victim
    after = stack.get("/victim/?0")
    assert after.status == 200
    assert int(after.text) != victim
    assert stack.get("/").status == 200


def test_concurrent_slow_requests_are_spread_over_the_workers(stack: Stack) -> None:
    stack.get("/spread/?0")
    wait_until(lambda: len(stack.worker_pids(SPREAD)) == 4, timeout=20, what="4 workers")
    time.sleep(0.5)  # the last one finishes its handshake
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: stack.get("/spread/?0.5"), range(16)))
    assert all(r.status == 200 for r in results)
    served = Counter(int(r.text) for r in results)
    assert set(served) == stack.worker_pids(SPREAD)
    assert len(served) == 4
    assert min(served.values()) >= 2, served


def frame(pairs: dict[str, str], body: bytes = b"") -> bytes:
    vars_ = b"".join(struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode()
                     for k, v in pairs.items())
    return struct.pack(">I", len(vars_)) + vars_ + body


def send_raw(stack: Stack, data: bytes, close_write: bool = True) -> bytes:
    """Writes data straight to the agent socket; returns all it answers
    before it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(stack.instance / "agent.sock"))
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("data", [
    pytest.param(struct.pack(">I", 0xFFFFFFF0) + b"x" * 100, id="oversized"),
    pytest.param(struct.pack(">I", 50) + b"\x00\x00\x00\x03KEY", id="truncated"),
    pytest.param(os.urandom(4096), id="random"),
    pytest.param(struct.pack(">I", 12) + struct.pack(">I", 100) + b"ABCDEFGH", id="pair-overrun"),
])
def test_malformed_frames_are_refused_and_the_agent_keeps_serving(stack: Stack, data: bytes) -> None:
    answer = send_raw(stack, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")
    assert stack.get("/").status == 200


def test_frame_without_app_is_refused(stack: Stack) -> None:
    answer = send_raw(stack, frame({"REQUEST_METHOD": "GET", "REQUEST_URI": "/", "CONTENT_LENGTH": "0"}))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"AGENT_APP" in answer


def test_frame_for_unknown_app_gets_503(stack: Stack) -> None:
    answer = send_raw(stack, frame({"AGENT_APP": "/no/such/app", "REQUEST_METHOD": "GET",
                                    "REQUEST_URI": "/", "CONTENT_LENGTH": "0"}))
    assert answer.startswith(b"HTTP/1.1 503 ")


def test_raw_frame_is_served_like_nginx_would(stack: Stack) -> None:
    answer = send_raw(stack, frame({"AGENT_APP": str(stack.app_root(HELLO)), "REQUEST_METHOD": "GET",
                                    "REQUEST_URI": "/", "PATH_INFO": "/", "QUERY_STRING": "",
                                    "SERVER_NAME": "x", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
                                    "CONTENT_LENGTH": "0"}), close_write=False)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"hello from " in answer



def test_client_abort_mid_request_leaves_the_worker_serving(stack: Stack) -> None:
    assert stack.get("/victim/?0").status == 200
    (worker,) = stack.worker_pids(VICTIM)
    marker = stack.scratch / "abort-began"
    conn = stack.connection()
    conn.request("GET", f"/victim/?1:{marker}")
    wait_until(marker.exists, what="the request to reach the worker")
    conn.close()  # the client goes away while the app works
    after = stack.get("/victim/?0")
    assert after.status == 200
    assert stack.worker_pids(VICTIM) == {worker}


def test_read_timeout_gives_504_from_nginx() -> None:
    impatient = AppSpec("impatient", apps.SLOW, "/", directives={"agent_read_timeout": "1s"})
    # The same app at a location with the default timeout: the first
    # request, which waits for the worker to start, goes there.
    patient = AppSpec("impatient", apps.SLOW, "/warm/")
    with running_stack([impatient, patient]) as stack:
        assert stack.get("/warm/?0").status == 200
        assert stack.get("/?0").status == 200
        response = stack.get("/?3")
        assert response.status == 504
        assert "upstream timed out" in stack.error_log.read_text()
        assert stack.get("/?0").status == 200
