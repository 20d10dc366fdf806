"""The status socket under a hostile local user (docs/security.md): the
connection limits per uid and the admins' reserve, the deadline of a
request, precise answers to malformed requests, what a reader without the
admin right sees, and who is admin by uid alone."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.control import server as status
from agent.control.provider import HIDDEN_ERROR, CoreStatus, path_only
from agent.control.server import StatusError, parse_request
from agent.core.config import AppConfig
from agent.core.pool import App

from .test_status import (
    NOBODY,
    SERVER_INFO,
    Harness,
    bearer,
    closed_by_server,
    connect,
    fetch,
    read_reply,
    request_bytes,
    run_as_nobody,
    running_server,
)

# -- code as another uid --------------------------------------------------------------


@contextmanager
def as_nobody(work: Callable[[], Any]) -> Iterator[Any]:
    """Runs `work` in a child process whose uid is nobody and yields what it
    returned (JSON); the child keeps its connections open until the block ends."""
    results, writer = os.pipe()
    release, holder = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(results)
            os.close(holder)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(writer, json.dumps({"result": work()}).encode())
            os.close(writer)
            os.read(release, 1)
        except BaseException as error:
            os.write(writer, json.dumps({"error": repr(error)}).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.close(release)
    try:
        with os.fdopen(results, "rb") as pipe:
            answer = json.loads(pipe.readline() or pipe.read())
        assert "result" in answer, answer
        yield answer["result"]
    finally:
        os.close(holder)
        os.waitpid(pid, 0)


KEPT: list[socket.socket] = []   # the child's connections, kept open until it exits


def open_connections(path: Path, count: int, first: bytes = b"") -> list[str]:
    """In the child: opens `count` connections (sending `first` on each) and
    says of each whether the server kept it ("open") or refused it (its
    answer's status)."""
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        if first:
            sock.sendall(first)
        KEPT.append(sock)
    time.sleep(0.3)
    outcomes = []
    for sock in KEPT:
        sock.settimeout(0.05)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            outcomes.append("open")
            continue
        outcomes.append(data.split(b" ", 2)[1].decode() if data else "closed")
    return outcomes


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "MAX_CONNECTIONS", 10)
    monkeypatch.setattr(status, "ADMIN_RESERVE", 3)
    monkeypatch.setattr(status, "MAX_PER_UID", 4)


# -- finding 6: connection limits -------------------------------------------------------


@pytest.mark.usefixtures("small_limits")
def test_one_uid_gets_its_share_and_the_rest_503(harness: Harness) -> None:
    path = harness.socket_path
    with as_nobody(lambda: open_connections(path, 6)) as outcomes:
        assert outcomes == ["open"] * 4 + ["503"] * 2
        # Root, and the server, are not shut out.
        assert fetch(path, "GET", "/server").json() == SERVER_INFO
        assert [c.peer.uid for c in harness.server.connections.values()].count(NOBODY) == 4


@pytest.mark.usefixtures("small_limits")
def test_root_keeps_the_reserve_when_other_uids_fill_theirs(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "MAX_PER_UID", 100)
    path = harness.socket_path
    with as_nobody(lambda: open_connections(path, 9)) as outcomes:
        assert outcomes == ["open"] * 7 + ["503"] * 2
        clients = [connect(path) for _ in range(3)]
        for client in clients:
            client.sendall(request_bytes("GET", "/server"))
            assert read_reply(client).json() == SERVER_INFO
        for client in clients:
            client.sock.close()


@pytest.mark.usefixtures("small_limits")
def test_an_admin_token_frees_the_uids_share(harness: Harness) -> None:
    path = harness.socket_path
    admin = request_bytes("GET", "/server", bearer(harness.tokens.admin))

    def work() -> list[str]:
        first = open_connections(path, 4, admin)
        return first + open_connections(path, 4)[4:]

    with as_nobody(work) as outcomes:
        # The four with the admin token answered (200), then four more fit.
        assert outcomes == ["200"] * 4 + ["open"] * 4


