"""The app table nginx writes (docs/protocol.md §4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.core.config import ConfigError, load_table, parse_table


def table(**app: object) -> dict[str, object]:
    return {"version": 1, "max_pool_size": 4, "apps": [{"name": "/srv/a", "app_root": "/srv/a", **app}]}


def test_defaults_follow_the_protocol() -> None:
    parsed = parse_table(table())
    (app,) = parsed.apps
    assert parsed.max_pool_size == 4
    assert (app.startup_file, app.python, app.min_instances, app.max_instances) == (
        "wsgi.py", "/usr/bin/python3", 1, 0)
    assert app.default_user == "nobody"


def test_equal_settings_compare_equal_so_processes_are_kept() -> None:
    first = parse_table(table(env={"A": "1", "B": "2"}))
    second = parse_table(table(env={"B": "2", "A": "1"}))
    assert first.apps == second.apps
    assert parse_table(table(env={"A": "x"})).apps != first.apps


@pytest.mark.parametrize(("app", "message"), [
    ({"min_instances": -1}, "min_instances must be an integer >= 0"),
    ({"max_instances": "2"}, "max_instances must be an integer"),
    ({"app_type": "rack"}, "app_type must be one of wsgi"),
    ({"app_root": "relative"}, "app_root must be an absolute path"),
    ({"env": {"A": 1}}, "env must map names to strings"),
    ({"min_instances": 3, "max_instances": 2}, "min_instances (3) exceeds max_instances (2)"),
])
def test_bad_values_are_named(app: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_table(table(**app))


def test_unreadable_files_say_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_table(tmp_path / "missing.json")
    bad = tmp_path / "apps.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_table(bad)
    bad.write_text(json.dumps({"apps": [{"name": "/a"}, {"name": "/a"}]}))
    with pytest.raises(ConfigError, match="app named twice"):
        load_table(bad)
