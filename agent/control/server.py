"""The status socket: HTTP/1.1 over a Unix stream socket (docs/status-api.md).

The server lives inside the core's policy loop, which is single-threaded:
it registers its listening socket and every connection on the core's
selector, with a callback `data(fd)`, and never blocks. Reads and writes
are nonblocking and buffered; a request is at most MAX_REQUEST bytes and
must arrive whole within REQUEST_LIMIT seconds of its first byte; a
connection that waits IDLE_LIMIT seconds for its next request is closed by
tick().

Any local user may connect (the socket is mode 0666), so connections are
limited per peer uid (SO_PEERCRED), and ADMIN_RESERVE of them are kept for
root and for connections that have shown the admin token: one user's
clients cannot shut out another's, nor the operator.

Everything the server reports or does goes through a Provider, the small
interface the core implements; the server itself knows HTTP, rights and
formats, and nothing of pools or processes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import msgpack  # type: ignore[import-untyped]

from agent.control import metrics
from agent.control.tokens import read_tokens
from agent.logs import log

MAX_REQUEST = 65536            # request line, headers and body together
MAX_HEADERS = 100
IDLE_LIMIT = 30.0              # seconds a connection may wait between requests
REQUEST_LIMIT = 10.0           # seconds from a request's first byte to its last; not reset by each byte
LINGER = 2.0                   # seconds a closing connection waits for the client to close first
MAX_CONNECTIONS = 128
ADMIN_RESERVE = 16             # of MAX_CONNECTIONS, only for root and admin-token connections
MAX_PER_UID = 32               # connections of one peer uid, root's and admin-token ones aside
ACCEPTS_PER_WAKEUP = 32        # so that a flood of clients cannot starve the core's other work
READS_PER_WAKEUP = 16
REQUESTS_PER_WAKEUP = 32
DASHBOARD = Path(__file__).with_name("dashboard.html")

JSON_TYPE = "application/json"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
HTML_TYPE = "text/html; charset=utf-8"
TOKEN_CHARS = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")        # none may be in a request target
HEADER_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # nor in a header value (HTAB may)
PATH = re.compile(r"(/[A-Za-z0-9\-._~!$&'()*+,;=:@%]*)+")   # RFC 3986's absolute path
BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
DIGITS = re.compile(r"[0-9]{1,12}")                  # ASCII only: str.isdigit() takes "²"
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ADMIN_PEER_UIDS = frozenset({0})                     # see StatusServer.rights_of

Details = dict[str, Any]


class Provider(Protocol):
    """What the status socket asks of the core. Every method is called on
    the core's loop thread and must return at once; the data returned is
    plain (dicts, lists, str, int, float, bool, None), shaped as the
    matching resource in docs/status-api.md. Any method may raise
    StatusError to answer with that status; any other exception answers
    500 and is logged."""

    def server_info(self) -> Details:
        """The body of GET /server."""

    def pool_info(self, detailed: bool) -> Details:
        """The body of GET /pool. Without `detailed` (a reader without the
        admin right), no error details: they may quote an app's secrets."""

    def requests_info(self, detailed: bool) -> Details:
        """The body of GET /requests: {"requests": [...]}. Without
        `detailed`, each request's path has no query string."""

    def metrics_snapshot(self) -> metrics.MetricsSnapshot:
        """The counters rendered at GET /metrics."""

    def restart_app(self, name: str, blocking: bool, done: Callable[[Details], None]) -> None:
        """Begin a rolling restart of the app called `name`; raise KeyError
        (or StatusError 404) when there is none. Call `done(details)` exactly once, on the loop
        thread: at once when not blocking (it may be called before this
        method returns), else when the restart has finished or been
        abandoned. The answer is {"ok": true, **details}; details with
        "ok": false (and an "error") answer 409."""

    def detach_process(self, pid: int) -> Details:
        """Detach the worker `pid`; raise KeyError (or StatusError 404) when
        no worker has that pid, ValueError (with the reason, or StatusError
        409) when it cannot be detached now.
        Returns details for the answer {"ok": true, **details}."""

    def reopen_logs(self) -> Details:
        """Close and reopen the agent's log file; returns details."""


