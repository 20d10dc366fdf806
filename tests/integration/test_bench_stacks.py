"""The benchmark's agent stack against the real nginx and module: a spawn
method nginx refuses is reported as not available, never run."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import NGINX, REPO, free_port

sys.path.insert(0, str(REPO / "bench"))
from stacks import AgentStack, Buffers, SpawnMethodUnavailable


@pytest.fixture
def run_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agent-bench-it-", dir="/tmp"))
    (root / "app").mkdir()
    (root / "app" / "wsgi.py").write_text("def application(environ, start_response):\n    return []\n")
    (root / "run").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_spawn_method_nginx_refuses_is_not_available(run_dir: Path) -> None:
    stack = AgentStack(run_dir / "run", free_port(), run_dir / "app", 1, Buffers(), NGINX, REPO, sys.executable,
                       "/usr/bin/python3", worker_count=1, spawn_method="bogus")
    with pytest.raises(SpawnMethodUnavailable, match="agent_spawn_method bogus"):
        stack.start()
    assert stack.processes == []      # nothing was started
    config = (run_dir / "run" / "nginx.conf").read_text()
    assert "agent_enabled on;\n            agent_spawn_method bogus;" in config