def test_refused_connections_make_one_log_line_a_tick(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(status, "MAX_PER_UID", 1)
    with as_nobody(lambda: open_connections(harness.socket_path, 5)) as outcomes:
        assert outcomes == ["open"] + ["503"] * 4
        with caplog.at_level(logging.WARNING, logger="agent"):
            harness.loop.call(harness.server.tick)
            harness.loop.call(harness.server.tick)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == [f"status socket: connections refused at the connection limits (uid {NOBODY}: 4)"]


# -- finding 6: the deadline of a request ------------------------------------------------


def test_a_request_sent_a_byte_at_a_time_gets_408_at_its_deadline(harness: Harness) -> None:
    start = time.monotonic()
    with connect(harness.socket_path) as slow:
        for byte in b"GET /ser":
            slow.sendall(bytes([byte]))
            time.sleep(0.01)
        time.sleep(0.05)
        # Each byte came within a second of the last: only the deadline of the whole request stops it.
        harness.loop.call(lambda: harness.server.tick(start + status.REQUEST_LIMIT / 2))
        assert len(harness.server.connections) == 1
        harness.loop.call(lambda: harness.server.tick(start + status.REQUEST_LIMIT + 1))
        reply = read_reply(slow)
        assert reply.status == 408
        assert reply.json() == {"error": f"the request was not complete within {status.REQUEST_LIMIT:g} s"}
        assert closed_by_server(slow)
    assert fetch(harness.socket_path, "GET", "/server").json() == SERVER_INFO


def test_the_deadline_is_per_request_on_a_kept_alive_connection(harness: Harness) -> None:
    with connect(harness.socket_path) as client:
        client.sendall(request_bytes("GET", "/server"))
        assert read_reply(client).status == 200
        time.sleep(0.05)
        # Idle between requests: the idle limit applies, not the request's deadline.
        harness.loop.call(lambda: harness.server.tick(time.monotonic() + status.REQUEST_LIMIT + 1))
        client.sendall(request_bytes("GET", "/server"))
        assert read_reply(client).json() == SERVER_INFO


def test_bytes_after_the_answer_do_not_keep_a_closing_connection(harness: Harness) -> None:
    with connect(harness.socket_path) as client:
        client.sendall(request_bytes("GET", "/server", {"Connection": "close"}))
        assert read_reply(client).status == 200
        client.sendall(b"more")
        time.sleep(0.05)
        harness.loop.call(lambda: harness.server.tick(time.monotonic() + status.LINGER + 1))
        assert closed_by_server(client)
    assert harness.server.connections == {}


# -- finding 9: malformed requests ------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    "POST /logs/reopen HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n",
    "POST /logs/reopen HTTP/1.1\r\nContent-Length: \u0663\r\n\r\n",
    "GET //[x HTTP/1.1\r\n\r\n",
    "GET /[::1]:80 HTTP/1.1\r\n\r\n",
    "GET http://[x/ HTTP/1.1\r\n\r\n",
    "POST /apps/restart?app=%zz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "POST /apps/restart?app=%e9 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "POST /apps/restart?app=%2 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "GET /server\x00 HTTP/1.1\r\n\r\n",
    "GET /server\x7f HTTP/1.1\r\n\r\n",
    "GET /server HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "GET /server HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "GET /server HTTP/" + "9" * 5000 + "\r\n\r\n",
    "GET /server HTTP/1.1\r\n" + "X: y\r\n" * 200 + "\r\n",
])
def test_a_malformed_request_gets_a_short_400_and_no_traceback(
        harness: Harness, garbage: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="agent"), connect(harness.socket_path) as sock:
        sock.sendall(garbage.encode("latin-1" if max(garbage) <= "\xff" else "utf-8"))
        reply = read_reply(sock)
        assert reply.status == 400
        assert 0 < len(reply.body) < 200
        assert reply.json()["error"]
        assert closed_by_server(sock)
    assert [r for r in caplog.records if r.exc_info] == []
    assert fetch(harness.socket_path, "GET", "/server").json() == SERVER_INFO
    assert harness.provider.reopened == 0
    assert harness.provider.restarts == []


def test_a_long_unknown_path_is_404_with_a_short_message(harness: Harness) -> None:
    reply = fetch(harness.socket_path, "GET", "/" + "x" * 10000)
    assert reply.status == 404
    assert len(reply.body) < 200
    pid = fetch(harness.socket_path, "POST", "/processes/" + "\u00b2".encode().decode("latin-1") + "/detach")
    assert pid.status == 400


