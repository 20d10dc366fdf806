"""The status socket's HTTP server, on a real Unix socket, driven by a
selector loop on its own thread as the core's loop drives it. The
provider is a small test double: these tests are about the server."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.control import metrics
from agent.control import server as status
from agent.control.server import StatusError, StatusServer
from agent.control.tokens import ensure_tokens, read_tokens

NOBODY = 65534
SERVER_INFO = {"version": "0.1.0", "pid": 1234, "watchdog_pid": 1233, "uptime": 1.5, "apps": 1}


@dataclass
class FakeProvider:
    apps: set[str] = field(default_factory=lambda: {"/srv/shop"})
    workers: dict[int, str] = field(default_factory=lambda: {2001: "serving", 2002: "stopping", 2003: "starting"})
    pool: dict[str, Any] = field(default_factory=lambda: {"max_pool_size": 6, "apps": []})
    restarts: list[tuple[str, bool]] = field(default_factory=list)
    held: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    detached: list[int] = field(default_factory=list)
    reopened: int = 0
    broken: bool = False
    detailed: list[bool] = field(default_factory=list)   # what pool_info and requests_info were asked

    def server_info(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("the provider failed")
        return dict(SERVER_INFO)

    def pool_info(self, detailed: bool) -> dict[str, Any]:
        self.detailed.append(detailed)
        return self.pool

    def requests_info(self, detailed: bool) -> dict[str, Any]:
        self.detailed.append(detailed)
        return {"requests": [{"app": "/srv/shop", "method": "GET", "path": "/", "pid": None, "age": 0.5,
                              "state": "queued"}]}

    def metrics_snapshot(self) -> metrics.MetricsSnapshot:
        return metrics.MetricsSnapshot(uptime=3.0, apps=[metrics.AppMetrics(name="/srv/shop", requests=7)])

    def restart_app(self, name: str, blocking: bool, done: Callable[[dict[str, Any]], None]) -> None:
        if name not in self.apps:
            raise KeyError(name)
        self.restarts.append((name, blocking))
        if blocking:
            self.held.append(done)
        else:
            done({"app": name, "blocking": False})

    def detach_process(self, pid: int) -> dict[str, Any]:
        if pid not in self.workers:
            raise KeyError(pid)
        if self.workers[pid] == "starting":
            raise StatusError(409, f"worker {pid} is still starting")
        if self.workers[pid] != "serving":
            raise ValueError(f"worker {pid} is {self.workers[pid]}")
        self.detached.append(pid)
        return {"pid": pid}

    def reopen_logs(self) -> dict[str, Any]:
        self.reopened += 1
        return {}


class Loop:
    """A selector loop on a thread, shaped like the core's: it calls
    key.data(key.fd) for ready fds, and runs calls handed to it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, self.on_wake)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)

    def on_wake(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self.wake_reader.recv(4096)

    def run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(timeout=0.5):
                callback: Callable[[int], None] = key.data
                callback(key.fd)
            while not self.calls.empty():
                call, answer = self.calls.get()
                answer.put(call())

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the loop's thread and return its result."""
        answer: queue.Queue[Any] = queue.Queue()
        self.calls.put((function, answer))
        self.wake_writer.send(b"x")
        return answer.get(timeout=5)

    def stop(self) -> None:
        self.running = False
        self.wake_writer.send(b"x")
        self.thread.join(timeout=5)


@dataclass
class Harness:
    directory: Path
    socket_path: Path
    provider: FakeProvider
    loop: Loop
    server: StatusServer

    @property
    def tokens(self) -> status.Tokens:
        return read_tokens(self.directory)


@contextlib.contextmanager
def running_server(token_owner: int | None = None, backlog: int = 64,
                   dashboard: bool = False) -> Iterator[Harness]:
    """A status server on its own loop thread, in a directory anyone may
    traverse (unlike pytest's tmp_path), so that a client running as nobody
    can reach the socket. token_owner: the uid that made the tokens (the
    agent's), when not this process's; dashboard: serve a small page as
    the dashboard, from the same directory."""
    directory = Path(tempfile.mkdtemp(prefix="agent-status-test-"))
    directory.chmod(0o755)
    ensure_tokens(directory)
    if token_owner is not None:
        for token in directory.glob("*.token"):
            os.chown(token, token_owner, token_owner)
    socket_path = directory / "status.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    socket_path.chmod(0o666)
    listener.listen(backlog)
    options: dict[str, Any] = {}
    if dashboard:
        options["dashboard"] = directory / "dashboard.html"
        options["dashboard"].write_text("<html><title>agent</title></html>")
    provider = FakeProvider()
    loop = Loop()
    server = StatusServer(listener, loop.selector, provider, directory, **options)
    loop.thread.start()
    try:
        yield Harness(directory, socket_path, provider, loop, server)
    finally:
        loop.call(server.close)
        loop.stop()
        listener.close()
        shutil.rmtree(directory)


@pytest.fixture
def harness() -> Iterator[Harness]:
    with running_server(dashboard=True) as running:
        yield running


# -- a minimal client -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Client:
    """One connection, with a buffer: a read may return more than one reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return chunk

    def take(self, size: int) -> bytes:
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken


def connect(path: Path) -> Client:
    return Client(path)


def request_bytes(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: agent"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_reply(client: Client, head_only: bool = False) -> Reply:
    while b"\r\n\r\n" not in client.buffer:
        assert client.receive(), f"connection closed before a full reply: {client.buffer!r}"
    head = client.take(client.buffer.index(b"\r\n\r\n") + 4)[:-4]
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only else int(headers["content-length"])
    while len(client.buffer) < length:
        assert client.receive(), "connection closed in the body"
    return Reply(int(status_line.split(" ")[1]), headers, client.take(length))


def fetch(path: Path, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Reply:
    with connect(path) as sock:
        sock.sendall(request_bytes(method, target, headers, body))
        return read_reply(sock, head_only=method == "HEAD")


def closed_by_server(client: Client) -> bool:
    """The server closed the connection, with nothing unread before the end."""
    try:
        return client.receive() == b"" and client.buffer == b""
    except ConnectionResetError:
        return True


def bearer(token: bytes | None) -> dict[str, str]:
    assert token is not None
    return {"Authorization": f"Bearer {token.decode()}"}


# -- reading ------------------------------------------------------------------------


def test_get_server_answers_json(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "GET", "/server")
    assert reply.status == 200
    assert reply.json() == SERVER_INFO
    assert reply.headers["connection"] == "keep-alive"


def test_every_read_resource_answers(harness: Harness) -> None:
    assert fetch(harness.socket_path, "GET", "/pool").json() == {"max_pool_size": 6, "apps": []}
    assert fetch(harness.socket_path, "GET", "/requests").json()["requests"][0]["state"] == "queued"
    page = fetch(harness.socket_path, "GET", "/dashboard")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert b"<title>agent</title>" in page.body


def test_metrics_is_prometheus_text(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    assert [s.value for s in found["agent_requests"].samples] == [7]


def test_msgpack_when_accept_names_it_first(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "GET", "/server", {"Accept": "application/msgpack, application/json"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(reply.body) == SERVER_INFO
    second = fetch(harness.socket_path, "GET", "/server", {"Accept": "application/json, application/msgpack"})
    assert second.json() == SERVER_INFO


def test_head_answers_headers_only(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("HEAD", "/server") + request_bytes("GET", "/server"))
        head = read_reply(sock, head_only=True)
        assert head.status == 200
        assert int(head.headers["content-length"]) == len(json.dumps(SERVER_INFO, separators=(",", ":")))
        assert read_reply(sock).json() == SERVER_INFO


def test_dashboard_missing_is_404(harness: Harness) -> None:
    (harness.directory / "dashboard.html").unlink()
    assert fetch(harness.socket_path, "GET", "/dashboard").status == 404


# -- connections ------------------------------------------------------------------


def test_keep_alive_serves_several_requests(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        for _ in range(3):
            sock.sendall(request_bytes("GET", "/server"))
            assert read_reply(sock).json() == SERVER_INFO


def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("GET", "/server") + request_bytes("GET", "/pool") + request_bytes("GET", "/nope"))
        assert read_reply(sock).json() == SERVER_INFO
        assert read_reply(sock).json()["max_pool_size"] == 6
        assert read_reply(sock).status == 404


def test_many_pipelined_requests_beyond_one_wakeup(harness: Harness) -> None:
    count = status.REQUESTS_PER_WAKEUP * 3
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("GET", "/server") * count)
        replies = [read_reply(sock) for _ in range(count)]
    assert [r.status for r in replies] == [200] * count


def test_connection_close_is_honoured(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("GET", "/server", {"Connection": "close"}))
        reply = read_reply(sock)
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert closed_by_server(sock)


def test_http_1_0_closes_unless_asked_to_keep_alive(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(b"GET /server HTTP/1.0\r\n\r\n")
        assert read_reply(sock).status == 200
        assert closed_by_server(sock)
    with connect(harness.socket_path) as sock:
        sock.sendall(b"GET /server HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_reply(sock).headers["connection"] == "keep-alive"
        sock.sendall(b"GET /server HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_reply(sock).status == 200


def test_a_request_in_pieces_is_assembled(harness: Harness) -> None:
    data = request_bytes("POST", "/logs/reopen", body=b"{}")
    with connect(harness.socket_path) as sock:
        for index in range(0, len(data), 7):
            sock.sendall(data[index:index + 7])
            time.sleep(0.005)
        assert read_reply(sock).json() == {"ok": True}
    assert harness.provider.reopened == 1


def test_a_slow_reader_does_not_stall_other_clients(harness: Harness) -> None:
    harness.provider.pool = {"max_pool_size": 6, "apps": [{"name": "x" * 1000, "n": i} for i in range(4000)]}
    with connect(harness.socket_path) as slow:
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(request_bytes("GET", "/pool"))
        time.sleep(0.2)
        # The server cannot have written 4 MB into the slow client's socket; it still answers others.
        assert fetch(harness.socket_path, "GET", "/server").json() == SERVER_INFO
        reply = read_reply(slow)
    assert len(reply.json()["apps"]) == 4000


def test_idle_connections_are_closed_by_tick(harness: Harness) -> None:
    with connect(harness.socket_path) as idle, connect(harness.socket_path) as busy:
        busy.sendall(request_bytes("GET", "/server"))
        read_reply(busy)
        time.sleep(0.05)
        harness.loop.call(lambda: harness.server.tick(time.monotonic() + 5))
        assert len(harness.server.connections) == 2
        harness.loop.call(lambda: harness.server.tick(time.monotonic() + status.IDLE_LIMIT + 1))
        assert closed_by_server(idle)
        assert closed_by_server(busy)
    assert harness.server.connections == {}


# -- bad requests ---------------------------------------------------------------------


def test_unknown_resource_is_404(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "GET", "/nothing/here")
    assert reply.status == 404
    assert "error" in reply.json()


def test_wrong_method_is_405_with_allow(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "POST", "/server")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    action = fetch(harness.socket_path, "GET", "/apps/restart?app=/srv/shop")
    assert action.status == 405
    assert action.headers["allow"] == "POST"
    assert harness.provider.restarts == []


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"GET /server HTTP/2.0\r\n\r\n",
    b"GET server HTTP/1.1\r\n\r\n",
    b"GET /server HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /logs/reopen HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
    b"POST /logs/reopen HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"POST /logs/reopen HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n0\r\n\r\n",
    b"POST /logs/reopen HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"POST /logs/reopen HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /logs/reopen HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
])
def test_malformed_request_is_400_and_closes(harness: Harness, garbage: bytes) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(garbage)
        reply = read_reply(sock)
        assert reply.status == 400
        assert reply.json()["error"]
        assert closed_by_server(sock)
    assert fetch(harness.socket_path, "GET", "/server").status == 200
    assert harness.provider.reopened == 0


def test_oversized_headers_are_refused_and_the_server_keeps_serving(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(b"GET /server HTTP/1.1\r\nX-Big: " + b"a" * (status.MAX_REQUEST + 10))
        reply = read_reply(sock)
        assert reply.status == 400
        assert "exceed" in reply.json()["error"]
        assert closed_by_server(sock)
    assert fetch(harness.socket_path, "GET", "/server").json() == SERVER_INFO


def test_oversized_body_is_refused_and_the_server_keeps_serving(harness: Harness) -> None:
    body = b"x" * (status.MAX_REQUEST * 2)
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("POST", "/logs/reopen", body=body))
        reply = read_reply(sock)
        assert reply.status == 400
        assert closed_by_server(sock)
    assert harness.provider.reopened == 0
    assert fetch(harness.socket_path, "GET", "/server").json() == SERVER_INFO


def test_a_provider_failure_is_500_and_the_server_keeps_serving(harness: Harness) -> None:
    harness.provider.broken = True
    assert fetch(harness.socket_path, "GET", "/server").status == 500
    harness.provider.broken = False
    assert fetch(harness.socket_path, "GET", "/server").status == 200


# -- actions ------------------------------------------------------------------------------


def test_reopen_logs_as_root(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "POST", "/logs/reopen")
    assert reply.status == 200
    assert reply.json() == {"ok": True}
    assert harness.provider.reopened == 1


def test_restart_answers_at_once_when_not_blocking(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "POST", "/apps/restart?app=/srv/shop")
    assert reply.json() == {"ok": True, "app": "/srv/shop", "blocking": False}
    assert harness.provider.restarts == [("/srv/shop", False)]


def test_restart_errors(harness: Harness) -> None:
    assert fetch(harness.socket_path, "POST", "/apps/restart?app=/srv/none").status == 404
    assert fetch(harness.socket_path, "POST", "/apps/restart").status == 400
    assert fetch(harness.socket_path, "POST", "/apps/restart?app=/srv/shop&blocking=maybe").status == 400
    assert fetch(harness.socket_path, "POST", "/apps/restart?app=/srv/shop&app=/srv/x").status == 400
    assert harness.provider.restarts == []


def test_blocking_restart_is_answered_when_done(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("POST", "/apps/restart?app=/srv/shop&blocking=1"))
        sock.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.receive()
        # While the answer is held, the loop serves everyone else.
        assert fetch(harness.socket_path, "GET", "/server").status == 200
        assert harness.provider.restarts == [("/srv/shop", True)]
        done = harness.provider.held[0]
        harness.loop.call(lambda: done({"app": "/srv/shop", "workers_replaced": 2}))
        sock.sock.settimeout(5)
        assert read_reply(sock).json() == {"ok": True, "app": "/srv/shop", "workers_replaced": 2}
        # The connection carries on.
        sock.sendall(request_bytes("GET", "/server"))
        assert read_reply(sock).json() == SERVER_INFO


def test_held_answer_keeps_the_connection_past_the_idle_limit(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("POST", "/apps/restart?app=/srv/shop&blocking=1"))
        time.sleep(0.1)
        harness.loop.call(lambda: harness.server.tick(time.monotonic() + status.IDLE_LIMIT + 1))
        done = harness.provider.held[0]
        harness.loop.call(lambda: done({"ok": False, "error": "abandoned: a worker failed to start"}))
        reply = read_reply(sock)
    assert reply.status == 409
    assert reply.json() == {"ok": False, "error": "abandoned: a worker failed to start"}


def test_held_answer_for_a_client_that_left_is_dropped(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("POST", "/apps/restart?app=/srv/shop&blocking=1"))
        time.sleep(0.1)
    time.sleep(0.1)
    done = harness.provider.held[0]
    harness.loop.call(lambda: done({"app": "/srv/shop"}))
    harness.loop.call(lambda: done({"app": "/srv/shop"}))  # a second call is ignored
    assert harness.server.connections == {}
    assert fetch(harness.socket_path, "GET", "/server").status == 200


def test_detach(harness: Harness) -> None:
    assert fetch(harness.socket_path, "POST", "/processes/2001/detach").json() == {"ok": True, "pid": 2001}
    assert harness.provider.detached == [2001]
    assert fetch(harness.socket_path, "POST", "/processes/9999/detach").status == 404
    conflict = fetch(harness.socket_path, "POST", "/processes/2002/detach")
    assert conflict.status == 409
    assert conflict.json() == {"error": "worker 2002 is stopping"}
    starting = fetch(harness.socket_path, "POST", "/processes/2003/detach")
    assert starting.status == 409
    assert starting.json() == {"error": "worker 2003 is still starting"}
    assert fetch(harness.socket_path, "POST", "/processes/abc/detach").status == 400
    assert harness.provider.detached == [2001]


# -- rights ---------------------------------------------------------------------------------


def test_tokens_decide_rights(harness: Harness) -> None:
    tokens = harness.tokens
    path = harness.socket_path
    assert fetch(path, "GET", "/server", bearer(tokens.read)).status == 200
    assert fetch(path, "POST", "/logs/reopen", bearer(tokens.read)).status == 403
    assert fetch(path, "POST", "/logs/reopen", bearer(tokens.admin)).status == 200
    assert harness.provider.reopened == 1


def test_a_wrong_token_is_refused_even_for_root(harness: Harness) -> None:
    path = harness.socket_path
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert fetch(path, "GET", "/server", wrong).status == 403
    assert fetch(path, "POST", "/logs/reopen", wrong).status == 403
    assert fetch(path, "GET", "/server", {"Authorization": "Basic dXNlcjpwYXNz"}).status == 403
    assert fetch(path, "GET", "/server", {"Authorization": "Bearer"}).status == 403
    assert harness.provider.reopened == 0


def run_as_nobody(path: Path, requests: list[tuple[str, str, dict[str, str]]]) -> list[int]:
    """Send requests from a child process that is uid nobody before it
    connects, so that SO_PEERCRED names nobody; returns the statuses."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            statuses = [fetch(path, method, target, headers).status for method, target, headers in requests]
            os.write(writer, json.dumps(statuses).encode())
        except BaseException as error:
            os.write(writer, json.dumps({"error": repr(error)}).encode())
        finally:
            os._exit(0)
    os.close(writer)
    data = b""
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert isinstance(result, list), result
    return result


def test_another_uid_reads_but_may_not_act(harness: Harness) -> None:
    admin = bearer(harness.tokens.admin)
    statuses = run_as_nobody(harness.socket_path, [
        ("GET", "/server", {}),
        ("GET", "/metrics", {}),
        ("POST", "/logs/reopen", {}),
        ("POST", "/apps/restart?app=/srv/shop", {}),
        ("POST", "/logs/reopen", admin),
    ])
    assert statuses == [200, 200, 403, 403, 200]
    assert harness.provider.reopened == 1
    assert harness.provider.restarts == []


# -- tokens on disk -------------------------------------------------------------------------


def test_ensure_tokens_makes_private_random_tokens_once(tmp_path: Path) -> None:
    first = ensure_tokens(tmp_path)
    for name in ("read.token", "admin.token"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600
    assert first.read is not None and first.admin is not None
    assert len(first.read) == 64 and len(first.admin) == 64
    int(first.read, 16)
    assert first.read != first.admin
    assert ensure_tokens(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token", "read.token"]


def test_ensure_tokens_replaces_only_what_is_missing(tmp_path: Path) -> None:
    first = ensure_tokens(tmp_path)
    (tmp_path / "read.token").unlink()
    second = ensure_tokens(tmp_path)
    assert second.admin == first.admin
    assert second.read is not None and second.read != first.read


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_document_names_exactly_the_served_routes(harness: Harness) -> None:
    document = yaml.safe_load((Path(__file__).parents[3] / "docs" / "openapi.yaml").read_text())
    assert document["openapi"].startswith("3.0")
    examples = {"/processes/{pid}/detach": "/processes/2001/detach", "/apps/restart": "/apps/restart?app=/srv/shop"}
    documented = set()
    for template, operations in document["paths"].items():
        for method in operations:
            documented.add((method.upper(), template))
            reply = fetch(harness.socket_path, method.upper(), examples.get(template, template))
            assert reply.status == 200, (method, template, reply.body)
    served = {("GET", path) for path in harness.server.reads} | {
        ("POST", "/apps/restart"), ("POST", "/processes/{pid}/detach"), ("POST", "/logs/reopen")}
    assert documented == served


def test_a_client_that_half_closes_still_gets_its_answers(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(request_bytes("GET", "/server") + request_bytes("POST", "/apps/restart?app=/srv/shop&blocking=1"))
        sock.sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock).json() == SERVER_INFO
        time.sleep(0.1)
        done = harness.provider.held[0]
        harness.loop.call(lambda: done({"app": "/srv/shop"}))
        assert read_reply(sock).json() == {"ok": True, "app": "/srv/shop"}
        assert closed_by_server(sock)
    assert harness.server.connections == {}


# -- body framings: chunked, Expect: 100-continue ----------------------------------


CHUNKED_HEAD = b"POST /logs/reopen HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n"


def test_a_chunked_body_is_read_whole_and_the_next_request_follows_it(harness: Harness) -> None:
    body = b"5;ext=1\r\nhello\r\nA\r\n, chunked!\r\n0\r\nX-Trailer: yes\r\n\r\n"
    with connect(harness.socket_path) as sock:
        # Sent in pieces, and followed on the same connection by another
        # request: the framing must end exactly where the body does.
        sock.sendall(CHUNKED_HEAD + b"\r\n" + body[:9])
        sock.sendall(body[9:] + request_bytes("GET", "/server"))
        assert read_reply(sock).json() == {"ok": True}
        assert read_reply(sock).json() == SERVER_INFO
    assert harness.provider.reopened == 1


def test_a_chunked_body_counts_against_the_request_limit(harness: Harness) -> None:
    chunk = b"x" * 4096
    body = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(status.MAX_REQUEST // 4096 + 1))
    with connect(harness.socket_path) as sock:
        sock.sendall(CHUNKED_HEAD + b"\r\n" + body)
        reply = read_reply(sock)
        assert reply.status == 400 and "exceeds" in reply.json()["error"]
    assert harness.provider.reopened == 0


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"])
def test_expect_100_continue_gets_100_before_the_body(harness: Harness, framing: bytes) -> None:
    body = b"hello" if b"Content-Length" in framing else b"5\r\nhello\r\n0\r\n\r\n"
    with connect(harness.socket_path) as sock:
        sock.sendall(b"POST /logs/reopen HTTP/1.1\r\nHost: agent\r\n" + framing + b"Expect: 100-continue\r\n\r\n")
        while len(sock.buffer) < len(status.CONTINUE):
            assert sock.receive(), "closed before 100 Continue"
        assert sock.take(len(status.CONTINUE)) == status.CONTINUE
        assert harness.provider.reopened == 0          # the body has not come yet
        sock.sendall(body)
        assert read_reply(sock).json() == {"ok": True}
        # One 100 Continue per request: the next request's answer comes alone.
        sock.sendall(request_bytes("GET", "/server"))
        assert read_reply(sock).json() == SERVER_INFO
    assert harness.provider.reopened == 1


def test_a_request_refused_on_its_headers_gets_no_100_continue(harness: Harness) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(b"POST /logs/reopen HTTP/1.1\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n")
        reply = read_reply(sock)
        assert reply.status == 400
        assert closed_by_server(sock)


@pytest.mark.parametrize(("header", "code"), [(b"Expect: something-else", 417),
                                               (b"Transfer-Encoding: gzip, chunked", 501)])
def test_unmet_expectations_and_unknown_codings_are_refused(harness: Harness, header: bytes, code: int) -> None:
    with connect(harness.socket_path) as sock:
        sock.sendall(b"POST /logs/reopen HTTP/1.1\r\nContent-Length: 0\r\n" + header + b"\r\n\r\n"
                     if b"Expect" in header else
                     b"POST /logs/reopen HTTP/1.1\r\n" + header + b"\r\n\r\n0\r\n\r\n")
        reply = read_reply(sock)
        assert reply.status == code
        assert reply.json()["error"]
        assert closed_by_server(sock)
    assert harness.provider.reopened == 0
