"""Typed access to the C side (agent._native, built by cffi from csrc/).

Everything the policy asks of the engine and the fork helper goes through
this module, so that cffi's types stay out of the rest of the package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent._native import ffi, lib  # type: ignore[import-not-found]

EV_QUEUED = lib.AGENT_EV_QUEUED
EV_WORKER_FAILED = lib.AGENT_EV_WORKER_FAILED
EV_WORKER_IDLE = lib.AGENT_EV_WORKER_IDLE
EV_LOG = lib.AGENT_EV_LOG
EV_REQUEST_TIMEOUT = lib.AGENT_EV_REQUEST_TIMEOUT
NOTIFY_QUEUED = lib.AGENT_NOTIFY_QUEUED
NOTIFY_IDLE = lib.AGENT_NOTIFY_IDLE
NOTIFY_HOLD = lib.AGENT_NOTIFY_HOLD
WORKER_ACTIVE: int = lib.AGENT_WORKER_ACTIVE
WORKER_DETACHED: int = lib.AGENT_WORKER_DETACHED
MAX_PEER_UIDS: int = lib.AGENT_MAX_PEER_UIDS

# Upper bounds of the request duration buckets, in seconds; the last bucket
# is +Inf (csrc/engine_api.h, agent_app_durations).
DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
assert len(DURATION_BOUNDS) == lib.AGENT_DURATION_BUCKETS

_ERROR_SIZE = 512

# The fast path's shared table in the instance directory (AGENT_FP_FILE in
# csrc/fastpath.h, which the nginx module includes too).
FASTPATH_FILE = "fastpath.table"


class NativeError(OSError):
    """A call into the C side failed; the message says which and why."""


@dataclass(frozen=True)
class EngineEvent:
    type: int
    app: int
    pid: int
    value: int
    message: str


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    app: int
    state: int  # WORKER_ACTIVE or WORKER_DETACHED
    concurrency: int
    sessions: int
    processed: int
    last_used_ms: int

    @property
    def detached(self) -> bool:
        return self.state == WORKER_DETACHED


@dataclass(frozen=True)
class AppStats:
    app: int
    queue_length: int
    requests: int
    queue_full: int
    queue_timeouts: int
    failed: int
    request_timeouts: int
    free_slots: int

    @property
    def unserved(self) -> int:
        """Queued requests that no free worker is about to take."""
        return max(0, self.queue_length - self.free_slots)


@dataclass(frozen=True)
class AppDurations:
    """Request durations of one app, from the frame read to the response's end.

    buckets[i] counts the requests with DURATION_BOUNDS[i-1] < duration <=
    DURATION_BOUNDS[i]: per bucket, not cumulative (see cumulative()).
    """

    app: int
    buckets: tuple[int, ...]
    count: int
    sum_seconds: float

    def cumulative(self) -> tuple[int, ...]:
        """Running sums of the buckets: Prometheus's le buckets, the last equal to count."""
        total = 0
        sums: list[int] = []
        for n in self.buckets:
            total += n
            sums.append(total)
        return tuple(sums)


@dataclass(frozen=True)
class RequestInfo:
    """A request the engine holds: queued, or with a worker."""

    app: int
    pid: int | None  # None while queued
    state: str  # 'queued' | 'forwarding'
    age: float  # seconds since the engine read the frame
    method: str
    path: str  # REQUEST_URI, cut at 511 bytes


def _check(result: int, what: str) -> int:
    if result < 0:
        raise NativeError(-result, f"{what}: {os.strerror(-result)}")
    return result


