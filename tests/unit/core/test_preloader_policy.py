"""The pure rules of smart spawning (agent/core/policy.py) and the parser of
a preloader's messages (agent/core/preloader.py)."""

from __future__ import annotations

from agent.core import policy
from agent.core.config import AppConfig
from agent.core.pool import App, Preloader, PreloaderState, Worker, WorkerState
from agent.core.preloader import Exited, Forked, ForkFailed, parse


def make_app(**kwargs: object) -> App:
    return App(id=1, config=AppConfig(name="/srv/a", app_root="/srv/a", **kwargs))  # type: ignore[arg-type]


def add_preloader(app: App, pid: int, state: PreloaderState, generation: int = 0, since: int = 0) -> Preloader:
    preloader = Preloader(pid=pid, app=app.name, generation=generation, spawned_at=since, state=state,
                          last_fork=since)
    app.preloaders[pid] = preloader
    return preloader


def test_direct_apps_spawn_directly() -> None:
    assert policy.spawn_step(make_app(spawn_method="direct")) == "direct"


def test_generic_apps_spawn_directly_whatever_the_spawn_method() -> None:
    app = make_app(spawn_method="smart", app_type="generic", app_start_command="node app.js")
    assert policy.spawn_step(app) == "direct"
    assert not policy.uses_preloader(app)


def test_a_smart_app_starts_a_preloader_then_waits_for_it_then_forks() -> None:
    app = make_app()
    assert policy.spawn_step(app) == "start_preloader"
    preloader = add_preloader(app, 10, PreloaderState.STARTING)
    assert policy.spawn_step(app) == "wait"
    preloader.state = PreloaderState.READY
    assert policy.spawn_step(app) == "fork"


def test_a_preloader_of_old_code_is_not_forked_from_and_is_stopped() -> None:
    app = make_app()
    add_preloader(app, 10, PreloaderState.READY, generation=0)
    app.generation = 1
    assert policy.spawn_step(app) == "start_preloader"
    actions = policy.preloader_deadline_actions(app, app.preloaders[10], 0)
    assert actions == [policy.StopPreloader(10, "the app's code or settings changed")]


def test_an_idle_preloader_is_stopped_only_past_its_idle_time_and_never_with_0() -> None:
    app = make_app(max_preloader_idle_time_ms=5000)
    preloader = add_preloader(app, 10, PreloaderState.READY, since=1000)
    assert policy.preloader_deadline_actions(app, preloader, 5999) == []
    assert [type(a) for a in policy.preloader_deadline_actions(app, preloader, 6000)] == [policy.StopPreloader]
    never = make_app(max_preloader_idle_time_ms=0)
    preloader = add_preloader(never, 10, PreloaderState.READY, since=0)
    assert policy.preloader_deadline_actions(never, preloader, 10**9) == []


def test_a_preloader_that_does_not_load_in_time_is_a_failed_start() -> None:
    app = make_app(start_timeout_ms=1000)
    preloader = add_preloader(app, 10, PreloaderState.STARTING, since=0)
    assert policy.preloader_deadline_actions(app, preloader, 1000) == []
    (action,) = policy.preloader_deadline_actions(app, preloader, 1001)
    assert isinstance(action, policy.KillPreloader) and action.failed_start


def test_a_lost_preloader_comes_back_only_while_wanted_and_the_app_has_workers() -> None:
    app = make_app()
    assert not policy.wants_preloader_back(app, 0)
    app.preloader_wanted = True
    assert not policy.wants_preloader_back(app, 0)   # no worker: the next spawn starts one
    app.workers[5] = Worker(pid=5, app=app.name, socket_path="s", spawned_at=0, state=WorkerState.SERVING)
    assert policy.wants_preloader_back(app, 0)
    app.start_not_before = 100
    assert not policy.wants_preloader_back(app, 50)
    assert policy.wants_preloader_back(app, 100)
    add_preloader(app, 10, PreloaderState.STARTING)
    assert not policy.wants_preloader_back(app, 100)


def test_the_preloaders_messages_are_parsed_strictly() -> None:
    assert parse(b'{"forked": 3, "pid": 1234}') == Forked(3, 1234)
    assert parse(b'{"exited": 1234, "status": 9}') == Exited(1234, 9)
    assert parse(b'{"failed": 3, "error": "fork: no memory"}') == ForkFailed(3, "fork: no memory")
    for bad in (b"", b"[]", b'{"forked": 3, "pid": 0}', b'{"forked": 3, "pid": -1}', b'{"exited": true, "status": 0}',
                b'{"exited": 5}', b'{"hello": 1}', b'{"forked": 3, "pid": 99999999999}', b"\xff"):
        assert parse(bad) is None, bad
