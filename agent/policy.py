"""The pool policy as a reconciler.

plan() looks at the pool as it is and returns the actions that bring it to
what the rules want. It performs no I/O and reads no clock of its own, so
each rule is a plain function that tests can drive with hand-made pools.
The core applies the actions (agent/core.py). docs/policy.md states each
rule in a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.pool import App, Pool, Worker

# Back-off after consecutive start failures: 1 s, 2 s, 4 s, ... at most 30 s.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class Spawn:
    app: str


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


Action = Spawn | Stop | Kill | ClearFailure


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next start after `failures` failures in a row."""
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)))


def app_capacity(app: App) -> int:
    """How many live workers the app may have by its own bound."""
    bound = app.config.max_instances
    return bound if bound > 0 else 1 << 30


def may_grow(app: App, room: int) -> bool:
    """The app could get another worker if requests waited: below its own
    bound, with room in the pool, and still configured."""
    return not app.removed and room > 0 and len(app.live_workers()) < app_capacity(app)


def wants_another_worker(app: App, now: float) -> bool:
    """A request waits, or the app is below its minimum; one start at a time
    per app, none while it backs off after failures or is being removed."""
    if app.removed or app.in_backoff(now) or app.failure_shown or app.starting_workers():
        return False
    live = len(app.live_workers())
    if live >= app_capacity(app):
        return False
    below_minimum = app.activated and app.spawn_failures == 0 and live < app.config.min_instances
    return below_minimum or app.queue_length > 0


def plan_spawns(pool: Pool, now: float) -> list[Action]:
    room = pool.max_pool_size - pool.live_count()
    actions: list[Action] = []
    for app in pool.apps.values():
        if room <= 0:
            break
        if wants_another_worker(app, now):
            actions.append(Spawn(app.name))
            room -= 1
    return actions


def plan_failures(pool: Pool, now: float) -> list[Action]:
    return [ClearFailure(app.name) for app in pool.apps.values()
            if app.failure_shown and not app.in_backoff(now)]


def worker_deadline_actions(app: App, worker: Worker, now: float) -> list[Action]:
    if worker.is_starting() and now - worker.spawned_at > app.config.start_timeout:
        return [Kill(worker.pid, f"did not finish starting within {app.config.start_timeout:g} s")]
    if worker.is_detaching() and worker.is_idle():
        return [Stop(worker.pid)]
    if worker.is_stopping() and worker.stop_deadline is not None and now > worker.stop_deadline:
        return [Kill(worker.pid, f"did not exit within {app.config.shutdown_timeout:g} s of SIGTERM")]
    return []


def plan_deadlines(pool: Pool, now: float) -> list[Action]:
    return [action for app in pool.apps.values() for worker in app.workers.values()
            for action in worker_deadline_actions(app, worker, now)]


def plan(pool: Pool, now: float) -> list[Action]:
    """Every action the pool needs now, in the order they should happen."""
    return plan_failures(pool, now) + plan_deadlines(pool, now) + plan_spawns(pool, now)
