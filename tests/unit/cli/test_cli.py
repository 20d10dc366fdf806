"""agentctl without an agent: the tables it prints from documents shaped
like docs/status-api.md, the serve settings file, the command line, the
status client's HTTP over a real Unix socket, and instance discovery with
real processes holding the watchdog's lock."""

from __future__ import annotations

import copy
import io
import json
import os
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from agent.cli import agentctl as cli
from agent.cli.serve import ServeOptions
from agent.cli.serve_config import ServeConfigError, build_options, parse
from agent.control.client import NoAgentError, choose_instance, running_instances

NOW = 1764280012.0
MB = 1024 * 1024

SERVER: dict[str, Any] = {
    "version": "0.1.0", "pid": 1234, "watchdog_pid": 1233, "instance_dir": "/tmp/agent-1a2b3c4d",
    "started_at": NOW - 12.5, "uptime": 12.5, "max_pool_size": 6, "processes": 2, "requests": 12345,
    "queued": 1, "apps": 1,
}


def process(pid: int, state: str, **extra: Any) -> dict[str, Any]:
    doc = {
        "pid": pid, "state": state, "sessions": 0, "processed": 2300, "concurrency": 1,
        "spawned_at": NOW - 11.3, "uptime": 11.3, "last_used": NOW - 3.0, "cpu_percent": 12.5,
        "memory": {"rss": 10 * MB, "pss": 7 * MB, "private": 6 * MB, "swap": 0},
        "generation": 1, "detach_reason": None,
    }
    doc.update(extra)
    return doc