class Engine:
    """The data plane: one C thread that moves requests from nginx to workers."""

    def __init__(self, listen_fd: int, max_frame_size: int = 0, io_buffer_size: int = 0,
                 frame_timeout_ms: int = 0, drain_max_bytes: int = 0, drain_max_ms: int = 0) -> None:
        """Zero for a size or a time: the engine's default (csrc/engine_api.h)."""
        config = ffi.new("agent_engine_config *")
        config.listen_fd = listen_fd
        config.max_frame_size = max_frame_size
        config.io_buffer_size = io_buffer_size
        config.frame_timeout_ms = frame_timeout_ms
        config.drain_max_bytes = drain_max_bytes
        config.drain_max_ms = drain_max_ms
        self._engine: Any = lib.agent_engine_new(config)
        if self._engine == ffi.NULL:
            raise NativeError(0, "cannot create the engine")
        self._events = ffi.new("agent_engine_event[]", 256)

    def start(self) -> None:
        _check(lib.agent_engine_start(self._engine), "starting the engine")

    def close(self) -> None:
        if self._engine != ffi.NULL:
            lib.agent_engine_stop(self._engine)
            lib.agent_engine_free(self._engine)
            self._engine = ffi.NULL

    def notify_fd(self) -> int:
        return int(lib.agent_engine_notify_fd(self._engine))

    def allow_peers(self, uids: Iterable[int]) -> None:
        """Only these uids may connect to the agent socket (the engine checks
        SO_PEERCRED); by default only the core's own effective uid."""
        wanted = sorted(set(uids))
        if not 1 <= len(wanted) <= MAX_PEER_UIDS:
            raise ValueError(f"between 1 and {MAX_PEER_UIDS} peer uids, not {len(wanted)}")
        array = ffi.new("unsigned int[]", wanted)
        _check(lib.agent_engine_allow_peers(self._engine, array, len(wanted)), "choosing the agent socket's peers")

    def refused_peers(self) -> int:
        """Connections to the agent socket closed for their peer's uid."""
        return int(lib.agent_engine_refused_peers(self._engine))

    def attach_fastpath(self, path: str | os.PathLike[str], nginx_uid: int | None) -> None:
        """Maps the fast path's table (csrc/fastpath.h) after checking it; raises
        NativeError when it cannot, and agent.sock then serves every request.
        nginx_uid: nginx's worker user, the table's owner when the core is root
        (None: not known, root's)."""
        uid = -1 if nginx_uid is None else nginx_uid
        _check(lib.agent_engine_fastpath_attach(self._engine, os.fsencode(path), uid),
               f"attaching the fast path table {os.fsdecode(path)}")

    def fastpath_attached(self) -> bool:
        return bool(lib.agent_engine_fastpath_attached(self._engine))

    def poll(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        while True:
            count = lib.agent_engine_poll(self._engine, self._events, len(self._events))
            for i in range(count):
                ev = self._events[i]
                message = ffi.string(ev.message).decode("utf-8", "replace")
                events.append(EngineEvent(ev.type, ev.app, ev.pid, ev.value, message))
            if count < len(self._events):
                return events

    def set_app(self, app: int, name: str, max_queue: int, queue_timeout_ms: int) -> None:
        _check(lib.agent_engine_app_set(self._engine, app, name.encode(), max_queue, queue_timeout_ms),
               f"configuring app {name}")

    def set_request_time(self, app: int, max_request_time_ms: int) -> None:
        _check(lib.agent_engine_app_request_time(self._engine, app, max_request_time_ms),
               "setting a request time limit")

    def remove_app(self, app: int) -> None:
        _check(lib.agent_engine_app_remove(self._engine, app), "removing an app")

    def notify_app(self, app: int, events: int) -> None:
        """Which per-request events (NOTIFY_*) to send for app."""
        _check(lib.agent_engine_app_notify(self._engine, app, events), "choosing an app's events")

    def fail_app(self, app: int, response: bytes) -> None:
        _check(lib.agent_engine_app_fail(self._engine, app, response, len(response)), "setting an error page")

    def clear_app_failure(self, app: int) -> None:
        _check(lib.agent_engine_app_clear_failure(self._engine, app), "clearing an error page")

    def add_worker(self, app: int, pid: int, socket_path: str, concurrency: int) -> None:
        _check(lib.agent_engine_worker_add(self._engine, app, pid, socket_path.encode(), concurrency),
               f"adding worker {pid}")

    def add_http_worker(self, app: int, pid: int, port: int, concurrency: int) -> None:
        """A generic worker: HTTP/1.1 on 127.0.0.1:port, one connection per
        request, never in the fast path (csrc/engine_api.h)."""
        _check(lib.agent_engine_worker_add_http(self._engine, app, pid, port, concurrency),
               f"adding worker {pid}")

    def detach_worker(self, pid: int) -> None:
        _check(lib.agent_engine_worker_detach(self._engine, pid), f"detaching worker {pid}")

    def release_worker(self, pid: int) -> None:
        _check(lib.agent_engine_worker_release(self._engine, pid), f"releasing worker {pid}")

    def remove_worker(self, pid: int) -> None:
        _check(lib.agent_engine_worker_remove(self._engine, pid), f"removing worker {pid}")

    def worker_stats(self, capacity: int = 1024) -> dict[int, WorkerStats]:
        out = ffi.new("agent_worker_stats[]", capacity)
        count = lib.agent_engine_worker_stats(self._engine, out, capacity)
        return {
            s.pid: WorkerStats(s.pid, s.app, s.state, s.concurrency,
                               s.sessions, s.processed, s.last_used_ms)
            for s in (out[i] for i in range(count))
        }

    def app_stats(self, capacity: int = 256) -> dict[int, AppStats]:
        out = ffi.new("agent_app_stats[]", capacity)
        count = lib.agent_engine_app_stats(self._engine, out, capacity)
        return {
            s.app: AppStats(s.app, s.queue_length, s.requests, s.queue_full, s.queue_timeouts, s.failed,
                            s.request_timeouts, s.free_slots)
            for s in (out[i] for i in range(count))
        }

    def app_durations(self, capacity: int = 256) -> dict[int, AppDurations]:
        out = ffi.new("agent_app_durations[]", capacity)
        count = lib.agent_engine_app_durations(self._engine, out, capacity)
        return {
            d.app: AppDurations(d.app, tuple(d.buckets), d.count, d.sum_us / 1e6)
            for d in (out[i] for i in range(count))
        }

    def requests(self, capacity: int = 256) -> list[RequestInfo]:
        """Queued and in-flight requests, oldest first."""
        while True:
            out = ffi.new("agent_request_info[]", capacity)
            count = lib.agent_engine_requests(self._engine, out, capacity)
            if count < capacity:
                break
            capacity *= 2  # there may be more: ask again with room for them
        return [
            RequestInfo(
                r.app,
                r.pid if r.state == lib.AGENT_REQUEST_FORWARDING else None,
                "forwarding" if r.state == lib.AGENT_REQUEST_FORWARDING else "queued",
                r.age_ms / 1000,
                ffi.string(r.method).decode("utf-8", "replace"),
                ffi.string(r.path).decode("utf-8", "replace"),
            )
            for r in (out[i] for i in range(count))
        ]


@dataclass(frozen=True)
class SpawnSpec:
    """What a worker process is started with (see csrc/spawn_api.h)."""

    path: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    death_signal: int = 0


def spawn(spec: SpawnSpec, listen_fd: int, ready_fd: int, output_fd: int, *,
          startup_fd: int = -1, env_fd: int = -1, cgroup_fd: int = -1, lifeline_fd: int = -1) -> int:
    """Forks and execs a worker; returns its pid or raises NativeError. The
    optional fds (-1: none) are the checked startup file (fd 5 in the
    worker), the app's environment (fd 6) and the cgroup.procs file the
    child joins before it drops root. A generic worker has listen_fd and
    ready_fd -1, and its lifeline (fd 3 in the worker) instead."""
    keep: list[Any] = []

    def cstr(text: str) -> Any:
        buf = ffi.new("char[]", text.encode())
        keep.append(buf)
        return buf

    def cstr_array(items: list[str]) -> Any:
        array = ffi.new("char *[]", len(items) + 1)
        for i, item in enumerate(items):
            array[i] = cstr(item)
        return array

    c_spec = ffi.new("agent_spawn_spec *")
    c_spec.path = cstr(spec.path)
    argv = cstr_array(spec.argv)
    envp = cstr_array([f"{k}={v}" for k, v in spec.env.items()])
    groups = ffi.new("unsigned int[]", list(spec.groups) or [0])
    c_spec.argv = argv
    c_spec.envp = envp
    c_spec.cwd = cstr(spec.cwd)
    c_spec.uid = spec.uid
    c_spec.gid = spec.gid
    c_spec.groups = groups
    c_spec.ngroups = len(spec.groups)
    c_spec.listen_fd = listen_fd
    c_spec.ready_fd = ready_fd
    c_spec.output_fd = output_fd
    c_spec.startup_fd = startup_fd
    c_spec.env_fd = env_fd
    c_spec.cgroup_fd = cgroup_fd
    c_spec.death_signal = spec.death_signal
    c_spec.lifeline_fd = lifeline_fd
    error = ffi.new("char[]", _ERROR_SIZE)
    pid = lib.agent_spawn(c_spec, error, _ERROR_SIZE)
    if pid < 0:
        raise NativeError(ffi.errno, ffi.string(error).decode("utf-8", "replace"))
    return int(pid)



def become_subreaper() -> None:
    """Orphaned descendants (a dead preloader's workers) become this
    process's children (csrc/spawn_api.h). Raises NativeError."""
    if lib.agent_become_subreaper() < 0:
        raise NativeError(ffi.errno, "prctl(PR_SET_CHILD_SUBREAPER)")
