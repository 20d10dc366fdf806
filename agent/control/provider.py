"""What the status socket shows, read from the core (docs/status-api.md).

Every document is built from the pool as the policy loop last saw it and
from the engine's counters, when a client asks; nothing here changes the
pool. Actions go back to the core, through the few methods of CoreView:
this module knows the core's data (pool, engine stats), not its loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import __version__
from agent.clock import monotonic_ms, unix_time
from agent.control.metrics import AppMetrics, Histogram, MetricsSnapshot, PreloaderMetrics, ProcessMetrics
from agent.control.server import StatusError
from agent.core.engine import DURATION_BOUNDS, AppDurations, AppStats, RequestInfo
from agent.core.pool import App, Pool, Preloader, ProcessUsage, Worker
from agent.instance import Instance


class EngineView(Protocol):
    """The engine's counters the documents show."""

    def app_stats(self) -> dict[int, AppStats]: ...

    def app_durations(self) -> dict[int, AppDurations]: ...

    def requests(self) -> list[RequestInfo]: ...


class CoreView(Protocol):
    """What the status provider reads from the core, and the actions it asks
    of it: agent/core/loop.py's Core has them all."""

    @property
    def instance(self) -> Instance: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def engine(self) -> EngineView: ...

    def refresh_stats(self) -> dict[int, AppStats]: ...

    def sample_stale_memory(self) -> None: ...

    def find_app(self, name: str) -> App | None: ...

    def begin_restart(self, app: App, reason: str) -> None: ...

    def when_restarted(self, app: App, done: Callable[[dict[str, Any]], None]) -> None: ...

    def detach(self, app: App, worker: Worker, reason: str, cause: str = "") -> None: ...

    def reopen_logs(self) -> None: ...


# An error summary quotes the app's traceback or output, which may hold its
# secrets: readers without the admin right see only that there was one.
HIDDEN_ERROR = "the last start failed; the details need the admin right"


def path_only(uri: str) -> str:
    """A request's URI without its query string, which may carry secrets."""
    return uri.partition("?")[0]


def worker_state(worker: Worker) -> str:
    if worker.is_serving() and worker.is_idle():
        return "idle"
    return worker.state.value


def process_document(worker: Worker, now: int) -> dict[str, Any]:
    usage = worker.usage
    memory = None if usage is None else {"rss": usage.rss, "pss": usage.pss, "private": usage.private,
                                         "swap": usage.swap}
    return {
        "pid": worker.pid,
        "state": worker_state(worker),
        "sessions": worker.sessions,
        "processed": worker.processed,
        "concurrency": worker.concurrency,
        "spawned_at": worker.started_at,
        "uptime": round((now - worker.spawned_at) / 1000, 3),
        "last_used": unix_time(worker.last_used) if worker.last_used else None,
        "cpu_percent": None if usage is None else round(usage.cpu_percent, 1),
        "memory": memory,
        "generation": worker.generation,
        "detach_reason": worker.detach_reason or None,
    }


def memory_document(usage: ProcessUsage | None) -> dict[str, int] | None:
    return None if usage is None else {"rss": usage.rss, "pss": usage.pss, "private": usage.private,
                                       "swap": usage.swap}


def preloader_document(preloader: Preloader, now: int) -> dict[str, Any]:
    usage = preloader.usage
    return {
        "pid": preloader.pid,
        "state": preloader.state.value,
        "spawned_at": preloader.started_at,
        "uptime": round((now - preloader.spawned_at) / 1000, 3),
        "forks": preloader.forks,
        "generation": preloader.generation,
        "cpu_percent": None if usage is None else round(usage.cpu_percent, 1),
        "memory": memory_document(usage),
    }


