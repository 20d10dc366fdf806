"""The pool policy's rules, on hand-made pools (no processes)."""

from __future__ import annotations

import signal

from agent.core import policy
from agent.core.config import AppConfig
from agent.core.pool import App, Pool, Worker, WorkerState

SECOND = 1000          # the pool's clock and durations are integer milliseconds
NOW = 1000 * SECOND


def make_pool(max_pool_size: int = 6, **apps: AppConfig) -> Pool:
    pool = Pool(max_pool_size=max_pool_size)
    for name, config in apps.items():
        pool.apps[name] = App(id=pool.new_app_id(), config=config)
    return pool


def config(name: str, **kwargs: object) -> AppConfig:
    return AppConfig(name=name, app_root=f"/srv/{name}", **kwargs)  # type: ignore[arg-type]


def add_worker(app: App, pid: int, state: WorkerState = WorkerState.SERVING, sessions: int = 0,
               spawned_at: int = NOW - 5 * SECOND, last_used: int = NOW - 1 * SECOND, **kwargs: object) -> Worker:
    worker = Worker(pid=pid, app=app.name, socket_path=f"/tmp/{pid}.sock", spawned_at=spawned_at,
                    state=state, sessions=sessions, last_used=last_used,
                    generation=app.generation, **kwargs)  # type: ignore[arg-type]
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
    assert policy.plan(pool, NOW) == [policy.Spawn("b")]  # b has no worker at all: it goes first
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
    app.failed_until = NOW + 1 * SECOND
    assert policy.plan(pool, NOW) == []


def test_the_error_page_is_cleared_when_the_back_off_ends() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.failure_shown = True
    app.failed_until = NOW + 1 * SECOND
    assert policy.plan(pool, NOW) == []
    assert policy.plan(pool, NOW + 1500) == [policy.ClearFailure("a")]


def test_back_off_doubles_up_to_a_bound() -> None:
    delays = [policy.backoff_delay_ms(n) for n in range(0, 9)]
    assert delays == [0, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]


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
    pool = make_pool(a=config("a", shutdown_timeout_ms=5 * SECOND))
    worker = add_worker(pool.apps["a"], 10, WorkerState.STOPPING)
    worker.stop_deadline = NOW + 5 * SECOND
    assert policy.plan(pool, NOW) == []
    assert [type(a) for a in policy.plan(pool, NOW + 6 * SECOND)] == [policy.Kill]


def test_a_start_that_takes_too_long_is_killed() -> None:
    pool = make_pool(a=config("a", start_timeout_ms=60 * SECOND))
    add_worker(pool.apps["a"], 10, WorkerState.STARTING, spawned_at=NOW - 61 * SECOND)
    (action,) = policy.plan(pool, NOW)
    assert isinstance(action, policy.Kill) and action.pid == 10
    assert "60 s" in action.reason


def test_a_removed_app_gets_no_new_worker() -> None:
    pool = make_pool(a=config("a"))
    pool.apps["a"].queue_length = 1
    pool.apps["a"].removed = True
    assert policy.plan(pool, NOW) == []


# -- recycling ------------------------------------------------------------------


def test_a_worker_over_its_memory_limit_is_detached() -> None:
    pool = make_pool(a=config("a", memory_limit_mb=100))
    app = pool.apps["a"]
    add_worker(app, 10, memory=99 << 20)
    add_worker(app, 11, memory=101 << 20)
    assert policy.plan(pool, NOW) == [policy.Detach(11, "memory limit: 101 MB > 100 MB", "memory_limit")]


def test_a_detached_worker_is_replaced_to_keep_the_minimum() -> None:
    pool = make_pool(a=config("a", min_instances=1, memory_limit_mb=100))
    app = pool.apps["a"]
    app.activated = True
    add_worker(app, 10, WorkerState.DETACHING, sessions=1)
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]


def test_a_worker_that_served_its_budget_is_detached() -> None:
    pool = make_pool(a=config("a", max_requests=100))
    app = pool.apps["a"]
    add_worker(app, 10, processed=99, max_requests=105)
    add_worker(app, 11, processed=105, max_requests=105)
    assert [a.pid for a in policy.plan(pool, NOW) if isinstance(a, policy.Detach)] == [11]


def test_request_budgets_spread_over_ten_percent() -> None:
    app = App(id=1, config=config("a", max_requests=1000))
    budgets = {policy.request_budget(app, draw / 10) for draw in range(10)}
    assert min(budgets) == 1000 and max(budgets) == 1090 and len(budgets) == 10
    assert policy.request_budget(App(id=2, config=config("b")), 0.5) == 0


