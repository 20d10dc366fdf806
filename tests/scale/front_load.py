"""Bounded load through the load balancer of examples/multi-host.

N threads, each a browser with its own session cookie and one keep-alive
connection (reopened after an error), send GET / until stopped, until
`max_requests` in all, or until `duration` has passed. Every outcome is
kept with the wall-clock times it was sent and answered, so that a test can
count the failures inside any window (e.g. after the load balancer marked
a host down).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class Outcome:
    sent: float              # time.time() when the request was sent
    answered: float
    status: int | None       # None: no HTTP answer (error says which)
    error: str = ""
    host: str = ""
    session: str = ""
    views: int = 0

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class FrontResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def ok(self) -> int:
        return sum(o.ok for o in self.outcomes)

    def failed(self, start: float = 0.0, end: float = float("inf")) -> list[Outcome]:
        """Failures among the requests sent in [start, end)."""
        return [o for o in self.outcomes if not o.ok and start <= o.sent < end]

    def sent_between(self, start: float, end: float) -> int:
        return sum(start <= o.sent < end for o in self.outcomes)

    def hosts(self, start: float = 0.0, end: float = float("inf")) -> Counter[str]:
        return Counter(o.host for o in self.outcomes if o.ok and start <= o.sent < end)

    def summary(self) -> str:
        statuses = Counter(o.status if o.status is not None else o.error for o in self.outcomes)
        return (f"total={len(self.outcomes)} ok={self.ok()} failed={len(self.failed())} "
                f"outcomes={dict(statuses)} hosts={dict(self.hosts())}")


class FrontLoad:
    def __init__(self, cluster_module: ModuleType, namespace: str, address: str, threads: int = 8,
                 max_requests: int = 200_000, duration: float = 120.0) -> None:
        self.cluster_module = cluster_module
        self.namespace = namespace
        self.address = address
        self.max_requests = max_requests
        self.duration = duration
        self.result = FrontResult()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.issued = 0
        self.deadline = 0.0
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> FrontLoad:
        self.deadline = time.monotonic() + self.duration
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> FrontResult:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(self.duration + 60)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"
        return self.result

    def completed(self) -> int:
        with self.lock:
            return len(self.result.outcomes)

    def claim(self) -> bool:
        if self.stop_event.is_set() or time.monotonic() >= self.deadline:
            return False
        with self.lock:
            if self.issued >= self.max_requests:
                return False
            self.issued += 1
        return True

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        cookie = ""
        while self.claim():
            if conn is None:
                conn = self.cluster_module.NamespacedConnection(self.namespace, self.address, timeout=30)
            outcome, keep = self.one_request(conn, cookie)
            cookie = cookie or (f"sid={outcome.session}" if outcome.session else "")
            with self.lock:
                self.result.outcomes.append(outcome)
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def one_request(self, conn: http.client.HTTPConnection, cookie: str) -> tuple[Outcome, bool]:
        sent = time.time()
        try:
            conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
            response = conn.getresponse()
            body = response.read()
        except TimeoutError:
            return Outcome(sent, time.time(), None, "timeout"), False
        except ConnectionRefusedError:
            return Outcome(sent, time.time(), None, "refused"), False
        except (OSError, http.client.HTTPException) as e:
            return Outcome(sent, time.time(), None, type(e).__name__), False
        answered = time.time()
        if response.status != 200:
            return Outcome(sent, answered, response.status), not response.will_close
        answer = json.loads(body)
        return (Outcome(sent, answered, 200, host=answer["host"], session=answer["session"], views=answer["views"]),
                not response.will_close)
