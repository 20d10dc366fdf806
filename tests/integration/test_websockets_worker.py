"""The worker side of WebSockets, alone: a real ASGI worker of a real
stack, its Unix socket spoken to as the engine speaks to it over an
upgraded connection (docs/protocol.md: a frame with AGENT_UPGRADE=1, then
the client's raw frames; records back: the 101 head, then the server's
frames, then the end record). The test is the client and the engine at
once, so it can send what no client library would: unmasked frames,
reserved bits, a text that is not UTF-8, a message over the limit."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from agent.loaders import asgi_websocket as ws
from tests.integration import websocket_apps
from tests.integration.stack import AppSpec, Stack, gone, running_stack, wait_until
from tests.integration.test_security_workers import worker_socket_of

MASK = b"\x5a\xa5\x0f\xf0"
KEY = base64.b64encode(b"0123456789abcdef").decode()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    app = AppSpec("ws", websocket_apps.APP, "/", startup_file="main.py",
                  directives={"agent_app_type": "asgi", "agent_max_instances": "1", "agent_min_instances": "1"})
    with running_stack([app]) as s:
        yield s


def the_worker(stack: Stack) -> int:
    if not stack.worker_pids():
        assert stack.get("/").status == 200  # the app's first worker starts on a request
    wait_until(lambda: len(stack.worker_pids()) == 1, timeout=30, what="the app's worker")
    (pid,) = stack.worker_pids()
    return pid


def request_frame(uri: str, **headers: str) -> bytes:
    path, _, query = uri.partition("?")
    pairs = {
        "AGENT_APP": "ws", "AGENT_UPGRADE": "1", "REQUEST_METHOD": "GET", "REQUEST_URI": uri,
        "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": "", "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555",
        "CONTENT_LENGTH": "0", "HTTP_HOST": "localhost", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": KEY, "HTTP_SEC_WEBSOCKET_VERSION": "13",
    }
    for name, value in headers.items():
        if value is None:
            pairs.pop(name, None)
        else:
            pairs[name] = value
    body = b"".join(struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v.encode("latin-1")))
                    + v.encode("latin-1") for k, v in pairs.items())
    return struct.pack(">I", len(body)) + body


class Tunnel:
    """One upgraded connection to the worker: what it answers, as the
    bytes its records carry, and whether the end record came."""

    def __init__(self, stack: Stack, uri: str, **headers: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(str(worker_socket_of(stack, the_worker(stack))))
        self.sock.sendall(request_frame(uri, **headers))
        self.raw = b""       # received, not yet cut into records
        self.stream = b""    # the records' bytes, not yet taken
        self.ended = False   # the end record came

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        while True:
            if len(self.raw) >= 4:
                size = int.from_bytes(self.raw[:4], "big")
                if size == 0:
                    assert not self.ended, "two end records"
                    self.ended, self.raw = True, self.raw[4:]
                    assert self.raw == b"", "bytes after the end record"
                    return
                if len(self.raw) >= 4 + size:
                    self.stream += self.raw[4 : 4 + size]
                    self.raw = self.raw[4 + size :]
                    return
            data = self.sock.recv(1 << 20)
            assert data, f"the connection closed inside a record, before the end record ({self.raw[:20]!r})"
            self.raw += data

    def take(self, size: int) -> bytes:
        while len(self.stream) < size:
            assert not self.ended, f"the end record came, {size} bytes wanted, {len(self.stream)} there"
            self._fill()
        data, self.stream = self.stream[:size], self.stream[size:]
        return data

    def head(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.stream:
            assert not self.ended
            self._fill()
        head, self.stream = self.stream.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
        return int(status_line.split()[1]), headers, status_line.encode()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """A whole HTTP response, up to the end record."""
        status, headers, _ = self.head()
        while not self.ended:
            self._fill()
        body, self.stream = self.stream, b""
        return status, headers, body

    def accepted(self) -> dict[str, str]:
        status, headers, _ = self.head()
        assert status == 101, (status, headers)
        assert headers["upgrade"] == "websocket" and headers["connection"] == "Upgrade"
        assert headers["sec-websocket-accept"] == ws.accept_key(KEY)
        return headers

    def frame(self) -> tuple[int, bytes]:
        """The server's next frame: unmasked, whole, no reserved bit."""
        first, second = self.take(2)
        assert first & 0x80 and not first & 0x70, hex(first)
        assert not second & 0x80, "a masked frame from the server"
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self.take(2), "big")
        elif size == 127:
            size = int.from_bytes(self.take(8), "big")
        return first & 0x0F, self.take(size)

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(ws.encode_frame(opcode, payload, fin=fin, mask=MASK))

    def closed_with(self) -> tuple[int, str]:
        """The server's close frame, then the end record and the end of the connection."""
        opcode, payload = self.frame()
        assert opcode == ws.OP_CLOSE, (opcode, payload[:50])
        assert self.stream == b""
        self._fill()
        assert self.ended and self.stream == b""
        assert self.sock.recv(10) == b""
        return ws.parse_close(payload)


