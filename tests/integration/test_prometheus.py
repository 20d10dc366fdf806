"""examples/prometheus: the scrape configuration, recording rules and alerts
checked and unit-tested by promtool, and held against the series a real
agent serves through nginx (`agent_status on;` behind a token)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.apps import HELLO
from tests.integration.stack import REPO, AppSpec, Stack, wait_until
from tests.integration.status_auth import basic_auth, new_token, status_location, write_htpasswd

EXAMPLE = REPO / "examples" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TOKEN = new_token()


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=EXAMPLE, capture_output=True, text=True, input=stdin, timeout=60)


def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_rules_and_alerts_are_valid() -> None:
    result = promtool("check", "rules", "rules.yml", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_and_alerts_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_rule_fails_its_unit_test() -> None:
    """The unit tests can fail: with the queue alert's `for` cut to 1
    minute it fires at minute 5, where the test expects it pending."""
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("rules.yml", "alerts.yml", "rules_test.yml"):
            shutil.copy(EXAMPLE / name, Path(scratch) / name)
        alerts = Path(scratch) / "alerts.yml"
        alerts.write_text(alerts.read_text().replace("for: 5m", "for: 1m", 1))
        result = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=scratch,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "AgentQueueFull" in result.stdout + result.stderr


class StatusStack(Stack):
    """A stack that also publishes the agent's status at /agent/, behind a token."""

    def config_text(self) -> str:
        text = super().config_text()
        htpasswd = write_htpasswd(self.root / "agent-status.htpasswd", TOKEN)
        head, tail = text.rsplit("    }\n}\n", 1)
        return head + status_location(htpasswd) + "    }\n}\n" + tail


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    app = AppSpec("shop", HELLO, directives={"agent_min_instances": "2", "agent_prestart": "on"})
    root = Path(tempfile.mkdtemp(prefix="agent-it-", dir="/tmp"))
    os.chmod(root, 0o755)
    running = StatusStack(root, [app])
    try:
        running.start()
        wait_until(lambda: len(running.worker_pids(app)) == 2, timeout=30, what="two workers")
        for _ in range(20):
            assert running.get("/").status == 200
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_metrics_need_the_token(stack: Stack) -> None:
    assert stack.get("/agent/metrics").status == 401
    assert stack.get("/agent/metrics", headers=basic_auth("wrong")).status == 401
    response = stack.get("/agent/metrics", headers=basic_auth(TOKEN))
    assert response.status == 200
    assert "agent_requests_total{" in response.text


def test_rules_read_series_the_agent_serves(stack: Stack) -> None:
    exposition = stack.get("/agent/metrics", headers=basic_auth(TOKEN)).text
    lint = promtool("check", "metrics", stdin=exposition)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    served = set(re.findall(r"^# TYPE (\w+) ", exposition, re.M))
    exprs = "\n".join(line for name in ("rules.yml", "alerts.yml")
                      for line in (EXAMPLE / name).read_text().splitlines() if line.strip().startswith("expr:"))
    # Series the rules read: agent_* names without a colon (recorded ones have one).
    read = set(re.findall(r"(?<![\w:])(agent_\w+)", exprs))
    assert read, exprs
    assert read <= served, read - served
