"""The pool policy as a reconciler.

plan() looks at the pool as it is and returns the actions that bring it to
what the rules want. It performs no I/O and reads no clock of its own, so
each rule is a plain function that tests can drive with hand-made pools.
The core applies the actions (agent/core/loop.py). docs/policy.md states each
rule in a sentence.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from agent.clock import seconds_text
from agent.core.config import AppConfig
from agent.core.pool import App, Pool, Preloader, Worker

# Back-off after consecutive start failures: 1 s, 2 s, 4 s, ... at most 30 s.
BACKOFF_FIRST_MS = 1000
BACKOFF_MAX_MS = 30_000

# A worker killed from outside while it starts is replaced at once; only
# after this many such kills in a row (no worker ready in between) are the
# replacements spaced, so that an app that kills itself cannot make the core
# fork without pause.
OUTSIDE_KILLS_FREE = 3
OUTSIDE_KILL_SPACING_MS = 250

# A starting worker that closed its handshake pipe without a whole line is
# given this long for its exit status to arrive, then killed as a failure.
HANDSHAKE_CLOSED_GRACE_MS = 1000

# Signals a process's own code brings on itself (faults, abort(), its own
# resource limits, a write to a closed pipe, its own alarm): a worker ended
# by one before its handshake failed to start. Any other signal (SIGKILL
# from the OOM killer or an operator, SIGTERM, SIGINT, ...) came from
# outside.
APP_CAUSED_SIGNALS = frozenset({
    signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS,
    signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGPIPE, signal.SIGALRM,
})


@dataclass(frozen=True)
class Spawn:
    app: str


@dataclass(frozen=True)
class Detach:
    """The engine stops giving the worker requests; it is stopped once idle.
    cause names the rule, for the restart counters (docs/status-api.md)."""

    pid: int
    reason: str
    cause: str = ""


@dataclass(frozen=True)
class Stop:
    """SIGTERM: the worker finishes its request and exits."""

    pid: int


@dataclass(frozen=True)
class Kill:
    """SIGKILL: the worker overstayed a deadline."""

    pid: int
    reason: str


@dataclass(frozen=True)
class ClearFailure:
    """The back-off is over: requests queue again and may start a worker."""

    app: str


@dataclass(frozen=True)
class StartPreloader:
    """A new preloader for the app (smart spawning), in place of one lost."""

    app: str


@dataclass(frozen=True)
class StopPreloader:
    """SIGTERM to a preloader; the workers it forked keep serving."""

    pid: int
    reason: str


@dataclass(frozen=True)
class KillPreloader:
    """SIGKILL to a preloader; failed_start: it counts as a failed start."""

    pid: int
    reason: str
    failed_start: bool = False


Action = Spawn | Detach | Stop | Kill | ClearFailure | StartPreloader | StopPreloader | KillPreloader


def backoff_delay_ms(failures: int) -> int:
    """Milliseconds to wait before the next start after `failures` failures in a row."""
    if failures <= 0:
        return 0
    return min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS << (failures - 1))


def app_capacity(app: App) -> int:
    """How many live workers the app may have by its own bound."""
    bound = app.config.max_instances
    return bound if bound > 0 else 1 << 30


def request_budget(app: App, draw: float) -> int:
    """Requests a new worker may serve before it is replaced (0: no limit).
    Each worker's budget is up to 10 % above agent_max_requests, drawn at
    random, so that workers started together do not all recycle together."""
    limit = app.config.max_requests
    return limit + int(limit * 0.1 * draw) if limit > 0 else 0


def limits_each_request(app: App) -> bool:
    """The app's workers are checked after every request they serve."""
    return bool(app.config.memory_limit_mb or app.config.max_requests or app.always_restart)


def may_grow(app: App, room: int) -> bool:
    """The app could get another worker if requests waited: below its own
    bound, with room in the pool, and still configured."""
    return not app.removed and room > 0 and len(app.live_workers()) < app_capacity(app)


