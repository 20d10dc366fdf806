"""The WSGI loader: the program that runs inside every app worker process.

Started as ``PYTHON wsgi_loader.py`` by the agent core with the environment
and file descriptors of docs/protocol.md section 3. It loads the app's
startup file, reports readiness (or a structured error) on the handshake
pipe, then serves requests over many connections: the engine's, and one
kept by each nginx worker process that takes the fast path. Its
concurrency (AGENT_CONCURRENCY) is 1 with agent_concurrency_model process:
one request at a time, on the main thread; with thread it is
agent_thread_count, each request on a thread of its own. Request frames as in section 1, responses cut into
records as in section 2. Only the uids in AGENT_PEER_UIDS may connect.

The core copies this file next to the other loaders and runs it under the
app's own interpreter (often a virtualenv without the agent installed), so
it uses the standard library only and imports nothing from the ``agent``
package. It must keep working on Python 3.9.
"""

from __future__ import annotations

import _socket
import errno
import gc
import io
import os
import select
import signal
import stat
import struct
import sys
import time
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_file_location

# A worker imports only what serving requests needs: json, traceback,
# socket (the Python wrapper), contextlib and urllib.parse each cost it
# memory that it would keep for its life, so the paths that use them (the
# error handshake, an app's exception, the preloader, a frame from a client
# other than nginx) import them where they run.

# Importing typing at run time costs every worker memory and start time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import FrameType, ModuleType, TracebackType
    from typing import Any

    ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
    WriteCallable = Callable[[bytes], None]
    StartResponse = Callable[..., WriteCallable]
    WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

LOG_PREFIX = "wsgi_loader: "

# The first recv of a connection reads into a buffer of this size; a frame
# whose vars fit in it (nearly all do) costs a single recv.
RECV_BUFFER_SIZE = 64 * 1024
# The engine caps vars at 1 MiB by default; the loader allows a configured
# engine some room but refuses absurd sizes instead of allocating them.
MAX_VARS_SIZE = 16 * 1024 * 1024
# Upper bound of one recv while reading the body, so that read() of a large
# body grows in steps rather than reserving the whole size at once.
BODY_RECV_SIZE = 1024 * 1024
# Unread body up to this size is received and dropped, so that the
# connection can carry the next request; past it the connection is closed
# after the response (section 2).
DRAIN_LIMIT = 1024 * 1024
# A body chunk up to this size is copied into one buffer with its record
# header (and the head, or the end record, where they go out with it) and
# sent with send(); a larger one is gathered with them by sendmsg() instead,
# which copies nothing in the worker. Either way one system call.
COALESCE_LIMIT = 16 * 1024
# Largest record the loader sends. Records of a large chunk or of a file
# sent with sendfile() are cut to this size: a record length is 32 bits,
# and a file's size is read once, before its first record is announced.
MAX_RECORD_SIZE = 16 * 1024 * 1024
# Most connections a worker keeps open: the engine's and one per nginx
# worker process. Past it, the connection idle the longest is closed.
MAX_CONNECTIONS = 256
# Refused peers and failed accepts are logged at most once per this many
# seconds: a local user must not be able to flood the log.
REFUSAL_LOG_INTERVAL = 10.0
# Out of descriptors with no connection to close: the pause before the
# next accept().
ACCEPT_RETRY_DELAY = 0.1

_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack

END_RECORD = b"\0\0\0\0"

INTERNAL_ERROR_BODY = b"500 Internal Server Error: the app raised an exception\n"
INTERNAL_ERROR_RESPONSE = (
    b"HTTP/1.1 500 Internal Server Error\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(INTERNAL_ERROR_BODY)
) + INTERNAL_ERROR_BODY
# The 500 response as one record and the end record, sent in one piece.
INTERNAL_ERROR_RECORDS = _pack_u32(len(INTERNAL_ERROR_RESPONSE)) + INTERNAL_ERROR_RESPONSE + END_RECORD


def log(message: str) -> None:
    sys.stderr.write(LOG_PREFIX + message + "\n")
    sys.stderr.flush()


def load_speedups() -> Any:
    """The C versions of the two hottest steps (csrc/loader_speedups.c),
    built for CPython 3.9 and later and installed next to this file; None
    where this interpreter cannot load them: the Python code below does the
    same work, slower. A module that is there but fails to load is logged."""
    try:
        if __package__:  # imported as agent.loaders.wsgi_loader, as the agent's tests do
            from . import _agent_loader_speedups as speedups  # type: ignore[attr-defined]
        else:
            import _agent_loader_speedups as speedups  # type: ignore[import-not-found]
    except ModuleNotFoundError:
        return None
    except ImportError as exc:
        log(f"the C speedups did not load, the Python code serves instead: {exc}")
        return None
    return speedups


SPEEDUPS = load_speedups()


# --------------------------------------------------------------------------
# Exceptions


class MalformedFrame(Exception):
    """The bytes on a connection are not a request frame (section 1)."""


class ClientDisconnected(ConnectionError):
    """The peer went away while the request was being read or answered."""


class LoadError(Exception):
    """The app could not be loaded; carries the handshake error fields."""

    def __init__(self, kind: str, summary: str, trace: str) -> None:
        super().__init__(summary)
        self.kind = kind
        self.summary = summary
        self.trace = trace


class _StopServing(BaseException):
    """Raised by the SIGTERM handler to leave the serve loop while the
    worker has no request in hand."""


# --------------------------------------------------------------------------
# Loading the app


def fix_sys_path(app_root: str) -> None:
    """Drop this file's directory from sys.path and put the app root first.

    Other files in the loaders directory must never shadow the app's own
    modules (an app's wsgi.py, for one).
    """
    own_dir = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != own_dir]
    sys.path.insert(0, app_root)


def resolve_startup_file(app_root: str, startup_file: str) -> str:
    if os.path.isabs(startup_file):
        return startup_file
    return os.path.join(app_root, startup_file)


