"""A reload that removes every agent_enabled location drains and stops the
apps; the agent stays up, with no app, until nginx stops or a reload brings
apps back (docs/design.md, "Reloads")."""

from __future__ import annotations

import json

from tests.integration import fault_apps
from tests.integration.load import Load
from tests.integration.stack import AppSpec, running_stack, wait_until

APP = AppSpec("app", fault_apps.PID_SLEEP, "/app/")


def test_removing_every_agent_location_drains_and_stops_the_apps() -> None:
    with running_stack([APP]) as stack:
        assert stack.get("/app/").status == 200
        workers = stack.worker_pids(APP)
        watchdog, core = stack.watchdog_pid(), stack.core_pid()
        assert workers

        # A request in flight when the location goes finishes first: drained.
        marker = stack.scratch / "serving"
        with Load(stack.port, f"/app/?sleep=2&pidfile={marker}", threads=1, max_requests=1, duration=30) as slow:
            wait_until(marker.exists, what="the slow request to reach the app")
            stack.apps = []
            stack.reload()
            assert json.loads((stack.instance / "apps.json").read_text())["apps"] == []
        assert slow.result.statuses == {200: 1}, slow.result.summary()

        wait_until(lambda: not stack.worker_pids(), timeout=30, what="the app's workers to stop")
        assert "is no longer configured: stopping its workers" in stack.log_file.read_text()
        assert stack.get("/app/").status == 404          # nginx's own: no location hands it on
        assert (stack.watchdog_pid(), stack.core_pid()) == (watchdog, core)
        assert stack.agent_running()

        stack.apps = [APP]                               # and back: the same agent serves it again
        stack.reload()
        assert stack.get("/app/").status == 200
        assert (stack.watchdog_pid(), stack.core_pid()) == (watchdog, core)
        assert not stack.worker_pids(APP) & workers
