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
and exits 0. WebSocket scopes are never made: the engine does not carry
them.

Standard library only; Python 3.9 and later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import traceback

if __package__:  # imported as agent.loaders.asgi_loader, as the agent's tests do
    from . import wsgi_loader as shared
else:  # run as a script from the loaders directory: wsgi_loader.py lies beside it
    _own_dir = os.path.dirname(os.path.realpath(__file__))
    if _own_dir not in sys.path:
        sys.path.insert(0, _own_dir)
    import wsgi_loader as shared  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Awaitable, Callable
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
HTTP_VERSIONS = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2.0": "2", "HTTP/2": "2"}

log = shared.log
ClientDisconnected = shared.ClientDisconnected
MalformedFrame = shared.MalformedFrame
LoadError = shared.LoadError
_pack_u32 = shared._pack_u32
END_RECORD = shared.END_RECORD


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
        self.watcher: asyncio.Task[None] | None = None
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
        if not self.gone.is_set() and self.watcher is None:
            self.watcher = self.loop.create_task(self.watch())
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

    async def watch(self) -> None:
        """With the body read, nothing more comes on the connection until
        the end record has left: end of file means the engine closed it
        (the client went away); a byte is not the protocol's either."""
        try:
            data = await self.loop.sock_recv(self.conn, 1)
        except OSError:
            data = b""
        if data:
            log("bytes past the end of a request body; the connection closes after the response")
        self.keep = False
        self.gone.set()

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

    async def finish_watch(self) -> None:
        """The request is over: stop looking for the peer's end of file, so
        that the next frame is read by the connection's loop alone."""
        self.gone.set()
        watcher = self.watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

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
                for part in parts:
                    await self.loop.sock_sendall(self.conn, part)
        except OSError as exc:
            self.gone.set()
            raise ClientDisconnected(f"sending the response: {exc}") from exc
        if not more:
            self.ended = True
            self.gone.set()


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
            exchange = Exchange(self.loop, conn, bytes(data[end:]), length)
            scope = http_scope(environ, self.lifespan_state)
        except (MalformedFrame, OSError) as exc:
            return shared.frame_refused(exc)
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
        await exchange.finish_watch()
        return exchange.keep and exchange.ended

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
    sock = socket.socket(fileno=listener.detach())
    sock.setblocking(False)
    try:
        return asyncio.run(serve_worker(sock, ready_fd, app, peer_uids, concurrency))
    finally:
        sock.close()


def main() -> int:
    shared.LOG_PREFIX = LOG_PREFIX
    return shared.main(APP_NAMES, run_worker)


if __name__ == "__main__":
    sys.exit(main())