def marker(stack: Stack, name: str) -> bool:
    return (stack.scratch / name).exists()


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_the_handshake_is_answered_101_and_messages_echo(stack: Stack) -> None:
    name = unique("echo")
    tunnel = Tunnel(stack, f"/echo?name={name}", HTTP_SEC_WEBSOCKET_PROTOCOL="chat, other")
    try:
        headers = tunnel.accepted()
        assert headers["sec-websocket-protocol"] == "chat"
        assert headers["x-app"] == "yes"
        tunnel.send(ws.OP_TEXT, "h\u00e9".encode())
        assert tunnel.frame() == (ws.OP_TEXT, "h\u00e9".encode())
        payload = os.urandom(200_000)
        tunnel.send(ws.OP_BINARY, payload)
        assert tunnel.frame() == (ws.OP_BINARY, payload)
        # Fragments, with a ping between them: the pong comes at once, the
        # message once whole.
        tunnel.send(ws.OP_TEXT, b"frag", fin=False)
        tunnel.send(ws.OP_PING, b"p1")
        assert tunnel.frame() == (ws.OP_PONG, b"p1")
        tunnel.send(ws.OP_CONTINUATION, b"ment", fin=False)
        tunnel.send(ws.OP_PONG, b"unasked")  # ignored
        tunnel.send(ws.OP_CONTINUATION, b"ed", fin=True)
        assert tunnel.frame() == (ws.OP_TEXT, b"fragmented")
        # The client's close: echoed, then the end record; the app sees its code.
        tunnel.send(ws.OP_CLOSE, ws.close_payload(4321, "done"))
        assert tunnel.closed_with() == (4321, "done")
    finally:
        tunnel.close()
    wait_until(lambda: marker(stack, f"{name}-disconnect-4321"), what="the app's websocket.disconnect")


def test_the_client_bytes_may_come_one_at_a_time(stack: Stack) -> None:
    tunnel = Tunnel(stack, f"/echo?name={unique('bytewise')}")
    try:
        tunnel.accepted()
        for byte in ws.encode_frame(ws.OP_TEXT, b"slowly", mask=MASK):
            tunnel.sock.sendall(bytes([byte]))
            time.sleep(0.005)
        assert tunnel.frame() == (ws.OP_TEXT, b"slowly")
    finally:
        tunnel.close()


def test_the_scope_of_a_websocket(stack: Stack) -> None:
    tunnel = Tunnel(stack, "/scope?name=s&x=%20", HTTP_SEC_WEBSOCKET_PROTOCOL="a, b", HTTP_ORIGIN="http://o")
    try:
        tunnel.accepted()
        opcode, payload = tunnel.frame()
        assert opcode == ws.OP_TEXT
        scope = json.loads(payload)
        assert tunnel.closed_with() == (1000, "")
    finally:
        tunnel.close()
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert (scope["http_version"], scope["scheme"], scope["path"], scope["raw_path"]) == ("1.1", "ws", "/scope",
                                                                                          "/scope")
    assert scope["query_string"] == "name=s&x=%20"
    assert scope["subprotocols"] == ["a", "b"]
    assert ["origin", "http://o"] in scope["headers"]
    assert scope["client"] == ["127.0.0.1", 5555] and scope["server"] == ["localhost", 80]
    assert scope["state"] == {}


