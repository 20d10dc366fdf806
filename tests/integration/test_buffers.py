"""The buffer directives reach nginx with proxy_*'s meanings: agent_buffer_size,
agent_buffers, agent_busy_buffers_size, agent_max_temp_file_size and
agent_temp_file_write_size (docs/directives.md).

A response spills to a temporary file only when nginx cannot send it to the
client as fast as the app gives it and its buffers are full: `limit_rate`
makes the client slow here, as one on a slow network would be.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import AppSpec, Stack, nginx_t_with, running_stack

# /big?N: N bytes of body; /header?N: an N-byte header and a short body.
SIZES = """
def application(environ, start_response):
    size = int(environ["QUERY_STRING"] or 0)
    if environ["PATH_INFO"] == "/header":
        start_response("200 OK", [("X-Big", "h" * size), ("Content-Length", "2")])
        return [b"ok"]
    body = bytes(i % 251 for i in range(size))
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
    return [body]
"""

KIB = 1024
SPILLED = "an upstream response is buffered to a temporary file"
# the client reads 100 KiB in about 2 s
SLOW_CLIENT = {"limit_rate": "50k", "limit_rate_after": "0"}
SMALL = {"agent_buffer_size": "4k", "agent_buffers": "4 4k"}


def expected(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def app(directives: dict[str, str]) -> AppSpec:
    return AppSpec("sizes", SIZES, "/", directives={"agent_min_instances": "1", **directives})


def temp_files(stack: Stack) -> list[Path]:
    """The files in agent_temp_path that nginx's workers hold open. nginx
    unlinks a temporary file as soon as it has made it, so they are found
    through /proc."""
    root = str(stack.root / "tmp" / "agent") + "/"
    found = []
    for pid in stack.nginx_worker_pids():
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.exists() else []:
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(root):
                    found.append(fd)
    return found


def get_watching_temp_files(stack: Stack, path: str) -> tuple[bytes, int]:
    """The body of GET path, and the most bytes seen in agent_temp_path's
    files while nginx was sending it."""
    largest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal largest
        while not done.is_set():
            for file in temp_files(stack):
                with contextlib.suppress(OSError):
                    largest = max(largest, file.stat().st_size)
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = stack.get(path, timeout=60)
    finally:
        done.set()
        watcher.join()
    assert response.status == 200, response.text[:200]
    return response.body, largest


def spill_warnings(stack: Stack) -> list[str]:
    return [line for line in stack.error_log.read_text().splitlines() if SPILLED in line]


@pytest.fixture
def small_buffers() -> Iterator[Stack]:
    with running_stack([app({**SMALL, **SLOW_CLIENT})]) as stack:
        yield stack


def test_a_response_larger_than_small_buffers_spills_to_agent_temp_path(small_buffers: Stack) -> None:
    body, largest = get_watching_temp_files(small_buffers, "/big?102400")
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected(100 * KIB)).digest()
    (warning,) = spill_warnings(small_buffers)
    assert str(small_buffers.root / "tmp" / "agent") in warning
    assert largest > 0


def test_max_temp_file_size_0_streams_with_no_temp_file() -> None:
    with running_stack([app({**SMALL, **SLOW_CLIENT, "agent_max_temp_file_size": "0"})]) as stack:
        body, largest = get_watching_temp_files(stack, "/big?102400")
        assert body == expected(100 * KIB)
        assert largest == 0 and not spill_warnings(stack)


def test_max_temp_file_size_bounds_the_temp_file() -> None:
    """nginx writes at most about this much to the file (a write may carry
    it past by less than agent_temp_file_write_size); the rest waits in the
    app's socket until the client has taken some."""
    directives = {**SMALL, **SLOW_CLIENT, "agent_max_temp_file_size": "16k", "agent_temp_file_write_size": "8k"}
    with running_stack([app(directives)]) as stack:
        body, largest = get_watching_temp_files(stack, "/big?204800")
        assert body == expected(200 * KIB)
        assert 0 < largest <= 24 * KIB, largest


def test_the_default_buffers_hold_a_100_kib_response_in_memory() -> None:
    with running_stack([app(SLOW_CLIENT)]) as stack:
        body, largest = get_watching_temp_files(stack, "/big?102400")
        assert body == expected(100 * KIB)
        assert largest == 0 and not spill_warnings(stack)