def may_start(app: App, now: int) -> bool:
    """One start at a time per app, none while it backs off after failures,
    shows its error page, waits out the spacing after outside kills, or is
    being removed."""
    return not (app.removed or app.in_backoff(now) or app.failure_shown or now < app.start_not_before
                or app.starting_workers())


# -- growing ----------------------------------------------------------------


def wants_another_worker(app: App, now: int) -> bool:
    """A request waits, or the app is below its minimum."""
    if not may_start(app, now) or len(app.live_workers()) >= app_capacity(app):
        return False
    below_minimum = app.activated and app.spawn_failures == 0 and len(app.live_workers()) < app.config.min_instances
    return below_minimum or app.queue_length > 0


def spawn_priority(app: App) -> int:
    """Who gets the pool's room first: an app whose requests wait with no
    worker at all, then one whose requests wait, then one below its minimum."""
    if app.queue_length > 0:
        return 0 if not app.live_workers() else 1
    return 2


def plan_spawns(pool: Pool, now: int) -> list[Action]:
    room = pool.room()
    actions: list[Action] = []
    for app in sorted(pool.apps.values(), key=spawn_priority):
        if room > 0 and not app.restarting() and wants_another_worker(app, now):
            actions.append(Spawn(app.name))
            room -= 1
    return actions


def plan_eviction(pool: Pool, now: int) -> list[Action]:
    """A full pool gives way to an app whose requests wait with no worker at
    all: the least recently used idle worker of another app is detached."""
    if pool.room() > 0:
        return []
    for app in pool.apps.values():
        if app.queue_length > 0 and not app.live_workers() and may_start(app, now):
            idle = [w for other in pool.apps.values() if other is not app
                    for w in other.serving_workers() if w.is_idle()]
            if idle:
                victim = min(idle, key=lambda w: w.last_used)
                return [Detach(victim.pid, f"the pool is full and {app.name} has no worker", "pool_full")]
    return []


# -- shrinking and recycling --------------------------------------------------


def recycle_reason(app: App, worker: Worker) -> tuple[str, str] | None:
    """Why a serving worker should be replaced, if it should: (cause, reason)."""
    if worker.over_memory_limit(app.config.memory_limit_mb):
        assert worker.memory is not None
        return "memory_limit", f"memory limit: {worker.memory >> 20} MB > {app.config.memory_limit_mb} MB"
    if worker.served_enough():
        return "max_requests", f"served {worker.processed} requests (limit {worker.max_requests})"
    if app.always_restart and worker.processed > 0:
        return "always_restart", "tmp/always_restart.txt: one request per worker"
    return None


def recycle(app: App, worker: Worker) -> Detach | None:
    """The detach that replaces a serving worker, if a rule wants it gone."""
    found = recycle_reason(app, worker) if worker.is_serving() else None
    return None if found is None else Detach(worker.pid, found[1], found[0])


def samples_after_request(app: App) -> bool:
    """A worker's memory is read after each request only when the app has a
    memory limit; otherwise the once-a-second sample is enough."""
    return bool(app.config.memory_limit_mb)


def after_request(app: App, worker: Worker) -> Detach | None:
    """A worker the engine holds after a request (limits_each_request): the
    detach that replaces it, or None to release it for the next request."""
    return recycle(app, worker)


def plan_recycling(pool: Pool, now: int) -> list[Action]:
    return [action for app in pool.apps.values() for worker in app.serving_workers()
            if (action := recycle(app, worker)) is not None]


def plan_idle(pool: Pool, now: int) -> list[Action]:
    """Workers idle longer than the pool idle time are stopped, least
    recently used first, down to the app's minimum."""
    if pool.pool_idle_time_ms <= 0:
        return []
    actions: list[Action] = []
    for app in pool.apps.values():
        spare = len(app.live_workers()) - app.config.min_instances
        idle = [w for w in app.serving_workers() if w.idle_for(now) > pool.pool_idle_time_ms]
        for worker in sorted(idle, key=lambda w: w.last_used)[:max(0, spare)]:
            actions.append(Detach(worker.pid, f"idle for {worker.idle_for(now) // 1000} s", "idle"))
    return actions