def test_always_restart_recycles_after_one_request() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.always_restart = True
    add_worker(app, 10, processed=0)
    add_worker(app, 11, processed=1)
    assert [a.pid for a in policy.plan(pool, NOW) if isinstance(a, policy.Detach)] == [11]


def test_idle_workers_stop_down_to_the_minimum_least_recently_used_first() -> None:
    pool = make_pool(a=config("a", min_instances=1))
    pool.pool_idle_time_ms = 300 * SECOND
    app = pool.apps["a"]
    add_worker(app, 10, last_used=NOW - 400 * SECOND)
    add_worker(app, 11, last_used=NOW - 500 * SECOND)
    add_worker(app, 12, last_used=NOW - 10 * SECOND)
    detached = [a.pid for a in policy.plan(pool, NOW) if isinstance(a, policy.Detach)]
    assert detached == [11, 10]
    add_worker(app, 13, last_used=NOW - 10 * SECOND, sessions=1)
    pool.pool_idle_time_ms = 0
    assert policy.plan(pool, NOW) == []


def test_idle_workers_keep_the_minimum() -> None:
    pool = make_pool(a=config("a", min_instances=2))
    app = pool.apps["a"]
    add_worker(app, 10, last_used=NOW - 4000 * SECOND)
    add_worker(app, 11, last_used=NOW - 5000 * SECOND)
    assert policy.plan(pool, NOW) == []


def test_a_full_pool_gives_way_to_an_app_with_waiting_requests() -> None:
    pool = make_pool(2, a=config("a"), b=config("b"))
    add_worker(pool.apps["a"], 10, last_used=NOW - 5 * SECOND)
    add_worker(pool.apps["a"], 11, last_used=NOW - 50 * SECOND)
    pool.apps["b"].queue_length = 1
    assert policy.plan(pool, NOW) == [policy.Detach(11, "the pool is full and b has no worker", "pool_full")]


def test_a_busy_pool_does_not_give_way() -> None:
    pool = make_pool(1, a=config("a"), b=config("b"))
    add_worker(pool.apps["a"], 10, sessions=1)
    pool.apps["b"].queue_length = 1
    assert policy.plan(pool, NOW) == []


# -- rolling restarts -------------------------------------------------------------


def restart(app: App) -> None:
    app.generation += 1
    app.restart_target = len(app.serving_workers())


def test_a_rolling_restart_starts_a_new_worker_before_retiring_an_old_one() -> None:
    pool = make_pool(a=config("a", max_instances=2))
    app = pool.apps["a"]
    add_worker(app, 10, spawned_at=NOW - 20 * SECOND)
    add_worker(app, 11, spawned_at=NOW - 10 * SECOND)
    restart(app)
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]   # beyond max_instances by one
    add_worker(app, 20, WorkerState.STARTING)
    assert policy.plan(pool, NOW) == []
    app.workers[20].state = WorkerState.SERVING
    assert policy.plan(pool, NOW) == [policy.Detach(10, "rolling restart", "rolling_restart")]
    app.workers[10].state = WorkerState.DETACHING
    app.workers[10].sessions = 1
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]
    add_worker(app, 21)
    assert policy.plan(pool, NOW) == [policy.Detach(11, "rolling restart", "rolling_restart")]
    app.workers[11].state = WorkerState.DETACHING
    app.workers[11].sessions = 1
    assert policy.plan(pool, NOW) == []
    assert not app.restarting()


def test_a_restart_waits_out_a_back_off() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    add_worker(app, 10)
    restart(app)
    app.failed_until = NOW + 5 * SECOND
    assert policy.plan(pool, NOW) == []


def test_room_made_by_an_eviction_goes_to_the_app_that_waits() -> None:
    pool = make_pool(1, a=config("a"), b=config("b"))
    a = pool.apps["a"]
    a.activated = True          # below its minimum once its worker goes
    add_worker(a, 10, WorkerState.DETACHING)
    pool.apps["b"].queue_length = 1
    assert policy.plan(pool, NOW) == [policy.Stop(10), policy.Spawn("b")]


def test_after_a_request_a_worker_is_released_or_replaced() -> None:
    app = App(id=1, config=config("a", max_requests=100, memory_limit_mb=100))
    assert policy.samples_after_request(app)
    assert not policy.samples_after_request(App(id=2, config=config("b", max_requests=100)))
    assert policy.after_request(app, add_worker(app, 10, processed=99, max_requests=105)) is None
    spent = add_worker(app, 11, processed=105, max_requests=105)
    assert policy.after_request(app, spent) == policy.Detach(11, "served 105 requests (limit 105)", "max_requests")
    leaving = add_worker(app, 12, WorkerState.DETACHING, processed=105, max_requests=105)
    assert policy.after_request(app, leaving) is None


