"""The ASGI loader: the program that runs inside every worker of an ASGI app
(agent_app_type asgi).

Started as ``PYTHON asgi_loader.py`` by the agent core with the environment
and file descriptors of docs/protocol.md section 3, exactly as the WSGI
loader is, and speaking the same worker protocol (sections 1 and 2). What it
shares with the WSGI loader it takes from it (``wsgi_loader.py``, which the
core copies into the same directory): the handshake, loading the startup
file, the private environment, the peer check, the frame's pairs, the
preloader of agent_spawn_method smart, the process name.

The startup file defines the ASGI 3 app as ``application``, or else ``app``.
Each worker runs one asyncio event loop, made after the fork in a worker of
the preloader (never in the preloader itself), and serves up to
AGENT_CONCURRENCY requests at once: one per connection the engine opens,
each connection carrying its requests one after another. Before it reports
ready the worker runs the lifespan protocol's startup; on SIGTERM it stops
taking requests, lets those in flight finish, runs the lifespan shutdown
and exits 0.

A request frame with AGENT_UPGRADE=1 and ``Upgrade: websocket`` gets a
``websocket`` scope: after the frame the connection carries the client's
WebSocket frames, and the worker's records carry the 101 answer and then
the server's frames, until either side closes (asgi_websocket.py is the
codec). Such a connection never carries another request.

Standard library only; Python 3.9 and later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import signal
import socket
import sys
import traceback

if __package__:  # imported as agent.loaders.asgi_loader, as the agent's tests do
    from . import asgi_websocket as ws
    from . import wsgi_loader as shared
else:  # run as a script from the loaders directory: wsgi_loader.py lies beside it
    _own_dir = os.path.dirname(os.path.realpath(__file__))
    if _own_dir not in sys.path:
        sys.path.insert(0, _own_dir)
    import asgi_websocket as ws  # type: ignore[import-not-found,no-redef]
    import wsgi_loader as shared  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Awaitable, Callable
    from types import ModuleType
    from typing import Any

    Message = dict[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

LOG_PREFIX = "asgi_loader: "
# The startup file's names for the app, in the order they are looked up.
APP_NAMES = ("application", "app")
# One receive() of the request body returns at most this much: the body is
# streamed from the socket, never held whole.
BODY_CHUNK_SIZE = 64 * 1024
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
LIFESPAN_VERSION = {"version": "3.0", "spec_version": "2.0"}
WEBSOCKET_VERSION = {"version": "3.0", "spec_version": "2.4"}
# One read of a WebSocket's incoming bytes.
WS_RECV_SIZE = 64 * 1024
# The client's messages the app has not received yet: past this many bytes
# (or messages) the worker stops reading the connection until the app takes
# some, so that a client cannot make it buffer without end.
WS_INBOX_BYTES = 1024 * 1024
WS_INBOX_MESSAGES = 64
# Bytes the client sends before the handshake is answered (it must not
# send any): kept for the codec up to this many, past it the connection
# is dropped.
WS_EARLY_LIMIT = 64 * 1024
# After its close frame the worker waits this long for the client's before
# it ends the connection; also the bound on writing the close frame.
WS_CLOSE_TIMEOUT = 2.0
WS_PING_INTERVAL_DEFAULT_MS = 20_000


def read_ping_interval(text: str | None) -> float:
    """AGENT_WS_PING_INTERVAL_MS (agent_websocket_ping_interval) in
    seconds; 0: no pings. Absent or not a whole number: the default."""
    if text is None or not (text.isascii() and text.isdigit()):
        return WS_PING_INTERVAL_DEFAULT_MS / 1000
    return int(text) / 1000


WS_PING_INTERVAL = read_ping_interval(os.environ.get("AGENT_WS_PING_INTERVAL_MS"))
# Headers of the 101 answer that the worker writes itself: the app's own
# are dropped.
WS_OWN_HEADERS = frozenset(("upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol",
                            "content-length", "transfer-encoding"))
HTTP_VERSIONS = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2.0": "2", "HTTP/2": "2"}

log = shared.log
ClientDisconnected = shared.ClientDisconnected
MalformedFrame = shared.MalformedFrame
LoadError = shared.LoadError
_pack_u32 = shared._pack_u32
END_RECORD = shared.END_RECORD


def response_records(status: str, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A whole text/plain response in one record, and the end record."""
    head = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *(headers or [])]
    response = shared.encode_head(status, head) + body
    return _pack_u32(len(response)) + response + END_RECORD


# websocket.close before websocket.accept: 403, as the ASGI spec says.
FORBIDDEN_RECORDS = response_records("403 Forbidden", b"403 Forbidden: the app refused the WebSocket\n")


# --------------------------------------------------------------------------
# Lifespan


