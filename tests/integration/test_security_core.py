"""The root core against its apps (issue 7, findings 2, 13, 14 and 15), on
the real stack: app code sends bad handshakes, plants paths whose stat()
fails, and starting workers are killed from outside. Each test checks that
the attack fails, that the core is the same process afterwards (its death
would take every app's workers with it) and that the stack keeps serving.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration import apps
from tests.integration.stack import AppSpec, Response, Stack, running_stack, wait_until

# App code writes its own line to the handshake pipe before the loader's.
SENDS_LINE = """
import os
os.write(int(os.environ["AGENT_READY_FD"]), {line!r})

def application(environ, start_response):
    start_response("200 OK", [])
    return [b"unreachable"]
"""

BAD_LINES = {
    "concurrency-x": (b'{"status":"ready","concurrency":"x"}\n', "concurrency must be an integer"),
    "list": (b"[]\n", "not a JSON object but list"),
    "concurrency-2-40": (b'{"status":"ready","concurrency":1099511627776}\n', "an integer of 41 bits"),
    "huge": (b"x" * 100_000, "no end of line within 65536 bytes"),
    "not-utf8": (b'{"status":"ready","x":"\xff"}\n', "not UTF-8"),
}
BAD_APPS = {name: AppSpec(f"bad-{name}", SENDS_LINE.format(line=line), f"/bad-{name}/")
            for name, (line, _) in BAD_LINES.items()}

# On a request, app code points tmp/restart.txt and tmp/always_restart.txt
# at a path whose stat() fails even for root (a name longer than NAME_MAX).
PLANTS_BAD_PATHS = """
import os

def application(environ, start_response):
    for name in ("restart.txt", "always_restart.txt"):
        path = os.path.join("tmp", name)
        if not os.path.islink(path):
            os.symlink("/" + "n" * 300, path)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""

# Fails its first start only (a marker in the stack's scratch directory).
FAILS_ONCE = """
import os

marker = os.path.join(os.environ["AGENT_APP_ROOT"], "..", "..", "scratch", "fails-once-started")
if not os.path.exists(marker):
    open(marker, "w").close()
    raise RuntimeError("the first start fails")

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"started on the second try"]
"""

# Takes 2 s to start: long enough to be killed while starting.
SLOW_START = """
import os, time
time.sleep(2)

def application(environ, start_response):
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""

HELLO = AppSpec("hello", apps.HELLO, "/")
STATFAIL = AppSpec("statfail", PLANTS_BAD_PATHS, "/statfail/")
PLAIN_PAGE = AppSpec("plainpage", apps.IMPORT_ERROR, "/plainpage/")
FRIENDLY_PAGE = AppSpec("friendlypage", apps.IMPORT_ERROR, "/friendlypage/",
                        directives={"agent_friendly_error_pages": "on"})
FAILS_ONCE_APP = AppSpec("failsonce", FAILS_ONCE, "/failsonce/")
# Direct: the worker itself loads the app, so its start is the import's 2 s.
SLOW = AppSpec("slowstart", SLOW_START, "/slowstart/", directives={"agent_spawn_method": "direct"})
# Smart: the preloader loads it, and starts as slowly.
SLOW_SMART = AppSpec("slowstart-smart", SLOW_START, "/slowstart-smart/", directives={"agent_spawn_method": "smart"})
ALL_APPS = [HELLO, *BAD_APPS.values(), STATFAIL, PLAIN_PAGE, FRIENDLY_PAGE, FAILS_ONCE_APP, SLOW, SLOW_SMART]


class Baseline:
    """The core and a healthy app's worker before the attacks."""

    def __init__(self, stack: Stack) -> None:
        response = stack.get("/")
        assert response.status == 200
        self.core = stack.core_pid()
        self.hello = response.text

    def check(self, stack: Stack) -> None:
        """Same core, and the healthy app is served by the same worker: a
        core that died would have taken it along (PDEATHSIG)."""
        assert stack.core_pid() == self.core, "the core was replaced\n" + stack.logs()
        assert os.path.exists(f"/proc/{self.core}")
        response = stack.get("/")
        assert response.status == 200 and response.text == self.hello


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(ALL_APPS, {"agent_max_pool_size": "20", "agent_stat_throttle_rate": "0"}) as s:
        tmp = s.app_root(STATFAIL) / "tmp"
        tmp.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(tmp, nobody.pw_uid, nobody.pw_gid)   # the app's own user may write there
        yield s


@pytest.fixture(scope="module")
def baseline(stack: Stack) -> Baseline:
    return Baseline(stack)


def log_text(stack: Stack) -> str:
    return stack.log_file.read_text(errors="replace")


# -- finding 2: a bad handshake line is a failed start, never the core's end ------


@pytest.mark.parametrize("name", BAD_LINES)
def test_a_bad_handshake_is_a_failed_start_and_the_core_survives(stack: Stack, baseline: Baseline,
                                                                 name: str) -> None:
    app = BAD_APPS[name]
    response = stack.get(app.location, timeout=30)
    assert response.status == 500, response.text
    log = log_text(stack)
    reason = BAD_LINES[name][1]
    pattern = rf"app {re.escape(str(stack.app_root(app)))} could not start .*: bad handshake from worker \d+: .*"
    reported = re.findall(pattern, log)
    assert reported and all(reason in line for line in reported), reported
    baseline.check(stack)
    wait_until(lambda: not stack.worker_pids(app), what="the bad app's workers to be killed")
    baseline.check(stack)