# -- HTTP messages ------------------------------------------------------------


class StatusError(Exception):
    """An answer of `status` with {"error": message}.

    A provider may raise it from any method to answer 400, 403, 404 or 409
    with its own message. `close` (for the server's own use) when the
    connection's framing is lost and it cannot carry another request;
    `allow` fills the Allow header of a 405."""

    def __init__(self, status: int, message: str, *, close: bool = False, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.allow = allow


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path, self.query = split_target(self.target)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if "close" in tokens:
            return False
        return self.version == "HTTP/1.1" or "keep-alive" in tokens

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise StatusError(400, f"query parameter {name!r} given more than once")
        return values[0]


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def shown(text: str, limit: int = 40) -> str:
    """A client's text quoted in an error message: short, printable."""
    quoted = ascii(text)
    return quoted if len(quoted) <= limit else quoted[:limit] + "..."


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """The path (as sent: not percent-decoded) and the query's parameters.
    Parsed here rather than by urllib, whose urlsplit raises ValueError on
    a target such as //[x and whose parse_qs hides bad escapes."""
    if CONTROL_CHARS.search(target):
        raise StatusError(400, "control characters in the request target", close=True)
    before_fragment = target.partition("#")[0]
    path, _, query = before_fragment.partition("?")
    if not PATH.fullmatch(path):
        raise StatusError(400, "malformed request target", close=True)
    return path, parse_query(query)


def parse_query(query: str) -> dict[str, list[str]]:
    """name=value pairs joined by &, in order; a name without = has the
    value "" (as parse_qs with keep_blank_values)."""
    params: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params.setdefault(decode_component(name), []).append(decode_component(value))
    return params


def decode_component(text: str) -> str:
    raw = text.replace("+", " ").encode("latin-1")
    if BAD_PERCENT.search(raw):
        raise StatusError(400, "bad percent-encoding in the query string")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise StatusError(400, "the query string is not UTF-8") from None


@dataclass(frozen=True)
class Head:
    """A request's line and headers; its body starts at `body_start`."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body_start: int

    @property
    def chunked(self) -> bool:
        return "transfer-encoding" in self.headers

    @property
    def expects_continue(self) -> bool:
        return self.version == "HTTP/1.1" and "expect" in self.headers


def parse_head(buffer: bytearray | bytes) -> Head | None:
    """The request line and headers at the start of `buffer` (after any empty
    lines, which RFC 9112 2.2 ignores), or None while they are incomplete.
    Raises StatusError for malformed or oversized ones, or a body framing
    this server does not take."""
    start = len(buffer) - len(bytes(buffer).lstrip(b"\r\n"))
    end = buffer.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buffer) >= MAX_REQUEST:
            raise StatusError(400, f"request headers exceed {MAX_REQUEST} bytes", close=True)
        return None
    lines = bytes(buffer[start:end]).decode("latin-1").split("\r\n")
    method, target, version = parse_request_line(lines[0])
    headers = parse_headers(lines[1:])
    check_framing(headers, version)
    return Head(method, target, version, headers, end + 4)


def parse_request(buffer: bytearray | bytes) -> tuple[Request, int] | None:
    """The first complete request in `buffer` and the bytes it took, or
    None while it is incomplete. Raises StatusError, and nothing else, for
    a malformed or oversized request (tests/fuzz/fuzz_status_request.py)."""
    head = parse_head(buffer)
    if head is None:
        return None
    if head.chunked:
        decoded = decode_chunked(buffer, head.body_start)
        if decoded is None:
            return None
        body, total = decoded
    else:
        total = head.body_start + content_length(head.headers)
        if total > MAX_REQUEST:
            raise StatusError(400, f"request exceeds {MAX_REQUEST} bytes", close=True)
        if len(buffer) < total:
            return None
        body = bytes(buffer[head.body_start:total])
    return Request(head.method, head.target, head.version, head.headers, body), total


def check_framing(headers: dict[str, str], version: str) -> None:
    """A body is framed by Content-Length or, in HTTP/1.1, by the chunked
    transfer coding alone; both at once could be read two ways (request
    smuggling), so neither is guessed. An expectation other than
    100-continue cannot be met (RFC 9110, 10.1.1)."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if version != "HTTP/1.1":
            raise StatusError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
        if "content-length" in headers:
            raise StatusError(400, "both Transfer-Encoding and Content-Length", close=True)
        if coding.strip().lower() != "chunked":
            raise StatusError(501, f"transfer coding {shown(coding)} is not supported; send chunked or "
                                   "Content-Length", close=True)
    expect = headers.get("expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        raise StatusError(417, f"cannot meet the expectation {shown(expect)}", close=True)


def decode_chunked(buffer: bytearray | bytes, start: int) -> tuple[bytes, int] | None:
    """A chunked body from `start` (RFC 9112, 7.1): its data and where the
    request ends, or None while incomplete. Chunk extensions and trailer
    fields are read past, not kept. Everything sent counts against
    MAX_REQUEST, framing included."""
    body = bytearray()
    pos = start
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            check_room(buffer)
            return None
        size_text = bytes(buffer[pos:line_end]).partition(b";")[0].strip(b" \t")
        if not CHUNK_SIZE.fullmatch(size_text):
            raise StatusError(400, "malformed chunk size", close=True)
        size = int(size_text, 16)
        pos = line_end + 2
        if size == 0:
            return skip_trailers(buffer, pos, bytes(body))
        if pos + size + 2 > MAX_REQUEST:
            raise StatusError(400, f"request exceeds {MAX_REQUEST} bytes", close=True)
        if len(buffer) < pos + size + 2:
            return None
        if buffer[pos + size:pos + size + 2] != b"\r\n":
            raise StatusError(400, "a chunk does not end with CRLF", close=True)
        body += buffer[pos:pos + size]
        pos += size + 2


def skip_trailers(buffer: bytearray | bytes, pos: int, body: bytes) -> tuple[bytes, int] | None:
    """The trailer section after the last chunk, up to its empty line."""
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            check_room(buffer)
            return None
        if line_end == pos:
            return body, pos + 2
        if b":" not in buffer[pos:line_end]:
            raise StatusError(400, "malformed trailer field", close=True)
        pos = line_end + 2


def check_room(buffer: bytearray | bytes) -> None:
    """An incomplete request that already fills MAX_REQUEST never completes."""
    if len(buffer) >= MAX_REQUEST:
        raise StatusError(400, f"request exceeds {MAX_REQUEST} bytes", close=True)


def parse_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise StatusError(400, "malformed request line", close=True)
    method, target, version = parts
    if not TOKEN_CHARS.match(method.encode("latin-1")):
        raise StatusError(400, "malformed method", close=True)
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise StatusError(400, f"unsupported protocol version {shown(version)}", close=True)
    if not target.startswith("/"):
        raise StatusError(400, "the request target must be a path", close=True)
    return method, target, version


def parse_headers(lines: list[str]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise StatusError(400, f"more than {MAX_HEADERS} headers", close=True)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN_CHARS.match(name.encode("latin-1")):
            raise StatusError(400, "malformed header line", close=True)
        key = name.lower()
        value = value.strip(" \t")
        if HEADER_CONTROL_CHARS.search(value):
            raise StatusError(400, f"control characters in header {shown(name)}", close=True)
        if key in headers and key == "content-length" and headers[key] != value:
            raise StatusError(400, "conflicting Content-Length headers", close=True)
        # Repeated headers are joined, as RFC 9110 allows for list-valued ones.
        headers[key] = f"{headers[key]}, {value}" if key in headers and key != "content-length" else value
    return headers


def content_length(headers: dict[str, str]) -> int:
    value = headers.get("content-length", "0")
    if not DIGITS.fullmatch(value):
        raise StatusError(400, "malformed Content-Length", close=True)
    return int(value)


def prefers_msgpack(accept: str | None) -> bool:
    """msgpack when it is the first media type the client names."""
    if not accept:
        return False
    first = accept.split(",", 1)[0].split(";", 1)[0].strip().lower()
    return first in MSGPACK_TYPES


def encode_data(data: Any, request: Request) -> Response:
    if prefers_msgpack(request.headers.get("accept")):
        return Response(200, MSGPACK_TYPES[0], msgpack.packb(data, use_bin_type=True))
    return Response(200, JSON_TYPE, json.dumps(data, separators=(",", ":")).encode("utf-8"))


def error_response(status: int, message: str, allow: str | None = None) -> Response:
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [("Allow", allow)] if allow else []
    return Response(status, JSON_TYPE, body, headers)


def serialize_response(response: Response, *, keep_alive: bool, head_only: bool) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


# -- connections -----------------------------------------------------------------


class Rights(Enum):
    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


PEERCRED = struct.Struct("3i")
REFUSED = serialize_response(error_response(503, "too many connections from this user"),
                             keep_alive=False, head_only=False)
UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)


def peer_of(sock: socket.socket) -> Peer:
    try:
        pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    except OSError:
        return UNKNOWN_PEER
    return Peer(pid, uid, gid)


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    peer: Peer
    last_activity: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    awaiting: bool = False      # a blocking action holds the answer
    closing: bool = False       # no more requests: flush, then close
    eof: bool = False           # the client sent everything it will send
    backlog: bool = False       # buffered requests left for the next wakeup
    closed: bool = False
    events: int = 0             # the selector interest currently registered
    peer_admin: bool = False    # the peer's uid alone gives the admin right
    token_admin: bool = False   # a request on it showed the admin token
    request_started: float | None = None  # the first byte of the request being received
    continued: bool = False     # 100 Continue was sent for the request being received

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def wants_read(self) -> bool:
        if self.eof or self.closed:
            return False
        # A closing connection keeps reading, to discard what the client
        # still sends: closing with unread data would reset the connection
        # and could destroy the answer before the client reads it.
        return self.closing or len(self.inbuf) < MAX_REQUEST

    def wants_write(self) -> bool:
        return bool(self.outbuf) or self.backlog

    def can_take_request(self) -> bool:
        return not (self.awaiting or self.closing or self.outbuf or self.closed)

    @property
    def limited(self) -> bool:
        """Counted against its uid's share and outside the admins' reserve."""
        return not (self.peer_admin or self.token_admin)


# -- the server -------------------------------------------------------------------


Handler = Callable[[Connection, Request], Response | None]


class StatusServer:
    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        provider: Provider,
        instance_dir: Path,
        *,
        dashboard: Path = DASHBOARD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.selector = selector
        self.provider = provider
        self.tokens = read_tokens(instance_dir)
        self.dashboard = dashboard
        self.clock = clock
        self.connections: dict[int, Connection] = {}
        self.refused: dict[int, int] = {}   # peer uid: connections refused since the last tick
        self.reads: dict[str, Callable[[Request, bool], Response]] = {
            "/server": lambda r, detailed: encode_data(self.provider.server_info(), r),
            "/pool": lambda r, detailed: encode_data(self.provider.pool_info(detailed), r),
            "/requests": lambda r, detailed: encode_data(self.provider.requests_info(detailed), r),
            "/metrics": lambda r, detailed: self.get_metrics(r),
            "/dashboard": lambda r, detailed: self.get_dashboard(r),
        }
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self.on_listener_ready)

    def close(self) -> None:
        """Stop serving: forget the listener (its owner closes it) and close every connection."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        for conn in list(self.connections.values()):
            self.drop(conn)

    def tick(self, now: float | None = None) -> None:
        """Called by the core about once a second: answers 408 to requests
        not complete within REQUEST_LIMIT and drops connections idle past
        their limit (now: the server's clock, read when not given)."""
        now = self.clock() if now is None else now
        for conn in list(self.connections.values()):
            if conn.awaiting or conn.closed:
                continue
            if conn.request_started is not None:
                if now - conn.request_started > REQUEST_LIMIT:
                    self.time_out(conn)
                continue
            limit = LINGER if conn.closing and not conn.outbuf else IDLE_LIMIT
            if now - conn.last_activity > limit:
                self.drop(conn)
        self.report_refused()

    def time_out(self, conn: Connection) -> None:
        conn.request_started = None
        self.answer_error(conn, StatusError(408, f"the request was not complete within {REQUEST_LIMIT:g} s"),
                          keep_alive=False, head_only=False)
        try:
            self.flush(conn)
        except OSError:
            self.drop(conn)
            return
        self.settle(conn)

    def report_refused(self) -> None:
        """One log line a tick, however many clients were refused."""
        if self.refused:
            counts = ", ".join(f"uid {uid}: {count}" for uid, count in sorted(self.refused.items()))
            log.warning("status socket: connections refused at the connection limits (%s)", counts)
            self.refused.clear()

    # -- accepting ----------------------------------------------------------

    def on_listener_ready(self, fd: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of fds, or a client gone before accept: try again on the next wakeup.
                log.warning("status socket: accept failed: %s", error)
                return
            self.admit(sock)

    def admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = peer_of(sock)
        peer_admin = peer.uid in ADMIN_PEER_UIDS
        if not self.has_room(peer, peer_admin):
            self.refused[peer.uid] = self.refused.get(peer.uid, 0) + 1
            with contextlib.suppress(OSError):
                sock.send(REFUSED)
            sock.close()
            return
        conn = Connection(sock=sock, peer=peer, last_activity=self.clock(), peer_admin=peer_admin)
        self.connections[conn.fd] = conn
        self.update_interest(conn)

    def has_room(self, peer: Peer, peer_admin: bool) -> bool:
        """Root may use every slot; any other peer shares MAX_CONNECTIONS -
        ADMIN_RESERVE with the others, at most MAX_PER_UID for its uid. A
        connection that shows the admin token leaves both counts."""
        if len(self.connections) >= MAX_CONNECTIONS:
            return False
        if peer_admin:
            return True
        limited = [conn for conn in self.connections.values() if conn.limited]
        if len(limited) >= MAX_CONNECTIONS - ADMIN_RESERVE:
            return False
        return sum(conn.peer.uid == peer.uid for conn in limited) < MAX_PER_UID

    # -- one connection's I/O -------------------------------------------------

    def on_connection_ready(self, fd: int) -> None:
        conn = self.connections.get(fd)
        if conn is None:
            return
        try:
            self.flush(conn)
            if conn.wants_read():
                self.receive(conn)
            self.serve_buffered(conn)
            self.flush(conn)
        except OSError:
            self.drop(conn)
            return
        except Exception:
            # A fault in this server must cost one connection, never the core's loop.
            log.exception("status socket: connection failed")
            self.drop(conn)
            return
        self.settle(conn)

    def receive(self, conn: Connection) -> None:
        for _ in range(READS_PER_WAKEUP):
            room = 65536 if conn.closing else MAX_REQUEST - len(conn.inbuf)
            if room <= 0:
                return
            try:
                chunk = conn.sock.recv(room)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                conn.eof = True
                return
            # Bytes received never reset a timer: REQUEST_LIMIT bounds a
            # request sent a byte at a time, LINGER a client that keeps
            # sending after the answer.
            if not conn.closing:
                conn.inbuf += chunk

    def flush(self, conn: Connection) -> None:
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del conn.outbuf[:sent]
            conn.last_activity = self.clock()
        if conn.closing:
            # Everything is sent: tell the client, then wait (LINGER) for it to close.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)

    def settle(self, conn: Connection) -> None:
        """Close the connection when it is done, else register what it waits for."""
        if conn.closed:
            return
        done_reading = conn.eof and not conn.awaiting and not conn.outbuf and not conn.backlog
        if done_reading or (conn.eof and conn.closing and not conn.outbuf):
            self.drop(conn)
            return
        self.update_interest(conn)

    def update_interest(self, conn: Connection) -> None:
        events = (selectors.EVENT_READ if conn.wants_read() else 0) | (
            selectors.EVENT_WRITE if conn.wants_write() else 0)
        if events == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, self.on_connection_ready)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, self.on_connection_ready)
        conn.events = events

    def drop(self, conn: Connection) -> None:
        if conn.closed:
            return
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        self.connections.pop(conn.fd, None)
        conn.closed = True
        conn.sock.close()

    # -- requests -------------------------------------------------------------

    def serve_buffered(self, conn: Connection) -> None:
        """Answer the complete requests in the buffer, one at a time: the
        next is parsed only once the previous answer is sent."""
        conn.backlog = False
        self.serve_requests(conn)
        # The clock of REQUEST_LIMIT runs while a request is partly
        # received and the connection could answer it; it restarts for
        # the next request.
        if conn.inbuf and conn.can_take_request():
            if conn.request_started is None:
                conn.request_started = self.clock()
        else:
            conn.request_started = None

    def serve_requests(self, conn: Connection) -> None:
        for _ in range(REQUESTS_PER_WAKEUP):
            if not conn.can_take_request():
                return
            try:
                parsed = parse_request(conn.inbuf)
            except StatusError as error:
                self.answer_error(conn, error, keep_alive=False, head_only=False)
                return
            except Exception as error:
                # parse_request raises only StatusError (it is fuzzed for
                # that); should it ever fail otherwise, the client still
                # gets its 400 and the log one line, not a traceback.
                log.warning("status socket: unparsable request: %s: %s", type(error).__name__, error)
                self.answer_error(conn, StatusError(400, "malformed request", close=True),
                                  keep_alive=False, head_only=False)
                return
            if parsed is None:
                self.send_continue(conn)
                return
            request, used = parsed
            del conn.inbuf[:used]
            conn.request_started = None
            conn.continued = False
            self.handle(conn, request)
            self.flush(conn)
        # The budget ran out with requests still buffered: the write
        # interest wakes this connection again on the next loop turn.
        conn.backlog = bool(conn.inbuf)

    def send_continue(self, conn: Connection) -> None:
        """A client that sent `Expect: 100-continue` waits for this before
        its body (RFC 9110, 10.1.1): sent once its headers are in and
        acceptable, never twice for one request. A request refused on its
        headers alone gets its final answer instead (parse_head raised)."""
        if conn.continued:
            return
        head = parse_head(conn.inbuf)
        if head is not None and head.expects_continue:
            conn.outbuf += CONTINUE
            conn.continued = True

    def handle(self, conn: Connection, request: Request) -> None:
        head_only = request.method == "HEAD"
        try:
            response = self.dispatch(conn, request)
        except StatusError as error:
            self.answer_error(conn, error, keep_alive=request.keep_alive, head_only=head_only)
            return
        except Exception as error:
            log.exception("status socket: %s %s failed", request.method, request.path)
            self.answer_error(conn, StatusError(500, f"internal error: {type(error).__name__}"),
                              keep_alive=request.keep_alive, head_only=head_only)
            return
        if response is not None:
            self.answer(conn, response, keep_alive=request.keep_alive, head_only=head_only)

    def answer(self, conn: Connection, response: Response, *, keep_alive: bool, head_only: bool) -> None:
        conn.outbuf += serialize_response(response, keep_alive=keep_alive, head_only=head_only)
        if not keep_alive:
            conn.closing = True
            conn.inbuf.clear()

    def answer_error(self, conn: Connection, error: StatusError, *, keep_alive: bool, head_only: bool) -> None:
        response = error_response(error.status, error.message, error.allow)
        self.answer(conn, response, keep_alive=keep_alive and not error.close, head_only=head_only)

    def dispatch(self, conn: Connection, request: Request) -> Response | None:
        """The answer, or None when an action answers later."""
        rights = self.rights_of(conn, request)
        read = self.reads.get(request.path)
        if read is not None:
            if request.method not in ("GET", "HEAD"):
                raise StatusError(405, f"{request.path} takes GET", allow="GET, HEAD")
            return read(request, rights is Rights.ADMIN)
        action = self.find_action(request.path)
        if action is None:
            raise StatusError(404, f"no resource {shown(request.path)}")
        if request.method != "POST":
            raise StatusError(405, f"{request.path} takes POST", allow="POST")
        if rights is not Rights.ADMIN:
            raise StatusError(403, "actions need root or the admin token")
        return action(conn, request)

    def rights_of(self, conn: Connection, request: Request) -> Rights:
        """A token, when given, decides alone: a wrong one is refused, never
        taken as the peer's own rights.

        Without a token, only root is admin by its uid. Not the agent's own
        uid when that is another: in a deployment without root, nginx's
        workers and the apps' workers run as that uid too, and a request
        through nginx, or an app's code, would be admin."""
        authorization = request.headers.get("authorization")
        if authorization is None:
            return Rights.ADMIN if conn.peer_admin else Rights.READ
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode("latin-1")
        if scheme.lower() == "bearer" and given:
            if self.tokens.admin is not None and hmac.compare_digest(given, self.tokens.admin):
                conn.token_admin = True
                return Rights.ADMIN
            if self.tokens.read is not None and hmac.compare_digest(given, self.tokens.read):
                return Rights.READ
        raise StatusError(403, "wrong token")

    def find_action(self, path: str) -> Handler | None:
        if path == "/apps/restart":
            return self.restart_app
        if path == "/logs/reopen":
            return lambda conn, request: self.action_response(request, self.provider.reopen_logs())
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "processes" and parts[3] == "detach":
            pid = parts[2]
            return lambda conn, request: self.detach_process(request, pid)
        return None

    # -- resources -------------------------------------------------------------

    def get_metrics(self, request: Request) -> Response:
        text = metrics.render(self.provider.metrics_snapshot())
        return Response(200, metrics.CONTENT_TYPE, text.encode("utf-8"))

    def get_dashboard(self, request: Request) -> Response:
        try:
            page = self.dashboard.read_bytes()
        except FileNotFoundError:
            raise StatusError(404, "no dashboard is installed") from None
        return Response(200, HTML_TYPE, page)

    def restart_app(self, conn: Connection, request: Request) -> None:
        name = request.param("app")
        if not name:
            raise StatusError(400, "restart needs ?app=NAME")
        blocking = parse_flag(request.param("blocking"), "blocking")
        answered = False

        def done(details: Details) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self.deliver_held(conn, request, self.action_response(request, details))

        conn.awaiting = True
        try:
            self.provider.restart_app(name, blocking, done)
        except Exception as error:
            if answered:
                # done() has answered already: a second answer would corrupt the stream.
                log.exception("status socket: restart of %s failed after answering", name)
                return
            answered = True
            conn.awaiting = False
            if isinstance(error, KeyError):
                raise StatusError(404, f"no app {name}") from None
            raise

    def deliver_held(self, conn: Connection, request: Request, response: Response) -> None:
        """Send an answer that a blocking action held. It may come from any
        callback of the core's loop, or from within the action itself."""
        conn.awaiting = False
        if conn.closed:
            return
        self.answer(conn, response, keep_alive=request.keep_alive, head_only=False)
        try:
            self.flush(conn)
        except OSError:
            self.drop(conn)
            return
        conn.backlog = bool(conn.inbuf)  # pipelined requests wait for the next wakeup
        self.settle(conn)

    def detach_process(self, request: Request, pid_text: str) -> Response:
        if not DIGITS.fullmatch(pid_text):
            raise StatusError(400, f"not a pid: {shown(pid_text)}")
        pid = int(pid_text)
        try:
            details = self.provider.detach_process(pid)
        except KeyError:
            raise StatusError(404, f"no process {pid}") from None
        except ValueError as error:
            raise StatusError(409, str(error) or f"process {pid} cannot be detached now") from None
        return self.action_response(request, details)

    def action_response(self, request: Request, details: Details) -> Response:
        body = {"ok": True, **details}
        response = encode_data(body, request)
        if body["ok"] is False:
            response.status = 409
        return response


def parse_flag(value: str | None, name: str) -> bool:
    if value is None or value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise StatusError(400, f"{name} must be 0 or 1")