# -- restarting ---------------------------------------------------------------


def plan_restart(app: App, now: int) -> list[Action]:
    """A rolling restart: a new worker is ready before an old one is retired,
    one at a time. The pool may hold one worker more than its bounds while
    it happens."""
    old = app.outdated_workers()
    if not old:
        return []
    current = [w for w in app.serving_workers() if w.generation == app.generation]
    target = max(app.restart_target, app.config.min_instances, 1)
    if len(old) + len(current) > target:
        return [Detach(old[0].pid, "rolling restart", "rolling_restart")]
    if may_start(app, now):
        return [Spawn(app.name)]
    return []


def plan_restarts(pool: Pool, now: int) -> list[Action]:
    return [action for app in pool.apps.values() for action in plan_restart(app, now)]


# -- failures and deadlines -----------------------------------------------------


StartFailure = Literal["abandon_restart", "show_error", "wait", "retry"]


def after_start_failure(app: App, delay_ms: int | None = None) -> StartFailure:
    """A worker did not start (app.spawn_failures counts it; the next try
    is due in delay_ms). During a rolling restart the new code is abandoned
    and the old workers keep serving. An app with no serving worker lets its
    requests wait for the retry when waits_for_retry allows, and otherwise
    shows its error page until the back-off ends. An app with serving
    workers serves on, and the back-off delays the next try."""
    if app.restarting():
        return "abandon_restart"
    if app.serving_workers():
        return "retry"
    delay = backoff_delay_ms(app.spawn_failures) if delay_ms is None else delay_ms
    return "wait" if waits_for_retry(app, delay) else "show_error"


def waits_for_retry(app: App, delay_ms: int) -> bool:
    """Requests wait for the next start rather than get the error page at
    once: after the first failure in a row only (a second one shows the
    page), and only when the retry is due before agent_max_request_queue_time
    would turn them away (0: no limit)."""
    limit = app.config.max_request_queue_time_ms
    return app.spawn_failures == 1 and (limit == 0 or delay_ms < limit)


def start_failed_by_app(exitcode: int) -> bool:
    """A worker ended before its handshake, with exitcode as
    os.waitstatus_to_exitcode gives it (-N: killed by signal N). An exit
    status, or a signal the app's own code raises, is the app's failed
    start; a signal from outside is not (docs/policy.md rule 18)."""
    return exitcode >= 0 or -exitcode in APP_CAUSED_SIGNALS


def outside_kill_spacing_ms(kills_in_a_row: int) -> int:
    """How long after the latest outside kill of a starting worker the
    next start waits: nothing for the first few in a row, then a little."""
    return 0 if kills_in_a_row <= OUTSIDE_KILLS_FREE else OUTSIDE_KILL_SPACING_MS


ConfigChange = Literal["replace", "update", "same"]


def config_change(app: App, config: AppConfig) -> ConfigChange:
    """New settings for a configured app: when what a worker is made of
    changed (or the app comes back after removal) its workers are replaced;
    when only limits changed they apply to the running workers."""
    if app.config.process_settings() != config.process_settings() or app.removed:
        return "replace"
    return "update" if app.config != config else "same"


def restart_file_touched(app: App, mtime: float | None) -> bool:
    """tmp/restart.txt appeared or changed since the last look."""
    return mtime is not None and mtime != app.restart_mtime


def plan_failures(pool: Pool, now: int) -> list[Action]:
    return [ClearFailure(app.name) for app in pool.apps.values()
            if app.failure_shown and not app.in_backoff(now)]


