"""The checks that choose a worker's user (agent/core/spawner.py): no
symbolic link, the app root owner's file only, never nginx's worker user."""

from __future__ import annotations

import json
import os
import pwd
import socket
from pathlib import Path

import pytest

from agent.core.config import AppConfig
from agent.core.spawner import (
    SpawnError,
    free_port,
    generic_env,
    generic_script,
    nginx_worker_uid,
    private_env,
    private_env_fd,
    resolve_user,
    worker_env,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the user switch needs root")
NOBODY = pwd.getpwnam("nobody")


def app_in(root: Path, **settings: str) -> AppConfig:
    return AppConfig(name=str(root), app_root=str(root), **settings)  # type: ignore[arg-type]


def test_a_symlinked_startup_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real.py").write_text("")
    (tmp_path / "wsgi.py").symlink_to(tmp_path / "real.py")
    with pytest.raises(SpawnError, match=r"is a symbolic link.*set agent_user"):
        resolve_user(app_in(tmp_path), None)


def test_a_symlinked_startup_file_runs_as_the_named_user_read_by_that_user(tmp_path: Path) -> None:
    (tmp_path / "real.py").write_text("")
    (tmp_path / "wsgi.py").symlink_to(tmp_path / "real.py")
    user, fd = resolve_user(app_in(tmp_path, user="nobody"), None)
    assert user is not None and user.uid == NOBODY.pw_uid and fd is None


def test_a_startup_file_not_of_the_app_root_owner_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wsgi.py").write_text("")
    os.chown(tmp_path / "wsgi.py", NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(SpawnError, match=r"belongs to nobody .*but the app root"):
        resolve_user(app_in(tmp_path), None)


def test_the_checked_file_is_handed_over_open(tmp_path: Path) -> None:
    (tmp_path / "wsgi.py").write_text("checked")
    user, fd = resolve_user(app_in(tmp_path), None)
    assert user is not None and user.uid == NOBODY.pw_uid  # root's files: the default user
    assert fd is not None
    try:
        assert os.read(fd, 100) == b"checked"
    finally:
        os.close(fd)


def test_nginx_worker_user_is_refused_whatever_names_it(tmp_path: Path) -> None:
    (tmp_path / "wsgi.py").write_text("")
    for settings in ({}, {"user": "nobody"}):
        with pytest.raises(SpawnError, match=r"nginx's worker user nobody \(uid \d+\)"):
            resolve_user(app_in(tmp_path, **settings), NOBODY.pw_uid)


def test_nginx_worker_uid_is_the_agent_socket_owner(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    assert nginx_worker_uid(path) is None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert nginx_worker_uid(path) is None  # still the agent's: not known
        os.chown(path, NOBODY.pw_uid, -1)
        assert nginx_worker_uid(path) == NOBODY.pw_uid


def test_agent_env_goes_through_a_private_fd_but_what_the_interpreter_reads_at_exec(tmp_path: Path) -> None:
    config = app_in(tmp_path)
    config = AppConfig(name=config.name, app_root=config.app_root,
                       env=(("DB_PASSWORD", "hunter2"), ("LD_LIBRARY_PATH", "/opt/lib"), ("PYTHONPATH", "/opt/py")))
    env = worker_env(config, None)
    assert "DB_PASSWORD" not in env and env["AGENT_ENV_FD"] == "6"
    assert (env["LD_LIBRARY_PATH"], env["PYTHONPATH"]) == ("/opt/lib", "/opt/py")
    assert private_env(config) == {"DB_PASSWORD": "hunter2"}
    fd = private_env_fd(private_env(config))
    assert fd is not None
    try:
        assert json.loads(os.read(fd, 4096)) == {"DB_PASSWORD": "hunter2"}
    finally:
        os.close(fd)
    assert private_env_fd({}) is None
    assert "AGENT_ENV_FD" not in worker_env(AppConfig(name="a", app_root="/srv/a", env=(("PYTHONPATH", "/x"),)), None)


def test_a_generic_app_runs_as_its_app_roots_owner_without_a_startup_file(tmp_path: Path) -> None:
    os.chown(tmp_path, NOBODY.pw_uid, NOBODY.pw_gid)
    user, fd = resolve_user(app_in(tmp_path, app_type="generic", app_start_command="node app.js"), None)
    assert user is not None and user.uid == NOBODY.pw_uid and fd is None
    with pytest.raises(SpawnError, match="nginx's worker user"):
        resolve_user(app_in(tmp_path, app_type="generic", app_start_command="x"), NOBODY.pw_uid)


def test_a_generic_worker_gets_its_port_and_every_agent_env_value_at_exec(tmp_path: Path) -> None:
    config = AppConfig(name="a", app_root=str(tmp_path), app_type="generic", app_start_command="x",
                       env=(("PORT", "1"), ("SECRET", "s"), ("PATH", "/opt/bin")))
    env = generic_env(config, None, 4321)
    assert env["PORT"] == "4321"          # agent_env cannot move the port
    assert env["SECRET"] == "s" and env["PATH"] == "/opt/bin"
    assert env["AGENT_APP_TYPE"] == "generic"
    assert not any(name in env for name in ("AGENT_LISTEN_FD", "AGENT_READY_FD", "AGENT_ENV_FD", "AGENT_STARTUP_FD"))
    assert not set(env) - {"PATH", "LANG", "PORT", "SECRET", "AGENT_APP_NAME", "AGENT_APP_ROOT", "AGENT_APP_TYPE"}


def test_the_generic_command_runs_after_a_no_op_sigterm_trap() -> None:
    assert generic_script("cd x && node app.js") == "trap : TERM\ncd x && node app.js"


def test_a_free_port_is_one_nothing_listens_on() -> None:
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