class Lifespan:
    """The lifespan protocol: one call of the app with the lifespan scope,
    for the worker's life. An app that raises before it asks for the first
    message, or returns without answering, does not speak it: the worker
    serves it anyway (as uvicorn's "auto") and sends it no shutdown."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.supported = True
        self.asked = False           # the app called receive() at least once
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        self.answers: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": dict(LIFESPAN_VERSION), "state": self.state}
        try:
            await self.app(scope, self.receive, self.send)
        except BaseException as exc:  # reported as the answer
            await self.answers.put({"type": "raised", "exc": exc})
            if not isinstance(exc, Exception):
                raise
        else:
            await self.answers.put({"type": "returned"})

    async def receive(self) -> Message:
        self.asked = True
        return await self.incoming.get()

    async def send(self, message: Message) -> None:
        await self.answers.put(message)

    async def exchange(self, phase: str) -> Message:
        """Sends lifespan.<phase>, returns the app's answer: a message, or
        one of ours ("raised", "returned") when the app ended instead."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())
        await self.incoming.put({"type": "lifespan." + phase})
        return await self.answers.get()

    async def startup(self) -> None:
        """Raises LoadError when the app's startup failed."""
        answer = await self.exchange("startup")
        kind = answer["type"]
        if kind == "lifespan.startup.complete":
            return
        if kind == "lifespan.startup.failed":
            raise LoadError("exception", "lifespan startup failed: " + str(answer.get("message", "")), "")
        if kind == "raised" and self.asked:
            summary, trace = shared.describe_exception(answer["exc"])
            raise LoadError("exception", "lifespan startup raised " + summary, trace)
        if kind == "raised" or kind == "returned":
            self.supported = False
            how = "raised " + type(answer["exc"]).__name__ if kind == "raised" else "returned"
            log(f"the app {how} on the lifespan scope: served without lifespan events")
            return
        raise LoadError("exception", f"lifespan startup: unexpected message {kind!r} from the app", "")

    async def shutdown(self) -> None:
        """Tells the app to shut down and waits for its answer; a failure
        is logged, and the worker exits all the same."""
        if not self.supported or self.task is None or self.task.done():
            return
        answer = await self.exchange("shutdown")
        kind = answer["type"]
        if kind == "lifespan.shutdown.failed":
            log("lifespan shutdown failed: " + str(answer.get("message", "")))
        elif kind == "raised":
            exc = answer["exc"]
            log("lifespan shutdown raised an exception:")
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            sys.stderr.flush()
        elif kind not in ("lifespan.shutdown.complete", "returned"):
            log(f"lifespan shutdown: unexpected message {kind!r} from the app")


# --------------------------------------------------------------------------
# The request frame (section 1) into an ASGI scope


async def read_frame(loop: asyncio.AbstractEventLoop, conn: socket.socket, first: bytes) -> tuple[bytearray, int]:
    """The frame up to the end of its vars, its first bytes in *first*.
    Returns the bytes read so far (body bytes may follow the vars) and
    the end of the vars in them."""
    data = bytearray(first)
    while len(data) < 4:
        more = await loop.sock_recv(conn, BODY_CHUNK_SIZE)
        if not more:
            raise MalformedFrame("connection closed inside the vars size")
        data += more
    vars_size = int.from_bytes(data[:4], "big")
    if vars_size == 0 or vars_size > shared.MAX_VARS_SIZE:
        raise MalformedFrame(f"vars size {vars_size}")
    end = 4 + vars_size
    while len(data) < end:
        more = await loop.sock_recv(conn, min(end - len(data), shared.RECV_BUFFER_SIZE))
        if not more:
            raise MalformedFrame("connection closed inside the vars")
        data += more
    return data, end


def port_of(text: str | None) -> int | None:
    return int(text) if text and text.isascii() and text.isdigit() else None


def http_scope(environ: dict[str, str], state: dict[str, Any]) -> dict[str, Any]:
    """The ASGI http scope of a request's CGI variables (values are the
    frame's bytes as latin-1 text, so encoding them back is exact)."""
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].lower().replace("_", "-").encode("latin-1"), value.encode("latin-1")))
    content_type = environ.get("CONTENT_TYPE")
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1")))
    if environ.get("CONTENT_LENGTH", "0") != "0":
        headers.append((b"content-length", environ["CONTENT_LENGTH"].encode("latin-1")))
    root_path = environ.get("SCRIPT_NAME", "")
    uri = environ.get("REQUEST_URI", "/")
    path_info = environ.get("PATH_INFO")
    if path_info is None:
        path_info = shared.path_from_request_uri(environ)[len(root_path):]
    # The path as the client asked for it, decoded: the root path included
    # (as uvicorn and hypercorn give it, and Starlette and Django expect).
    path = (root_path + path_info).encode("latin-1").decode("utf-8", "replace")
    client_port = port_of(environ.get("REMOTE_PORT"))
    server_port = port_of(environ.get("SERVER_PORT"))
    return {
        "type": "http",
        "asgi": dict(ASGI_VERSION),
        "http_version": HTTP_VERSIONS.get(environ.get("SERVER_PROTOCOL", ""), "1.1"),
        "method": environ["REQUEST_METHOD"],
        "scheme": "https" if environ.get("HTTPS", "").lower() == "on" else "http",
        "path": path,
        "raw_path": uri.split("?", 1)[0].encode("latin-1"),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "root_path": root_path.encode("latin-1").decode("utf-8", "replace"),
        "headers": headers,
        "client": (environ["REMOTE_ADDR"], client_port or 0) if "REMOTE_ADDR" in environ else None,
        "server": (environ.get("SERVER_NAME", "localhost"), server_port),
        "state": dict(state),
    }