def module_name_for(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def strip_loader_frames(tb: TracebackType | None) -> TracebackType | None:
    """Skip the loaders' and importlib's frames so the app's come first."""
    own_dir = os.path.dirname(os.path.realpath(__file__))
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen") and os.path.dirname(os.path.realpath(filename)) != own_dir:
            break
        tb = tb.tb_next
    return tb


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """Return the one-line summary and the traceback text of *exc*."""
    summary = type(exc).__name__
    text = str(exc)
    if text:
        summary += ": " + text
    import traceback

    lines = traceback.format_exception(type(exc), exc, strip_loader_frames(exc.__traceback__))
    return summary, "".join(lines)


def classify_load_exception(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return "syntax_error"
    if isinstance(exc, ImportError):
        return "import_error"
    return "exception"


class CheckedSourceLoader(SourceFileLoader):
    """Runs the source the core checked and handed over on an fd, never
    what the path holds by now (nor a bytecode cache of it)."""

    def __init__(self, name: str, path: str, source: bytes) -> None:
        super().__init__(name, path)
        self.source = source

    def get_code(self, fullname: str) -> Any:
        return compile(self.source, self.path, "exec", dont_inherit=True)

    def get_source(self, fullname: str) -> str:
        return self.source.decode("utf-8", "replace")


def read_startup_fd(fd: int) -> bytes:
    """The startup file's text from the fd the core opened (it checked the
    file's owner, and chose this worker's user from it)."""
    chunks = []
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def import_startup_file(path: str, source: bytes | None = None) -> ModuleType:
    """Execute the startup file as a module registered in sys.modules.

    Registering it (under the file's stem, as `import` would) lets pickle
    and the app's own imports find it. SourceFileLoader accepts any file
    extension (mod_wsgi-style ``app.wsgi`` files included). With source,
    that text runs instead of the file's.
    """
    name = module_name_for(path)
    loader = SourceFileLoader(name, path) if source is None else CheckedSourceLoader(name, path, source)
    spec = spec_from_file_location(name, path, loader=loader)
    if spec is None:  # only for a loader that refuses the path
        raise ImportError("cannot create a module spec for " + path)
    module = module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_application(app_root: str, startup_file: str, startup_fd: int | None = None,
                     names: tuple[str, ...] = ("application",)) -> WSGIApp:
    """The app the startup file defines: the first of *names* it binds
    (the ASGI loader also takes `app`). Raises LoadError."""
    path = resolve_startup_file(app_root, startup_file)
    if startup_fd is None and not os.path.isfile(path):
        raise LoadError("missing_startup_file", "startup file not found: " + path, "")
    try:
        source = None if startup_fd is None else read_startup_fd(startup_fd)
    except OSError as exc:
        raise LoadError("exception", f"cannot read the startup file {path}: {exc}", "") from exc
    try:
        module = import_startup_file(path, source)
    except BaseException as exc:  # anything the app raises is reported
        summary, trace = describe_exception(exc)
        raise LoadError(classify_load_exception(exc), summary, trace) from exc
    for name in names:
        application = getattr(module, name, None)
        if application is not None:
            break
    if application is None or not callable(application):
        raise LoadError(
            "no_application",
            path + " defines no callable " + " nor ".join(f"'{name}'" for name in names),
            "",
        )
    return application  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# The spawn handshake (section 3)


def write_handshake(ready_fd: int, data: bytes) -> None:
    """One JSON line on the handshake pipe, which is then closed."""
    try:
        while data:
            written = os.write(ready_fd, data)
            data = data[written:]
    except OSError as exc:
        log(f"cannot write the handshake line: {exc}")
    finally:
        try:  # noqa: SIM105 - contextlib is not imported by workers
            os.close(ready_fd)
        except OSError:
            pass


def report_ready(ready_fd: int, concurrency: int) -> None:
    # Formatted here rather than by json, which a worker then never imports.
    write_handshake(ready_fd, b'{"status": "ready", "pid": %d, "concurrency": %d}\n' % (os.getpid(), concurrency))


def report_load_error(ready_fd: int, error: LoadError) -> None:
    log("cannot load the app: " + error.summary)
    if error.trace:
        sys.stderr.write(error.trace)
        sys.stderr.flush()
    import json

    message = {"status": "error", "pid": os.getpid(), "kind": error.kind, "summary": error.summary,
               "traceback": error.trace}
    write_handshake(ready_fd, (json.dumps(message) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------
# The request body


class InputStream:
    """wsgi.input: exactly CONTENT_LENGTH bytes, read from the socket on demand.

    Never holds more of the body than the caller asks for (plus, for
    readline, the rest of one recv), so a huge upload costs one buffer.
    """

    __slots__ = ("_buffer", "_sock", "unread")

    def __init__(self, sock: _socket.socket, prefix: bytes, length: int) -> None:
        if len(prefix) > length:
            # The engine sends the next frame only after the end record of
            # this response: bytes past the body are no request of ours.
            raise MalformedFrame("bytes past the end of the request body")
        self._sock = sock
        self._buffer = prefix
        # Body bytes still in the socket, not yet received.
        self.unread = length - len(prefix)

    def _receive(self, size: int) -> bytes:
        size = min(size, self.unread)
        size = min(size, BODY_RECV_SIZE)
        try:
            data = self._sock.recv(size)
        except OSError as exc:
            raise ClientDisconnected(f"reading the request body: {exc}") from exc
        if not data:
            raise ClientDisconnected(f"the connection closed with {self.unread} body bytes unsent")
        self.unread -= len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        buffered = self._buffer
        if size is None or size < 0:
            size = len(buffered) + self.unread
        if size <= len(buffered):
            if size == len(buffered):
                self._buffer = b""
                return buffered
            self._buffer = buffered[size:]
            return buffered[:size]
        self._buffer = b""
        parts = [buffered] if buffered else []
        needed = min(size - len(buffered), self.unread)
        while needed > 0:
            data = self._receive(needed)
            parts.append(data)
            needed -= len(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        buffered = self._buffer
        scanned = 0
        while True:
            newline = buffered.find(b"\n", scanned, limit)
            if newline >= 0:
                end = newline + 1
                break
            if limit is not None and len(buffered) >= limit:
                end = limit
                break
            if self.unread == 0:
                end = len(buffered)
                break
            scanned = len(buffered)
            buffered += self._receive(RECV_BUFFER_SIZE)
        self._buffer = buffered[end:]
        return buffered[:end]

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def drain(self) -> bool:
        """Receive and drop the body the app left unread, when it is small.

        Returns whether the connection can carry another request: its next
        bytes must be the next frame. A large remainder is not worth
        waiting for; the caller closes the connection instead. The limit
        counts all the body the app left, received or not, so that the
        outcome does not depend on how the bytes happened to arrive.
        """
        if self.unread + len(self._buffer) > DRAIN_LIMIT:
            return False
        self._buffer = b""
        while self.unread:
            self._receive(BODY_RECV_SIZE)
        return True


# wsgi.input of every request without a body. It never receives: its
# socket is never used.
EMPTY_INPUT = InputStream(None, b"", 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# The response (section 2)


class FileWrapper:
    """wsgi.file_wrapper: iterates a file in blocks; sent with sendfile()
    when it wraps a regular file with a descriptor."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data: bytes = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


def py_encode_head(status: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The status line and headers of a response, checked and encoded.

    SPEEDUPS.encode_head does the same in C, when it loaded."""
    # One join over a flat list: no string per header line.
    parts = ["HTTP/1.1 ", status]
    for header in headers:
        if not isinstance(header, (tuple, list)) or len(header) != 2:  # a str of two characters would unpack
            raise TypeError(f"a response header must be a (name, value) pair, not {header!r}")
        parts += ("\r\n", header[0], ": ", header[1])
    parts.append("\r\n\r\n")
    head = "".join(parts)
    # Every line break must be one the loader put there: an app must not
    # be able to split its response by putting one in a header. There is
    # one per header (4 parts each), one after the status and one at the end.
    breaks = (len(parts) - 3) // 4 + 2
    if head.count("\n") != breaks or head.count("\r") != breaks:
        raise ValueError("a response status or header contains a line break")
    code = status[:3]
    if len(code) != 3 or not (code.isascii() and code.isdigit()) or status[3:4] not in ("", " "):
        raise ValueError(f"invalid response status {status!r}")
    return head.encode("latin-1")


encode_head = py_encode_head if SPEEDUPS is None else SPEEDUPS.encode_head


def content_length_of(headers: Iterable[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Response:
    """One request's start_response/write state, and its records on the
    connection (section 2).

    ``sent`` turns true with the first byte of the response on the wire:
    until then an error can still be answered with a 500. ``ended`` turns
    true once the end record has left; ``keep`` false when the connection
    must not carry another request (the app left a large body unread).
    """

    __slots__ = ("conn", "ended", "head", "headers", "keep", "sent", "stream")

    def __init__(self, conn: _socket.socket, stream: InputStream) -> None:
        self.conn = conn
        self.stream = stream
        self.head: bytes | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False
        self.ended = False
        self.keep = True

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> WriteCallable:
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the frame <-> traceback cycle
        elif self.head is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self.head = encode_head(status, headers)
        self.headers = headers
        return self.write

    def _head(self) -> bytes:
        head = self.head
        if head is None:
            raise RuntimeError("response body before start_response()")
        return head

    def write(self, data: bytes) -> None:
        """Send *data* as a record; the first one carries the head too."""
        try:
            if self.sent:
                if not data:
                    return  # a zero length would be the end record
                if len(data) <= COALESCE_LIMIT:
                    self.conn.sendall(_pack_u32(len(data)) + data)
                else:
                    self._send_chunk(b"", data, b"")
                return
            head = self._head()
            if len(data) <= COALESCE_LIMIT:
                # Joined before `sent` is set: a body that is not bytes
                # raises here, while a 500 can still be answered.
                payload = _pack_u32(len(head) + len(data)) + head + data
                self.sent = True
                self.conn.sendall(payload)
            else:
                self._send_chunk(head, data, b"")
        except OSError as exc:
            raise ClientDisconnected(f"sending the response: {exc}") from exc

    def _send_chunk(self, head: bytes, data: bytes, tail: bytes) -> None:
        """Send *head* (b"" once it has left), a chunk too large to copy as
        records of its own, and *tail* (the end record, or b""), gathered
        by sendmsg() rather than joined: one call, no copy of the chunk."""
        view = memoryview(data).cast("B")  # a body that is not bytes raises before `sent`
        self.sent = True
        size = len(view)
        if len(head) + size <= MAX_RECORD_SIZE:
            self._send_parts([_pack_u32(len(head) + size) + head, view, tail])
            return
        prefix = _pack_u32(len(head)) + head if head else b""
        for start in range(0, size, MAX_RECORD_SIZE):
            piece = view[start : start + MAX_RECORD_SIZE]
            self._send_parts([prefix + _pack_u32(len(piece)), piece])
            prefix = b""
        if tail:
            self.conn.sendall(tail)

    def _send_parts(self, parts: list[Any]) -> None:
        """Send byte strings and byte memoryviews in order, with one
        sendmsg(). It sends all on a blocking socket unless a signal cuts
        it short; then the rest follows with sendall()."""
        conn = self.conn
        sent = conn.sendmsg(parts)
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            conn.sendall(memoryview(part)[sent:])
            sent = 0

    def finish(self, last: bytes = b"") -> None:
        """Send *last* (the final chunk, maybe empty), the head if it has not
        left yet, and the end record, in one system call.

        The unread body is settled first: the engine may send the next
        frame as soon as it has the end record.
        """
        if self.stream.unread:
            self.settle_body()
        try:
            if self.sent:
                if not last:
                    payload = END_RECORD
                elif len(last) <= COALESCE_LIMIT:
                    payload = _pack_u32(len(last)) + last + END_RECORD
                else:
                    self._send_chunk(b"", last, END_RECORD)
                    self.ended = True
                    return
            elif len(last) <= COALESCE_LIMIT:
                head = self._head()
                payload = _pack_u32(len(head) + len(last)) + head + last + END_RECORD
                self.sent = True
            else:
                self._send_chunk(self._head(), last, END_RECORD)
                self.ended = True
                return
            self.conn.sendall(payload)
        except OSError as exc:
            raise ClientDisconnected(f"sending the response: {exc}") from exc
        self.ended = True

    def settle_body(self) -> None:
        """Drop a small unread body; mark the connection to close on a large one."""
        if not self.stream.drain():
            self.keep = False

    def send_file(self, wrapper: FileWrapper) -> bool:
        """Send a wrapped regular file with sendfile(); False if it is not one.

        Each record's length is announced before its bytes leave, so the
        file must deliver all of them: one that shrinks meanwhile ends the
        response with an error (the connection closes, no end record).
        """
        filelike = wrapper.filelike
        if self.head is None or isinstance(filelike, io.TextIOBase):
            return False
        try:
            file_fd = filelike.fileno()
            offset = filelike.tell()
            file_stat = os.fstat(file_fd)
        except (AttributeError, OSError, ValueError):
            return False
        if not stat.S_ISREG(file_stat.st_mode):
            return False
        count = max(file_stat.st_size - offset, 0)
        declared = content_length_of(self.headers)
        if declared is not None and 0 <= declared < count:
            count = declared
        if count:
            head = self.head
            pending = _pack_u32(len(head)) + head
            self.sent = True
            out_fd = self.conn.fileno()
            try:
                while count > 0:
                    size = min(count, MAX_RECORD_SIZE)
                    self.conn.sendall(pending + _pack_u32(size))
                    pending = b""
                    count -= size
                    while size > 0:
                        sent = os.sendfile(out_fd, file_fd, offset, size)
                        if sent == 0:
                            raise RuntimeError(f"{filelike!r} ended before the {size} bytes announced")
                        offset += sent
                        size -= sent
            except OSError as exc:
                raise ClientDisconnected(f"sending the response: {exc}") from exc
        self.finish()
        return True


def run_app(app: WSGIApp, environ: dict[str, Any], response: Response) -> None:
    """Call the app and send its whole response, end record included."""
    result = app(environ, response.start_response)
    if type(result) is list and result:
        # The common shape: the last chunk goes out with the end record
        # (and for a single chunk with the head too), in one send. A list
        # has no close() to call.
        if len(result) > 1:
            write = response.write
            for chunk in result[:-1]:
                if chunk:
                    write(chunk)
        response.finish(result[-1])
        return
    try:
        if isinstance(result, FileWrapper) and response.send_file(result):
            return
        write = response.write
        for chunk in result:
            if chunk:
                write(chunk)
        response.finish()
    finally:
        # After the end record, as other servers do: the app's cleanup
        # does not delay the response.
        close = getattr(result, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------
# The request frame (section 1)

# PEP 3333 (and wsgiref.validate) want these present; nginx always sends
# them, other clients of the protocol may not.
CGI_FALLBACKS = (
    ("SCRIPT_NAME", ""),
    ("QUERY_STRING", ""),
    ("SERVER_NAME", "localhost"),
    ("SERVER_PORT", "80"),
    ("SERVER_PROTOCOL", "HTTP/1.1"),
)


def wsgi_environ_base(multithread: bool = False) -> dict[str, Any]:
    """The environ keys every request shares, copied for each one.

    It holds no CGI key, so that after the frame's pairs are added the
    size of the dict tells whether a key came twice.
    """
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }


def receive_frame(
    conn: _socket.socket,
    buf: bytearray,
    view: memoryview,
    received: int,
) -> tuple[bytearray, int, bytes]:
    """Read a frame up to the end of its vars; its first *received* bytes
    are in *buf* already.

    Returns the buffer that holds the frame (*buf*, or one of its own for
    vars larger than *buf*), the end of the vars in it (they are
    ``buffer[4:end]``) and the body bytes that arrived with them.
    """
    while received < 4:
        more = conn.recv_into(view[received:])
        if not more:
            raise MalformedFrame("connection closed inside the vars size")
        received += more
    (vars_size,) = _unpack_u32(buf, 0)
    if vars_size == 0 or vars_size > MAX_VARS_SIZE:
        raise MalformedFrame(f"vars size {vars_size}")
    end = 4 + vars_size
    if end > len(buf):
        return receive_large_vars(conn, view[:received], end), end, b""
    while received < end:
        more = conn.recv_into(view[received:])
        if not more:
            raise MalformedFrame("connection closed inside the vars")
        received += more
    body_prefix = bytes(view[end:received]) if received > end else b""
    return buf, end, body_prefix


def receive_large_vars(conn: _socket.socket, head: memoryview, end: int) -> bytearray:
    """Read vars larger than the shared buffer into a buffer of their own."""
    large = bytearray(end)
    view = memoryview(large)
    received = len(head)
    view[:received] = head
    while received < end:
        more = conn.recv_into(view[received:])
        if not more:
            raise MalformedFrame("connection closed inside the vars")
        received += more
    view.release()
    return large


def add_pairs(data: memoryview, environ: dict[str, Any]) -> int:
    """Add the pairs of the vars to environ; return how many there were.

    This is the hottest loop of the worker, hence its terse shape: an
    unpack past the end of *data* raises struct.error, and a size that
    points past the end leaves *pos* beyond it; both are caught once
    instead of being tested pair by pair. Values are latin-1, as PEP 3333
    requires; slicing one decoded string is cheaper than decoding each.
    """
    text = str(data, "latin-1")
    size = len(data)
    unpack = _unpack_u32
    pos = count = 0
    try:
        while pos < size:
            key_start = pos + 4
            key_end = key_start + unpack(data, pos)[0]
            value_start = key_end + 4
            pos = value_start + unpack(data, key_end)[0]
            environ[text[key_start:key_end]] = text[value_start:pos]
            count += 1
    except struct.error:
        raise MalformedFrame("a pair runs past the end of the vars") from None
    if pos != size:
        raise MalformedFrame("a value runs past the end of the vars")
    return count


def add_pairs_joining(data: memoryview, environ: dict[str, Any]) -> None:
    """Add the pairs of vars in which a key occurs more than once.

    A repeated header is joined with ', ' (with '; ' for cookies), as
    section 1 says; any other repeated key keeps its last value.
    """
    text = str(data, "latin-1")
    size = len(data)
    pos = 0
    while pos < size:
        (key_size,) = _unpack_u32(data, pos)
        key_end = pos + 4 + key_size
        (value_size,) = _unpack_u32(data, key_end)
        value_end = key_end + 4 + value_size
        key = text[pos + 4 : key_end]
        value = text[key_end + 4 : value_end]
        pos = value_end
        if key in environ and key.startswith("HTTP_"):
            separator = "; " if key == "HTTP_COOKIE" else ", "
            value = environ[key] + separator + value
        environ[key] = value


def py_environ_from_vars(buffer: bytearray | bytes, end: int, base: dict[str, Any]) -> dict[str, Any]:
    """The environ of the vars in ``buffer[4:end]``: a copy of *base* with
    the pairs added. SPEEDUPS.environ_from_vars does the same in C."""
    data = memoryview(buffer)[4:end]
    environ = base.copy()
    count = add_pairs(data, environ)
    if len(environ) != len(base) + count:
        environ = base.copy()
        add_pairs_joining(data, environ)
    # Of the key rules (1 to 1024 bytes of [A-Z0-9_]) only an empty key is
    # refused here: the engine checks the rest, and a key that breaks them
    # is merely an odd environ entry.
    if "" in environ:
        raise MalformedFrame("an empty key")
    return environ


def c_environ_from_vars(buffer: bytearray | bytes, end: int, base: dict[str, Any]) -> dict[str, Any]:
    """py_environ_from_vars with the pairs decoded in C; repeated keys,
    which are rare, are still joined here."""
    try:
        environ: dict[str, Any] | None = SPEEDUPS.environ_from_vars(buffer, end, base)
    except ValueError as exc:
        raise MalformedFrame(str(exc)) from None
    if environ is None:  # a key came twice; the C code checked every pair's bounds, and that no key is empty
        environ = base.copy()
        add_pairs_joining(memoryview(buffer)[4:end], environ)
    return environ


environ_from_vars = py_environ_from_vars if SPEEDUPS is None else c_environ_from_vars


def request_content_length(environ: dict[str, Any]) -> int:
    value = environ.get("CONTENT_LENGTH")
    if value == "0":
        return 0
    if value is None:
        raise MalformedFrame("no CONTENT_LENGTH")
    if not value.isdigit():
        raise MalformedFrame(f"CONTENT_LENGTH {value!r}")
    try:
        return int(value)
    except ValueError:  # non-ASCII digits pass isdigit()
        raise MalformedFrame(f"CONTENT_LENGTH {value!r}") from None


def path_from_request_uri(environ: dict[str, Any]) -> str:
    path = environ.get("REQUEST_URI", "/").split("?", 1)[0]
    from urllib.parse import unquote_to_bytes  # only for a frame without PATH_INFO: nginx always sends it

    return unquote_to_bytes(path).decode("latin-1")


# Every key add_fallbacks may add: a frame from nginx holds them all, and
# one set comparison (in C) tells so.
CGI_KEYS = frozenset([key for key, _ in CGI_FALLBACKS] + ["PATH_INFO"])


def add_fallbacks(environ: dict[str, Any]) -> None:
    if not environ.keys() >= CGI_KEYS:
        for key, value in CGI_FALLBACKS:
            if key not in environ:
                environ[key] = value
        if "PATH_INFO" not in environ:
            environ["PATH_INFO"] = path_from_request_uri(environ)
    if "HTTPS" in environ and environ["HTTPS"].lower() == "on":
        environ["wsgi.url_scheme"] = "https"


def read_request(
    conn: _socket.socket,
    buf: bytearray,
    view: memoryview,
    received: int,
    base: dict[str, Any],
) -> tuple[dict[str, Any], InputStream]:
    buffer, end, body_prefix = receive_frame(conn, buf, view, received)
    environ = environ_from_vars(buffer, end, base)
    if "REQUEST_METHOD" not in environ:
        raise MalformedFrame("no REQUEST_METHOD")
    length = request_content_length(environ)
    add_fallbacks(environ)
    # Most requests have no body: they share one empty stream, which
    # holds nothing a request could change (reads of it return b"").
    stream = InputStream(conn, body_prefix, length) if length or body_prefix else EMPTY_INPUT
    environ["wsgi.input"] = stream
    return environ, stream


# --------------------------------------------------------------------------
# Serving


def answer_app_error(response: Response) -> bool:
    """Log the app's exception and end the response as far as it can be.

    Returns whether the connection can carry another request. Before the
    first byte of the response a 500 takes its place; after it the response
    cannot be ended cleanly, and closing the connection without the end
    record tells the engine to cut it off.
    """
    import traceback

    log("the app raised an exception:")
    traceback.print_exc()
    sys.stderr.flush()
    if response.ended:  # raised by the body's close(): the response is whole
        return response.keep
    if response.sent:
        return False
    response.sent = True
    try:
        if response.stream.unread:
            response.settle_body()
        response.conn.sendall(INTERNAL_ERROR_RECORDS)
    except OSError:  # ClientDisconnected included
        return False
    return response.keep


class ServeState:
    """Shared between the serve loop, the SIGTERM handler and fork hooks.

    An instance with slots rather than class attributes: the loop writes
    ``idle`` twice per request, and writing a class attribute costs more.
    """

    __slots__ = ("forked", "idle", "stopping")

    def __init__(self) -> None:
        self.stopping = False
        # True only while the worker has no request in hand: waiting in
        # poll(), accepting, or closing a connection.
        self.idle = False
        # Set once the app has forked: a child may then hold a copy of the
        # connection, and only shutdown() ends it for the peer.
        self.forked = False


STATE = ServeState()


def note_fork() -> None:
    STATE.forked = True


def close_connection(conn: _socket.socket) -> None:
    if STATE.forked:
        try:  # noqa: SIM105 - contextlib.suppress costs more, and this runs often
            conn.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def handle_sigterm(signum: int, frame: FrameType | None) -> None:
    STATE.stopping = True
    if STATE.idle:
        raise _StopServing


def frame_refused(exc: Exception) -> bool:
    """Logs why a request frame could not be read; False: its connection closes."""
    if isinstance(exc, MalformedFrame):
        log(f"malformed request frame ({exc}); connection closed")
    else:
        log(f"reading the request frame: {exc}")
    return False


def serve_request(
    conn: _socket.socket,
    app: WSGIApp,
    buf: bytearray,
    view: memoryview,
    base: dict[str, Any],
) -> bool:
    """Serve the one request whose frame is arriving on *conn* (poll() said
    it is readable); return whether the connection may carry another.

    This runs once per request and is the worker's own main cost, so it
    keeps to the least work: one recv for a frame that fits the buffer,
    one send for a response of a single small chunk.
    """
    try:
        received = conn.recv_into(buf)
    except OSError:  # reset by the peer while idle: an ordinary close
        return False
    if not received:  # the peer closed the idle connection
        return False
    try:
        environ, stream = read_request(conn, buf, view, received, base)
    except (MalformedFrame, OSError) as exc:
        return frame_refused(exc)
    response = Response(conn, stream)
    try:
        run_app(app, environ, response)
    except ClientDisconnected as exc:
        log(f"client went away: {exc}")
        return False
    except Exception:
        return answer_app_error(response)
    return response.keep


# --------------------------------------------------------------------------
# Connections and who may open them


def allowed_peer_uids(text: str | None) -> frozenset[int]:
    """The uids that may connect (AGENT_PEER_UIDS: decimal uids separated
    by commas, set by the core: its own and nginx's worker user's). Absent:
    this process's euid and root. Raises ValueError on anything else."""
    if text is None:
        return frozenset((os.geteuid(), 0))
    uids = set()
    for part in text.split(","):
        if not (part.isascii() and part.isdigit()):
            raise ValueError(f"AGENT_PEER_UIDS {text!r} is not a list of uids")
        uids.add(int(part))
    return frozenset(uids)


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: _socket.socket) -> tuple[int, int, int]:
    """The connecting process's pid, uid and gid, as the kernel took them
    at connect() (SO_PEERCRED)."""
    return _UCRED.unpack(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))  # type: ignore[return-value]


def admitted(conn: _socket.socket, peer_uids: frozenset[int], refusal_log: Callable[[str], None],
             error_log: Callable[[str], None]) -> bool:
    """Whether the peer of a new connection may send requests; if not, the
    connection is closed unread and the refusal logged."""
    try:
        pid, uid, _ = peer_credentials(conn)
    except OSError as exc:
        conn.close()
        error_log(f"cannot read a connection's peer credentials: {exc}")
        return False
    if uid not in peer_uids:
        conn.close()  # unread
        refusal_log(f"refused a connection from uid {uid} (pid {pid}): only uids "
                    f"{','.join(map(str, sorted(peer_uids)))} may connect")
        return False
    return True


class RateLimitedLog:
    """At most one line per interval; the lines held back are counted in
    the next one."""

    __slots__ = ("held", "interval", "next_at")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.held = 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.held += 1
            return
        if self.held:
            message += f" ({self.held} more since the last such line)"
        self.held = 0
        self.next_at = now + self.interval
        log(message)


class Server:
    """The worker's connections: the engine's and one per nginx worker
    process that keeps one (docs/design.md, "The loader's system calls").

    Requests are served one at a time, whichever connection brings one.
    With no request in hand the worker waits in poll() on the listener,
    every open connection and the signal wake-up pipe. Connections are
    blocking sockets: poll() said a frame is arriving, so its recv does not
    wait, and the response is sent whole. They are wrapped in the C socket
    type: the Python subclass in the socket module adds a cost per
    connection and nothing used.
    """

    def __init__(self, listener: _socket.socket, app: WSGIApp, peer_uids: frozenset[int]) -> None:
        self.listener = listener
        self.app = app
        self.peer_uids = peer_uids
        # fd -> connection, least recently used first.
        self.conns: dict[int, _socket.socket] = {}
        self.refusal_log = RateLimitedLog(REFUSAL_LOG_INTERVAL)
        self.accept_error_log = RateLimitedLog(REFUSAL_LOG_INTERVAL)
        self.wake_read = install_wakeup_pipe()
        listener.setblocking(False)
        self.listen_fd = listener.fileno()
        self.poller = select.poll()
        self.poller.register(self.listen_fd, select.POLLIN)
        self.poller.register(self.wake_read, select.POLLIN)

    def serve(self) -> None:
        """Serve requests until SIGTERM; then close every connection."""
        state = STATE
        try:
            self.run(state)
        except _StopServing:
            pass
        finally:
            state.idle = False  # a second SIGTERM must not cut the closing short
            for conn in self.conns.values():
                close_connection(conn)
            self.conns.clear()

    def run(self, state: ServeState) -> None:
        """The loop. A blocking accept() or recv() would lose a SIGTERM
        that lands after the loop last looked at `stopping` but before the
        call blocks: Python runs a signal's handler between bytecodes, so
        that one would wait for the next connection or frame, which a
        detached worker never gets. Here the only wait is poll(), which
        also watches the signal wake-up pipe: the interpreter writes to it
        as the signal arrives, whenever that is, and the handler runs as
        poll() returns."""
        conns = self.conns
        poll = self.poller.poll
        app = self.app
        buf = bytearray(RECV_BUFFER_SIZE)
        view = memoryview(buf)
        base = wsgi_environ_base()
        while True:
            state.idle = True
            if state.stopping:
                return
            for fd, _ in poll():
                conn = conns.get(fd)
                if conn is None:
                    if self.control_event(fd):
                        break
                    continue
                state.idle = False
                del conns[fd]
                if serve_request(conn, app, buf, view, base):
                    conns[fd] = conn  # now the most recently used
                else:
                    self.poller.unregister(fd)
                    close_connection(conn)
                state.idle = True
                if state.stopping:
                    return

    def control_event(self, fd: int) -> bool:
        """An event on the listener or the signal pipe. True when the
        connections changed: the loop then polls again rather than act on
        events of an fd that changed hands."""
        if fd == self.listen_fd:
            self.accept()
            return True
        if fd == self.wake_read:
            self.drain_wakeups()
        return False

    def drain_wakeups(self) -> None:
        try:  # noqa: SIM105 - contextlib is not imported by workers
            os.read(self.wake_read, 512)
        except BlockingIOError:
            pass

    def accept(self) -> None:
        """Take one connection from the backlog, if its peer may send
        requests; at the cap, close the connection idle the longest."""
        try:
            fd = self.listener._accept()[0]  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        except OSError as exc:  # EMFILE, ECONNABORTED: try the next one
            self.accept_error_log(f"accept: {exc}")
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The connection stays in the backlog and the listener
                # readable: make room, or wait a little rather than spin.
                if self.conns:
                    self.close_oldest()
                else:
                    time.sleep(ACCEPT_RETRY_DELAY)
            return
        conn = _socket.socket(self.listener.family, self.listener.type, 0, fd)
        if not admitted(conn, self.peer_uids, self.refusal_log, self.accept_error_log):
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self.close_oldest()
        self.conns[fd] = conn
        self.poller.register(fd, select.POLLIN)

    def close_oldest(self) -> None:
        fd = next(iter(self.conns))
        self.poller.unregister(fd)
        close_connection(self.conns.pop(fd))


class ThreadedServer(Server):
    """agent_concurrency_model thread: up to `threads` requests at once.

    The main thread keeps Server's poll() loop and never runs the app. A
    connection whose frame arrives leaves the poll set and goes to a
    thread of the pool, which serves that one request and hands the
    connection back through a pipe that wakes poll(). The engine opens at
    most `threads` connections for requests, so none waits for a thread.
    SIGTERM stops new requests; those in flight finish, then the worker ends.
    """

    def __init__(self, listener: _socket.socket, app: WSGIApp, peer_uids: frozenset[int], threads: int) -> None:
        super().__init__(listener, app, peer_uids)
        import queue
        import threading

        self.work: queue.SimpleQueue[_socket.socket | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[tuple[_socket.socket, bool]] = queue.SimpleQueue()
        self.in_flight = 0
        self.done_read, self.done_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.done_read, select.POLLIN)
        self.threads = [threading.Thread(target=self.work_loop, name=f"request-{n}", daemon=True)
                        for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def serve(self) -> None:
        """Serve until SIGTERM and the requests in flight are done."""
        try:
            self.run(STATE)
        finally:
            for conn in self.conns.values():
                close_connection(conn)
            self.conns.clear()
            for _ in self.threads:
                self.work.put(None)

    def run(self, state: ServeState) -> None:
        # Never idle: the SIGTERM handler only sets `stopping`, and the
        # signal's byte on the wake-up pipe ends this thread's poll().
        state.idle = False
        poll = self.poller.poll
        while not (state.stopping and self.in_flight == 0):
            if state.stopping:
                self.stop_taking_requests()
            for fd, _ in poll():
                if fd == self.done_read:
                    self.take_back()
                    break  # connections closed: poll again before acting on their fds
                conn = self.conns.pop(fd, None)
                if conn is None:
                    if self.control_event(fd):
                        break
                    continue
                self.poller.unregister(fd)
                self.in_flight += 1
                self.work.put(conn)

    def stop_taking_requests(self) -> None:
        """Once stopping: no new connection, no new frame on an idle one."""
        if self.listen_fd >= 0:
            self.poller.unregister(self.listen_fd)
            self.listen_fd = -1
        for fd, conn in self.conns.items():
            self.poller.unregister(fd)
            close_connection(conn)
        self.conns.clear()

    def take_back(self) -> None:
        """The connections whose request ended: back into the poll set if
        they may carry another, else closed."""
        try:
            while os.read(self.done_read, 512):
                pass
        except BlockingIOError:
            pass
        while not self.done.empty():
            conn, keep = self.done.get()
            self.in_flight -= 1
            if keep and not STATE.stopping:
                fd = conn.fileno()
                self.conns[fd] = conn
                self.poller.register(fd, select.POLLIN)
            else:
                close_connection(conn)

    def work_loop(self) -> None:
        """One thread of the pool: a request at a time, with its own buffer."""
        buf = bytearray(RECV_BUFFER_SIZE)
        view = memoryview(buf)
        base = wsgi_environ_base(multithread=True)
        while True:
            conn = self.work.get()
            if conn is None:
                return
            keep = False
            try:
                keep = serve_request(conn, self.app, buf, view, base)
            except BaseException as exc:  # SystemExit in a thread ends this request, not the worker
                log(f"the app raised {type(exc).__name__} outside a response; connection closed")
            finally:
                self.done.put((conn, keep))
                try:  # noqa: SIM105 - contextlib is not imported by workers
                    os.write(self.done_write, b"\0")
                except BlockingIOError:  # full: a wake-up is pending anyway
                    pass


def install_wakeup_pipe() -> int:
    """A pipe the interpreter writes a byte to whenever a signal arrives;
    returns its read end, for poll()."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    return wake_read


def serve(listener: _socket.socket, app: WSGIApp, peer_uids: frozenset[int], concurrency: int = 1) -> None:
    if concurrency > 1:
        ThreadedServer(listener, app, peer_uids, concurrency).serve()
    else:
        Server(listener, app, peer_uids).serve()


MAX_CONCURRENCY = 1024  # the core's bound (agent_thread_count)


def read_concurrency(text: str | None) -> int:
    """AGENT_CONCURRENCY: how many requests to serve at once (absent: 1).
    Raises ValueError on anything but a whole number from 1 to 1024."""
    if text is None:
        return 1
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_CONCURRENCY):
        raise ValueError(f"AGENT_CONCURRENCY {text!r} is not a number from 1 to {MAX_CONCURRENCY}")
    return int(text)


def open_listener(listen_fd: int) -> _socket.socket:
    listener = _socket.socket(fileno=listen_fd)
    listener.setblocking(True)
    # The app's own child processes must not hold the worker's socket.
    os.set_inheritable(listen_fd, False)
    return listener


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, handle_sigterm)
    signal.signal(signal.SIGINT, handle_sigterm)


def make_undumpable() -> None:
    """Other processes of this user may no longer read /proc/PID/environ,
    /proc/PID/mem or ptrace this worker (PR_SET_DUMPABLE 0). execve() sets
    the flag back, so it is done here, after exec, before the app loads."""
    import ctypes  # only here: it costs every worker memory

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        log("prctl(PR_SET_DUMPABLE, 0): " + os.strerror(ctypes.get_errno()))


def release_free_memory() -> None:
    """Give the C heap's free pages back to the kernel. Compiling this
    script from source (a script is never read from a .pyc) and importing
    the app leave megabytes freed but still mapped; left there they count
    in the worker's private memory, and a preloader's would be copied into
    each worker that allocates on them. glibc's malloc_trim() releases
    them; another libc has none, and they stay."""
    import ctypes  # loaded already by make_undumpable

    try:  # noqa: SIM105 - contextlib is not imported by workers
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:
        pass


def load_private_env() -> None:
    """The app's agent_env values the core passed on fd 6 (AGENT_ENV_FD), not
    in the exec environment: set only now that the worker is undumpable, so
    that they never show in /proc/PID/environ. Raises LoadError."""
    fd_text = os.environ.pop("AGENT_ENV_FD", None)
    if fd_text is None:
        return
    import json  # only for an app with agent_env values

    try:
        with os.fdopen(int(fd_text), "rb") as source:
            env = json.loads(source.read())
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("not an object of strings")
    except (OSError, ValueError) as exc:
        raise LoadError("exception", f"cannot read the app's environment from fd {fd_text}: {exc}", "") from exc
    os.environ.update(env)


if TYPE_CHECKING:
    # A worker with its app loaded: reports ready (or an error) on the
    # handshake pipe, serves until SIGTERM, returns the exit status.
    RunWorker = Callable[[_socket.socket, int, Any, frozenset[int], int], int]


def main(app_names: tuple[str, ...] = ("application",), worker: RunWorker | None = None) -> int:
    """A worker or a preloader, from the environment of docs/protocol.md
    section 3. The ASGI loader runs this too, with its own names for the
    app and its own worker."""
    worker = worker or run_worker
    make_undumpable()
    app_root = os.environ.get("AGENT_APP_ROOT") or os.getcwd()
    startup_file = os.environ.get("AGENT_STARTUP_FILE", "wsgi.py")
    listen_fd = int(os.environ.get("AGENT_LISTEN_FD", "3"))
    ready_fd = int(os.environ.get("AGENT_READY_FD", "4"))
    startup_fd = os.environ.pop("AGENT_STARTUP_FD", None)
    # Read before the app's private environment is set: it cannot change it.
    peer_uids_text = os.environ.pop("AGENT_PEER_UIDS", None)
    concurrency_text = os.environ.pop("AGENT_CONCURRENCY", None)
    fix_sys_path(app_root)
    try:
        os.set_inheritable(ready_fd, False)
        listener = open_listener(listen_fd)
    except OSError as exc:
        report_load_error(ready_fd, LoadError("exception", f"bad listening socket: {exc}", ""))
        return 1
    try:
        peer_uids = allowed_peer_uids(peer_uids_text)
        concurrency = read_concurrency(concurrency_text)
    except ValueError as exc:
        report_load_error(ready_fd, LoadError("exception", str(exc), ""))
        return 1
    # Logs are read line by line; block-buffered prints would arrive late.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    preloader = os.environ.pop("AGENT_PRELOADER", None) == "1"
    # Named before the app loads, which may take long: a preloader is told
    # from a worker at every moment of its life.
    worker_name = own_process_name()
    if preloader:
        set_process_name(PRELOADER_NAME)
    try:
        load_private_env()
        app = load_application(app_root, startup_file, None if startup_fd is None else int(startup_fd), app_names)
    except LoadError as error:
        report_load_error(ready_fd, error)
        return 1
    # Objects loaded so far live as long as the worker (or, in a preloader,
    # as its workers): keep the collector from walking them again and
    # again, and from touching the pages the workers share with it.
    gc.freeze()
    release_free_memory()
    if preloader:
        return run_preloader(listener, ready_fd, app, peer_uids, worker_name, concurrency, worker)
    return worker(listener, ready_fd, app, peer_uids, concurrency)


def run_worker(listener: _socket.socket, ready_fd: int, app: WSGIApp, peer_uids: frozenset[int],
               concurrency: int) -> int:
    """A worker with its app loaded: reports ready and serves."""
    install_signal_handlers()
    os.register_at_fork(after_in_parent=note_fork)
    report_ready(ready_fd, concurrency)
    try:
        serve(listener, app, peer_uids, concurrency)
    finally:
        listener.close()
    return 0


# --------------------------------------------------------------------------
# The preloader (agent_spawn_method smart, docs/protocol.md section 3, "The preloader")

# Most file descriptors one spawn command carries: the worker's listening
# socket, its handshake pipe, its output pipe, its lifeline, its cgroup.
SPAWN_FDS = 5
CONTROL_MESSAGE_SIZE = 4096
F_SETSIG = 10   # Linux's fcntl command; the fcntl module names it only on some builds


class Preloader:
    """Forks workers from the loaded app when the core asks, over the
    control socket (fd 3, SOCK_SEQPACKET), and reports how each ended."""

    def __init__(self, control: _socket.socket, app: WSGIApp, peer_uids: frozenset[int], worker_name: bytes,
                 concurrency: int, worker: RunWorker) -> None:
        self.control = control
        self.worker = worker
        self.worker_name = worker_name
        self.concurrency = concurrency
        self.app = app
        self.peer_uids = peer_uids
        self.stopping = False
        self.cgroup_fork = CgroupFork.make()
        self.wake_fd = install_wakeup_pipe()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        # A handler, not SIG_DFL: the wake-up pipe then hears of every exit.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        while not self.stopping:
            self.reap()
            for fd, _ in poller.poll():
                if fd == self.wake_fd:
                    try:  # noqa: SIM105 - contextlib is not imported by workers
                        os.read(self.wake_fd, 512)
                    except BlockingIOError:
                        pass
                elif not self.take_command():
                    return  # the core is gone
        # The workers live on: the core adopts them (it is their subreaper).

    def reap(self) -> None:
        """Reports each worker that ended, after killing what it left in
        its process group while its zombie still holds the group's id."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            try:  # noqa: SIM105 - contextlib is not imported by workers
                os.killpg(info.si_pid, signal.SIGKILL)
            except OSError:
                pass
            pid, status = os.waitpid(info.si_pid, 0)
            self.send({"exited": pid, "status": status})

    def send(self, message: dict[str, object]) -> None:
        import json  # the preloader's own: its workers never use it

        self.control.sendall(json.dumps(message).encode())

    def take_command(self) -> bool:
        """One command from the core; False when the core closed the socket."""
        import json
        import socket

        try:
            data, fds, _, _ = socket.recv_fds(self.control, CONTROL_MESSAGE_SIZE, SPAWN_FDS)  # type: ignore[arg-type]
        except InterruptedError:
            return True
        for fd in fds:  # recv_fds does not set close-on-exec
            os.set_inheritable(fd, False)
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            command = json.loads(data)
            number = int(command["spawn"])
            cgroup = bool(command.get("cgroup"))
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            log(f"preloader: bad command from the core: {exc}")
            return True
        self.fork(number, fds, cgroup)
        return True

    def fork(self, number: int, fds: list[int], cgroup: bool) -> None:
        if len(fds) != 4 + cgroup:
            for fd in fds:
                os.close(fd)
            self.send({"failed": number, "error": f"{len(fds)} file descriptors came with the command"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        born_inside = False
        try:
            pid = self.cgroup_fork.fork(fds[4]) if cgroup and self.cgroup_fork else None
            born_inside = pid is not None
            if pid is None:
                pid = os.fork()
        except OSError as exc:
            self.send({"failed": number, "error": f"fork: {exc.strerror}"})
            pid = -1
        if pid == 0:
            code = 1
            try:
                code = self.become_worker(fds, cgroup and not born_inside)
            except BaseException:  # the child must never return into the preloader's loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            self.send({"forked": number, "pid": pid})

    def become_worker(self, fds: list[int], join: bool) -> int:
        """In the forked child: drop what belongs to the preloader, take the
        worker's own socket, pipes, session and cgroup (join: it was not
        born in it), then serve."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.wake_fd)
        self.control.close()
        set_process_name(self.worker_name)
        # Its socket on fd 3 and its handshake pipe on fd 4, as a direct
        # worker's (docs/protocol.md section 3).
        listen_fd, ready_fd, output_fd, lifeline_fd = place_fds(fds[:4], {0: 3, 1: 4})
        try:
            os.setsid()
            if join:
                join_cgroup(fds[4])
            elif len(fds) > 4:
                os.close(fds[4])
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.close(output_fd)
            watch_lifeline(lifeline_fd)
            listener = open_listener(listen_fd)
        except OSError as exc:
            report_load_error(ready_fd, LoadError("exception", f"cannot become a worker: {exc}", ""))
            return 1
        return self.worker(listener, ready_fd, self.app, self.peer_uids, self.concurrency)


def place_fds(fds: list[int], targets: dict[int, int]) -> list[int]:
    """fds, those whose index targets names moved to that fd number. All
    are first lifted above 9, since one may sit on another's target."""
    import fcntl

    lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, target in targets.items():
        os.dup2(lifted[index], target, inheritable=False)
        os.close(lifted[index])
        lifted[index] = target
    return lifted


def join_cgroup(cgroup_fd: int) -> None:
    """Into the worker's own cgroup, whose directory the core opened: the
    core made its cgroup.procs the app user's (agent/core/supervision.py)."""
    try:
        procs_fd = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=cgroup_fd)
        try:
            os.write(procs_fd, b"0")
        finally:
            os.close(procs_fd)
    finally:
        os.close(cgroup_fd)


class CgroupFork:
    """os.fork() with the child born in a given cgroup: clone3 with
    CLONE_INTO_CGROUP (Linux 5.7). A child that moved into its cgroup after
    the fork would wait for an RCU grace period, 8 ms or more of a 3 ms
    start. The system call is made through ctypes, with what os.fork() and
    glibc's fork() do around theirs: Python's fork hooks and state
    (PyOS_BeforeFork and PyOS_AfterFork_*, the functions the C API gives
    for any call that clones the process), the child's thread id in
    glibc's thread descriptor (CLONE_CHILD_SETTID at the address the
    kernel holds for it, as glibc's fork passes it) and its robust mutex
    list. glibc's fork also resets the lists of other threads and the
    locks they may hold, and runs pthread_atfork handlers (none matter to
    a process with one thread); so only a process with one thread forks
    this way, and os.fork() serves everywhere else."""

    CLONE_CHILD_CLEARTID = 0x00200000
    CLONE_CHILD_SETTID = 0x01000000
    CLONE_INTO_CGROUP = 0x200000000
    SYS_CLONE3 = 435  # the same number on every architecture
    PR_GET_TID_ADDRESS = 40
    ROBUST_LIST_CALLS = {"x86_64": (273, 274), "aarch64": (99, 100)}  # set_robust_list, get_robust_list

    def __init__(self, libc: Any, tid_address: int, robust_head: int, robust_size: int,
                 numbers: tuple[int, int]) -> None:
        import ctypes  # loaded already by make_undumpable

        fields = ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
                  "set_tid", "set_tid_size", "cgroup")
        self.args_type = type("CloneArgs", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_uint64) for n in fields]})
        self.ctypes = ctypes
        self.syscall = libc.syscall
        self.tid_address = tid_address
        self.set_robust_list = numbers[0]
        self.robust_head, self.robust_size = robust_head, robust_size
        self.before = ctypes.pythonapi.PyOS_BeforeFork
        self.after_in_child = ctypes.pythonapi.PyOS_AfterFork_Child
        self.after_in_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
        self.refused: str | None = None

    @classmethod
    def make(cls) -> CgroupFork | None:
        """None where this process cannot fork that way: not glibc (the
        address the kernel holds is glibc's thread id field; another libc
        keeps something else there), not x86_64 or aarch64, or a kernel
        that hides the address."""
        numbers = cls.ROBUST_LIST_CALLS.get(os.uname().machine)
        try:
            glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError):
            glibc = ""
        if not glibc.startswith("glibc"):
            return None
        try:
            import ctypes
        except ImportError:
            return None
        if numbers is None or not hasattr(ctypes, "pythonapi"):
            return None
        libc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL through the call, as os.fork() does
        libc.syscall.restype = ctypes.c_long
        tid_address, head, size = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t()
        if libc.prctl(cls.PR_GET_TID_ADDRESS, ctypes.byref(tid_address), 0, 0, 0) != 0 or not tid_address.value:
            return None
        if libc.syscall(numbers[1], 0, ctypes.byref(head), ctypes.byref(size)) != 0:
            return None
        return cls(libc, tid_address.value, head.value or 0, size.value, numbers)

    def fork(self, cgroup_fd: int) -> int | None:
        """0 in the child, its pid in the parent; None where the kernel
        refused (said once in the log) or the process has other threads."""
        if self.refused is not None or len(os.listdir("/proc/self/task")) != 1:
            return None
        ctypes = self.ctypes
        args = self.args_type(flags=self.CLONE_INTO_CGROUP | self.CLONE_CHILD_SETTID | self.CLONE_CHILD_CLEARTID,
                              child_tid=self.tid_address, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
        # No Python signal handler may run in the child before its state
        # is made its own; the mask is inherited, pending signals are not.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        self.before()
        pid = self.syscall(self.SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if pid == 0:
            self.syscall(self.set_robust_list, ctypes.c_void_p(self.robust_head), ctypes.c_size_t(self.robust_size))
            self.after_in_child()
        else:
            error = ctypes.get_errno()
            self.after_in_parent()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid < 0:
            self.refused = os.strerror(error)
            log(f"preloader: clone3 into the worker's cgroup: {self.refused}; workers move into it after the fork")
            return None
        return int(pid)


def watch_lifeline(fd: int) -> None:
    """The core holds the other end of this pipe and never writes to it.
    When the core ends, the kernel sends SIGKILL to this worker's process
    group (O_ASYNC with F_SETSIG): the preloader's workers cannot have
    the core as their parent, whose death PR_SET_PDEATHSIG would follow."""
    import fcntl  # only here: a direct worker does not need it

    fcntl.fcntl(fd, fcntl.F_SETOWN, -os.getpid())
    fcntl.fcntl(fd, getattr(fcntl, "F_SETSIG", F_SETSIG), signal.SIGKILL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
    os.set_inheritable(fd, False)
    try:
        ended = os.read(fd, 1) == b""
    except BlockingIOError:
        ended = False
    if ended:  # the core ended before the watch was set
        os.killpg(0, signal.SIGKILL)


PRELOADER_NAME = b"agent-preloader"


def set_process_name(name: bytes) -> None:
    """The name ps and top show (/proc/PID/comm, 15 bytes): a preloader is
    told from its workers, which share its command line, by this name."""
    import ctypes  # loaded already by make_undumpable

    pr_set_name = 15
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, ctypes.c_char_p(name[:15]), 0, 0, 0) != 0:
        log("prctl(PR_SET_NAME): " + os.strerror(ctypes.get_errno()))


def own_process_name() -> bytes:
    """This process's name as ps shows it: the one a preloader's workers take back."""
    try:
        with open("/proc/self/comm", "rb") as comm:
            return comm.read().strip()
    except OSError:
        return b"python3"


def run_preloader(control: _socket.socket, ready_fd: int, app: WSGIApp, peer_uids: frozenset[int],
                  worker_name: bytes, concurrency: int, worker: RunWorker | None = None) -> int:
    """The app is loaded: report ready, close the handshake pipe, then fork
    workers on demand until SIGTERM or the core's end. Each runs *worker*
    (run_worker by default) on the app the preloader loaded."""
    preloader = Preloader(control, app, peer_uids, worker_name, concurrency, worker or run_worker)
    report_ready(ready_fd, concurrency)  # and closes the pipe
    preloader.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
