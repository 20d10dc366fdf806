"""WebSockets end to end: the `websockets` client library, nginx with the
module, the engine's tunnel (docs/protocol.md, "Upgraded connections") and
an ASGI worker (agent/loaders/asgi_loader.py). A plain ASGI app
(tests/integration/websocket_apps.py): echo of text and bytes, a 1 MiB
message, a broadcast over three clients of one worker, closes from either
side, SIGTERM to the worker, a refused handshake. Then the Starlette
WebSocket route of examples/asgi in its own virtualenv (as
tests/integration/test_asgi.py makes it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.integration import websocket_apps
from tests.integration.stack import AppSpec, Stack, example_venv, gone, running_stack, started, wait_until
from tests.integration.test_asgi import BUILT_VENV, EXAMPLE, StarletteStack
from tests.integration.test_threads import serving


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # One worker (agent_max_instances 1) with the default agent_concurrency:
    # every WebSocket of the tests is on the same event loop.
    app = AppSpec("ws", websocket_apps.APP, "/", startup_file="main.py",
                  directives={"agent_app_type": "asgi", "agent_max_instances": "1"})
    with running_stack([app]) as s:
        yield s


def client(stack: Stack, path: str, subprotocols: list[str] | None = None, max_size: int = 1 << 20) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{stack.port}{path}", proxy=None, open_timeout=30,
                   subprotocols=subprotocols, max_size=max_size)  # type: ignore[arg-type]


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def marker(stack: Stack, name: str) -> bool:
    return (stack.scratch / name).exists()


def worker_of(stack: Stack) -> int:
    wait_until(lambda: len(stack.worker_pids()) == 1, timeout=30, what="the app's one worker")
    (pid,) = stack.worker_pids()
    return pid


def test_text_and_bytes_are_echoed_with_the_apps_subprotocol_and_header(stack: Stack) -> None:
    with client(stack, f"/echo?name={unique('echo')}", subprotocols=["chat", "v2"]) as ws:
        assert ws.subprotocol == "chat"
        assert ws.response is not None and ws.response.headers["X-App"] == "yes"
        ws.send("h\u00e9llo")
        assert ws.recv(timeout=10) == "h\u00e9llo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=10) == b"\x00\x01\xff"
        # Pings are answered by the worker itself.
        assert ws.ping().wait(timeout=10)


def test_a_message_of_1_mib_each_way(stack: Stack) -> None:
    payload = os.urandom(1 << 20)
    with client(stack, f"/echo?name={unique('mib')}", max_size=2 << 20) as ws:
        ws.send(payload)
        assert ws.recv(timeout=30) == payload
        text = "\u00e9" * (1 << 19)  # 1 MiB of UTF-8
        ws.send(text)
        assert ws.recv(timeout=30) == text


def test_a_broadcast_reaches_three_clients_of_one_worker(stack: Stack) -> None:
    with contextlib.ExitStack() as opened:
        clients = [opened.enter_context(client(stack, f"/broadcast?name={unique(f'b{n}')}")) for n in range(3)]
        welcomes = {c.recv(timeout=10) for c in clients}
        # All three joined the same worker's set.
        assert welcomes == {f"welcome {worker_of(stack)}"}
        clients[1].send("to everyone")
        assert [c.recv(timeout=10) for c in clients] == ["to everyone"] * 3


def test_a_client_that_closes_makes_the_app_see_websocket_disconnect(stack: Stack) -> None:
    name = unique("closer")
    with client(stack, f"/hold?name={name}") as ws:
        wait_until(lambda: marker(stack, f"{name}-open"), what="the app holding the WebSocket")
        ws.close(4005, "leaving")
        assert ws.close_code == 4005  # the worker echoed it
    wait_until(lambda: marker(stack, f"{name}-disconnect-4005"), timeout=30, what="the app's websocket.disconnect")
    wait_until(lambda: marker(stack, f"{name}-send-raised"), timeout=30, what="the app's next send to raise")


def test_a_client_that_drops_the_connection_makes_the_app_see_1006(stack: Stack) -> None:
    name = unique("dropper")
    with client(stack, f"/hold?name={name}") as ws:
        wait_until(lambda: marker(stack, f"{name}-open"), what="the app holding the WebSocket")
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame
    wait_until(lambda: marker(stack, f"{name}-disconnect-1006"), timeout=30, what="the app's websocket.disconnect")


def test_a_server_close_reaches_the_client_with_its_code_and_reason(stack: Stack) -> None:
    name = unique("server-close")
    with client(stack, f"/close?name={name}&code=4321&reason=go%20away") as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert (ws.close_code, ws.close_reason) == (4321, "go away")
    wait_until(lambda: marker(stack, f"{name}-disconnect-4321"), timeout=30, what="the app's websocket.disconnect")


def test_close_before_accept_is_403(stack: Stack) -> None:
    name = unique("refused")
    with pytest.raises(InvalidStatus) as raised:
        client(stack, f"/refuse?name={name}")
    assert raised.value.response.status_code == 403
    assert raised.value.response.body == b"403 Forbidden: the app refused the WebSocket\n"
    assert marker(stack, f"{name}-called")
    # The app's own refusal (the websocket.http.response extension).
    with pytest.raises(InvalidStatus) as raised:
        client(stack, f"/deny?name={unique('denied')}")
    assert (raised.value.response.status_code, raised.value.response.body) == (401, b"not for you\r\n")


def test_websockets_and_plain_requests_share_the_worker(stack: Stack) -> None:
    with client(stack, f"/echo?name={unique('shared')}") as ws:
        assert stack.get("/").text == f"plain http, pid {worker_of(stack)}"
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here"


def test_each_open_websocket_holds_one_of_the_workers_sessions(stack: Stack) -> None:
    with contextlib.ExitStack() as opened:
        for n in range(3):
            ws = opened.enter_context(client(stack, f"/echo?name={unique(f'session{n}')}"))
            ws.send("here")
            assert ws.recv(timeout=10) == "here"
        wait_until(lambda: serving(stack)["sessions"] == 3, timeout=30, what="three sessions on the worker")
    wait_until(lambda: serving(stack)["sessions"] == 0, timeout=30, what="the sessions to end with the WebSockets")


def test_sigterm_to_the_worker_closes_its_websockets_with_1001(stack: Stack) -> None:
    pid = worker_of(stack)
    names = [unique(f"term{n}") for n in range(2)]
    with contextlib.ExitStack() as opened:
        clients = [opened.enter_context(client(stack, f"/hold?name={name}")) for name in names]
        for name in names:
            wait_until(lambda name=name: marker(stack, f"{name}-open"), what="the app holding the WebSocket")
        os.kill(pid, signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=20)
            assert ws.close_code == 1001
    for name in names:
        assert marker(stack, f"{name}-disconnect-1001")
    wait_until(lambda: gone(pid), timeout=30, what="the worker to exit")
    # A new worker takes the next WebSocket.
    with client(stack, f"/echo?name={unique('after')}") as ws:
        ws.send("again")
        assert ws.recv(timeout=10) == "again"
    assert pid not in stack.worker_pids()


def test_many_websockets_at_once_on_one_worker(stack: Stack) -> None:
    def session(n: int) -> str:
        with client(stack, f"/echo?name={unique(f'many{n}')}") as ws:
            ws.send(f"message {n}")
            return str(ws.recv(timeout=30))

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(session, range(20)))
    assert answers == [f"message {n}" for n in range(20)]


# -- examples/asgi: Starlette's WebSocket --------------------------------------

@pytest.fixture(scope="module")
def starlette() -> Iterator[StarletteStack]:
    root = Path(tempfile.mkdtemp(prefix="agent-ws-", dir="/tmp"))
    try:
        shutil.copytree(EXAMPLE, root / "apps" / "starlette", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        python = example_venv(EXAMPLE, BUILT_VENV, root / "venv")
        with started(StarletteStack(root, "smart", python)) as stack:
            assert isinstance(stack, StarletteStack)
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_starlette_example_echoes_over_its_websocket_route(starlette: StarletteStack) -> None:
    with client(starlette, "/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo: hello"
        ws.send(b"\x01\x02")
        assert ws.recv(timeout=10) == b"\x01\x02"
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1000


# A WSGI app cannot take an upgrade: it answers the handshake as a request.
WSGI_SOURCE = """
import os

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d %s" % (os.getpid(), environ.get("HTTP_UPGRADE", "").encode())]
"""


def test_a_websocket_handshake_to_a_wsgi_app_gets_its_answer_and_the_worker_serves_on() -> None:
    app = AppSpec("wsgi", WSGI_SOURCE, "/", directives={"agent_max_instances": "1"})
    with running_stack([app]) as stack:
        with pytest.raises(InvalidStatus) as refused:
            client(stack, "/")
        assert refused.value.response.status_code == 200
        pid, upgrade = refused.value.response.body.decode().split()
        assert upgrade == "websocket"
        answer = stack.get("/")
        assert answer.status == 200 and answer.text.split()[0] == pid
