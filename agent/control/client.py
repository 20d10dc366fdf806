"""A client for the agent's status socket (docs/status-api.md) and the
discovery of running agents.

The status socket speaks HTTP/1.1 over a Unix stream socket, so the client
is http.client with a connection whose connect() opens AF_UNIX. Every
failure becomes a StatusError whose exit_code is the one agentctl exits
with (docs/agentctl.md).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.instance import Instance, ancestor_problem

EXIT_FAILED = 1
EXIT_NO_AGENT = 3
EXIT_NO_RIGHTS = 4
EXIT_NOT_FOUND = 5

DEFAULT_TIMEOUT = 30.0
INSTANCE_DIR_ENV = "AGENT_INSTANCE_DIR"
# The module's default instance directories and those of `agentctl serve`:
# under /run for root, under /tmp for other users.
DISCOVERY_GLOBS = ("agent-*", "agent-serve-*/instance")
DISCOVERY_ROOTS = (Path("/run"), Path("/tmp"))


class StatusError(Exception):
    """A status request failed; exit_code says how, for agentctl."""

    exit_code = EXIT_FAILED


class NoAgentError(StatusError):
    exit_code = EXIT_NO_AGENT


class NoRightsError(StatusError):
    exit_code = EXIT_NO_RIGHTS


class NotFoundError(StatusError):
    exit_code = EXIT_NOT_FOUND


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the host name only fills the Host header."""

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class StatusClient:
    """GET and POST on one agent's status socket, answers decoded from JSON."""

    def __init__(self, socket_path: Path, token: str | None = None) -> None:
        self.socket_path = socket_path
        self.token = token

    def get(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        return self.request("GET", path, timeout)

    def post(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        return self.request("POST", path, timeout)

    def request(self, method: str, path: str, timeout: float) -> Any:
        status, body = self._exchange(method, path, timeout)
        document = self._decode(body, status)
        if status >= 400:
            raise error_for_status(status, method, path, document)
        return document

    def _exchange(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.socket_path, timeout)
        headers = {"Accept": "application/json", "Connection": "close"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoAgentError(f"no agent answers on {self.socket_path} ({e.strerror})") from e
        except PermissionError as e:
            raise NoRightsError(f"cannot connect to {self.socket_path}: {e.strerror}") from e
        except TimeoutError as e:
            raise StatusError(f"the agent did not answer {method} {path} within {timeout:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise StatusError(f"{method} {path} on {self.socket_path} failed: {e}") from e
        finally:
            conn.close()

    def _decode(self, body: bytes, status: int) -> Any:
        try:
            return json.loads(body) if body else {}
        except ValueError as e:
            if status >= 400:
                # An error page that is not JSON still says what went wrong.
                return {"error": body.decode("utf-8", "replace").strip()}
            raise StatusError(f"the agent answered with something that is not JSON: {e}") from e


def error_for_status(status: int, method: str, path: str, document: Any) -> StatusError:
    message = document.get("error") if isinstance(document, dict) else None
    detail = message or http.client.responses.get(status, "error")
    if status == 403:
        return NoRightsError(f"no rights to {method} {path}: {detail} "
                             "(actions need root or the admin token)")
    if status == 404:
        return NotFoundError(f"{detail}")
    return StatusError(f"{method} {path}: {status} {detail}")


# -- instances ------------------------------------------------------------


@dataclass(frozen=True)
class InstanceInfo:
    """One agent's instance directory, as found on disk."""

    root: Path
    watchdog_pid: int | None
    running: bool

    @property
    def status_socket(self) -> Path:
        return Instance(self.root).status_socket


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def inspect_instance(root: Path) -> InstanceInfo:
    instance = Instance(root)
    running = instance.watchdog_running() and instance.status_socket.exists()
    return InstanceInfo(root, read_pid(instance.watchdog_pid_file), running)


def planted_problem(root: Path, base: Path) -> str | None:
    """Why a directory found under base may have been planted by another
    local user, or None. Only root's and the invoking user's directories
    are trusted: whoever made one could otherwise receive the --token
    given, or answer in the agent's place."""
    me = os.getuid()
    path = root
    while path != base and base in path.parents:
        try:
            info = os.lstat(path)
        except OSError as e:
            return f"cannot lstat {path}: {e.strerror}"
        owner, mode = info.st_uid, stat.S_IMODE(info.st_mode)
        if not stat.S_ISDIR(info.st_mode):
            return f"{path} is not a directory"
        if owner not in (0, me) or mode & 0o022:
            return f"{path} belongs to uid {owner} with mode {mode:04o} (not root's or yours, or writable by others)"
        path = path.parent
    try:
        return ancestor_problem(base)
    except OSError as e:
        return f"cannot lstat {base}: {e.strerror}"


def warn_ignored(message: str) -> None:
    print(f"agentctl: warning: {message}", file=sys.stderr)


def discovery_roots(tmp: Path | Sequence[Path]) -> tuple[Path, ...]:
    return (tmp,) if isinstance(tmp, Path) else tuple(tmp)


def candidate_dirs(environ: Mapping[str, str] | None = None, tmp: Path | Sequence[Path] = DISCOVERY_ROOTS,
                   warn: Callable[[str], None] = warn_ignored) -> list[Path]:
    """Directories that may hold an agent: $AGENT_INSTANCE_DIR, then the
    default places, each once. A default place another user may have
    planted is left out, with a warning naming it."""
    env = os.environ if environ is None else environ
    found: list[Path] = []
    if env.get(INSTANCE_DIR_ENV):
        found.append(Path(env[INSTANCE_DIR_ENV]))
    for base in discovery_roots(tmp):
        for pattern in DISCOVERY_GLOBS:
            for path in sorted(p for p in base.glob(pattern) if (p / "watchdog.pid").exists()):
                problem = planted_problem(path, base)
                if problem is None:
                    found.append(path)
                else:
                    warn(f"ignoring {path}: {problem}")
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {u.resolve() for u in unique}:
            unique.append(path)
    return unique


def running_instances(environ: Mapping[str, str] | None = None,
                      tmp: Path | Sequence[Path] = DISCOVERY_ROOTS) -> list[InstanceInfo]:
    return [info for info in map(inspect_instance, candidate_dirs(environ, tmp)) if info.running]


def choose_instance(explicit: Path | None, environ: Mapping[str, str] | None = None,
                    tmp: Path | Sequence[Path] = DISCOVERY_ROOTS) -> Path:
    """The instance a command talks to: --instance, else $AGENT_INSTANCE_DIR,
    else the one running agent. An explicit choice is used as given, so that
    the error names the socket that did not answer."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return explicit
    if env.get(INSTANCE_DIR_ENV):
        return Path(env[INSTANCE_DIR_ENV])
    running = running_instances(env, tmp)
    if not running:
        places = ", ".join(f"{base}/agent-*" for base in discovery_roots(tmp))
        raise NoAgentError(f"no running agent found (looked in {places}); "
                           "is nginx running with agent_enabled? Use --instance DIR to name one")
    if len(running) > 1:
        listing = "\n".join(f"  {info.root}" for info in running)
        raise NoAgentError(f"{len(running)} agents are running; choose one with --instance DIR:\n{listing}")
    return running[0].root