def worker_deadline_actions(app: App, worker: Worker, now: int) -> list[Action]:
    if worker.is_starting() and now - worker.spawned_at > app.config.start_timeout_ms:
        return [Kill(worker.pid, f"did not finish starting within {seconds_text(app.config.start_timeout_ms)}")]
    closed = worker.handshake_closed_at
    if worker.is_starting() and closed is not None and now - closed > HANDSHAKE_CLOSED_GRACE_MS:
        return [Kill(worker.pid, "closed its handshake pipe without a whole handshake line")]
    if worker.is_detaching() and worker.is_idle():
        return [Stop(worker.pid)]
    if worker.is_stopping() and worker.stop_deadline is not None and now > worker.stop_deadline:
        return [Kill(worker.pid, f"did not exit within {seconds_text(app.config.shutdown_timeout_ms)}")]
    return []


def plan_deadlines(pool: Pool, now: int) -> list[Action]:
    return [action for app in pool.apps.values() for worker in app.workers.values()
            for action in worker_deadline_actions(app, worker, now)]


# -- smart spawning: preloaders ----------------------------------------------------


SpawnStep = Literal["fork", "start_preloader", "wait", "direct"]


def uses_preloader(app: App) -> bool:
    """A generic app's command is started for each worker: there is
    nothing to preload."""
    return app.config.spawn_method == "smart" and app.config.app_type != "generic"


def spawn_step(app: App) -> SpawnStep:
    """How a worker the app needs is made: directly; forked by its ready
    preloader; or, smart with no preloader of its current code yet, after
    one is started (the spawn waits for it: the workers serving go on)."""
    if not uses_preloader(app):
        return "direct"
    preloader = app.current_preloader()
    if preloader is None:
        return "start_preloader"
    return "fork" if preloader.is_ready() else "wait"


def preloader_deadline_actions(app: App, preloader: Preloader, now: int) -> list[Action]:
    config = app.config
    if preloader.is_starting():
        if now - preloader.spawned_at > config.start_timeout_ms:
            return [KillPreloader(preloader.pid, f"did not finish loading the app within "
                                  f"{seconds_text(config.start_timeout_ms)}", failed_start=True)]
        closed = preloader.handshake_closed_at
        if closed is not None and now - closed > HANDSHAKE_CLOSED_GRACE_MS:
            return [KillPreloader(preloader.pid, "closed its handshake pipe without a whole handshake line",
                                  failed_start=True)]
    elif preloader.is_ready():
        if preloader.generation < app.generation or app.removed or not uses_preloader(app):
            return [StopPreloader(preloader.pid, "the app's code or settings changed" if not app.removed
                                  else "app removed")]
        limit = config.max_preloader_idle_time_ms
        if limit > 0 and preloader.idle_for(now) >= limit and not app.starting_workers():
            return [StopPreloader(preloader.pid, f"no worker forked for {seconds_text(limit)}")]
    elif preloader.stop_deadline is not None and now > preloader.stop_deadline:
        return [KillPreloader(preloader.pid, f"did not exit within {seconds_text(config.shutdown_timeout_ms)}")]
    return []


def wants_preloader_back(app: App, now: int) -> bool:
    """A preloader that died (not one stopped as idle) is started again at
    once while the app has workers, so that the next spawn finds it ready;
    the spacing and back-off of starts apply."""
    return (uses_preloader(app) and app.preloader_wanted and app.current_preloader() is None
            and bool(app.live_workers()) and may_start(app, now))


def plan_preloaders(pool: Pool, now: int) -> list[Action]:
    actions: list[Action] = [action for app in pool.apps.values() for preloader in app.preloaders.values()
                             for action in preloader_deadline_actions(app, preloader, now)]
    actions += [StartPreloader(app.name) for app in pool.apps.values() if wants_preloader_back(app, now)]
    return actions


def plan(pool: Pool, now: int) -> list[Action]:
    """Every action the pool needs now, in the order they should happen:
    stops and detaches first, so that the spawns see the room they make."""
    return (plan_failures(pool, now) + plan_deadlines(pool, now) + plan_preloaders(pool, now)
            + plan_recycling(pool, now) + plan_idle(pool, now) + plan_restarts(pool, now)
            + plan_eviction(pool, now) + plan_spawns(pool, now))