POOL: dict[str, Any] = {
    "max_pool_size": 6,
    "apps": [{
        "name": "/srv/shop", "app_root": "/srv/shop", "app_type": "wsgi", "min_instances": 1,
        "max_instances": 0, "queue_length": 1, "requests": 4567, "queue_full": 0, "queue_timeouts": 0,
        "request_timeouts": 0, "failed": 2, "restarts": 1, "spawns": 3, "spawn_failures": 0,
        "last_spawn_error": None,
        "processes": [
            process(2001, "serving", sessions=1),
            process(2002, "idle", processed=7, uptime=3725.0, last_used=None, cpu_percent=0.0,
                    memory={"rss": 12 * MB, "pss": 8 * MB, "private": 5 * MB + MB // 2, "swap": MB}),
        ],
    }],
}

REQUESTS: dict[str, Any] = {"requests": [
    {"app": "/srv/shop", "method": "GET", "path": "/cart?id=3", "pid": 2001, "age": 0.25, "state": "forwarding"},
    {"app": "/srv/shop", "method": "POST", "path": "/checkout", "pid": None, "age": 1.5, "state": "queued"},
]}


def columns(line: str) -> list[str]:
    return line.split()


# -- tables ------------------------------------------------------------------


def test_status_shows_an_app_header_and_one_line_per_process() -> None:
    text = cli.format_status(SERVER, POOL, NOW)
    lines = text.splitlines()
    assert "Instance: /tmp/agent-1a2b3c4d (watchdog 1233, core 1234, up 12s)" in lines
    assert "Pool    : 2 processes of at most 6, 12345 requests, 1 queued" in lines
    header = lines.index("/srv/shop (wsgi)")
    assert lines[header + 1].split() == ["Queue:", "1", "Requests:", "4567", "Processes:", "2", "(min", "1,",
                                         "max", "no", "bound)", "Restarts:", "1", "Failed:", "2"]
    assert columns(lines[header + 2]) == ["PID", "STATE", "SESSIONS", "PROCESSED", "UPTIME", "CPU%",
                                          "PRIVATE", "MB", "LAST", "USED"]
    assert columns(lines[header + 3]) == ["2001", "serving", "1", "2300", "11s", "12.5", "6.0", "3s", "ago"]
    assert columns(lines[header + 4]) == ["2002", "idle", "0", "7", "1h", "2m", "0.0", "5.5", "never"]


def test_status_columns_line_up() -> None:
    lines = cli.format_status(SERVER, POOL, NOW).splitlines()
    header = next(line for line in lines if line.strip().startswith("PID"))
    rows = [line for line in lines if line.strip().startswith(("2001", "2002"))]
    for name in ("STATE", "PROCESSED", "CPU%", "LAST USED"):
        start = header.index(name)
        assert all(row[start - 1] == " " and row[start] != " " for row in rows), name


def test_status_shows_a_dash_for_a_figure_not_sampled_yet() -> None:
    pool = copy.deepcopy(POOL)
    pool["apps"][0]["processes"][0].update(cpu_percent=None, memory=None)
    row = next(line for line in cli.format_status(SERVER, pool, NOW).splitlines() if "2001" in line)
    assert columns(row) == ["2001", "serving", "1", "2300", "11s", "-", "-", "3s", "ago"]


def test_status_names_a_start_failure_and_an_app_without_processes() -> None:
    pool = copy.deepcopy(POOL)
    pool["apps"][0]["processes"] = []
    pool["apps"][0]["last_spawn_error"] = {"summary": "ImportError: no module named flask", "at": NOW - 65}
    text = cli.format_status(SERVER, pool, NOW)
    assert "  Last start failure: ImportError: no module named flask (1m 5s ago)" in text
    assert "  (no processes)" in text


def test_memory_stats_lists_each_process_and_the_totals() -> None:
    lines = cli.format_memory(POOL).splitlines()
    assert columns(lines[0]) == ["APP", "PID", "RSS", "MB", "PSS", "MB", "PRIVATE", "MB", "SWAP", "MB"]
    assert columns(lines[1]) == ["/srv/shop", "2001", "10.0", "7.0", "6.0", "0.0"]
    assert columns(lines[2]) == ["/srv/shop", "2002", "12.0", "8.0", "5.5", "1.0"]
    assert columns(lines[3]) == ["total", "(2", "processes)", "22.0", "15.0", "11.5", "1.0"]


def test_memory_stats_shows_a_dash_for_a_figure_not_sampled_yet() -> None:
    pool = copy.deepcopy(POOL)
    pool["apps"][0]["processes"][0]["memory"] = None
    assert columns(cli.format_memory(pool).splitlines()[1]) == ["/srv/shop", "2001", "-", "-", "-", "-"]


def test_requests_lists_the_oldest_first_and_a_queued_one_without_pid() -> None:
    lines = cli.format_requests(REQUESTS).splitlines()
    assert columns(lines[0]) == ["APP", "METHOD", "PATH", "PID", "AGE", "STATE"]
    assert columns(lines[1]) == ["/srv/shop", "POST", "/checkout", "-", "1.50s", "queued"]
    assert columns(lines[2]) == ["/srv/shop", "GET", "/cart?id=3", "2001", "0.25s", "forwarding"]
    assert cli.format_requests({"requests": []}) == "No requests in flight.\n"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3725, "1h 2m"),
                                               (90000, "1d 1h"), (None, "-"), (-3, "0s")])
def test_durations_read_like_a_person_would_say_them(seconds: float | None, text: str) -> None:
    assert cli.duration(seconds) == text


# -- the serve settings file ----------------------------------------------------


def test_settings_file_values_reach_the_serve_options() -> None:
    settings = parse("port: 9000\nmin_instances: 3\nenv:\n  COLOR: blue\n  WORKERS: 4\n", Path("agent.yaml"))
    options = build_options(Path("/srv/shop"), settings, {})
    assert (options.port, options.settings["min_instances"], options.settings["env"]) == (
        9000, 3, {"COLOR": "blue", "WORKERS": "4"})
    assert options.settings["max_pool_size"] == ServeOptions(app_dir=Path("/")).settings["max_pool_size"]


def test_flags_override_the_file_and_add_to_its_env() -> None:
    settings = parse("port: 9000\nhost: 0.0.0.0\nenv: {A: file, B: file}\n", Path("agent.yaml"))
    options = build_options(Path("/srv/shop"), settings, {"port": 9100, "host": None, "env": {"B": "flag"}})
    assert (options.port, options.host) == (9100, "0.0.0.0")
    assert options.settings["env"] == {"A": "file", "B": "flag"}