@pytest.mark.parametrize(("headers", "problem"), [
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "Sec-WebSocket-Version is not 13"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "c2hvcnQ="}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"HTTP_SEC_WEBSOCKET_KEY": None}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"REQUEST_METHOD": "POST"}, "the method is not GET"),
])
def test_a_bad_handshake_is_answered_400_without_calling_the_app(stack: Stack, headers: dict[str, str],
                                                                 problem: str) -> None:
    name = unique("bad")
    tunnel = Tunnel(stack, f"/echo?name={name}", **headers)
    try:
        status, answer, body = tunnel.response()
        assert tunnel.sock.recv(10) == b""
    finally:
        tunnel.close()
    assert status == 400
    assert answer["sec-websocket-version"] == "13"
    assert body == f"400 Bad Request: not a WebSocket handshake ({problem})\n".encode()
    assert not marker(stack, f"{name}-called")
    wait_until(lambda: f"not a WebSocket handshake ({problem}): answered 400" in stack.log_file.read_text(),
               what="the log line")


def test_close_before_accept_is_403_and_the_http_response_extension_is_the_apps(stack: Stack) -> None:
    for path, status, body in (("/refuse", 403, b"403 Forbidden: the app refused the WebSocket\n"),
                               ("/deny", 401, b"not for you\r\n"),
                               ("/raise", 500, b"500 Internal Server Error: the app raised an exception\n")):
        tunnel = Tunnel(stack, f"{path}?name={unique('refused')}")
        try:
            answer = tunnel.response()
            assert (answer[0], answer[2]) == (status, body), path
            assert tunnel.sock.recv(10) == b""
        finally:
            tunnel.close()


def test_a_plain_request_on_an_upgrade_frame_is_served_and_its_connection_closes(stack: Stack) -> None:
    tunnel = Tunnel(stack, "/other", HTTP_UPGRADE="h2c")
    try:
        status, _, body = tunnel.response()
        assert status == 200 and body.startswith(b"plain http")
        assert tunnel.sock.recv(10) == b""
    finally:
        tunnel.close()


def test_a_server_close_reaches_the_client_with_its_code_and_reason(stack: Stack) -> None:
    name = unique("close")
    tunnel = Tunnel(stack, f"/close?name={name}&code=4004&reason=bye%20now")
    try:
        tunnel.accepted()
        opcode, payload = tunnel.frame()
        assert (opcode, ws.parse_close(payload)) == (ws.OP_CLOSE, (4004, "bye now"))
        # The worker waits for the client's close before it ends the connection.
        tunnel.send(ws.OP_CLOSE, payload)
        tunnel._fill()
        assert tunnel.ended and tunnel.sock.recv(10) == b""
    finally:
        tunnel.close()
    wait_until(lambda: marker(stack, f"{name}-disconnect-4004"), what="the app's websocket.disconnect")


def test_a_client_that_goes_away_gives_the_app_1006_and_its_send_raises(stack: Stack) -> None:
    name = unique("gone")
    tunnel = Tunnel(stack, f"/hold?name={name}")
    try:
        tunnel.accepted()
        wait_until(lambda: marker(stack, f"{name}-open"), what="the app holding the WebSocket")
    finally:
        tunnel.close()
    wait_until(lambda: marker(stack, f"{name}-disconnect-1006"), what="the app's websocket.disconnect")
    wait_until(lambda: marker(stack, f"{name}-send-raised"), what="the app's send to raise")


@pytest.mark.parametrize(("data", "code"), [
    (ws.encode_frame(ws.OP_TEXT, b"unmasked"), 1002),
    (bytes([0x80 | 0x20 | ws.OP_TEXT, 0x80]) + MASK, 1002),
    (bytes([0x80 | 0x7, 0x80]) + MASK, 1002),
    (ws.encode_frame(ws.OP_PING, b"x" * 126, mask=MASK), 1002),
    (ws.encode_frame(ws.OP_TEXT, b"caf\xe9", mask=MASK), 1007),
    # 17 MiB announced: refused from the header, the payload never sent.
    (bytes([0x82, 0xFF]) + (17 << 20).to_bytes(8, "big") + MASK, 1009),
])
def test_a_violation_closes_with_its_code_and_the_app_sees_it(stack: Stack, data: bytes, code: int) -> None:
    name = unique("violation")
    tunnel = Tunnel(stack, f"/echo?name={name}")
    try:
        tunnel.accepted()
        tunnel.send(ws.OP_TEXT, b"before")
        assert tunnel.frame() == (ws.OP_TEXT, b"before")
        tunnel.sock.sendall(data)
        assert tunnel.closed_with()[0] == code
    finally:
        tunnel.close()
    wait_until(lambda: marker(stack, f"{name}-disconnect-{code}"), what="the app's websocket.disconnect")