class CoreStatus:
    """The status socket's provider: documents from the core's state, and
    the actions an operator may ask for."""

    def __init__(self, core: CoreView) -> None:
        self.core = core
        self.started_at = time.time()

    # -- documents -------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        core = self.core
        app_stats = core.engine.app_stats()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "watchdog_pid": os.getppid(),
            "instance_dir": str(core.instance.root),
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 3),
            "max_pool_size": core.pool.max_pool_size,
            "processes": core.pool.live_count(),
            "requests": sum(s.requests for s in app_stats.values()),
            "queued": sum(s.queue_length for s in app_stats.values()),
            "apps": len(core.pool.apps),
        }

    def pool_info(self, detailed: bool) -> dict[str, Any]:
        core = self.core
        app_stats = core.refresh_stats()
        core.sample_stale_memory()
        now = monotonic_ms()
        return {
            "max_pool_size": core.pool.max_pool_size,
            "apps": [self.app_document(app, app_stats.get(app.id), now, detailed)
                     for app in core.pool.apps.values()],
        }

    def app_document(self, app: App, stats: Any, now: int, detailed: bool) -> dict[str, Any]:
        error = None if not app.last_error else {
            "summary": app.last_error if detailed else HIDDEN_ERROR, "at": app.last_error_at}
        return {
            "name": app.name,
            "app_root": app.config.app_root,
            "app_type": app.config.app_type,
            "min_instances": app.config.min_instances,
            "max_instances": app.config.max_instances,
            "queue_length": stats.queue_length if stats else 0,
            "requests": stats.requests if stats else 0,
            "queue_full": stats.queue_full if stats else 0,
            "queue_timeouts": stats.queue_timeouts if stats else 0,
            "request_timeouts": stats.request_timeouts if stats else 0,
            "failed": stats.failed if stats else 0,
            "restarts": app.restarts,
            "spawns": app.spawns,
            "spawn_failures": app.spawn_failures_total,
            "last_spawn_error": error,
            "processes": [process_document(w, now) for w in sorted(app.workers.values(), key=lambda w: w.pid)],
            "spawn_method": app.config.spawn_method,
            "concurrency_model": app.config.concurrency_model,
            "worker_concurrency": app.config.worker_concurrency,
            "preloaders": [preloader_document(p, now) for p in sorted(app.preloaders.values(), key=lambda p: p.pid)],
        }

    def requests_info(self, detailed: bool) -> dict[str, Any]:
        names = {app.id: app.name for app in self.core.pool.apps.values()}
        return {"requests": [
            {"app": names.get(r.app), "method": r.method, "path": r.path if detailed else path_only(r.path),
             "pid": r.pid, "age": round(r.age, 3), "state": r.state}
            for r in self.core.engine.requests()
        ]}

    def metrics_snapshot(self) -> MetricsSnapshot:
        core = self.core
        app_stats = core.engine.app_stats()
        durations = core.engine.app_durations()
        return MetricsSnapshot(
            uptime=time.time() - self.started_at,
            apps=[app_metrics(app, app_stats.get(app.id), durations.get(app.id))
                  for app in core.pool.apps.values()],
        )

    # -- actions ---------------------------------------------------------

    def restart_app(self, name: str, blocking: bool, done: Callable[[dict[str, Any]], None]) -> None:
        app = self.core.find_app(name)
        if app is None:
            raise StatusError(404, f"no app named {name}")
        self.core.begin_restart(app, "asked through the status socket")
        if blocking:
            self.core.when_restarted(app, done)
        else:
            done({"ok": True, "app": app.name, "restarting": True})

    def detach_process(self, pid: int) -> dict[str, Any]:
        found = self.core.pool.find_worker(pid)
        if found is None:
            raise StatusError(404, f"no worker with pid {pid}")
        app, worker = found
        if not worker.is_serving():
            raise StatusError(409, f"worker {pid} is {worker.state.value}, not serving")
        self.core.detach(app, worker, "detached through the status socket", "detached")
        return {"ok": True, "pid": pid, "app": app.name}

    def reopen_logs(self) -> dict[str, Any]:
        self.core.reopen_logs()
        return {"ok": True}


def app_metrics(app: App, stats: AppStats | None, durations: AppDurations | None) -> AppMetrics:
    duration = None
    if durations is not None:
        duration = Histogram(bounds=DURATION_BOUNDS[:-1], counts=durations.buckets, total=durations.sum_seconds)
    spawn = app.spawn_durations
    rejected = {} if stats is None else {
        "queue_full": stats.queue_full, "queue_timeout": stats.queue_timeouts,
        "request_timeout": stats.request_timeouts, "worker_failed": stats.failed}
    return AppMetrics(
        name=app.name,
        requests=stats.requests if stats else 0,
        duration=duration,
        rejected=rejected,
        queue_length=stats.queue_length if stats else 0,
        processes=[process_metrics(w) for w in app.workers.values()],
        preloaders=[PreloaderMetrics(pid=p.pid, memory=memory_document(p.usage) or {})
                    for p in app.preloaders.values()],
        spawns=app.spawns,
        spawn_failures=app.spawn_failures_total,
        spawn_duration=Histogram(bounds=spawn.bounds, counts=tuple(spawn.counts), total=spawn.total),
        restarts=dict(app.replaced),
    )


def process_metrics(worker: Worker) -> ProcessMetrics:
    usage = worker.usage
    memory = {} if usage is None else {"rss": usage.rss, "pss": usage.pss, "private": usage.private,
                                       "swap": usage.swap}
    return ProcessMetrics(pid=worker.pid, state=worker_state(worker), memory=memory,
                          cpu_seconds=usage.cpu_seconds if usage else 0.0, requests=worker.processed)