# -- finding 15: a stat() that fails is logged once, never the core's end -----------


def test_an_app_file_whose_stat_fails_is_logged_once_and_the_core_survives(stack: Stack,
                                                                           baseline: Baseline) -> None:
    first = stack.get(STATFAIL.location)
    assert first.status == 200
    tmp = stack.app_root(STATFAIL) / "tmp"
    assert os.path.islink(tmp / "restart.txt") and os.path.islink(tmp / "always_restart.txt")
    time.sleep(3.5)   # three looks at the files at least (agent_stat_throttle_rate 0: every tick)
    baseline.check(stack)
    message = "cannot look at tmp/restart.txt: File name too long"
    log = log_text(stack)
    assert log.count(message) == 1
    assert log.count("cannot look at tmp/always_restart.txt: File name too long") == 1
    assert "the core carries on" not in log   # no exception reached the loop at all
    baseline.check(stack)
    again = stack.get(STATFAIL.location)
    assert again.status == 200 and again.text == first.text   # not restarted either


# -- finding 13: the error page shows no traceback unless asked to -------------------


def test_the_error_page_names_no_error_unless_friendly_pages_are_on(stack: Stack, baseline: Baseline) -> None:
    plain = stack.get(PLAIN_PAGE.location, timeout=30)
    friendly = stack.get(FRIENDLY_PAGE.location, timeout=30)
    assert plain.status == 500 and friendly.status == 500
    assert "could not be started" in plain.text
    for secret in ("module_that_does_not_exist_here", "Traceback", "ModuleNotFoundError",
                   str(stack.app_root(PLAIN_PAGE))):
        assert secret not in plain.text, secret
    assert "module_that_does_not_exist_here" in friendly.text
    assert "Traceback" in friendly.text and str(stack.app_root(FRIENDLY_PAGE)) in friendly.text
    log = log_text(stack)
    for app in (PLAIN_PAGE, FRIENDLY_PAGE):
        assert f"app {stack.app_root(app)} could not start" in log
    assert log.count("No module named 'module_that_does_not_exist_here'") >= 2
    assert "Traceback (most recent call last)" in log
    baseline.check(stack)


# -- finding 14: only the app's own failure counts as a failed start ------------------


def test_a_request_waits_for_the_retry_after_a_first_failed_start(stack: Stack, baseline: Baseline) -> None:
    response = stack.get(FAILS_ONCE_APP.location, timeout=30)
    assert response.status == 200, response.text
    assert response.text == "started on the second try"
    assert "RuntimeError: the first start fails" in log_text(stack)
    baseline.check(stack)


def test_a_worker_killed_while_starting_is_replaced_at_once_and_nothing_fails(stack: Stack,
                                                                              baseline: Baseline) -> None:
    result: list[Response] = []
    request = threading.Thread(target=lambda: result.append(stack.get(SLOW.location, timeout=60)))
    request.start()
    killed: list[int] = []
    for _ in range(2):   # twice in a row: that doubled the back-off before
        deadline = time.monotonic() + 10
        while not stack.worker_pids(SLOW) - set(killed) and request.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not stack.worker_pids(SLOW) - set(killed):
            break   # no replacement started: the request has its answer already
        (victim,) = stack.worker_pids(SLOW) - set(killed)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    request.join(60)
    assert len(killed) == 2, (killed, result and result[0].status)
    assert result and result[0].status == 200
    assert int(result[0].text) not in killed
    log = log_text(stack)
    root = str(stack.app_root(SLOW))
    for pid in killed:
        assert f"worker {pid} was killed by SIGKILL while starting, by a signal the agent did not send" in log
    assert f"app {root} could not start" not in log
    baseline.check(stack)


def test_a_preloader_killed_while_loading_is_replaced_at_once_and_nothing_fails(stack: Stack,
                                                                                baseline: Baseline) -> None:
    result: list[Response] = []
    request = threading.Thread(target=lambda: result.append(stack.get(SLOW_SMART.location, timeout=60)))
    request.start()
    killed: list[int] = []
    for _ in range(2):   # twice in a row, as for a worker
        deadline = time.monotonic() + 10
        while not preloader_pids(stack) - set(killed) and request.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        loading = preloader_pids(stack) - set(killed)
        if not loading:
            break
        (victim,) = loading
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    request.join(60)
    assert len(killed) == 2, (killed, result and result[0].status)
    assert result and result[0].status == 200
    log = log_text(stack)
    root = str(stack.app_root(SLOW_SMART))
    for pid in killed:
        assert f"app {root}: preloader {pid} was killed by SIGKILL while loading the app" in log
    assert f"app {root} could not start" not in log
    baseline.check(stack)


def preloader_pids(stack: Stack) -> set[int]:
    return {p.pid for p in stack.preloader_processes(SLOW_SMART)}