@pytest.mark.parametrize(("text", "message"), [
    ("port: 9000\n\nmin_instance: 2\n", "agent.yaml:3: unknown key 'min_instance'"),
    ("agent_port: 9000\n", "agent.yaml:1: unknown key 'agent_port' (write directives without the agent_ prefix)"),
    ("host: a\nport: eighty\n", "agent.yaml:2: port must be an integer, not 'eighty'"),
    ("port: 70000\n", "agent.yaml:1: port must be between 1 and 65535, not 70000"),
    ("min_instances: true\n", "agent.yaml:1: min_instances must be an integer, not True"),
    ("# settings\nenv: [A, B]\n", "agent.yaml:2: env must be a mapping of NAME: VALUE"),
    ("env:\n  A: [1]\n", "agent.yaml:1: env A must be a string or a number"),
    ("prestart: maybe\n", "agent.yaml:1: prestart must be true or false, not 'maybe'"),
    ("max_request_time: soon\n", "agent.yaml:1: max_request_time must be a time such as 30"),
    ("port: 1\nport: 2\n", "agent.yaml:2: port is set twice (first on line 1)"),
    ("- port\n", "agent.yaml:1: the file must be a mapping"),
    ("port: 1\n  host: [\n", "agent.yaml:2: not valid YAML"),
])
def test_a_bad_settings_file_names_the_key_and_its_line(text: str, message: str) -> None:
    with pytest.raises(ServeConfigError) as caught:
        parse(text, Path("agent.yaml"))
    assert message in str(caught.value)


def test_an_empty_settings_file_leaves_the_defaults() -> None:
    options = build_options(Path("/srv/shop"), parse("", Path("agent.yaml")), {})
    assert options == ServeOptions(app_dir=Path("/srv/shop"))


def test_a_directive_beyond_the_options_is_passed_on_or_refused_by_name() -> None:
    """memory_limit is not one of ServeOptions' own fields: it must reach
    the rendered directives, or be refused with its key and line; never be
    dropped."""
    settings = parse("port: 9000\nmemory_limit: 300\n", Path("agent.yaml"))
    try:
        options = build_options(Path("/srv/shop"), settings, {})
    except ServeConfigError as e:
        assert "agent.yaml:2: memory_limit" in str(e)
    else:
        assert options.settings["memory_limit"] == 300


def test_serve_print_config_uses_the_file_and_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("port: 9000\nmin_instances: 3\nstartup_file: app.py\n")
    module = tmp_path / "ngx_http_agent_module.so"
    module.write_bytes(b"")
    out = io.StringIO()
    code = cli.main(["serve", str(tmp_path), "--config", str(config), "--port", "9100", "--module", str(module),
                     "--print-config"], out)
    assert code == 0
    assert "listen 127.0.0.1:9100;" in out.getvalue()
    assert "agent_min_instances 3;" in out.getvalue()
    assert 'agent_startup_file "app.py";' in out.getvalue()


def test_serve_writes_the_buffer_directives_from_the_file_and_the_flags(tmp_path: Path) -> None:
    """A buffer size from YAML (as written or in bytes) and --buffers from
    the command line reach the location; an unset busy size is left to
    nginx, which computes it from the buffers as proxy_* does."""
    config = tmp_path / "agent.yaml"
    config.write_text("buffer_size: 32k\nmax_temp_file_size: 0\ntemp_file_write_size: 65536\n")
    module = tmp_path / "ngx_http_agent_module.so"
    module.write_bytes(b"")
    out = io.StringIO()
    code = cli.main(["serve", str(tmp_path), "--config", str(config), "--buffers", "4 64k", "--module", str(module),
                     "--print-config"], out)
    assert code == 0
    text = out.getvalue()
    assert "agent_buffer_size 32k;" in text and "agent_buffers 4 64k;" in text
    assert "agent_max_temp_file_size 0;" in text and "agent_temp_file_write_size 65536;" in text
    assert "agent_busy_buffers_size" not in text


@pytest.mark.parametrize(("text", "message"), [
    ("buffers: 8\n", "agent.yaml:1: buffers must be a number of buffers and their size such as '8 16k', not 8"),
    ("buffers: 1 64k\n", "agent.yaml:1: buffers must be at least 2 buffers of more than 0 bytes"),
    ("busy_buffers_size: 1g\n", "agent.yaml:1: busy_buffers_size must be a size such as 4096, 8k or 1m, not '1g'"),
])
def test_a_bad_buffer_setting_names_the_key_and_its_line(text: str, message: str) -> None:
    with pytest.raises(ServeConfigError) as caught:
        parse(text, Path("agent.yaml"))
    assert message in str(caught.value)