def websocket_scope(environ: dict[str, str], state: dict[str, Any]) -> dict[str, Any]:
    """The ASGI websocket scope of an upgrade request's CGI variables."""
    scope = http_scope(environ, state)
    del scope["method"]
    scope["type"] = "websocket"
    scope["asgi"] = dict(WEBSOCKET_VERSION)
    scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
    scope["subprotocols"] = ws.offered_subprotocols(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"))
    scope["extensions"] = {"websocket.http.response": {}}
    return scope


def is_websocket_upgrade(environ: dict[str, str]) -> bool:
    return environ.get("AGENT_UPGRADE") == "1" and environ.get("HTTP_UPGRADE", "").strip().lower() == "websocket"


def bad_handshake_records(problem: str) -> bytes:
    body = f"400 Bad Request: not a WebSocket handshake ({problem})\n".encode()
    return response_records("400 Bad Request", body, [("Sec-WebSocket-Version", "13")])


# --------------------------------------------------------------------------
# One request: receive() and send()


def reason_phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def records(data: bytes) -> list[bytes]:
    """*data* as records: a record header before each piece of at most
    the loader's largest record."""
    if len(data) <= shared.MAX_RECORD_SIZE:
        return [_pack_u32(len(data)), data]
    parts: list[bytes] = []
    view = memoryview(data)
    for start in range(0, len(data), shared.MAX_RECORD_SIZE):
        piece = view[start : start + shared.MAX_RECORD_SIZE]
        parts += (_pack_u32(len(piece)), piece)  # type: ignore[arg-type]
    return parts


# Parts of at most this many bytes in all leave in one send(): a record's
# header and its payload (and the end record) in one system call, which
# the reader on the other side takes in one read.
JOIN_LIMIT = 64 * 1024


async def send_parts(loop: asyncio.AbstractEventLoop, conn: socket.socket, parts: list[bytes]) -> None:
    if sum(map(len, parts)) <= JOIN_LIMIT:
        await loop.sock_sendall(conn, b"".join(parts))
        return
    for part in parts:
        await loop.sock_sendall(conn, part)


class Exchange:
    """One request on one connection: the body as http.request messages
    read from the socket as the app asks, the response as records written
    as the app sends them (section 2).

    ``started`` turns true when the first response byte is on the wire (an
    error can still become a 500 until then), ``ended`` once the end record
    has left; ``keep`` false when the connection must not carry another
    request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, prefix: bytes, length: int) -> None:
        if len(prefix) > length:
            raise MalformedFrame("bytes past the end of the request body")
        self.loop = loop
        self.conn = conn
        self.prefix = prefix
        self.unread = length - len(prefix)   # body bytes still in the socket
        self.body_done = False               # the last http.request has been returned
        # One reader and one writer at a time: the event loop keeps one
        # callback per direction of a socket.
        self.read_lock = asyncio.Lock()
        self.write_lock = asyncio.Lock()
        self.gone = asyncio.Event()          # the peer went away, or the response ended
        self.watching = False                # a reader callback looks for the peer's end of file
        self.head: bytes | None = None
        self.started = False
        self.ended = False
        self.keep = True

    # -- receive ---------------------------------------------------------

    async def receive(self) -> Message:
        if not self.body_done and not self.gone.is_set():
            async with self.read_lock:
                if not self.body_done:
                    return await self.next_body()
        if not self.gone.is_set() and not self.watching:
            self.start_watch()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def next_body(self) -> Message:
        if self.prefix:
            body, self.prefix = self.prefix, b""
        elif self.unread:
            body = await self.recv_body(BODY_CHUNK_SIZE)
        else:
            body = b""
        self.body_done = not self.unread
        return {"type": "http.request", "body": body, "more_body": not self.body_done}

    async def recv_body(self, size: int) -> bytes:
        try:
            data = await self.loop.sock_recv(self.conn, min(size, self.unread))
        except OSError as exc:
            self.gone.set()
            raise ClientDisconnected(f"reading the request body: {exc}") from exc
        if not data:
            self.gone.set()
            raise ClientDisconnected(f"the connection closed with {self.unread} body bytes unsent")
        self.unread -= len(data)
        return data

    def start_watch(self) -> None:
        """With the body read, nothing more comes on the connection until
        the end record has left: end of file means the engine closed it
        (the client went away); a byte before that is not the protocol's.
        The watch peeks and never takes a byte: once the end record has
        left, the next request's frame may arrive before the watch is
        stopped, and every byte of it is the connection loop's."""
        self.watching = True
        self.loop.add_reader(self.conn.fileno(), self.peer_readable)

    def peer_readable(self) -> None:
        try:
            data = self.conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.stop_watch()
        if not data:
            self.keep = False
        elif not self.ended:
            log("bytes past the end of a request body; the connection closes after the response")
            self.keep = False
        self.gone.set()

    def stop_watch(self) -> None:
        if self.watching:
            self.watching = False
            self.loop.remove_reader(self.conn.fileno())

    async def settle_body(self) -> None:
        """Before the end record: drop a small unread body, so that the next
        frame can follow; note a large one, to close the connection."""
        async with self.read_lock:
            self.prefix = b""
            if not self.unread:
                return
            if self.unread > shared.DRAIN_LIMIT:
                self.keep = False
                return
            while self.unread:
                await self.recv_body(shared.BODY_RECV_SIZE)
            self.body_done = True

    def finish_watch(self) -> None:
        """The request is over: stop looking for the peer's end of file, so
        that the next frame is read by the connection's loop alone."""
        self.gone.set()
        self.stop_watch()

    # -- send ------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            self.head = self.encode_head(message)
        elif kind == "http.response.body":
            if self.head is None:
                raise RuntimeError("http.response.body before http.response.start")
            if self.ended:
                raise RuntimeError("http.response.body after the response ended")
            body = message.get("body", b"")
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise TypeError(f"http.response.body's body must be bytes, not {type(body).__name__}")
            await self.write(bytes(body), bool(message.get("more_body", False)))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an http scope")

    @staticmethod
    def encode_head(message: Message) -> bytes:
        status = message["status"]
        if type(status) is not int or not 100 <= status <= 999:
            raise ValueError(f"invalid response status {status!r}")
        headers = []
        for header in message.get("headers", ()):
            name, value = header
            headers.append((bytes(name).decode("latin-1"), bytes(value).decode("latin-1")))
        phrase = reason_phrase(status)
        return shared.encode_head(f"{status} {phrase}" if phrase else str(status), headers)  # type: ignore[no-any-return]

    async def write(self, body: bytes, more: bool) -> None:
        parts: list[bytes] = []
        if not self.started:
            assert self.head is not None
            body = self.head + body
        if body:
            parts = records(body)
        if not more:
            await self.settle_body()
            parts.append(END_RECORD)
        if not parts:
            return
        self.started = True
        try:
            async with self.write_lock:
                await send_parts(self.loop, self.conn, parts)
        except OSError as exc:
            self.gone.set()
            raise ClientDisconnected(f"sending the response: {exc}") from exc
        if not more:
            self.ended = True
            self.gone.set()


# --------------------------------------------------------------------------
# One WebSocket


CONNECTING, OPEN, CLOSING, ENDED = "connecting", "open", "closing", "ended"


class _OpenStream(asyncio.Protocol):
    """An open WebSocket's connection, read and written by the loop's
    transport: the client's bytes reach the session as they arrive, with no
    task woken and no reader registered anew for each of them."""

    def __init__(self, session: WebSocketSession) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.stream_opened(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def eof_received(self) -> bool:
        self.session.lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.lost()

    def pause_writing(self) -> None:
        self.session.writable.clear()

    def resume_writing(self) -> None:
        self.session.writable.set()


class WebSocketSession:
    """One WebSocket on one connection (RFC 6455 over docs/protocol.md's
    records): the handshake's answer, then the server's frames in records.
    Once open, the connection is the loop's transport's (_OpenStream): the
    client's frames are decoded as they arrive, pings answered at once,
    whole messages queued for receive(), at most WS_INBOX_BYTES of them
    (reading pauses past that).

    ``phase``: CONNECTING until the app accepts (or refuses: an HTTP
    response), OPEN, CLOSING once a close frame has left, ENDED once the
    end record has left or the connection is lost. The app sees
    websocket.disconnect once anything ends the WebSocket: the client's
    close (its code), a violation (the code sent, 1002, 1007 or 1009), the
    worker stopping (1001), a lost connection (1006)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, environ: dict[str, str],
                 early: bytes) -> None:
        self.loop = loop
        self.conn = conn
        self.key = environ["HTTP_SEC_WEBSOCKET_KEY"]
        self.offered = ws.offered_subprotocols(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"))
        self.early = bytearray(early)
        self.frames = ws.FrameReader()
        self.phase = CONNECTING
        self.connect_given = False
        self.inbox: collections.deque[tuple[Message, int]] = collections.deque()
        self.inbox_bytes = 0
        self.waiters: list[asyncio.Future[None]] = []  # receive() calls waiting for a message or the disconnect
        self.disconnect: Message | None = None
        self.write_lock = asyncio.Lock()     # until the transport has the connection
        self.task: asyncio.Task[None] | None = None    # the watch before accept
        self.transport: asyncio.Transport | None = None  # once open
        self.writable = asyncio.Event()      # the transport's buffer is below its high-water mark
        self.writable.set()
        self.reading_paused = False          # the inbox is full: the transport reads nothing
        self.closer: asyncio.Task[None] | None = None
        self.peer_closed = asyncio.Event()   # the client's close arrived, or it is gone
        self.response: Exchange | None = None  # websocket.http.response.* in place of accept
        self.going_away = False
        self.ended = False
        self.heard = 0.0                     # loop time of the client's last frame
        self.pinger: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.loop.create_task(self.watch())

    # -- receive ---------------------------------------------------------

    async def receive(self) -> Message:
        if not self.connect_given:
            self.connect_given = True
            return {"type": "websocket.connect"}
        while True:
            if self.inbox:
                message, size = self.inbox.popleft()
                self.inbox_bytes -= size
                if self.reading_paused and not self.inbox_full():
                    self.reading_paused = False
                    self.pump()  # frames read before the pause first
                    if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
                        self.transport.resume_reading()
                return message
            if self.disconnect is not None:
                return dict(self.disconnect)
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    def wake_receiver(self) -> None:
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def set_disconnect(self, code: int, reason: str = "") -> None:
        if self.disconnect is None:
            self.disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.wake_receiver()

    async def watch(self) -> None:
        """Before the handshake is answered: notice the client going away
        (the engine closes the connection). The client must send nothing
        yet; what it sends anyway is kept for the codec, up to a bound."""
        while True:
            data = await self.receive_bytes()
            if not data:
                return
            self.early += data
            if len(self.early) > WS_EARLY_LIMIT:
                log(f"a WebSocket client sent over {WS_EARLY_LIMIT} bytes before the handshake's answer; dropped")
                self.lost()
                return

    async def receive_bytes(self) -> bytes:
        """What the client sent next; b"" once the connection has ended,
        which the session then takes as lost."""
        try:
            data = await self.loop.sock_recv(self.conn, WS_RECV_SIZE)
        except OSError:
            data = b""
        if not data:
            self.lost()
        return data

    def stream_opened(self, transport: asyncio.Transport) -> None:
        """The transport has the connection: what the client sent before
        the handshake's answer is decoded first."""
        self.transport = transport
        if self.ended:  # lost meanwhile
            transport.abort()
            return
        early, self.early = bytes(self.early), bytearray()
        if early:
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        self.heard = self.loop.time()
        if not self.reading_paused:
            self.pump()

    def inbox_full(self) -> bool:
        return self.inbox_bytes >= WS_INBOX_BYTES or len(self.inbox) >= WS_INBOX_MESSAGES

    def pump(self) -> None:
        """The client's frames read so far, until the inbox is full (reading
        then pauses), the client's close, or a violation."""
        try:
            while not self.reading_paused and not self.ended:
                event = self.frames.next()
                if event is None:
                    return
                if not self.take(event):
                    return
        except ws.ProtocolError as error:
            log(f"WebSocket closed: {error}")
            if self.phase == OPEN:
                self.phase = CLOSING
                self.set_disconnect(error.code, error.reason)
                self.write_now(ws.encode_close(error.code, error.reason))
                self.end()
            else:
                self.peer_closed.set()

    def take(self, event: ws.Received) -> bool:
        """One thing the client sent; False when it ends the reading."""
        opcode = event.opcode
        if opcode == ws.OP_TEXT or opcode == ws.OP_BINARY:
            if self.phase != OPEN:
                return True  # after the worker's close: dropped
            if opcode == ws.OP_TEXT:
                message: Message = {"type": "websocket.receive", "text": event.text}
                size = len(event.text)
            else:
                message = {"type": "websocket.receive", "bytes": event.data}
                size = len(event.data)
            self.inbox.append((message, size))
            self.inbox_bytes += size
            self.wake_receiver()
            if self.inbox_full() and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
        elif opcode == ws.OP_PING:
            if self.phase == OPEN:
                self.write_now(ws.encode_frame(ws.OP_PONG, event.data))
        elif opcode == ws.OP_CLOSE:
            if self.phase == OPEN:
                self.phase = CLOSING
                self.set_disconnect(event.code, event.reason)
                self.write_now(ws.encode_frame(ws.OP_CLOSE, event.data))  # the echo, as RFC 6455 5.5.1 asks
                self.end()
            else:
                self.peer_closed.set()
            return False
        return True  # a pong: nothing to do

    # -- send ------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            await self.accept(message)
        elif kind == "websocket.send":
            await self.send_message(message)
        elif kind == "websocket.close":
            await self.close_by_app(message)
        elif kind in ("websocket.http.response.start", "websocket.http.response.body"):
            await self.http_response(message)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a websocket scope")

    def check_unanswered(self, what: str) -> None:
        if self.ended:
            raise ClientDisconnected("the client went away before the WebSocket handshake was answered")
        if self.phase != CONNECTING or self.response is not None:
            raise RuntimeError(f"{what} after the WebSocket handshake was answered")

    async def accept(self, message: Message) -> None:
        self.check_unanswered("websocket.accept")
        subprotocol = message.get("subprotocol")
        if subprotocol is not None and subprotocol not in self.offered:
            raise ValueError(f"websocket.accept: subprotocol {subprotocol!r} is not one the client offered")
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Accept", ws.accept_key(self.key))]
        if subprotocol is not None:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        for name, value in message.get("headers", ()):
            text = bytes(name).decode("latin-1")
            if text.lower() not in WS_OWN_HEADERS:
                headers.append((text, bytes(value).decode("latin-1")))
        head = shared.encode_head("101 Switching Protocols", headers)
        await self.stop_task()
        self.check_unanswered("websocket.accept")  # the client may have gone meanwhile
        self.phase = OPEN
        await self.write(head)
        self.heard = self.loop.time()
        await self.open_stream()
        if WS_PING_INTERVAL > 0:
            self.pinger = self.loop.create_task(self.keepalive(WS_PING_INTERVAL))
        if self.going_away:
            self.start_close(ws.CLOSE_GOING_AWAY)

    async def send_message(self, message: Message) -> None:
        if self.phase == CONNECTING and not self.ended:
            raise RuntimeError("websocket.send before websocket.accept")
        if self.phase != OPEN:
            raise ClientDisconnected("websocket.send on a closed WebSocket")
        text, data = message.get("text"), message.get("bytes")
        if text is not None and data is None:
            frame = ws.encode_frame(ws.OP_TEXT, str(text).encode("utf-8"))
        elif data is not None and text is None:
            frame = ws.encode_frame(ws.OP_BINARY, bytes(data))
        else:
            raise ValueError("websocket.send needs exactly one of 'bytes' and 'text'")
        await self.write(frame)

    async def close_by_app(self, message: Message) -> None:
        code = message.get("code")
        code = ws.CLOSE_NORMAL if code is None else code
        reason = message.get("reason") or ""
        if self.phase == CONNECTING:
            if self.ended:
                return
            self.check_unanswered("websocket.close")
            await self.stop_task()
            await self.refuse(FORBIDDEN_RECORDS)
            return
        if self.phase != OPEN:
            return  # closed already: nothing more to say
        if type(code) is not int or not ws.valid_close_code(code):
            raise ValueError(f"websocket.close: {code!r} is not a close code a server may send")
        self.start_close(code, str(reason))

    async def http_response(self, message: Message) -> None:
        """The websocket.http.response extension: an HTTP response in place
        of the handshake's answer."""
        if self.response is None:
            self.check_unanswered(message["type"])
            await self.stop_task()
            self.response = Exchange(self.loop, self.conn, b"", 0)
        await self.response.send({**message, "type": message["type"].replace("websocket.http.", "http.", 1)})
        if self.response.ended:
            self.phase = ENDED
            self.ended = True
            self.set_disconnect(ws.CLOSE_ABNORMAL)

    async def refuse(self, response: bytes) -> None:
        """An HTTP response in place of the handshake's answer; the
        connection ends with it."""
        self.phase = ENDED
        self.ended = True
        self.set_disconnect(ws.CLOSE_ABNORMAL)
        with contextlib.suppress(OSError):
            await self.loop.sock_sendall(self.conn, response)
        self.shutdown()

    async def open_stream(self) -> None:
        """Hands the connection to the loop's transport (_OpenStream). It
        gets a duplicate of the socket, so that the connection's task
        closes its own as ever: the peer sees the end once both are shut."""
        try:
            sock = self.conn.dup()
        except OSError as exc:
            self.lost()
            raise ClientDisconnected(f"the WebSocket's connection: {exc}") from exc
        try:
            await self.loop.connect_accepted_socket(lambda: _OpenStream(self), sock=sock)
        except OSError as exc:
            sock.close()
            self.lost()
            raise ClientDisconnected(f"the WebSocket's connection: {exc}") from exc

    def write_now(self, data: bytes) -> None:
        """Into the transport's buffer, in order with every other write."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(records(data)))

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:  # the handshake's answer: the transport comes after it
            try:
                async with self.write_lock:
                    await send_parts(self.loop, self.conn, records(data))
            except OSError as exc:
                self.lost()
                raise ClientDisconnected(f"sending on the WebSocket: {exc}") from exc
            return
        if transport.is_closing() or self.ended:
            raise ClientDisconnected("sending on the WebSocket: the connection is gone")
        self.write_now(data)
        if not self.writable.is_set():
            await self.writable.wait()
            if self.ended:
                raise ClientDisconnected("sending on the WebSocket: the connection is gone")

    # -- the end ---------------------------------------------------------

    def start_close(self, code: int, reason: str = "") -> None:
        """The worker closes: its close frame, the client's answer awaited
        for a while, then the end record. The app sees the disconnect at once."""
        if self.phase != OPEN:
            return
        self.phase = CLOSING
        self.set_disconnect(code, reason)
        self.closer = self.loop.create_task(self.closing(code, reason))

    async def closing(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.write(ws.encode_close(code, reason)), WS_CLOSE_TIMEOUT)
        except (ClientDisconnected, asyncio.TimeoutError):
            self.lost()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.peer_closed.wait(), WS_CLOSE_TIMEOUT)
        self.end()

    def end(self) -> None:
        """The end record after whatever the transport still holds, then the
        connection is shut: it carries nothing more. The transport closes
        once it has written it (or gives up after WS_CLOSE_TIMEOUT)."""
        if self.ended:
            return
        self.ended = True
        self.phase = ENDED
        transport = self.transport
        if transport is None or transport.is_closing():
            self.shutdown()
            return
        transport.write(END_RECORD)
        transport.close()
        self.loop.call_later(WS_CLOSE_TIMEOUT, transport.abort)
        self.shutdown(flush=True)

    def lost(self) -> None:
        """The connection is gone, or given up."""
        self.ended = True
        self.phase = ENDED
        self.set_disconnect(ws.CLOSE_ABNORMAL)
        self.peer_closed.set()
        self.shutdown()

    async def keepalive(self, interval: float) -> None:
        """A ping every interval while the WebSocket is open. A client that
        has sent nothing, pongs included, for two intervals is taken as
        gone (a peer that vanished without a word would hold the session
        for good): closed with 1011, as the websockets library's keepalive
        closes, and the app sees websocket.disconnect 1011."""
        with contextlib.suppress(ClientDisconnected):
            while self.phase == OPEN:
                await asyncio.sleep(interval)
                if self.phase != OPEN:
                    return
                if self.loop.time() - self.heard >= 2 * interval:
                    log(f"a WebSocket client sent nothing for {2 * interval:g} s, pongs included: closed (1011)")
                    self.start_close(ws.CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
                    return
                await self.write(ws.encode_frame(ws.OP_PING, b""))

    def shutdown(self, flush: bool = False) -> None:
        """Nothing more is read or written; flush: the transport still
        writes what it holds (the end record) before it closes."""
        if self.pinger is not None and self.pinger is not asyncio.current_task():
            self.pinger.cancel()
        if not flush:
            if self.transport is not None:
                self.transport.abort()
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
        self.set_disconnect(ws.CLOSE_ABNORMAL)
        self.writable.set()  # a writer waiting for room: it finds the session ended
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def stop_task(self) -> None:
        task = self.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def go_away(self) -> None:
        """The worker stops: an open WebSocket is closed with 1001, one the
        app accepts later too."""
        self.going_away = True
        self.start_close(ws.CLOSE_GOING_AWAY)

    async def finish(self, raised: bool) -> None:
        """The app returned (or raised): close what it left open."""
        if self.phase == CONNECTING and not self.ended:
            await self.stop_task()
            if self.response is not None:
                if not self.response.started:
                    await self.refuse(shared.INTERNAL_ERROR_RECORDS)
                else:
                    log("the app returned before the end of its response; the response is cut off")
                    self.lost()
            else:
                if not raised:
                    log("the app returned without accepting or closing the WebSocket")
                await self.refuse(shared.INTERNAL_ERROR_RECORDS)
        elif self.phase == OPEN:
            self.start_close(ws.CLOSE_INTERNAL_ERROR if raised else ws.CLOSE_NORMAL)
        if self.closer is not None:
            await self.closer
        await self.stop_task()
        self.shutdown()


# --------------------------------------------------------------------------
# Connections


class Server:
    """The worker's connections and their requests, on one event loop.

    Each accepted connection (only from AGENT_PEER_UIDS) gets a task that
    reads a frame, serves that request, and reads the next: one request at
    a time per connection, as many at once as the engine opens connections
    (at most the worker's concurrency). A connection waiting for its next
    frame is idle; on stop the idle ones are closed, the others finish."""

    def __init__(self, listener: socket.socket, app: ASGIApp, peer_uids: frozenset[int], concurrency: int,
                 lifespan_state: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.listener = listener
        self.app = app
        self.peer_uids = peer_uids
        self.lifespan_state = lifespan_state
        self.max_connections = shared.MAX_CONNECTIONS + concurrency
        self.tasks: set[asyncio.Task[None]] = set()
        # Idle connections' tasks, the one idle the longest first.
        self.idle: dict[asyncio.Task[None], None] = {}
        self.websockets: set[WebSocketSession] = set()
        self.stopping = False
        self.refusal_log = shared.RateLimitedLog(shared.REFUSAL_LOG_INTERVAL)
        self.accept_error_log = shared.RateLimitedLog(shared.REFUSAL_LOG_INTERVAL)

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until *stop* is set, then until the requests in flight end."""
        accepting = self.loop.create_task(self.accept_loop())
        await stop.wait()
        self.stopping = True
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        self.listener.close()
        for task in list(self.idle):
            task.cancel()
        for session in list(self.websockets):
            session.go_away()
        while self.tasks:
            await asyncio.wait(list(self.tasks))

    async def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(self.listener)
            except OSError as exc:
                self.accept_error_log(f"accept: {exc}")
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.idle:
                    next(iter(self.idle)).cancel()
                await asyncio.sleep(shared.ACCEPT_RETRY_DELAY)
                continue
            if not shared.admitted(conn, self.peer_uids, self.refusal_log, self.accept_error_log):
                continue
            if len(self.tasks) >= self.max_connections:
                if not self.idle:
                    conn.close()
                    self.accept_error_log(f"{len(self.tasks)} connections, none idle: a new one closed")
                    continue
                next(iter(self.idle)).cancel()
            task = self.loop.create_task(self.connection(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def connection(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self.stopping:
                self.idle[task] = None
                try:
                    first = await self.loop.sock_recv(conn, shared.RECV_BUFFER_SIZE)
                except OSError:  # reset by the peer while idle: an ordinary close
                    return
                finally:
                    self.idle.pop(task, None)
                if not first or not await self.serve_request(conn, first):
                    return
        except asyncio.CancelledError:
            pass  # closed while idle (stop, or the connection cap)
        finally:
            conn.close()

    async def serve_request(self, conn: socket.socket, first: bytes) -> bool:
        """The request whose frame begins with *first*; returns whether the
        connection may carry another."""
        try:
            data, end = await read_frame(self.loop, conn, first)
            environ = shared.environ_from_vars(data, end, {})
            if "REQUEST_METHOD" not in environ:
                raise MalformedFrame("no REQUEST_METHOD")
            length = shared.request_content_length(environ)
            # After an upgrade request's frame come the client's own bytes,
            # not a body: such a connection never carries another request.
            upgrade = environ.get("AGENT_UPGRADE") == "1"
            if not is_websocket_upgrade(environ):
                exchange = Exchange(self.loop, conn, bytes(data[end : end + length] if upgrade else data[end:]),
                                    length)
                scope = http_scope(environ, self.lifespan_state)
        except (MalformedFrame, OSError) as exc:
            return shared.frame_refused(exc)
        if is_websocket_upgrade(environ):
            return await self.serve_websocket(conn, environ, bytes(data[end:]))
        del data
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except ClientDisconnected as exc:
            log(f"client went away: {exc}")
            exchange.keep = False
        except Exception:
            log("the app raised an exception:")
            traceback.print_exc()
            sys.stderr.flush()
            await self.answer_error(exchange)
        else:
            if not exchange.ended:
                await self.unfinished(exchange)
        finally:
            # Before the connection's loop reads again, or closes it.
            exchange.finish_watch()
        return exchange.keep and exchange.ended and not upgrade

    async def serve_websocket(self, conn: socket.socket, environ: dict[str, str], early: bytes) -> bool:
        """A WebSocket, from its handshake to its end; the connection then
        closes (returns False)."""
        problem = ws.handshake_problem(environ)
        if problem is not None:
            log(f"not a WebSocket handshake ({problem}): answered 400")
            with contextlib.suppress(OSError):
                await self.loop.sock_sendall(conn, bad_handshake_records(problem))
            return False
        session = WebSocketSession(self.loop, conn, environ, early)
        scope = websocket_scope(environ, self.lifespan_state)
        session.start()
        self.websockets.add(session)
        if self.stopping:
            session.go_away()
        raised = False
        try:
            await self.app(scope, session.receive, session.send)
        except ClientDisconnected as exc:
            log(f"client went away: {exc}")
        except Exception:
            log("the app raised an exception:")
            traceback.print_exc()
            sys.stderr.flush()
            raised = True
        finally:
            self.websockets.discard(session)
        await session.finish(raised)
        return False

    async def answer_error(self, exchange: Exchange) -> None:
        """A 500 in place of a response not yet started; a started one is
        cut off (the connection closes without its end record)."""
        if exchange.started or exchange.ended:
            exchange.keep = exchange.keep and exchange.ended
            return
        exchange.started = True
        try:
            await exchange.settle_body()
            await self.loop.sock_sendall(exchange.conn, shared.INTERNAL_ERROR_RECORDS)
        except OSError:  # ClientDisconnected included
            exchange.keep = False
            return
        exchange.ended = True

    async def unfinished(self, exchange: Exchange) -> None:
        if exchange.started:
            log("the app returned before the end of its response; the response is cut off")
            exchange.keep = False
            return
        log("the app returned without a response")
        await self.answer_error(exchange)


# --------------------------------------------------------------------------
# The worker


async def serve_worker(listener: socket.socket, ready_fd: int, app: ASGIApp, peer_uids: frozenset[int],
                       concurrency: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lifespan = Lifespan(app)
    try:
        await lifespan.startup()
    except LoadError as error:
        shared.report_load_error(ready_fd, error)
        return 1
    shared.report_ready(ready_fd, concurrency)
    await Server(listener, app, peer_uids, concurrency, lifespan.state).serve(stop)
    await lifespan.shutdown()
    return 0


def run_worker(listener: _socket.socket, ready_fd: int, app: ASGIApp, peer_uids: frozenset[int],
               concurrency: int) -> int:
    """A worker with its app loaded (wsgi_loader.main's worker, or its
    preloader's after the fork): its own event loop, from here on."""
    try:
        uvloop = event_loop_module(os.environ.get("AGENT_ASGI_LOOP", "auto"))
    except shared.LoadError as error:
        shared.report_load_error(ready_fd, error)
        return 1
    sock = socket.socket(fileno=listener.detach())
    sock.setblocking(False)
    serving = serve_worker(sock, ready_fd, app, peer_uids, concurrency)
    try:
        if uvloop is None:
            return asyncio.run(serving)
        if hasattr(asyncio, "Runner"):  # Python 3.11
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(serving)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(serving)
    finally:
        sock.close()


def event_loop_module(choice: str) -> ModuleType | None:
    """uvloop, for agent_asgi_loop auto when the app's Python has it (as
    uvicorn's --loop auto) and for uvloop, where a worker without it fails
    to start; None: asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        if choice == "uvloop":
            raise shared.LoadError("exception", f"agent_asgi_loop uvloop: {sys.executable} cannot import uvloop; "
                                   "install it in the app's environment, or set agent_asgi_loop auto", "") from None
        return None
    module: ModuleType = uvloop
    return module


def main() -> int:
    shared.LOG_PREFIX = LOG_PREFIX
    if os.environ.get("AGENT_ASGI_LOOP", "auto") != "asyncio":
        # A preloader's import is its workers' too. A try, not suppress():
        # tests/unit/test_imports.py's rule for the app's packages.
        try:  # noqa: SIM105
            import uvloop  # noqa: F401
        except ImportError:
            pass
    return shared.main(APP_NAMES, run_worker)


if __name__ == "__main__":
    sys.exit(main())
