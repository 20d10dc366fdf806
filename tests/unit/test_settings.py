"""Every setting is declared once: the registry (agent.settings), the nginx
module's table (nginx-module/ngx_http_agent_settings.h) and the directive
reference (docs/directives.md) must name the same directives, in the same
scopes, with the same defaults."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from agent.cli import agentctl as cli
from agent.core.config import AppConfig, AppTable, parse_table
from agent.settings import (
    APP_SETTINGS,
    BY_NAME,
    DIRECTIVES,
    HTTP_SETTINGS,
    Kind,
    Scope,
    check_value,
    parse_size,
    parse_time_ms,
)

REPO = Path(__file__).resolve().parents[2]
C_TABLE = REPO / "nginx-module" / "ngx_http_agent_settings.h"
DOCS = REPO / "docs" / "directives.md"

# X(NAME, KIND, SCOPE, DEFAULT, ...): the row format the module's header documents.
C_ROW = re.compile(r"^\s*X\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*,\s*(\"(?:[^\"\\]|\\.)*\"|[\w-]+)")
DOC_SECTIONS = {"## http block": {Scope.HTTP},
                "## http, server and location blocks": {Scope.APP, Scope.LOCATION},
                "## location blocks": {Scope.LOCATION}}
DOC_ROW = re.compile(r"^\| `agent_(\w+)[^`]*` \| ([^|]*) \|")


def c_rows() -> dict[str, tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for line in C_TABLE.read_text().splitlines():
        match = C_ROW.match(line)
        if match:
            name, kind, scope, default = match.groups()
            assert name not in rows, f"{name} is declared twice in {C_TABLE.name}"
            rows[name] = (kind, scope, default)
    return rows


def doc_rows() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    section = ""
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            section = line.strip()
        match = DOC_ROW.match(line)
        if match and section in DOC_SECTIONS:
            assert match.group(1) not in rows, f"agent_{match.group(1)} is documented twice"
            rows[match.group(1)] = (section, match.group(2).strip())
    return rows


def c_default(setting_kind: Kind, literal: str) -> object:
    if literal == "NONE":
        return None
    if literal.startswith('"'):
        return literal[1:-1]
    if setting_kind in (Kind.FLAG, Kind.STATUS):
        return bool(int(literal))
    return int(literal)


def test_the_module_declares_every_directive_of_the_registry_and_no_other() -> None:
    assert set(c_rows()) == {s.name for s in DIRECTIVES}


@pytest.mark.parametrize("setting", DIRECTIVES, ids=lambda s: s.name)
def test_the_module_row_agrees_with_the_registry(setting: object) -> None:
    assert setting in DIRECTIVES
    s = BY_NAME[setting.name]  # type: ignore[attr-defined]
    kind, scope, default = c_rows()[s.name]
    assert scope == s.scope.name
    assert kind == s.kind.name
    expected = s.default if s.default not in ("", {}) else None
    assert c_default(s.kind, default) in (expected, s.default)


def test_the_docs_describe_every_directive_in_its_scope() -> None:
    documented = doc_rows()
    assert set(documented) == {s.name for s in DIRECTIVES}
    for name, (section, _) in documented.items():
        assert BY_NAME[name].scope in DOC_SECTIONS[section], f"agent_{name} is documented under {section}"


def doc_default(text: str, kind: Kind) -> object:
    """The value a docs default cell starts with, in the registry's unit."""
    first = text.split(" (")[0].strip().strip("`")
    if kind in (Kind.SIZE, Kind.BUFS):
        return first                     # nginx's syntax, as written (1024m is no time)
    if first in ("on", "off"):
        return first == "on"
    if re.fullmatch(r"\d+(ms|s|m|h|d)", first):
        return parse_time_ms(first)
    if re.fullmatch(r"\d+", first):
        return int(first)
    return first


@pytest.mark.parametrize("setting", [s for s in DIRECTIVES if s.default not in (None, "", {})],
                         ids=lambda s: s.name)
def test_the_documented_default_is_the_registry_default(setting: object) -> None:
    s = BY_NAME[setting.name]  # type: ignore[attr-defined]
    _, cell = doc_rows()[s.name]
    assert doc_default(cell, s.kind) == s.default, f"docs say {cell!r} for agent_{s.name}"


def test_app_config_and_app_table_carry_exactly_the_registry_keys() -> None:
    """agent_app_root and the JSON's name are the app's identity; every other
    per-app row is one AppConfig field named by its apps.json key."""
    assert {f.name for f in fields(AppConfig)} == {s.key for s in APP_SETTINGS} | {"name"}
    assert {f.name for f in fields(AppTable)} == {s.key for s in HTTP_SETTINGS if s.default is not None} | {"apps"}


def test_apps_json_defaults_come_from_the_registry() -> None:
    table = parse_table({"apps": [{"name": "/srv/a"}]})
    (app,) = table.apps
    for setting in APP_SETTINGS:
        if setting.default is not None and setting.kind is not Kind.ENV:
            assert getattr(app, setting.key) == setting.default, setting.name
    assert table.pool_idle_time_ms == BY_NAME["pool_idle_time"].default == 300_000


@pytest.mark.parametrize(("text", "ms"), [("0", 0), ("30", 30_000), ("500ms", 500), ("5m", 300_000), ("1h", 3_600_000)])
def test_times_are_integer_milliseconds(text: str, ms: int) -> None:
    assert parse_time_ms(text) == ms
    assert check_value(BY_NAME["max_request_time"], text) == ms


def test_a_time_below_its_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 1, not 0"):
        check_value(BY_NAME["start_timeout"], "0")


def test_serve_refuses_a_pool_of_no_processes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["serve", "/srv/shop", "--max-pool-size", "0"])
    assert caught.value.code == 2
    assert "--max-pool-size: must be >= 1, not 0" in capsys.readouterr().err


def test_every_serve_setting_is_a_flag_and_reaches_the_config(tmp_path: Path) -> None:
    """A flag per row; its value lands in nginx.conf as the directive."""
    args = cli.build_parser().parse_args(["serve", str(tmp_path), "--max-request-time", "90s", "--prestart", "on",
                                          "--memory-limit", "300", "--pool-idle-time", "500ms"])
    assert (args.max_request_time, args.prestart, args.memory_limit, args.pool_idle_time) == (90_000, True, 300, 500)


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("4096", 4096), ("8k", 8192), ("16K", 16384),
                                            ("1m", 1 << 20), ("1024M", 1 << 30)])
def test_sizes_are_nginx_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert check_value(BY_NAME["buffer_size"], text) == text


@pytest.mark.parametrize("text", ["", "8x", "1g", "-1", "8 k", "1.5k"])
def test_a_size_nginx_would_refuse_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must be a size such as 4096, 8k or 1m"):
        check_value(BY_NAME["busy_buffers_size"], text)


def test_buffers_are_a_number_and_a_size() -> None:
    assert check_value(BY_NAME["buffers"], "16  8k") == "16 8k"
    assert check_value(BY_NAME["buffer_size"], 16384) == "16384"


@pytest.mark.parametrize(("value", "message"), [
    ("8", "a number of buffers and their size"),
    ("8k 8", "a number of buffers and their size"),
    (8, "a number of buffers and their size"),
    ("1 8k", "at least 2 buffers of more than 0 bytes"),
    ("8 0", "at least 2 buffers of more than 0 bytes"),
])
def test_bad_buffers_are_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_value(BY_NAME["buffers"], value)