def test_a_message_of_16_mib_is_taken_and_one_byte_more_is_not(stack: Stack) -> None:
    tunnel = Tunnel(stack, f"/echo?name={unique('big')}")
    try:
        tunnel.accepted()
        payload = os.urandom(ws.MAX_MESSAGE_SIZE)
        # In two fragments: they count together.
        tunnel.send(ws.OP_BINARY, payload[:1000], fin=False)
        tunnel.send(ws.OP_CONTINUATION, payload[1000:])
        assert tunnel.frame() == (ws.OP_BINARY, payload)
        tunnel.send(ws.OP_BINARY, payload[:1000], fin=False)
        tunnel.sock.sendall(bytes([ws.OP_CONTINUATION | 0x80, 0xFF]) + (len(payload) - 999).to_bytes(8, "big") + MASK)
        assert tunnel.closed_with()[0] == 1009
    finally:
        tunnel.close()


def test_sigterm_closes_open_websockets_with_1001_and_the_worker_exits(stack: Stack) -> None:
    pid = the_worker(stack)
    names = [unique(f"term{n}") for n in range(2)]
    tunnels = [Tunnel(stack, f"/hold?name={name}") for name in names]
    try:
        for tunnel, name in zip(tunnels, names, strict=True):
            tunnel.accepted()
            wait_until(lambda name=name: marker(stack, f"{name}-open"), what="the app holding the WebSocket")
        os.kill(pid, signal.SIGTERM)
        for tunnel in tunnels:
            opcode, payload = tunnel.frame()
            assert (opcode, ws.parse_close(payload)[0]) == (ws.OP_CLOSE, 1001)
            tunnel.send(ws.OP_CLOSE, payload)
            tunnel._fill()
            assert tunnel.ended and tunnel.sock.recv(10) == b""
    finally:
        for tunnel in tunnels:
            tunnel.close()
    for name in names:
        wait_until(lambda name=name: marker(stack, f"{name}-disconnect-1001"), what="the app's disconnect 1001")
    wait_until(lambda: gone(pid), timeout=30, what="the worker to exit")
    # Its replacement serves.
    wait_until(lambda: stack.worker_pids() - {pid}, timeout=30, what="a new worker")
    tunnel = Tunnel(stack, f"/echo?name={unique('after')}")
    try:
        tunnel.accepted()
    finally:
        tunnel.close()


# -- agent_websocket_ping_interval ---------------------------------------------

@pytest.fixture(scope="module")
def pinging() -> Iterator[Stack]:
    app = AppSpec("ws", websocket_apps.APP, "/", startup_file="main.py", directives={
        "agent_app_type": "asgi", "agent_max_instances": "1", "agent_min_instances": "1",
        "agent_websocket_ping_interval": "300ms"})
    with running_stack([app]) as s:
        yield s


def test_a_client_that_answers_nothing_is_closed_with_1011_after_two_intervals(pinging: Stack) -> None:
    name = unique("silent")
    tunnel = Tunnel(pinging, f"/hold?name={name}")
    try:
        tunnel.accepted()
        started = time.monotonic()
        pings = 0
        while True:  # the pings come unanswered, then the close
            opcode, payload = tunnel.frame()
            if opcode != ws.OP_PING:
                break
            pings += 1
        assert opcode == ws.OP_CLOSE and pings >= 1
        assert ws.parse_close(payload) == (1011, "keepalive ping timeout")
        assert time.monotonic() - started >= 0.5
        tunnel.send(ws.OP_CLOSE, payload)  # the close answered: the end record, then the end
        tunnel._fill()
        assert tunnel.ended
    finally:
        tunnel.close()
    wait_until(lambda: marker(pinging, f"{name}-disconnect-1011"), what="the app's disconnect 1011")


def test_a_client_that_answers_the_pings_stays_open(pinging: Stack) -> None:
    tunnel = Tunnel(pinging, f"/echo?name={unique('answering')}")
    try:
        tunnel.accepted()
        deadline = time.monotonic() + 2.0   # more than six intervals
        pings = 0
        while time.monotonic() < deadline:
            opcode, payload = tunnel.frame()
            assert opcode == ws.OP_PING, (opcode, payload[:40])
            pings += 1
            tunnel.send(ws.OP_PONG, payload)
        assert pings >= 4
        tunnel.send(ws.OP_TEXT, b"still open")
        while (frame := tunnel.frame())[0] == ws.OP_PING:
            tunnel.send(ws.OP_PONG, frame[1])
        assert frame == (ws.OP_TEXT, b"still open")
    finally:
        tunnel.close()