def test_a_header_larger_than_buffer_size_is_a_502() -> None:
    with running_stack([app({"agent_buffer_size": "4k", "agent_buffers": "4 4k"})]) as stack:
        assert stack.get("/header?2000").status == 200
        assert stack.get("/header?6000").status == 502
        assert "upstream sent too big header" in stack.error_log.read_text()


def test_the_default_buffer_size_takes_a_header_of_8_kib() -> None:
    with running_stack([app({})]) as stack:
        response = stack.get("/header?8192")
        assert response.status == 200 and len(response.headers["x-big"]) == 8192


# -- nginx -t ------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "",
    "agent_buffer_size 4k; agent_buffers 4 4k;",
    "agent_buffers 16 8k; agent_busy_buffers_size 64k; agent_temp_file_write_size 64k;",
    "agent_max_temp_file_size 0;",
    "agent_max_temp_file_size 1m; agent_temp_file_write_size 32k;",
    "agent_buffer_response off; agent_buffers 3 4k; agent_buffer_size 4k;",
])
def test_good_buffer_settings_pass_nginx_t(line: str) -> None:
    result = nginx_t_with(line)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("line", "message"), [
    ("agent_buffer_size 8x;", '"agent_buffer_size" directive invalid value'),
    ("agent_buffer_size 1g;", '"agent_buffer_size" directive invalid value'),
    ("agent_buffers 8;", 'invalid number of arguments in "agent_buffers" directive'),
    ("agent_buffers 0 8k;", '"agent_buffers" directive invalid value'),
    ("agent_buffers 8 0;", '"agent_buffers" directive invalid value'),
    ("agent_buffers 8 8k; agent_buffers 4 8k;", '"agent_buffers" directive is duplicate'),
    ("agent_buffers 1 64k;", 'there must be at least 2 "agent_buffers"'),
    ("agent_busy_buffers_size 8k;",
     '"agent_busy_buffers_size" must be equal to or greater than the maximum of the value of '
     '"agent_buffer_size" and one of the "agent_buffers"'),
    ("agent_buffers 4 8k; agent_busy_buffers_size 32k;",
     '"agent_busy_buffers_size" must be less than the size of all "agent_buffers" minus one buffer'),
    # the computed busy size, twice agent_buffer_size, is more than 3 buffers of 4k
    ("agent_buffers 4 4k;",
     '"agent_busy_buffers_size" must be less than the size of all "agent_buffers" minus one buffer'),
    ("agent_temp_file_write_size 4k;",
     '"agent_temp_file_write_size" must be equal to or greater than the maximum of the value of '
     '"agent_buffer_size" and one of the "agent_buffers"'),
    ("agent_max_temp_file_size 4k;",
     '"agent_max_temp_file_size" must be equal to zero to disable temporary files usage or must be '
     'equal to or greater than the maximum of the value of "agent_buffer_size" and one of the "agent_buffers"'),
])
def test_bad_buffer_settings_are_refused_by_nginx_t_as_proxy_refuses_them(line: str, message: str) -> None:
    result = nginx_t_with(line)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_location_inherits_the_server_s_buffers_and_is_checked_with_them() -> None:
    """Set in the http block, the buffers apply to the location; a location
    that sets only agent_busy_buffers_size is checked against them."""
    root = Path(tempfile.mkdtemp(prefix="agent-conf-", dir="/tmp"))
    try:
        stack = Stack(root, [AppSpec("a", SIZES, "/", directives={"agent_busy_buffers_size": "96k"})],
                      http_directives={"agent_buffers": "4 32k", "agent_buffer_size": "32k"})
        stack.write_config()
        assert subprocess.run(stack.nginx_command("-t"), capture_output=True, text=True).returncode == 0
        stack.http_directives["agent_buffers"] = "4 24k"     # 64k busy, fine in http; 96k is not
        stack.write_config()
        result = subprocess.run(stack.nginx_command("-t"), capture_output=True, text=True)
        assert result.returncode != 0 and '"agent_busy_buffers_size" must be less than' in result.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