def test_the_query_string_is_decoded_as_utf8(harness: Harness) -> None:
    harness.provider.apps.add("/srv/caf\u00e9 shop")
    reply = fetch(harness.socket_path, "POST", "/apps/restart?app=/srv/caf%C3%A9+shop&flag")
    assert reply.status == 200
    assert harness.provider.restarts == [("/srv/caf\u00e9 shop", False)]


@pytest.mark.parametrize(("target", "path", "query"), [
    ("/pool", "/pool", {}),
    ("/pool?", "/pool", {}),
    ("/apps/restart?app=/a&blocking=1", "/apps/restart", {"app": ["/a"], "blocking": ["1"]}),
    ("/x?a&a=&b=%20+", "/x", {"a": ["", ""], "b": ["  "]}),
    ("/x#frag?a=1", "/x", {}),
    ("/a/b;c=d/%41:@!$&'()*+,=-._~", "/a/b;c=d/%41:@!$&'()*+,=-._~", {}),
])
def test_split_target(target: str, path: str, query: dict[str, list[str]]) -> None:
    assert status.split_target(target) == (path, query)


def test_parse_request_raises_only_status_errors_on_odd_input() -> None:
    for data in [b"\r\n" * 40000, b"GET / HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n",
                 b"GET /?%ff%fe HTTP/1.1\r\n\r\n", b"\xff\xfe / HTTP/1.1\r\n\r\n", b":\r\n\r\n"]:
        try:
            parse_request(data)
        except StatusError as error:
            assert error.status == 400


# -- finding 8: what readers without the admin right see ---------------------------------------


def test_readers_without_the_admin_right_get_no_details(harness: Harness) -> None:
    tokens = harness.tokens
    path = harness.socket_path
    assert fetch(path, "GET", "/pool").status == 200
    assert fetch(path, "GET", "/requests", bearer(tokens.read)).status == 200
    assert fetch(path, "GET", "/requests", bearer(tokens.admin)).status == 200
    assert run_as_nobody(path, [("GET", "/pool", {}), ("GET", "/requests", {}),
                                ("GET", "/requests", bearer(tokens.admin))]) == [200, 200, 200]
    # root; the read token; the admin token; nobody; nobody; nobody with the admin token
    assert harness.provider.detailed == [True, False, True, False, False, True]


def test_the_provider_hides_query_strings_and_error_summaries() -> None:
    assert path_only("/reset?token=s3cret&x=1") == "/reset"
    assert path_only("/plain") == "/plain"
    app = App(id=1, config=AppConfig(name="/srv/shop", app_root="/srv/shop"))
    app.last_error, app.last_error_at = "KeyError: 'DB_PASSWORD=hunter2'", 1764280000.0
    provider = CoreStatus.__new__(CoreStatus)
    hidden = provider.app_document(app, None, 0, detailed=False)["last_spawn_error"]
    assert hidden == {"summary": HIDDEN_ERROR, "at": 1764280000.0}
    shown = provider.app_document(app, None, 0, detailed=True)["last_spawn_error"]
    assert shown["summary"] == "KeyError: 'DB_PASSWORD=hunter2'"


# -- finding 10: admin by uid is root only ------------------------------------------------------


@pytest.fixture
def agent_as_nobody(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """A status server whose process runs as nobody, as in a deployment
    without root: nobody is also nginx's workers' and the apps' uid (and it
    made the tokens)."""
    with monkeypatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: NOBODY)
        with running_server(token_owner=NOBODY, backlog=16) as running:
            patch.undo()
            yield running


def test_the_agents_own_uid_is_not_admin_without_the_token(agent_as_nobody: Harness) -> None:
    harness = agent_as_nobody
    admin = bearer((harness.directory / "admin.token").read_bytes().strip())
    statuses = run_as_nobody(harness.socket_path, [
        ("GET", "/server", {}),
        ("POST", "/logs/reopen", {}),
        ("POST", "/apps/restart?app=/srv/shop", {}),
        ("POST", "/logs/reopen", admin),
    ])
    assert statuses == [200, 403, 403, 200]
    assert harness.provider.reopened == 1
    assert harness.provider.restarts == []
    # Root stays admin.
    assert fetch(harness.socket_path, "POST", "/logs/reopen").status == 200
