"""A bounded load generator for the integration tests.

`Load` runs N client threads against one path on 127.0.0.1. Each thread
keeps one HTTP/1.1 keep-alive connection to nginx (reopened after an error,
as a browser or a proxy would) and sends requests one after the other until
the first of these: the stop event is set (`stop()`), the total number of
requests reaches `max_requests`, the thread has sent `per_thread` requests,
or `duration` seconds have passed. So every loop ends by itself, in count
and in time, even if the test forgets to stop it.

Every outcome is counted: HTTP statuses in `statuses`, and requests that got
no HTTP answer in `errors` ('refused' for ConnectionRefusedError, 'timeout'
for a socket timeout, 'error' for any other OSError or a malformed answer).
When the app names its worker in an `X-Pid` header, `pids` counts the
responses each worker gave.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

from tests.integration.stack import wait_until

PID_HEADER = "X-Pid"


@dataclass
class LoadResult:
    """What a load saw. Plain counts: nothing here depends on timing."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)        # X-Pid of 2xx responses
    status_pids: Counter[tuple[int, int]] = field(default_factory=Counter)  # (status, X-Pid), any status
    headers: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, watched header present)
    stopped_by: Counter[str] = field(default_factory=Counter)  # per thread: stop, count, per-thread, deadline

    @property
    def total(self) -> int:
        return self.statuses.total() + self.errors.total()

    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def failed(self) -> int:
        """Everything that was not a 2xx response, connection errors included."""
        return self.total - self.ok()

    def failed_statuses(self) -> Counter[int]:
        return Counter({s: n for s, n in self.statuses.items() if not 200 <= s < 300})

    def summary(self) -> str:
        return (f"total={self.total} ok={self.ok()} failed={self.failed()} statuses={dict(self.statuses)} "
                f"errors={dict(self.errors)} pids={len(self.pids)} stopped_by={dict(self.stopped_by)}")


class Load:
    """N threads hitting `path` on 127.0.0.1:`port`; use as a context manager
    or call start() and stop(). stop() returns the LoadResult."""

    def __init__(self, port: int, path: str, threads: int = 4, *, max_requests: int = 10_000,
                 per_thread: int = 0, duration: float = 30.0, timeout: float = 30.0,
                 keep_alive: bool = True, watch_headers: Iterable[str] = ()) -> None:
        assert threads >= 1 and max_requests >= 1 and duration > 0
        self.port = port
        self.path = path
        self.thread_count = threads
        self.max_requests = max_requests
        self.per_thread = per_thread
        self.duration = duration
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.watch_headers = [h.lower() for h in watch_headers]
        self.result = LoadResult()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.issued = 0
        self.deadline = 0.0
        self.threads: list[threading.Thread] = []

    # -- control -----------------------------------------------------------

    def start(self) -> Load:
        self.deadline = time.monotonic() + self.duration
        self.threads = [threading.Thread(target=self.run, name=f"load-{i}", daemon=True)
                        for i in range(self.thread_count)]
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """Stops the threads (each finishes the request it is on) and
        returns the result. Bounded: a request cannot outlast its timeout."""
        self.stop_event.set()
        return self.join()

    def join(self) -> LoadResult:
        """Waits for the load to end by one of its own bounds."""
        limit = time.monotonic() + max(0.0, self.deadline - time.monotonic()) + self.timeout + 5
        for thread in self.threads:
            thread.join(max(0.0, limit - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"load threads did not stop: {alive}"
        return self.result

    def done(self) -> bool:
        return all(not t.is_alive() for t in self.threads)

    def completed(self) -> int:
        """Outcomes recorded so far (safe to call while the load runs)."""
        with self.lock:
            return self.result.total

    def pids_seen(self) -> set[int]:
        with self.lock:
            return set(self.result.pids)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the threads -----------------------------------------------------------

    def claim(self, sent: int) -> str | None:
        """A ticket for one more request, or the reason this thread stops."""
        if self.stop_event.is_set():
            return "stop"
        if time.monotonic() >= self.deadline:
            return "deadline"
        if self.per_thread and sent >= self.per_thread:
            return "per-thread"
        with self.lock:
            if self.issued >= self.max_requests:
                return "count"
            self.issued += 1
        return None

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        sent = 0
        try:
            while (reason := self.claim(sent)) is None:
                sent += 1
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                if not self.one_request(conn) or not self.keep_alive:
                    conn.close()
                    conn = None
            with self.lock:
                self.result.stopped_by[reason] += 1
        finally:
            if conn is not None:
                conn.close()

    def one_request(self, conn: http.client.HTTPConnection) -> bool:
        """Sends one request and records its outcome; False if the
        connection is no longer usable."""
        headers = {} if self.keep_alive else {"Connection": "close"}
        try:
            conn.request("GET", self.path, headers=headers)
            response = conn.getresponse()
            response.read()
        except ConnectionRefusedError:
            self.record_error("refused")
            return False
        except TimeoutError:
            self.record_error("timeout")
            return False
        except (OSError, http.client.HTTPException):
            self.record_error("error")
            return False
        pid_text = response.getheader(PID_HEADER)
        with self.lock:
            self.result.statuses[response.status] += 1
            if pid_text is not None and pid_text.isdigit():
                self.result.status_pids[(response.status, int(pid_text))] += 1
                if 200 <= response.status < 300:
                    self.result.pids[int(pid_text)] += 1
            for name in self.watch_headers:
                if response.getheader(name) is not None:
                    self.result.headers[(response.status, name)] += 1
        return not response.will_close

    def record_error(self, kind: str) -> None:
        with self.lock:
            self.result.errors[kind] += 1


def losses_under_fault(port: int, path: str, fault: Callable[[], object], label: str) -> LoadResult:
    """Loads `path` on 16 connections; once 200 answers came, `fault()`
    acts, and the load runs on until 200 more came. Prints and returns
    what the load saw."""
    with Load(port, path, threads=16, max_requests=100_000, duration=90) as load:
        wait_until(lambda: load.completed() >= 200, timeout=30, what="the load to run")
        fault()
        target = load.completed() + 200
        wait_until(lambda: load.completed() >= target, timeout=60, what="200 more answers after the fault")
    print(f"\n[{label}] {load.result.summary()}")
    return load.result

