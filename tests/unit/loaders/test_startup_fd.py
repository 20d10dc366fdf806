"""The loader runs the startup file the core checked (handed over on an fd),
and makes its worker undumpable before the app loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.loaders import wsgi_loader

FIRST = "def application(environ, start_response):\n    return [b'checked']\n"
SECOND = "raise SystemExit('the swapped file ran')\n"


def test_the_source_read_from_the_fd_runs_not_what_the_path_holds_now(tmp_path: Path) -> None:
    startup = tmp_path / "swapme.py"
    startup.write_text(FIRST)
    fd = os.open(startup, os.O_RDONLY)
    (tmp_path / "new.py").write_text(SECOND)
    os.replace(tmp_path / "new.py", startup)
    try:
        app = wsgi_loader.load_application(str(tmp_path), "swapme.py", fd)
        assert app({}, None) == [b"checked"]
    finally:
        sys.modules.pop("swapme", None)
    assert not (tmp_path / "__pycache__").exists()  # no bytecode of a file it did not read


def test_the_fd_is_read_whole_and_closed(tmp_path: Path) -> None:
    startup = tmp_path / "big.py"
    startup.write_text("x = 1\n" * 50000)
    fd = os.open(startup, os.O_RDONLY)
    assert wsgi_loader.read_startup_fd(fd) == startup.read_bytes()
    try:
        os.fstat(fd)
    except OSError:
        return
    raise AssertionError("the fd is still open")


def test_a_missing_startup_file_is_still_reported_without_an_fd(tmp_path: Path) -> None:
    try:
        wsgi_loader.load_application(str(tmp_path), "absent.py")
    except wsgi_loader.LoadError as error:
        assert error.kind == "missing_startup_file"
    else:
        raise AssertionError("no LoadError")


def test_the_worker_is_not_dumpable_after_make_undumpable() -> None:
    program = (
        "import ctypes, sys\n"
        f"sys.path.insert(0, {str(Path(wsgi_loader.__file__).parent)!r})\n"
        "import wsgi_loader\n"
        "libc = ctypes.CDLL(None)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"
        "wsgi_loader.make_undumpable()\n"
        "print(before, libc.prctl(3, 0, 0, 0, 0))\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "0"]


def test_the_private_environment_is_read_from_its_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.write(write, b'{"DB_PASSWORD": "hunter2"}')
    os.close(write)
    monkeypatch.setenv("AGENT_ENV_FD", str(read))
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    wsgi_loader.load_private_env()
    assert os.environ.pop("DB_PASSWORD") == "hunter2"
    assert "AGENT_ENV_FD" not in os.environ
    with pytest.raises(OSError):
        os.fstat(read)  # closed once read


@pytest.mark.parametrize("content", [b"not json", b'["A"]', b'{"A": 1}'])
def test_a_private_environment_that_is_not_an_object_of_strings_is_a_load_error(
        monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    read, write = os.pipe()
    os.write(write, content)
    os.close(write)
    monkeypatch.setenv("AGENT_ENV_FD", str(read))
    with pytest.raises(wsgi_loader.LoadError, match="cannot read the app's environment"):
        wsgi_loader.load_private_env()