def test_a_failed_start_abandons_a_restart_or_shows_the_error_page() -> None:
    app = App(id=1, config=config("a"))
    assert policy.after_start_failure(app) == "show_error"
    add_worker(app, 10)
    assert policy.after_start_failure(app) == "retry"
    app.generation += 1
    assert policy.after_start_failure(app) == "abandon_restart"


def test_new_settings_replace_workers_and_new_limits_do_not() -> None:
    app = App(id=1, config=config("a", max_requests=10))
    assert policy.config_change(app, config("a", max_requests=10)) == "same"
    assert policy.config_change(app, config("a", max_requests=20)) == "update"
    assert policy.config_change(app, config("a", max_requests=10, python="python3.12")) == "replace"
    app.removed = True
    assert policy.config_change(app, config("a", max_requests=10)) == "replace"


def test_a_restart_file_restarts_when_it_appears_or_changes() -> None:
    app = App(id=1, config=config("a"))
    assert not policy.restart_file_touched(app, None)
    assert policy.restart_file_touched(app, 5.0)
    app.restart_mtime = 5.0
    assert not policy.restart_file_touched(app, 5.0)
    assert policy.restart_file_touched(app, 6.0)


# -- starts that fail, and starts killed from outside ---------------------------


def test_after_a_first_failure_requests_wait_for_the_retry_when_it_is_due_in_time() -> None:
    app = App(id=1, config=config("a"))
    app.spawn_failures = 1
    assert policy.after_start_failure(app, 1 * SECOND) == "wait"      # no queue time limit
    app.config = config("a", max_request_queue_time_ms=5 * SECOND)
    assert policy.after_start_failure(app, 1 * SECOND) == "wait"
    app.config = config("a", max_request_queue_time_ms=1 * SECOND)
    assert policy.after_start_failure(app, 1 * SECOND) == "show_error"  # they would time out first
    app.config = config("a")
    app.spawn_failures = 2                                               # the retry failed too
    assert policy.after_start_failure(app, 2 * SECOND) == "show_error"
    add_worker(app, 10)
    assert policy.after_start_failure(app, 2 * SECOND) == "retry"


def test_requests_that_wait_for_the_retry_start_it_when_the_back_off_ends() -> None:
    pool = make_pool(a=config("a"))
    app = pool.apps["a"]
    app.spawn_failures = 1
    app.failed_until = NOW + 1 * SECOND
    app.queue_length = 2
    assert policy.plan(pool, NOW) == []
    assert policy.plan(pool, NOW + 1 * SECOND) == [policy.Spawn("a")]


def test_only_the_apps_own_failure_counts_as_a_failed_start() -> None:
    assert policy.start_failed_by_app(1)
    assert policy.start_failed_by_app(0)
    for signum in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGXCPU):
        assert policy.start_failed_by_app(-signum), signum
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        assert not policy.start_failed_by_app(-signum), signum


def test_a_worker_killed_while_starting_is_replaced_at_once_until_it_happens_too_often() -> None:
    assert [policy.outside_kill_spacing_ms(n) for n in range(1, 6)] == [0, 0, 0, 250, 250]
    pool = make_pool(a=config("a", min_instances=2))
    app = pool.apps["a"]
    app.activated = True
    add_worker(app, 10)
    assert policy.plan(pool, NOW) == [policy.Spawn("a")]
    app.start_not_before = NOW + 250
    assert policy.plan(pool, NOW) == []
    assert policy.plan(pool, NOW + 250) == [policy.Spawn("a")]


def test_a_worker_that_closed_its_handshake_pipe_and_lives_on_is_killed_after_a_grace() -> None:
    app = App(id=1, config=config("a"))
    worker = add_worker(app, 10, WorkerState.STARTING, spawned_at=NOW - 2 * SECOND)
    assert policy.worker_deadline_actions(app, worker, NOW) == []
    worker.handshake_closed_at = NOW - 500
    assert policy.worker_deadline_actions(app, worker, NOW) == []
    worker.handshake_closed_at = NOW - 1500
    assert policy.worker_deadline_actions(app, worker, NOW) == [
        policy.Kill(10, "closed its handshake pipe without a whole handshake line")]