def test_a_bad_buffers_flag_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", ".", "--buffers", "8"])
    assert caught.value.code == 2
    assert "--buffers: must be a number of buffers and their size" in capsys.readouterr().err


def test_serve_with_a_bad_settings_file_fails_naming_the_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("port: 9000\nmax_pool: 3\n")
    assert cli.main(["serve", str(tmp_path), "--config", str(config), "--print-config"]) == 1
    assert f"{config}:2: unknown key 'max_pool'" in capsys.readouterr().err


# -- the command line -------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["restart-app"], ["detach-process", "abc"], ["top", "--interval", "0"], ["status", "--bogus"],
    ["no-such-command"], ["serve"], ["serve", ".", "--min-instances", "-1"],
])
def test_a_wrong_command_line_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    assert "usage: agentctl" in capsys.readouterr().err


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("status", "top", "memory-stats", "requests", "restart-app", "detach-process", "reopen-logs",
                    "list-instances", "serve"):
        with pytest.raises(SystemExit) as caught:
            cli.main([command, "--help"])
        assert caught.value.code == 0
        assert f"agentctl {command}" in capsys.readouterr().out.split("examples:")[1]


# -- the client against a status socket peer -----------------------------------


class Peer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A status socket that answers from a table of fixed documents."""

    daemon_threads = True

    def __init__(self, path: Path, answers: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str]] = []
        super().__init__(str(path), PeerHandler)


class PeerHandler(BaseHTTPRequestHandler):
    server: Peer

    def answer(self) -> None:
        self.server.seen.append((self.command, self.path))
        status, document = self.server.answers.get((self.command, self.path.split("?")[0]),
                                                   (404, {"error": f"no such resource: {self.path}"}))
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = answer
    do_POST = answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    root = tmp_path / "instance"
    root.mkdir()
    return root


def start_peer(root: Path, answers: dict[tuple[str, str], tuple[int, Any]]) -> Peer:
    peer = Peer(root / "status.sock", answers)
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    return peer


@pytest.fixture
def peer(instance: Path) -> Iterator[Peer]:
    server = start_peer(instance, {("GET", "/server"): (200, SERVER), ("GET", "/pool"): (200, POOL),
                                   ("GET", "/requests"): (200, REQUESTS)})
    yield server
    server.shutdown()
    server.server_close()


def run(instance: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(["--instance", str(instance), *argv], out)
    return code, out.getvalue()


def test_status_reads_server_and_pool_from_the_socket(instance: Path, peer: Peer) -> None:
    code, text = run(instance, "status")
    assert code == 0
    assert "/srv/shop (wsgi)" in text and "2001" in text and "2002" in text
    code, text = run(instance, "status", "--json")
    assert code == 0
    assert json.loads(text) == {"server": SERVER, "pool": POOL}


def test_instance_may_follow_the_command(instance: Path, peer: Peer) -> None:
    out = io.StringIO()
    assert cli.main(["requests", "--instance", str(instance)], out) == 0
    assert "/checkout" in out.getvalue()


def test_top_redraws_the_screen_each_interval(instance: Path, peer: Peer) -> None:
    started = time.monotonic()
    code, text = run(instance, "top", "--interval", "0.2", "--iterations", "3")
    assert code == 0
    assert text.count(cli.CLEAR_SCREEN) == 3
    assert text.count("/srv/shop (wsgi)") == 3
    assert time.monotonic() - started >= 0.4
    assert peer.seen.count(("GET", "/pool")) == 3


def test_restart_app_accepts_a_path_that_resolves_to_the_app(tmp_path: Path, instance: Path, peer: Peer) -> None:
    app_root = tmp_path / "shop"
    app_root.mkdir()
    (tmp_path / "link").symlink_to(app_root)
    pool = copy.deepcopy(POOL)
    pool["apps"][0].update(name=str(app_root), app_root=str(app_root))
    peer.answers[("GET", "/pool")] = (200, pool)
    peer.answers[("POST", "/apps/restart")] = (200, {"ok": True})
    code, text = run(instance, "restart-app", f"{tmp_path}/link/", "--blocking")
    assert code == 0, text
    assert peer.seen[-1] == ("POST", f"/apps/restart?app={str(app_root).replace('/', '%2F')}&blocking=1")
    assert text == f"restarted {app_root}\n"


@pytest.mark.parametrize(("status", "code"), [(403, 4), (404, 5), (409, 1), (500, 1)])
def test_agent_errors_become_exit_codes_and_messages(instance: Path, peer: Peer, status: int, code: int,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    peer.answers[("POST", "/processes/2001/detach")] = (status, {"error": f"refused with {status}"})
    assert run(instance, "detach-process", "2001")[0] == code
    assert f"refused with {status}" in capsys.readouterr().err


def test_an_unknown_app_is_exit_5_and_lists_the_known_ones(instance: Path, peer: Peer,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run(instance, "restart-app", "/srv/nope")[0] == 5
    assert "unknown app '/srv/nope'; the agent runs: /srv/shop" in capsys.readouterr().err
    assert not any(method == "POST" for method, _ in peer.seen)


def test_no_socket_and_a_dead_socket_are_exit_3(instance: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(instance, "status")[0] == 3
    assert "no agent answers on" in capsys.readouterr().err
    peer = Peer(instance / "status.sock", {})
    peer.server_close()  # the socket file stays, nobody listens: connection refused
    assert (instance / "status.sock").exists()
    assert run(instance, "status")[0] == 3
    assert "Connection refused" in capsys.readouterr().err


# -- finding instances -------------------------------------------------------------

LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def watchdogs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def fake_running_agent(root: Path, watchdogs: list[subprocess.Popen[str]]) -> None:
    """A process holding watchdog.pid's lock, as the watchdog does, and a
    status.sock: what discovery looks at."""
    root.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(root / "watchdog.pid")],
                            stdout=subprocess.PIPE, text=True)
    watchdogs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    (root / "status.sock").touch()


def test_discovery_finds_running_agents_only(tmp_path: Path, watchdogs: list[subprocess.Popen[str]]) -> None:
    fake_running_agent(tmp_path / "agent-1a2b3c4d", watchdogs)
    stale = tmp_path / "agent-serve-8080" / "instance"
    stale.mkdir(parents=True)
    (stale / "watchdog.pid").write_text("99999\n")
    (stale / "status.sock").touch()
    found = running_instances({}, tmp_path)
    assert [(i.root, i.watchdog_pid) for i in found] == [(tmp_path / "agent-1a2b3c4d", watchdogs[0].pid)]
    assert choose_instance(None, {}, tmp_path) == tmp_path / "agent-1a2b3c4d"
    watchdogs[0].kill()
    watchdogs[0].wait()
    with pytest.raises(NoAgentError):
        choose_instance(None, {}, tmp_path)


def test_several_agents_need_a_choice(tmp_path: Path, watchdogs: list[subprocess.Popen[str]]) -> None:
    fake_running_agent(tmp_path / "agent-1a2b3c4d", watchdogs)
    fake_running_agent(tmp_path / "agent-serve-8080" / "instance", watchdogs)
    with pytest.raises(NoAgentError) as caught:
        choose_instance(None, {}, tmp_path)
    assert caught.value.exit_code == 3
    assert str(tmp_path / "agent-1a2b3c4d") in str(caught.value)
    assert str(tmp_path / "agent-serve-8080" / "instance") in str(caught.value)
    explicit = tmp_path / "agent-serve-8080" / "instance"
    assert choose_instance(explicit, {}, tmp_path) == explicit
    assert choose_instance(None, {"AGENT_INSTANCE_DIR": str(explicit)}, tmp_path) == explicit


def test_list_instances_shows_the_watchdog_and_the_apps(instance: Path, peer: Peer,
                                                        watchdogs: list[subprocess.Popen[str]]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(instance / "watchdog.pid")],
                            stdout=subprocess.PIPE, text=True)
    watchdogs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    code, text = run(instance, "list-instances")
    assert code == 0
    assert columns(text.splitlines()[1]) == [str(instance), str(proc.pid), "1"]
    os.kill(proc.pid, 9)
    proc.wait()
    assert run(instance, "list-instances")[0] == 3
