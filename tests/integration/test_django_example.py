"""examples/django served through nginx and the agent, with its own virtualenv.

The virtualenv is `make django-venv`'s (build/django-venv, which `make test`
makes), copied where the workers' unprivileged user can read it; without it
the test makes one with examples/django/make-venv.sh (pip needs PyPI).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.stack import REPO, free_port, wait_until

EXAMPLE = REPO / "examples" / "django"
BUILT_VENV = REPO / "build" / "django-venv"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agent-django-", dir="/tmp"))
    shutil.copytree(EXAMPLE, root / "app", ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3"))
    if (BUILT_VENV / "bin" / "python").exists():
        shutil.copytree(BUILT_VENV, root / "venv", symlinks=True)
    else:
        subprocess.run([str(EXAMPLE / "make-venv.sh"), str(root / "venv")], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def answers_hello(port: int) -> bool:
    try:
        return get(port, "/") == (200, "Hello, world\n")
    except OSError:
        return False


# The project's two startup files: WSGI (the default) and ASGI.
SERVE_AS = {"wsgi": [], "asgi": ["--app-type", "asgi", "--startup-file", "asgi.py"]}


@pytest.mark.parametrize("app_type", sorted(SERVE_AS))
def test_django_example_serves_its_views_from_its_virtualenv(workdir: Path, app_type: str) -> None:
    port, venv_python = free_port(), workdir / "venv" / "bin" / "python"
    log = workdir / f"serve-{app_type}.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", str(workdir / "app"), "--port",
                                    str(port), "--run-dir", str(workdir / f"run-{app_type}"),
                                    "--python", str(venv_python), *SERVE_AS[app_type]],
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: answers_hello(port), timeout=60, what="the Django example's hello view")
        status, page = get(port, "/page")
        assert status == 200
        assert "<h1>A page rendered by Django</h1>" in page and "<li>item 10</li>" in page
        found = re.search(r"Worker (\d+) rendered this list for /page", page)
        assert found is not None, page
        worker = psutil.Process(int(found.group(1)))
        assert worker.cmdline()[0] == str(venv_python)
        assert worker.cmdline()[1].endswith(f"/{app_type}_loader.py")
        assert get(port, "/admin/login/")[0] == 200    # the admin's templates and forms load
        assert get(port, "/nowhere")[0] == 404
    except BaseException:
        print(log.read_text(errors="replace"))
        raise
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
