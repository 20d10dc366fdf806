"""tmp/restart.txt, looked at on each app's own schedule: agent_stat_throttle_rate
stands in server and location blocks too, as in Passenger (docs/directives.md)."""

from __future__ import annotations

import json
import time

from tests.integration import apps
from tests.integration.stack import AppSpec, Stack, running_stack, wait_until

# The http block's rate is an hour: only an app whose location says otherwise
# looks at its files while the test runs.
OFTEN = AppSpec("often", apps.INTROSPECT, "/often/", directives={"agent_stat_throttle_rate": "0"})
RARELY = AppSpec("rarely", apps.INTROSPECT, "/rarely/")


def touch_restart_file(stack: Stack, app: AppSpec) -> None:
    tmp = stack.app_root(app) / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "restart.txt").touch()


def serving_pid(stack: Stack, app: AppSpec) -> int:
    response = stack.get(app.location)
    assert response.status == 200, response.text
    return int(json.loads(response.body)["pid"])


def test_each_app_looks_at_its_restart_file_at_its_own_location_rate() -> None:
    with running_stack([OFTEN, RARELY], {"agent_stat_throttle_rate": "1h"}) as stack:
        often_before, rarely_before = serving_pid(stack, OFTEN), serving_pid(stack, RARELY)
        # The agent's first look at each app is at its first tick; the
        # hour-long rate starts counting from there.
        time.sleep(2.5)
        touch_restart_file(stack, RARELY)
        touch_restart_file(stack, OFTEN)

        wait_until(lambda: often_before not in stack.worker_pids(OFTEN), timeout=30,
                   what="the app with agent_stat_throttle_rate 0 in its location to restart")
        assert serving_pid(stack, OFTEN) != often_before
        # By now the other app has had as many ticks as the first needed, and
        # more: its location inherits the hour, so it has not looked.
        time.sleep(3)
        assert stack.worker_pids(RARELY) == {rarely_before}
        assert serving_pid(stack, RARELY) == rarely_before
        assert "rarely: rolling restart" not in stack.log_file.read_text()
