"""The agent core: the engine (C) and the policy (this loop).

The engine thread moves every request; this loop never sees one. It wakes
on the engine's events, on worker handshakes and output, on signals and on
a one-second tick, asks the policy what to do (agent/core/policy.py) and
does it. Every side effect on processes and on the engine's routing table
happens in this file. It knows nothing of the status socket:
agent/core/main.py hands it one through the selector and a tick callback.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import selectors
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import logs
from agent.clock import monotonic_ms, seconds_text
from agent.core import handshake, policy
from agent.core.config import AppConfig, AppTable, ConfigError, load_table
from agent.core.engine import (
    EV_LOG,
    EV_QUEUED,
    EV_REQUEST_TIMEOUT,
    EV_WORKER_FAILED,
    EV_WORKER_IDLE,
    NOTIFY_HOLD,
    NOTIFY_IDLE,
    NOTIFY_QUEUED,
    AppStats,
    Engine,
    EngineEvent,
    NativeError,
    become_subreaper,
)
from agent.core.error_page import startup_error_response
from agent.core.pool import App, Pool, Preloader, PreloaderState, ProcessUsage, Worker, WorkerState
from agent.core.preloader import Channel, Exited, PreloaderFailed
from agent.core.spawner import (
    GENERIC,
    SpawnError,
    StartedProcess,
    fork_worker,
    install_loaders,
    prepare_workers_dir,
    start_generic_worker,
    start_preloader,
    start_worker,
)
from agent.core.supervision import Supervision
from agent.instance import Instance
from agent.logs import OutputCapture, log
from agent.settings import default
from agent.signals import SignalInbox
from agent.unix import describe_exit

TICK_MS = 1000
MEMORY_SAMPLE_INTERVAL_MS = 1000
# A status reader may have this many processes sampled for it: about 0.1 ms
# each for a small worker (psutil reads /proc/PID/smaps_rollup), so a few ms
# at most between two turns of the loop, however large the pool.
ON_DEMAND_SAMPLES = 32
GUARD_LOG_INTERVAL_MS = 10_000
# A starting generic worker's port is tried this often until it accepts.
PROBE_INTERVAL_MS = 50


@dataclass
class Probe:
    """The readiness check of a starting generic worker: a nonblocking
    connect to its port, tried again every PROBE_INTERVAL_MS until one is
    accepted (agent_start_timeout bounds the wait, as for a handshake)."""

    port: int
    due: int = 0
    sock: socket.socket | None = None


class Guard:
    """Runs each step and callback of the loop: an exception is logged with
    its traceback and the loop goes on, since the core ending would take
    every app's workers with it (PDEATHSIG). The same step failing again
    within GUARD_LOG_INTERVAL_MS is counted, not logged again, so that one
    that fails at every turn cannot flood the log."""

    def __init__(self) -> None:
        self.logged_at: dict[str, int] = {}
        self.unlogged: Counter[str] = Counter()

    def run(self, what: str, call: Callable[..., object], *args: Any) -> None:
        try:
            call(*args)
        except Exception:
            now = monotonic_ms()
            if now - self.logged_at.get(what, -GUARD_LOG_INTERVAL_MS) < GUARD_LOG_INTERVAL_MS:
                self.unlogged[what] += 1
                return
            self.logged_at[what] = now
            also = self.unlogged.pop(what, 0)
            log.exception("core: %s failed%s; the core carries on", what,
                          f" (and {also} more time(s) since last logged)" if also else "")


class Core:
    def __init__(self, instance: Instance, listen_fd: int) -> None:
        self.instance = instance
        self.engine = Engine(listen_fd)
        self.pool = Pool(max_pool_size=default("max_pool_size"))
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.handshakes: dict[int, tuple[int, bytearray]] = {}   # fd -> (pid, data)
        self.captures: dict[int, OutputCapture] = {}              # fd -> capture
        self.channels: dict[int, Channel] = {}                    # preloader pid -> its control socket
        self.lifelines: dict[int, int] = {}                       # forked or generic worker pid -> the core's end
        self.probes: dict[int, Probe] = {}                         # starting generic worker pid -> its check
        self.probe_fds: dict[int, int] = {}                        # a probe's socket fd -> the worker's pid
        self.ended_output: dict[int, list[str]] = {}               # generic worker pid -> its last lines, pipe closed
        self.socket_numbers = itertools.count(1)
        self.next_tick = 0
        self.next_memory_sample = 0
        self.next_restart_checks: dict[str, int] = {}              # app name -> when its files are next looked at
        self.notifying: dict[int, int] = {}                        # app id -> NOTIFY_* asked for
        self.restart_waiters: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self.tickers: list[Callable[[], None]] = []   # called about once a second, on this loop
        self.guard = Guard()

    # -- the loop ---------------------------------------------------------

    def run(self) -> int:
        self.prepare()
        self.load_apps()
        # Only now: a request accepted before the app table is known would
        # be refused as naming an unknown app.
        self.engine.start()
        log.info("core ready, pid %d, serving %d app(s)", os.getpid(), len(self.pool.apps))
        while not self.stopping or self.pool.workers() or self.pool.preloaders():
            self.turn()
        self.engine.close()
        log.info("core stopped")
        return 0

    def prepare(self) -> None:
        try:
            become_subreaper()
        except NativeError as e:
            log.warning("%s: %s; a dead preloader's workers will not be reaped by the core", e, e.strerror)
        prepare_workers_dir(self.instance)
        install_loaders(self.instance.loaders_dir)
        self.supervision = Supervision.setup(self.instance.root)
        self.instance.core_pid_file.write_text(f"{os.getpid()}\n")
        self.signals = SignalInbox(self.selector, (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
        self.selector.register(self.engine.notify_fd(), selectors.EVENT_READ, self.on_engine_notify)

    def turn(self) -> None:
        """One turn of the loop; no step's exception ends it (Guard)."""
        for step in (self.wait_for_events, self.handle_signals, self.handle_engine_events, self.reap_workers,
                     self.probe_ports, self.reconcile):
            self.guard.run(step.__name__, step)

    def wait_for_events(self) -> None:
        timeout = (PROBE_INTERVAL_MS if self.probes else TICK_MS) / 1000
        for key, _ in self.selector.select(timeout=timeout):
            callback: Callable[[int], None] = key.data
            self.guard.run(getattr(callback, "__qualname__", "a callback"), callback, key.fd)

    def on_engine_notify(self, fd: int) -> None:
        """Events are drained in handle_engine_events; nothing to do here."""

    # -- signals ----------------------------------------------------------

    def handle_signals(self) -> None:
        for signum in self.signals.take():
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the app table")
                self.load_apps()
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Stop taking requests for good; in-flight ones finish first."""
        log.info("shutting down: %d worker(s) to stop", len(self.pool.workers()))
        self.stopping = True
        for app in self.pool.apps.values():
            app.removed = True
            for worker in list(app.workers.values()):
                self.detach(app, worker, "agent shutdown")
            for preloader in list(app.preloaders.values()):
                self.stop_preloader(app, preloader, "agent shutdown")

    # -- the app table ----------------------------------------------------

    def load_apps(self) -> None:
        try:
            table = load_table(self.instance.apps_file)
        except ConfigError as e:
            log.error("keeping the current apps: %s", e)
            return
        self.apply_table(table)

    def apply_table(self, table: AppTable) -> None:
        self.pool.max_pool_size = table.max_pool_size
        self.pool.pool_idle_time_ms = table.pool_idle_time_ms
        wanted = {config.name: config for config in table.apps}
        for name, app in self.pool.apps.items():
            if name not in wanted and not app.removed:
                log.info("app %s is no longer configured: stopping its workers", name)
                app.removed = True
                self.detach_all(app, "app removed")
        for config in table.apps:
            self.configure_app(config)

    def configure_app(self, config: AppConfig) -> None:
        app = self.pool.apps.get(config.name)
        if app is None:
            app = App(id=self.pool.new_app_id(), config=config)
            app.restart_mtime = restart_file_mtime(config)
            self.pool.apps[config.name] = app
            log.info("app %s: added (root %s)", config.name, config.app_root)
        elif (change := policy.config_change(app, config)) == "replace":
            log.info("app %s: settings changed, replacing its workers", config.name)
            app.config = config
            app.removed = False
            app.spawn_failures = 0
            app.failed_until = 0
            self.clear_failure(app)
            self.begin_restart(app, "settings changed")
        elif change == "update":
            log.info("app %s: limits changed, applied to the running workers", config.name)
            app.config = config
            self.next_restart_checks.pop(config.name, None)   # its stat throttle rate may be shorter now
        if config.prestart:
            app.activated = True
        self.engine.set_app(app.id, config.name, config.max_request_queue_size, config.max_request_queue_time_ms)
        self.engine.set_request_time(app.id, config.max_request_time_ms)

    # -- engine events ----------------------------------------------------

    def handle_engine_events(self) -> None:
        for event in self.engine.poll():
            self.guard.run("an engine event", self.on_engine_event, event)

    def on_engine_event(self, event: EngineEvent) -> None:
        if event.type == EV_QUEUED:
            app = self.pool.app_by_id(event.app)
            if app is not None:
                app.activated = True
                app.queue_length = max(app.queue_length, int(event.value))
        elif event.type == EV_WORKER_FAILED:
            found = self.pool.find_worker(event.pid)
            if found is not None:
                # The engine says why: a refused connection, or a response
                # that went on past the drain's bounds after nginx left.
                log.warning("worker %d failed its connection: %s", event.pid, event.message)
                self.detach(*found, "its connection failed")
        elif event.type == EV_WORKER_IDLE:
            self.worker_finished_requests(event.pid, int(event.value))
        elif event.type == EV_REQUEST_TIMEOUT:
            self.request_timed_out(event.pid, event.message)
        elif event.type == EV_LOG:
            log.warning("%s", event.message)

    def request_timed_out(self, pid: int, message: str) -> None:
        """The engine cut off a request that ran too long and detached its
        worker; the worker may be stuck for good, so it is killed, not asked
        to stop. Other requests it was serving end with it."""
        found = self.pool.find_worker(pid)
        if found is None:
            return
        app, worker = found
        log.warning("app %s: %s", app.name, message)
        app.replaced["request_time"] += 1
        self.kill(worker, "request time limit")

    def worker_finished_requests(self, pid: int, processed: int) -> None:
        """Apps with per-worker limits hear of every finished request, and
        the engine holds the worker until it is checked: one that leaks or
        has served enough never starts another request."""
        found = self.pool.find_worker(pid)
        if found is None:
            return
        app, worker = found
        worker.processed = max(worker.processed, processed)
        worker.last_used = monotonic_ms()
        if policy.samples_after_request(app):
            self.sample_memory([worker])
        recycle = policy.after_request(app, worker)
        if recycle is not None:
            self.detach(app, worker, recycle.reason, recycle.cause)
        elif worker.in_engine():
            self.engine.release_worker(pid)

    def refresh_stats(self) -> dict[int, AppStats]:
        """Reads the engine's counters into the pool; returns the apps' stats
        as read, for a caller that shows them."""
        app_stats = self.engine.app_stats()
        for app in self.pool.apps.values():
            stats = app_stats.get(app.id)
            app.queue_length = stats.unserved if stats else 0
        worker_stats = self.engine.worker_stats()
        for worker in self.pool.workers():
            ws = worker_stats.get(worker.pid)
            if ws is not None:
                worker.sessions = ws.sessions
                worker.processed = ws.processed
                # The engine's clock is CLOCK_MONOTONIC in milliseconds too.
                worker.last_used = max(worker.last_used, ws.last_used_ms)
        return app_stats

    def sample_memory(self, workers: list[Worker]) -> None:
        now = monotonic_ms()
        for worker in workers:
            usage = sample_usage(worker.pid, worker.usage, (now - worker.sampled_at) / 1000, tree=bool(worker.port))
            if usage is not None:
                worker.usage, worker.memory, worker.sampled_at = usage, usage.private, now

    def sample_stale_memory(self, limit: int = ON_DEMAND_SAMPLES) -> None:
        """For a status reader: the processes never sampled (started since
        the last round: a starting worker, one just ready) or sampled longer
        ago than two rounds, those without a sample first, at most `limit`,
        so that a reader right after a start sees every process's memory."""
        now = monotonic_ms()
        stale = [w for w in self.pool.workers() if not w.is_stopping()
                 and (w.usage is None or now - w.sampled_at > 2 * MEMORY_SAMPLE_INTERVAL_MS)]
        stale.sort(key=lambda w: (w.usage is not None, w.sampled_at))
        self.sample_memory(stale[:limit])
        # A preloader (one an app, two during a restart) as well: one still
        # loading the app has not been sampled yet.
        self.sample_preloaders(now, [p for p in self.pool.preloaders()
                                     if p.usage is None or now - p.sampled_at > 2 * MEMORY_SAMPLE_INTERVAL_MS])

    # -- handshakes and output ---------------------------------------------

    def on_handshake(self, fd: int) -> None:
        pid, data = self.handshakes[fd]
        try:
            chunk = os.read(fd, handshake.LIMIT - len(data))
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("worker %d: cannot read its handshake: %s", pid, e.strerror)
            chunk = b""
        data += chunk
        if not handshake.complete(data, eof=not chunk):
            return
        self.forget_handshake(fd)
        found = self.pool.find_worker(pid)
        if found is None:
            preloader = self.pool.find_preloader(pid)
            if preloader is not None:
                self.preloader_handshake(*preloader, bytes(data), eof=not chunk)
            return
        app, worker = found
        if not worker.is_starting():
            return  # killed on purpose while starting (shutdown, new settings)
        if not chunk and not handshake.has_line(data) and len(data) < handshake.LIMIT:
            # Closed without a line: it is exiting, or was killed. Its exit
            # status says whose failure that is (start_ended); one that
            # lives on is killed after a grace (policy.worker_deadline_actions).
            worker.handshake_closed_at = monotonic_ms()
            return
        self.finish_handshake(app, worker, bytes(data))

    def forget_handshake(self, fd: int) -> None:
        self.selector.unregister(fd)
        os.close(fd)
        del self.handshakes[fd]

    def finish_handshake(self, app: App, worker: Worker, data: bytes) -> None:
        said = handshake.read(worker.pid, data)
        if said.ready:
            # A worker never takes more at once than its app allows.
            self.worker_ready(app, worker, min(said.concurrency, app.config.worker_concurrency))
            return
        self.spawn_failed(app, said.summary, said.details)
        self.kill(worker, "failed to start")

    def take_handshake(self, pid: int) -> bytes:
        """What a worker that just exited wrote to its handshake pipe and
        this loop had not read yet; the pipe is closed."""
        for fd, (handshake_pid, data) in list(self.handshakes.items()):
            if handshake_pid != pid:
                continue
            with contextlib.suppress(OSError):
                while len(data) < handshake.LIMIT and (chunk := os.read(fd, handshake.LIMIT - len(data))):
                    data += chunk
            self.forget_handshake(fd)
            return bytes(data)
        return b""

    def start_ended(self, app: App, worker: Worker, exitcode: int) -> None:
        """A starting worker exited. Only the app's own failure counts as a
        failed start (docs/policy.md rule 18): an error line, an exit status,
        a signal its own code raised. One killed from outside (the OOM
        killer, an operator) is replaced at once, with no back-off."""
        data = self.take_handshake(worker.pid)
        said = handshake.read(worker.pid, data) if handshake.has_line(data) else None
        description = describe_exit(exitcode)
        if worker.port and policy.start_failed_by_app(exitcode):
            tail = self.output_tail(worker.pid)
            last = next((line for line in reversed(tail) if line.strip()), "")
            self.spawn_failed(app, f"the start command {description} before listening on its port"
                              + (f": {last.strip()[:200]}" if last else ""),
                              f"worker {worker.pid} ({app.config.app_start_command}) {description} before "
                              f"listening on 127.0.0.1:{worker.port}; its last output:\n" + "\n".join(tail)
                              if tail else f"worker {worker.pid} {description} before listening; it wrote nothing")
        elif said is not None and not said.ready:   # its error line, read late
            self.spawn_failed(app, said.summary, said.details)
        elif policy.start_failed_by_app(exitcode):
            self.spawn_failed(app, f"the worker {description} before it was ready",
                              f"worker {worker.pid} {description} before reporting readiness; see the log above")
        else:
            app.outside_kills += 1
            spacing = policy.outside_kill_spacing_ms(app.outside_kills)
            app.start_not_before = monotonic_ms() + spacing
            log.warning("app %s: worker %d %s while starting, by a signal the agent did not send: "
                        "not counted as a failed start; replaced %s", app.name, worker.pid, description,
                        f"in {seconds_text(spacing)}" if spacing else "at once")

    def worker_ready(self, app: App, worker: Worker, concurrency: int) -> None:
        worker.state = WorkerState.SERVING
        worker.ready_at = worker.last_used = monotonic_ms()
        worker.concurrency = concurrency
        app.spawn_durations.observe((worker.ready_at - worker.spawned_at) / 1000)
        app.spawn_failures = 0
        app.outside_kills = 0
        self.clear_failure(app)
        if worker.port:
            self.engine.add_http_worker(app.id, worker.pid, worker.port, worker.concurrency)
        else:
            self.engine.add_worker(app.id, worker.pid, worker.socket_path, worker.concurrency)
        # The engine hands it waiting requests at once; a count from an
        # event before it did must not start yet another worker for them.
        app.queue_length = max(0, app.queue_length - worker.concurrency)
        log.info("app %s: worker %d ready in %d ms", app.name, worker.pid, worker.ready_at - worker.spawned_at)

    def output_tail(self, pid: int) -> list[str]:
        """The last lines a worker wrote, its pipe read to the end first."""
        for capture in self.captures.values():
            if capture.pid == pid:
                capture.read_all()
                capture.flush()
                return list(capture.tail)
        return self.ended_output.get(pid, [])

    def on_output(self, fd: int) -> None:
        capture = self.captures[fd]
        if not capture.read():
            found = self.pool.find_worker(capture.pid)
            if found is not None and found[1].port:
                self.ended_output[capture.pid] = list(capture.tail)   # for start_ended
            self.selector.unregister(fd)
            os.close(fd)
            del self.captures[fd]

    # -- spawning and failures ---------------------------------------------

    def spawn(self, app: App) -> None:
        step = policy.spawn_step(app)
        if step == "start_preloader":
            self.start_preloader(app)
            return
        if step == "wait":
            return  # the preloader's handshake comes first
        if app.config.app_type == GENERIC:
            try:
                generic = start_generic_worker(app.config, self.instance, self.supervision)
            except SpawnError as e:
                self.spawn_failed(app, e.summary, e.details)
                return
            self.track(app, generic)
            return
        socket_path = str(self.instance.workers_dir / f"{app.id}-{next(self.socket_numbers)}.sock")
        preloader = app.current_preloader() if step == "fork" else None
        try:
            if preloader is not None:
                started = self.fork_from(app, preloader, socket_path)
                if started is None:
                    return
            else:
                started = start_worker(app.config, self.instance, socket_path, self.supervision)
        except SpawnError as e:
            self.spawn_failed(app, e.summary, e.details)
            return
        self.track(app, started, preloader)

    def track(self, app: App, started: StartedProcess, preloader: Preloader | None = None) -> None:
        worker = Worker(pid=started.pid, app=app.name, socket_path=started.socket_path,
                        spawned_at=monotonic_ms(), started_at=time.time(), generation=app.generation,
                        max_requests=policy.request_budget(app, random.random()),
                        preloader=0 if preloader is None else preloader.pid, port=started.port)
        if started.lifeline_fd >= 0:
            self.lifelines[worker.pid] = started.lifeline_fd
        app.spawns += 1
        app.workers[worker.pid] = worker
        if started.port:
            self.probes[worker.pid] = Probe(started.port, due=monotonic_ms())
        else:
            self.handshakes[started.ready_fd] = (started.pid, bytearray())
            self.selector.register(started.ready_fd, selectors.EVENT_READ, self.on_handshake)
        self.captures[started.output_fd] = OutputCapture(started.output_fd, app.name, started.pid)
        self.selector.register(started.output_fd, selectors.EVENT_READ, self.on_output)
        log.info("app %s: spawned worker %d%s", app.name, worker.pid,
                 f" (forked by preloader {preloader.pid})" if preloader else
                 f" (port {started.port})" if started.port else "")

    # -- generic workers: ready when their port accepts ----------------------

    def probe_ports(self) -> None:
        now = monotonic_ms()
        for pid, probe in list(self.probes.items()):
            if probe.sock is None and now >= probe.due:
                self.start_probe(pid, probe)

    def start_probe(self, pid: int, probe: Probe) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        err = sock.connect_ex(("127.0.0.1", probe.port))
        if err == errno.EINPROGRESS:
            probe.sock = sock
            self.probe_fds[sock.fileno()] = pid
            self.selector.register(sock, selectors.EVENT_WRITE, self.on_probe)
            return
        sock.close()
        self.probe_result(pid, err)

    def on_probe(self, fd: int) -> None:
        pid = self.probe_fds.pop(fd)
        probe = self.probes[pid]
        sock = probe.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.forget_probe_socket(probe)
        self.probe_result(pid, err)

    def forget_probe_socket(self, probe: Probe) -> None:
        if probe.sock is not None:
            self.probe_fds.pop(probe.sock.fileno(), None)
            self.selector.unregister(probe.sock)
            probe.sock.close()
            probe.sock = None

    def forget_probe(self, pid: int) -> None:
        probe = self.probes.pop(pid, None)
        if probe is not None:
            self.forget_probe_socket(probe)

    def probe_result(self, pid: int, err: int) -> None:
        probe = self.probes[pid]
        if err != 0:
            probe.due = monotonic_ms() + PROBE_INTERVAL_MS
            return
        self.forget_probe(pid)
        found = self.pool.find_worker(pid)
        if found is None or not found[1].is_starting():
            return
        app, worker = found
        if not listens_in_tree(pid, probe.port):
            # Someone else took the port between its choice and the app's bind.
            self.spawn_failed(app, f"port {probe.port} accepted connections, but not from the app's processes",
                              f"127.0.0.1:{probe.port}, chosen for worker {pid}, is held by another process")
            self.kill(worker, "its port belongs to another process")
            return
        self.worker_ready(app, worker, app.config.worker_concurrency)

    def spawn_failed(self, app: App, summary: str, details: str) -> None:
        app.spawn_failures += 1
        delay = policy.backoff_delay_ms(app.spawn_failures)
        app.failed_until = monotonic_ms() + delay
        app.last_error = summary
        app.last_error_at = time.time()
        app.spawn_failures_total += 1
        log.error("app %s could not start (%d in a row, next try in %s): %s%s", app.name, app.spawn_failures,
                  seconds_text(delay), summary, "" if details == summary else "\n" + details)
        outcome = policy.after_start_failure(app, delay)
        if outcome == "abandon_restart":
            self.abandon_restart(app)
        elif outcome == "wait":
            log.info("app %s: its requests wait for the next try", app.name)
        elif outcome == "show_error":
            page = startup_error_response(app.name, summary, details, app.config.friendly_error_pages)
            self.engine.fail_app(app.id, page)
            app.failure_shown = True

    # -- preloaders (agent_spawn_method smart) ---------------------------------

    def start_preloader(self, app: App) -> None:
        """Starts the app's preloader; the workers it will fork wait for its
        handshake. A failure to start is the app's failed start."""
        app.preloader_wanted = True
        try:
            started = start_preloader(app.config, self.instance, self.supervision)
        except SpawnError as e:
            self.spawn_failed(app, e.summary, e.details)
            return
        now = monotonic_ms()
        preloader = Preloader(pid=started.pid, app=app.name, generation=app.generation, spawned_at=now,
                              started_at=time.time())
        app.preloaders[started.pid] = preloader
        app.preloader_starts += 1
        channel = Channel(started.control_fd, started.pid)
        self.channels[started.pid] = channel
        self.selector.register(channel.fileno(), selectors.EVENT_READ, self.on_channel)
        self.handshakes[started.ready_fd] = (started.pid, bytearray())
        self.selector.register(started.ready_fd, selectors.EVENT_READ, self.on_handshake)
        self.captures[started.output_fd] = OutputCapture(started.output_fd, app.name, started.pid)
        self.selector.register(started.output_fd, selectors.EVENT_READ, self.on_output)
        log.info("app %s: spawned preloader %d", app.name, started.pid)

    def preloader_handshake(self, app: App, preloader: Preloader, data: bytes, eof: bool) -> None:
        if not preloader.is_starting():
            return
        if eof and not handshake.has_line(data) and len(data) < handshake.LIMIT:
            preloader.handshake_closed_at = monotonic_ms()   # its exit status decides
            return
        said = handshake.read(preloader.pid, data)
        if not said.ready:
            self.spawn_failed(app, said.summary, said.details)
            self.kill_preloader(app, preloader, "failed to load the app")
            return
        preloader.state = PreloaderState.READY
        preloader.ready_at = preloader.last_fork = monotonic_ms()
        app.spawn_failures = 0
        log.info("app %s: preloader %d ready in %d ms", app.name, preloader.pid,
                 preloader.ready_at - preloader.spawned_at)

    def fork_from(self, app: App, preloader: Preloader, socket_path: str) -> StartedProcess | None:
        """A worker forked by the ready preloader; None when the preloader
        failed to fork (it is killed, and the next spawn starts another).
        Raises SpawnError when the worker's own parts cannot be made."""
        channel = self.channels[preloader.pid]
        try:
            started = fork_worker(channel, self.instance, socket_path, self.supervision)
        except PreloaderFailed as e:
            log.error("app %s: preloader %d did not fork a worker: %s", app.name, preloader.pid, e)
            self.kill_preloader(app, preloader, "did not fork")
            return None
        if not is_child_of(started.pid, preloader.pid):
            # Its word is app code's: the core acts only on its own children's.
            log.error("app %s: preloader %d named pid %d, not its child, as the worker it forked",
                      app.name, preloader.pid, started.pid)
            self.supervision.abandon(self.supervision.cgroups.pop(started.pid, None))
            for fd in (started.ready_fd, started.output_fd, started.lifeline_fd):
                os.close(fd)
            unlink_quietly(socket_path)
            self.kill_preloader(app, preloader, "named a process that is not its child")
            return None
        preloader.last_fork = monotonic_ms()
        preloader.forks += 1
        app.preloader_losses = 0
        # Exit reports that came while the core waited for the fork's reply.
        self.drain_channel(channel)
        return started

    def on_channel(self, fd: int) -> None:
        channel = next((c for c in self.channels.values() if c.fileno() == fd), None)
        if channel is not None:
            self.drain_channel(channel)
            if channel.closed:
                self.close_channel(channel.pid)

    def drain_channel(self, channel: Channel) -> None:
        for message in channel.take():
            if isinstance(message, Exited):
                self.forked_worker_exited(channel.pid, message.pid, message.status)

    def forked_worker_exited(self, preloader_pid: int, pid: int, status: int) -> None:
        """The preloader reaped a worker it forked (and killed what the
        worker left in its process group first)."""
        found = self.pool.find_worker(pid)
        if found is None or found[1].preloader != preloader_pid:
            log.warning("preloader %d reported the exit of %d, which it did not fork", preloader_pid, pid)
            return
        self.supervision.exited(pid, reaped=True)
        self.worker_exited(pid, status)
        self.close_output(pid)

    def close_channel(self, pid: int) -> None:
        channel = self.channels.pop(pid, None)
        if channel is not None:
            self.drain_channel(channel)
            self.selector.unregister(channel.fileno())
            channel.close()

    def preloader_exited(self, app: App, preloader: Preloader, status: int) -> None:
        """Its workers serve on: they are now the core's children (it is
        their subreaper). One that exited unreported is taken as gone."""
        self.close_channel(preloader.pid)
        for fd, (pid, _) in list(self.handshakes.items()):
            if pid == preloader.pid:
                self.forget_handshake(fd)
        del app.preloaders[preloader.pid]
        exitcode = os.waitstatus_to_exitcode(status)
        description = describe_exit(exitcode)
        if preloader.is_starting():
            if policy.start_failed_by_app(exitcode):
                self.spawn_failed(app, f"the preloader {description} before it was ready",
                                  f"preloader {preloader.pid} {description} before reporting readiness; "
                                  "see the log above")
            else:
                log.warning("app %s: preloader %d %s while loading the app", app.name, preloader.pid, description)
        elif preloader.is_stopping():
            log.info("app %s: preloader %d stopped (%s)", app.name, preloader.pid, description)
        else:
            app.preloader_losses += 1
            app.start_not_before = monotonic_ms() + policy.backoff_delay_ms(app.preloader_losses - 1)
            log.warning("app %s: preloader %d %s unexpectedly; its workers serve on and a new preloader "
                        "starts", app.name, preloader.pid, description)
        for worker in list(app.workers.values()):
            if worker.preloader == preloader.pid:
                worker.preloader = 0
                if not is_child_of(worker.pid, os.getpid()):
                    # Reaped by the preloader, its report lost with it.
                    self.supervision.exited(worker.pid, reaped=True)
                    self.worker_exited(worker.pid, signal.SIGKILL)
                    self.close_output(worker.pid)
        self.drop_if_removed(app)

    def stop_preloader(self, app: App, preloader: Preloader, reason: str) -> None:
        """SIGTERM: it stops forking and exits; its workers serve on."""
        if preloader.is_starting():
            self.kill_preloader(app, preloader, reason)
            return
        if preloader.is_stopping():
            return
        if reason.startswith("no worker forked"):
            app.preloader_wanted = False
        preloader.state = PreloaderState.STOPPING
        preloader.stop_deadline = monotonic_ms() + app.config.shutdown_timeout_ms
        log.info("app %s: stopping preloader %d (%s)", app.name, preloader.pid, reason)
        with contextlib.suppress(ProcessLookupError):
            os.kill(preloader.pid, signal.SIGTERM)

    def kill_preloader(self, app: App, preloader: Preloader, reason: str) -> None:
        """SIGKILL to the preloader's process group and cgroup; its workers
        have their own."""
        log.warning("app %s: killing preloader %d: %s", app.name, preloader.pid, reason)
        preloader.state = PreloaderState.STOPPING
        preloader.stop_deadline = None
        self.supervision.kill(preloader.pid)

    def sample_preloaders(self, now: int, preloaders: list[Preloader] | None = None) -> None:
        for preloader in self.pool.preloaders() if preloaders is None else preloaders:
            usage = sample_usage(preloader.pid, preloader.usage, (now - preloader.sampled_at) / 1000)
            if usage is not None:
                preloader.usage, preloader.sampled_at = usage, now

    # -- restarts --------------------------------------------------------------

    def begin_restart(self, app: App, reason: str) -> None:
        """Rolling: every serving worker is replaced, one at a time, each
        only once its replacement is ready (policy.plan_restart)."""
        for worker in app.starting_workers():
            self.kill(worker, "restarting")
        for preloader in app.preloaders.values():
            if preloader.is_starting():
                self.kill_preloader(app, preloader, "restarting")
        app.generation += 1
        app.restarts += 1
        app.restart_target = len(app.serving_workers())
        app.spawn_failures = 0
        app.failed_until = 0
        log.info("app %s: rolling restart of %d worker(s) (%s)", app.name, app.restart_target, reason)

    def abandon_restart(self, app: App) -> None:
        """The new code does not start: the old workers keep serving."""
        old = app.outdated_workers()
        for worker in old:
            worker.generation = app.generation
        log.error("app %s: rolling restart abandoned; %d old worker(s) keep serving", app.name, len(old))
        self.finish_restart(app, ok=False)

    def when_restarted(self, app: App, done: Callable[[dict[str, Any]], None]) -> None:
        """done is called once the app's restart has ended, or been abandoned."""
        self.restart_waiters.setdefault(app.name, []).append(done)

    def finish_restart(self, app: App, ok: bool) -> None:
        pids = sorted(w.pid for w in app.serving_workers())
        for done in self.restart_waiters.pop(app.name, []):
            done({"ok": ok, "app": app.name, "pids": pids,
                  **({} if ok else {"error": f"the new workers did not start: {app.last_error}"})})

    def check_restarts_finished(self) -> None:
        for name in list(self.restart_waiters):
            app = self.pool.apps.get(name)
            if app is None:
                for done in self.restart_waiters.pop(name):
                    done({"ok": False, "app": name, "error": "the app was removed"})
            elif not app.restarting() and not app.starting_workers():
                self.finish_restart(app, ok=True)

    def find_app(self, name: str) -> App | None:
        """By name, or by a path that resolves to an app's root."""
        app = self.pool.apps.get(name)
        if app is None and name.startswith("/"):
            resolved = os.path.realpath(name)
            app = next((a for a in self.pool.apps.values()
                        if os.path.realpath(a.config.app_root) == resolved), None)
        return app if app is not None and not app.removed else None

    def reopen_logs(self) -> None:
        logs.reopen()
        log.info("log file reopened")

    def check_restart_files(self, now: int) -> None:
        """tmp/restart.txt touched: a rolling restart. tmp/always_restart.txt
        present: every worker serves one request, then is replaced. Each app
        is looked at as often as its own agent_stat_throttle_rate allows."""
        for app in self.pool.apps.values():
            if app.removed or now < self.next_restart_checks.get(app.name, 0):
                continue
            self.next_restart_checks[app.name] = now + max(app.config.stat_throttle_rate_ms, TICK_MS)
            restart = self.look_at(app, "tmp/restart.txt")
            mtime = restart.st_mtime if restart is not None else None
            if policy.restart_file_touched(app, mtime):
                self.begin_restart(app, "tmp/restart.txt touched")
            app.restart_mtime = mtime
            app.always_restart = self.look_at(app, "tmp/always_restart.txt") is not None

    def look_at(self, app: App, name: str) -> os.stat_result | None:
        """stat() of a file in the app's root, None when it is not there.
        The app's owner controls that path (a symlink loop, a FUSE mount, a
        name too long), so any error means "not there": it is logged once
        per app, file and errno, not at every look."""
        try:
            found = os.stat(Path(app.config.app_root) / name)
        except OSError as e:
            if e.errno not in (errno.ENOENT, None) and (name, e.errno) not in app.stat_errors:
                app.stat_errors.add((name, e.errno))
                log.warning("app %s: cannot look at %s: %s (taken as absent)", app.name, name, e.strerror)
            return None
        app.stat_errors = {(n, code) for n, code in app.stat_errors if n != name}
        return found

    def clear_failure(self, app: App) -> None:
        if app.failure_shown:
            self.engine.clear_app_failure(app.id)
            app.failure_shown = False

    # -- stopping workers ----------------------------------------------------

    def detach_all(self, app: App, reason: str) -> None:
        for worker in list(app.workers.values()):
            self.detach(app, worker, reason)

    def detach(self, app: App, worker: Worker, reason: str, cause: str = "") -> None:
        if worker.is_starting():
            self.kill(worker, reason)
        elif worker.is_serving():
            self.engine.detach_worker(worker.pid)
            worker.state = WorkerState.DETACHING
            worker.detach_reason = reason
            if cause:
                app.replaced[cause] += 1
            log.info("app %s: detached worker %d (%s)", app.name, worker.pid, reason)

    def has_no_requests(self, worker: Worker) -> bool:
        """Asks the engine, not the last snapshot: a detached worker gets no
        new request, so once the engine counts none it is safe to stop."""
        stats = self.engine.worker_stats().get(worker.pid)
        if stats is not None:
            worker.sessions = stats.sessions
        return worker.sessions == 0

    def stop(self, worker: Worker) -> None:
        app = self.pool.apps[worker.app]
        worker.state = WorkerState.STOPPING
        worker.stop_deadline = monotonic_ms() + app.config.shutdown_timeout_ms
        self.signal(worker, signal.SIGTERM)

    def kill(self, worker: Worker, reason: str) -> None:
        log.warning("app %s: killing worker %d: %s", worker.app, worker.pid, reason)
        worker.state = WorkerState.STOPPING
        worker.stop_deadline = None
        self.signal(worker, signal.SIGKILL)

    def signal(self, worker: Worker, signum: int) -> None:
        """SIGTERM asks the worker alone (it may stop its own children), but
        a generic worker's whole process group (its pid is the shell that
        runs its command); SIGKILL takes its whole process group and cgroup."""
        if signum == signal.SIGKILL:
            self.supervision.kill(worker.pid)
            return
        if worker.port:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signum)
            return
        # A worker already gone is removed by reap_workers.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def reap_workers(self) -> None:
        while True:
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if exited is None or exited.si_pid == 0:
                return
            pid = exited.si_pid
            # Before the reap, while the zombie keeps its pid from reuse:
            # what the worker started dies with it.
            self.supervision.exited(pid)
            _, status = os.waitpid(pid, 0)
            self.worker_exited(pid, status)
            self.close_output(pid)

    def close_output(self, pid: int) -> None:
        """A reaped worker's output pipe is closed now, not at its end of
        file, which a process the worker started could hold off forever."""
        for fd, capture in list(self.captures.items()):
            if capture.pid == pid:
                capture.read()   # what the worker wrote last
                capture.flush()
                self.selector.unregister(fd)
                os.close(fd)
                del self.captures[fd]

    def worker_exited(self, pid: int, status: int) -> None:
        lifeline = self.lifelines.pop(pid, None)
        if lifeline is not None:
            os.close(lifeline)
        found = self.pool.find_worker(pid)
        if found is None:
            preloader = self.pool.find_preloader(pid)
            if preloader is not None:
                self.preloader_exited(*preloader, status)
            return
        app, worker = found
        description = describe_exit(os.waitstatus_to_exitcode(status))
        if worker.is_starting():
            self.start_ended(app, worker, os.waitstatus_to_exitcode(status))
        elif worker.is_stopping():
            log.info("app %s: worker %d stopped (%s)", app.name, pid, description)
        else:
            log.warning("app %s: worker %d %s unexpectedly", app.name, pid, description)
            app.replaced["crash"] += 1
        if worker.in_engine():
            self.engine.remove_worker(pid)
        self.forget_probe(pid)
        self.ended_output.pop(pid, None)
        for fd, (handshake_pid, _) in list(self.handshakes.items()):
            if handshake_pid == pid:
                self.forget_handshake(fd)
        del app.workers[pid]
        unlink_quietly(worker.socket_path)
        self.drop_if_removed(app)

    def drop_if_removed(self, app: App) -> None:
        if app.removed and not app.workers and not app.preloaders and not self.stopping and \
                app.name in self.pool.apps:
            self.engine.remove_app(app.id)
            self.notifying.pop(app.id, None)
            del self.pool.apps[app.name]
            self.next_restart_checks.pop(app.name, None)

    # -- the policy ----------------------------------------------------------

    def reconcile(self) -> None:
        now = monotonic_ms()
        fresh = now >= self.next_tick
        if fresh:
            self.refresh_stats()
            self.check_restart_files(now)
            for tick in self.tickers:
                self.guard.run("a ticker", tick)
            self.next_tick = now + TICK_MS
        if now >= self.next_memory_sample:
            self.sample_memory([w for w in self.pool.workers() if w.is_serving()])
            self.sample_preloaders(now)
            self.next_memory_sample = now + MEMORY_SAMPLE_INTERVAL_MS
        for _ in range(3):  # a detach makes room that a spawn may use at once
            actions = policy.plan(self.pool, now)
            if not fresh and any(isinstance(a, policy.Spawn) for a in actions):
                # Queue lengths from events may be stale: check before forking.
                self.refresh_stats()
                fresh = True
                actions = policy.plan(self.pool, now)
            for action in actions:
                self.guard.run(f"applying {action}", self.apply, action)
            if not any(isinstance(a, policy.Detach) for a in actions):
                break
        self.check_restarts_finished()
        self.choose_notifications()

    def choose_notifications(self) -> None:
        """Hear of queued requests only for apps that could start a worker:
        at its bound an app's queue is the engine's business alone, and an
        event per request would wake this loop for nothing."""
        room = self.pool.room()
        for app in self.pool.apps.values():
            wanted = NOTIFY_QUEUED if policy.may_grow(app, room) else 0
            if policy.limits_each_request(app):
                wanted |= NOTIFY_IDLE | NOTIFY_HOLD
            if self.notifying.get(app.id) != wanted:
                self.engine.notify_app(app.id, wanted)
                self.notifying[app.id] = wanted

    def apply(self, action: policy.Action) -> None:
        if isinstance(action, policy.Spawn):
            self.spawn(self.pool.apps[action.app])
        elif isinstance(action, policy.Detach):
            found = self.pool.find_worker(action.pid)
            if found is not None:
                self.detach(*found, action.reason, action.cause)
        elif isinstance(action, policy.ClearFailure):
            self.clear_failure(self.pool.apps[action.app])
        elif isinstance(action, policy.Stop):
            found = self.pool.find_worker(action.pid)
            if found is not None and self.has_no_requests(found[1]):
                self.stop(found[1])
        elif isinstance(action, policy.StartPreloader):
            self.start_preloader(self.pool.apps[action.app])
        elif isinstance(action, policy.StopPreloader | policy.KillPreloader):
            found_preloader = self.pool.find_preloader(action.pid)
            if found_preloader is None:
                return
            app, preloader = found_preloader
            if isinstance(action, policy.StopPreloader):
                self.stop_preloader(app, preloader, action.reason)
                return
            if action.failed_start:
                self.spawn_failed(app, f"the preloader {action.reason}", action.reason)
            self.kill_preloader(app, preloader, action.reason)
        elif isinstance(action, policy.Kill):
            found = self.pool.find_worker(action.pid)
            if found is not None:
                if found[1].is_starting():
                    self.spawn_failed(found[0], f"the worker {action.reason}", action.reason)
                self.kill(found[1], action.reason)


