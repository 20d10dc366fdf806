"""Real stores for the integration tests: a redis-server the test starts and
stops itself, and an app virtualenv with the `redis` client.

Both live in a directory the caller owns (a test's temporary directory), so
nothing is left behind and two runs never share a server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.stack import APP_PYTHON, REPO, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
APP_REQUIREMENTS = REPO / "examples" / "shared-state" / "requirements.txt"


@dataclass
class RedisServer:
    """A running redis-server without persistence: on a Unix socket in
    `directory` (mode 0777, so that workers of any user reach it), or on
    host:port when `bind` is given (inside a network namespace with
    `prefix`, e.g. ["ip", "netns", "exec", "db"])."""

    directory: Path
    process: subprocess.Popen[bytes]
    bind: tuple[str, int] | None = None
    prefix: Sequence[str] = ()

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.bind is not None:
            return f"redis://{self.bind[0]}:{self.bind[1]}/0"
        return f"unix://{self.socket}"

    def cli(self, *args: str) -> str:
        where = ["-h", self.bind[0], "-p", str(self.bind[1])] if self.bind else ["-s", str(self.socket)]
        result = subprocess.run([*self.prefix, REDIS_CLI, *where, *args], capture_output=True, text=True,
                                timeout=10, check=True)
        return result.stdout.strip()

    def ping(self) -> bool:
        try:
            return self.cli("PING") == "PONG"
        except subprocess.SubprocessError:
            return False

    def get_int(self, key: str) -> int:
        value = self.cli("GET", key)
        return int(value) if value else 0


@contextlib.contextmanager
def redis_server(directory: Path, bind: tuple[str, int] | None = None,
                 prefix: Sequence[str] = ()) -> Iterator[RedisServer]:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    listen = (["--bind", bind[0], "--port", str(bind[1]), "--protected-mode", "no"] if bind
              else ["--port", "0", "--unixsocket", str(directory / "redis.sock"), "--unixsocketperm", "777"])
    command = [*prefix, REDIS_SERVER, *listen, "--save", "", "--appendonly", "no", "--dir", str(directory),
               "--daemonize", "no", "--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = RedisServer(directory, process, bind, prefix)
    try:
        wait_until(lambda: process.poll() is None and server.ping(), timeout=15, what="redis-server")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def app_virtualenv(directory: Path) -> Path:
    """A virtualenv of the apps' interpreter with the example's requirements
    (the `redis` client, from PyPI), readable by every worker user; returns
    its python."""
    subprocess.run([APP_PYTHON, "-m", "venv", str(directory)], check=True, capture_output=True)
    python = directory / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(APP_REQUIREMENTS)], check=True, capture_output=True, timeout=300)
    subprocess.run(["chmod", "-R", "a+rX", str(directory)], check=True)
    return python
