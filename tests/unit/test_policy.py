"""The pool policy's rules, on hand-made pools (no processes)."""

from __future__ import annotations

from agent import policy
from agent.config import AppConfig
from agent.pool import App, Pool, Worker, WorkerState

NOW = 1000.0


def make_pool(max_pool_size: int = 6, **apps: AppConfig) -> Pool:
    pool = Pool(max_pool_size=max_pool_size)
    for name, config in apps.items():
        pool.apps[name] = App(id=pool.new_app_id(), config=config)
    return pool


def config(name: str, **kwargs: object) -> AppConfig:
    return AppConfig(name=name, app_root=f"/srv/{name}", **kwargs)  # type: ignore[arg-type]


def add_worker(app: App, pid: int, state: WorkerState = WorkerState.SERVING, sessions: int = 0,
               spawned_at: float = NOW - 5) -> Worker:
    worker = Worker(pid=pid, app=app.name, socket_path=f"/tmp/{pid}.sock", spawned_at=spawned_at,
                    state=state, sessions=sessions)
    app.workers[pid] = worker
    return worker


def test_an_app_nobody_asked_for_gets_no_worker() -> None:
    pool = make_pool(a=config("a", min_instances=2))
    assert policy.plan(pool, NOW) == []


def test_a_waiting_request_starts_a_worker() -> None:
    pool = make_pool(a=config("a"))
    pool.apps["a"].queue_length = 1
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]


def test_one_start_at_a_time_per_app() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.queue_length = 5
    add_worker(app, 10, WorkerState.STARTING)
    assert policy.plan(pool, NOW) == []


def test_an_activated_app_is_kept_at_its_minimum() -> None:
    pool = make_pool(a=config("a", min_instances=3))
    app = pool.apps["a"]
    app.activated = True
    add_worker(app, 10)
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]
    add_worker(app, 11)
    add_worker(app, 12)
    assert policy.plan(pool, NOW) == []


def test_max_instances_bounds_an_app() -> None:
    pool = make_pool(a=config("a", max_instances=2))
    app = pool.apps["a"]
    app.queue_length = 10
    add_worker(app, 10)
    add_worker(app, 11)
    assert policy.plan(pool, NOW) == []


def test_max_pool_size_bounds_every_app_together() -> None:
    pool = make_pool(2, a=config("a"), b=config("b"))
    add_worker(pool.apps["a"], 10)
    pool.apps["a"].queue_length = 3
    pool.apps["b"].queue_length = 3
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]
    add_worker(pool.apps["b"], 11)
    assert policy.plan(pool, NOW) == []


def test_detaching_workers_do_not_count_toward_the_bounds() -> None:
    pool = make_pool(1, a=config("a"))
    app = pool.apps["a"]
    add_worker(app, 10, WorkerState.DETACHING, sessions=1)
    app.queue_length = 1
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]


def test_no_start_while_an_app_backs_off() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.queue_length = 1
    app.spawn_failures = 1
    app.failed_until = NOW + 1
    assert policy.plan(pool, NOW) == []


def test_the_error_page_is_cleared_when_the_back_off_ends() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.failure_shown = True
    app.failed_until = NOW + 1
    assert policy.plan(pool, NOW) == []
    assert policy.plan(pool, NOW + 1.5) == [policy.ClearFailure("a")]


def test_back_off_doubles_up_to_a_bound() -> None:
    delays = [policy.backoff_delay(n) for n in range(0, 9)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_failing_app_is_not_restarted_for_its_minimum() -> None:
    pool = make_pool(a=config("a", min_instances=2))
    app = pool.apps["a"]
    app.activated = True
    app.spawn_failures = 2
    assert policy.plan(pool, NOW) == []
    app.queue_length = 1
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]


def test_an_idle_detached_worker_is_stopped_and_a_busy_one_is_not() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    add_worker(app, 10, WorkerState.DETACHING, sessions=0)
    add_worker(app, 11, WorkerState.DETACHING, sessions=1)
    assert policy.plan(pool, NOW) == [policy.Stop(10)]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_shutdown_timeout() -> None:
    pool = make_pool(a=config("a", shutdown_timeout=5.0))
    worker = add_worker(pool.apps["a"], 10, WorkerState.STOPPING)
    worker.stop_deadline = NOW + 5
    assert policy.plan(pool, NOW) == []
    assert [type(a) for a in policy.plan(pool, NOW + 6)] == [policy.Kill]


def test_a_start_that_takes_too_long_is_killed() -> None:
    pool = make_pool(a=config("a", start_timeout=60.0))
    add_worker(pool.apps["a"], 10, WorkerState.STARTING, spawned_at=NOW - 61)
    (action,) = policy.plan(pool, NOW)
    assert isinstance(action, policy.Kill) and action.pid == 10
    assert "60 s" in action.reason


def test_a_removed_app_gets_no_new_worker() -> None:
    pool = make_pool(a=config("a"))
    pool.apps["a"].queue_length = 1
    pool.apps["a"].removed = True
    assert policy.plan(pool, NOW) == []