def sample_usage(pid: int, previous: ProcessUsage | None, elapsed: float, tree: bool = False) -> ProcessUsage | None:
    """A worker's memory and CPU. Its private memory is its unique set size
    (what the kernel gets back when it exits) plus its swapped-out pages.
    tree (a generic worker, whose pid is the shell running its command):
    the sums over the process and all its descendants."""
    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)] if tree else [process]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    rss = pss = uss = swap = 0
    cpu = 0.0
    for i, each in enumerate(processes):
        try:
            with each.oneshot():
                memory = each.memory_full_info()
                times = each.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if i == 0:
                return None
            continue   # a descendant that just ended
        rss, pss, uss, swap = rss + memory.rss, pss + memory.pss, uss + memory.uss, swap + memory.swap
        cpu += times.user + times.system
    percent = 100.0 * (cpu - previous.cpu_seconds) / elapsed if previous and elapsed > 0 else 0.0
    return ProcessUsage(rss=rss, pss=pss, uss=uss, swap=swap, cpu_seconds=cpu, cpu_percent=max(0.0, percent))


def listens_in_tree(pid: int, port: int) -> bool:
    """A process of the worker's tree (pid and its descendants) listens on
    127.0.0.1:port (or on every address at port)."""
    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    for each in processes:
        try:
            connections = each.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                return True
    return False


def is_child_of(pid: int, parent: int) -> bool:
    """pid is a live (or zombie) child of parent, by /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    # The name (field 2) may hold spaces and parentheses: the fields after it
    # start after the last ")": state, then the parent's pid.
    fields = stat[stat.rfind(b")") + 2:].split()
    return len(fields) > 1 and fields[1] == str(parent).encode()


def restart_file_mtime(config: AppConfig) -> float | None:
    try:
        return (Path(config.app_root) / "tmp" / "restart.txt").stat().st_mtime
    except OSError:
        return None


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, e.strerror)
