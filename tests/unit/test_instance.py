"""The instance directory's rules (agent/instance.py), the token files and
agentctl's discovery filter: what a directory or file another user made
must not pass. The tests run as root and give files to nobody."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.control.client import candidate_dirs, planted_problem
from agent.control.tokens import ensure_tokens, read_token
from agent.instance import UnsafeDirectory, check_directory, make_private_directory

NOBODY = 65534


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def test_a_new_directory_is_made_and_passes(base: Path) -> None:
    make_private_directory(base / "a" / "instance")
    assert (base / "a" / "instance").is_dir()
    check_directory(base / "a" / "instance")


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_directory_others_can_write_to_is_refused(base: Path, mode: int) -> None:
    (base / "instance").mkdir()
    (base / "instance").chmod(mode)
    with pytest.raises(UnsafeDirectory, match=f"is writable by other users .*mode {mode:04o}"):
        make_private_directory(base / "instance")


def test_a_directory_of_another_user_is_refused_naming_owner_and_what_to_do(base: Path) -> None:
    (base / "instance").mkdir(mode=0o755)
    os.chown(base / "instance", NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory) as caught:
        make_private_directory(base / "instance")
    message = str(caught.value)
    assert str(base / "instance") in message and f"owner uid {NOBODY}" in message
    assert "remove it, or set agent_instance_dir to another path" in message


def test_a_link_is_refused_even_to_a_good_directory(base: Path) -> None:
    (base / "real").mkdir(mode=0o755)
    (base / "instance").symlink_to(base / "real")
    with pytest.raises(UnsafeDirectory, match="is a symbolic link"):
        make_private_directory(base / "instance")


def test_an_ancestor_others_can_write_to_is_refused_unless_sticky(base: Path) -> None:
    (base / "shared").mkdir()
    (base / "shared").chmod(0o777)
    with pytest.raises(UnsafeDirectory, match=f"{base / 'shared'} lets other users rename"):
        make_private_directory(base / "shared" / "instance")
    (base / "shared").chmod(0o1777)  # as /tmp
    check_directory(base / "shared" / "instance")


def test_an_ancestor_of_another_user_is_refused(base: Path) -> None:
    (base / "theirs").mkdir(mode=0o755)
    (base / "theirs" / "instance").mkdir(mode=0o755)
    os.chown(base / "theirs", NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match=f"{base / 'theirs'} belongs to another user"):
        check_directory(base / "theirs" / "instance")


def test_a_planted_token_file_is_replaced_and_never_read(base: Path) -> None:
    planted = base / "admin.token"
    planted.write_text("planted\n")
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    assert read_token(planted) is None
    tokens = ensure_tokens(base)
    assert tokens.admin is not None and tokens.admin != b"planted"
    assert planted.stat().st_uid == os.geteuid()


def test_a_token_file_that_is_a_link_or_readable_by_others_is_not_used(base: Path) -> None:
    secret = base / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    (base / "read.token").symlink_to(secret)
    assert read_token(base / "read.token") is None
    tokens = ensure_tokens(base)
    assert not (base / "read.token").is_symlink() and tokens.read != b"root's secret"
    (base / "admin.token").chmod(0o644)
    assert read_token(base / "admin.token") is None


def test_discovery_leaves_out_directories_of_other_users(base: Path) -> None:
    mine, theirs, open_to_all = base / "agent-00000001", base / "agent-00000002", base / "agent-00000003"
    for root in (mine, theirs, open_to_all):
        root.mkdir(mode=0o755)
        (root / "watchdog.pid").write_text("1\n")
    os.chown(theirs, NOBODY, NOBODY)
    open_to_all.chmod(0o777)
    assert planted_problem(mine, base) is None
    warnings: list[str] = []
    assert candidate_dirs({}, base, warn=warnings.append) == [mine]
    assert [w.split(":")[0] for w in warnings] == [f"ignoring {theirs}", f"ignoring {open_to_all}"]
    assert f"belongs to uid {NOBODY}" in warnings[0] and "mode 0777" in warnings[1]


def test_discovery_checks_the_run_dir_above_a_serve_instance(base: Path) -> None:
    instance = base / "agent-serve-8080" / "instance"
    instance.mkdir(parents=True, mode=0o755)
    (instance / "watchdog.pid").write_text("1\n")
    os.chown(instance.parent, NOBODY, NOBODY)
    warnings: list[str] = []
    assert candidate_dirs({}, [base], warn=warnings.append) == []
    assert warnings and str(instance.parent) in warnings[0]
