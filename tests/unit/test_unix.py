"""The Unix helpers the watchdog and the core share."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from agent.unix import describe_exit, listen_unix


def test_a_stale_socket_file_is_replaced_and_the_mode_set(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("left over")
    with listen_unix(path, 8, mode=0o600) as listener:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not listener.get_inheritable()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_a_failure_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "agent.sock"
    with pytest.raises(OSError, match=f"cannot listen on {path}: ") as caught:
        listen_unix(path, 8)
    assert caught.value.errno is not None


def test_exits_are_described_from_return_codes() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(os.waitstatus_to_exitcode(signal.SIGTERM)) == "was killed by SIGTERM"
