"""The WSGI loader: the program that runs inside every app worker process.

Started as ``PYTHON wsgi_loader.py`` by the agent core with the environment
and file descriptors of docs/protocol.md section 3. It loads the app's
startup file, reports readiness (or a structured error) on the handshake
pipe, then serves one request per connection on the listening socket:
request frames as in section 1, responses as in section 2.

The core copies this file next to the other loaders and runs it under the
app's own interpreter (often a virtualenv without the agent installed), so
it uses the standard library only and imports nothing from the ``agent``
package. It must keep working on Python 3.9.
"""

from __future__ import annotations

import _socket
import contextlib
import gc
import io
import json
import os
import signal
import socket
import stat
import struct
import sys
import traceback
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_file_location
from urllib.parse import unquote_to_bytes

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
# Unread body up to this size is received and dropped before the
# connection is closed (see InputStream.drain).
DRAIN_LIMIT = 1024 * 1024
# A body chunk up to this size is sent together with the response head in
# one sendall; a larger one is not worth copying.
COALESCE_LIMIT = 256 * 1024

_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from

INTERNAL_ERROR_BODY = b"500 Internal Server Error: the app raised an exception\n"
INTERNAL_ERROR_RESPONSE = (
    b"HTTP/1.1 500 Internal Server Error\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(INTERNAL_ERROR_BODY)
) + INTERNAL_ERROR_BODY


def log(message: str) -> None:
    sys.stderr.write(LOG_PREFIX + message + "\n")
    sys.stderr.flush()


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
    """Raised by the SIGTERM handler to leave a blocking accept()."""


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
    """Skip the loader's and importlib's frames so the app's come first."""
    own_file = os.path.realpath(__file__)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen") and (os.path.realpath(filename) != own_file):
            break
        tb = tb.tb_next
    return tb


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """Return the one-line summary and the traceback text of *exc*."""
    summary = type(exc).__name__
    text = str(exc)
    if text:
        summary += ": " + text
    lines = traceback.format_exception(type(exc), exc, strip_loader_frames(exc.__traceback__))
    return summary, "".join(lines)


def classify_load_exception(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return "syntax_error"
    if isinstance(exc, ImportError):
        return "import_error"
    return "exception"


def import_startup_file(path: str) -> ModuleType:
    """Execute the startup file as a module registered in sys.modules.

    Registering it (under the file's stem, as `import` would) lets pickle
    and the app's own imports find it. SourceFileLoader accepts any file
    extension (mod_wsgi-style ``app.wsgi`` files included).
    """
    name = module_name_for(path)
    loader = SourceFileLoader(name, path)
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


def load_application(app_root: str, startup_file: str) -> WSGIApp:
    path = resolve_startup_file(app_root, startup_file)
    if not os.path.isfile(path):
        raise LoadError("missing_startup_file", "startup file not found: " + path, "")
    try:
        module = import_startup_file(path)
    except BaseException as exc:  # anything the app raises is reported
        summary, trace = describe_exception(exc)
        raise LoadError(classify_load_exception(exc), summary, trace) from exc
    application = getattr(module, "application", None)
    if application is None or not callable(application):
        raise LoadError(
            "no_application",
            path + " defines no callable 'application'",
            "",
        )
    return application  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# The spawn handshake (section 3)


def write_handshake(ready_fd: int, message: dict[str, object]) -> None:
    data = (json.dumps(message) + "\n").encode("utf-8")
    try:
        while data:
            written = os.write(ready_fd, data)
            data = data[written:]
    except OSError as exc:
        log(f"cannot write the handshake line: {exc}")
    finally:
        with contextlib.suppress(OSError):
            os.close(ready_fd)


def report_ready(ready_fd: int) -> None:
    write_handshake(ready_fd, {"status": "ready", "pid": os.getpid(), "concurrency": 1})


def report_load_error(ready_fd: int, error: LoadError) -> None:
    log("cannot load the app: " + error.summary)
    if error.trace:
        sys.stderr.write(error.trace)
        sys.stderr.flush()
    write_handshake(
        ready_fd,
        {
            "status": "error",
            "pid": os.getpid(),
            "kind": error.kind,
            "summary": error.summary,
            "traceback": error.trace,
        },
    )


# --------------------------------------------------------------------------
# The request body


class InputStream:
    """wsgi.input: exactly CONTENT_LENGTH bytes, read from the socket on demand.

    Never holds more of the body than the caller asks for (plus, for
    readline, the rest of one recv), so a huge upload costs one buffer.
    """

    __slots__ = ("_buffer", "_sock", "_unread")

    def __init__(self, sock: _socket.socket, prefix: bytes, length: int) -> None:
        if len(prefix) > length:
            prefix = prefix[:length]
        self._sock = sock
        self._buffer = prefix
        # Body bytes still in the socket, not yet received.
        self._unread = length - len(prefix)

    def _receive(self, size: int) -> bytes:
        size = min(size, self._unread)
        size = min(size, BODY_RECV_SIZE)
        try:
            data = self._sock.recv(size)
        except OSError as exc:
            raise ClientDisconnected(f"reading the request body: {exc}") from exc
        if not data:
            raise ClientDisconnected(f"the connection closed with {self._unread} body bytes unsent")
        self._unread -= len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        buffered = self._buffer
        if size is None or size < 0:
            size = len(buffered) + self._unread
        if size <= len(buffered):
            if size == len(buffered):
                self._buffer = b""
                return buffered
            self._buffer = buffered[size:]
            return buffered[:size]
        self._buffer = b""
        parts = [buffered] if buffered else []
        needed = min(size - len(buffered), self._unread)
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
            if self._unread == 0:
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

    def drain(self) -> None:
        """Receive the body the app left unread, when it is small.

        Closing a Unix socket with unread data makes the peer's next read
        fail with ECONNRESET instead of the clean end of file it expects.
        A large remainder is not worth waiting for.
        """
        if 0 < self._unread <= DRAIN_LIMIT:
            self._buffer = b""
            while self._unread:
                self._receive(BODY_RECV_SIZE)


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


def encode_head(status: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The status line and headers of a response, checked and encoded."""
    lines = [name + ": " + value + "\r\n" for name, value in headers]
    head = "HTTP/1.1 " + status + "\r\n" + "".join(lines) + "\r\n"
    # Every line break must be one the loader put there: an app must not
    # be able to split its response by putting one in a header.
    breaks = len(lines) + 2
    if head.count("\n") != breaks or head.count("\r") != breaks:
        raise ValueError("a response status or header contains a line break")
    if not status[:3].isdigit() or status[3:4] not in ("", " "):
        raise ValueError(f"invalid response status {status!r}")
    return head.encode("latin-1")


def content_length_of(headers: Iterable[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Response:
    """One request's start_response/write state."""

    __slots__ = ("conn", "head", "headers", "sent")

    def __init__(self, conn: _socket.socket) -> None:
        self.conn = conn
        self.head: bytes | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False

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

    def write(self, data: bytes) -> None:
        try:
            if self.sent:
                self.conn.sendall(data)
                return
            head = self.head
            if head is None:
                raise RuntimeError("response body before start_response()")
            if len(data) <= COALESCE_LIMIT:
                # Joined before `sent` is set: a body that is not bytes
                # raises here, while a 500 can still be answered.
                payload = head + data
                self.sent = True
                self.conn.sendall(payload)
            else:
                self.sent = True
                self.conn.sendall(head)
                self.conn.sendall(data)
        except OSError as exc:
            raise ClientDisconnected(f"sending the response: {exc}") from exc

    def finish_head(self) -> None:
        """Send the head of a response whose body was empty."""
        if not self.sent:
            self.write(b"")

    def send_file(self, wrapper: FileWrapper) -> bool:
        """Send a wrapped regular file with sendfile(); False if it is not one."""
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
        self.write(b"")
        out_fd = self.conn.fileno()
        try:
            while count > 0:
                sent = os.sendfile(out_fd, file_fd, offset, count)
                if sent == 0:  # the file shrank under us
                    break
                offset += sent
                count -= sent
        except OSError as exc:
            raise ClientDisconnected(f"sending the response: {exc}") from exc
        return True


def run_app(app: WSGIApp, environ: dict[str, Any], response: Response) -> None:
    result = app(environ, response.start_response)
    try:
        if isinstance(result, FileWrapper) and response.send_file(result):
            return
        write = response.write
        for chunk in result:
            if chunk:
                write(chunk)
        response.finish_head()
    finally:
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


def wsgi_environ_base() -> dict[str, Any]:
    """The environ keys every request shares, copied for each one.

    It holds no CGI key, so that after the frame's pairs are added the
    size of the dict tells whether a key came twice.
    """
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }


def receive_frame(conn: _socket.socket, buf: bytearray, view: memoryview) -> tuple[memoryview, bytes]:
    """Read a frame up to the end of its vars.

    Returns the vars and the body bytes that arrived with them.
    """
    received = conn.recv_into(buf)
    while received < 4:
        more = conn.recv_into(view[received:]) if received else 0
        if not more:
            raise MalformedFrame("connection closed before a frame")
        received += more
    (vars_size,) = _unpack_u32(buf, 0)
    if vars_size == 0 or vars_size > MAX_VARS_SIZE:
        raise MalformedFrame(f"vars size {vars_size}")
    end = 4 + vars_size
    if end > len(buf):
        return receive_large_vars(conn, view[:received], end), b""
    while received < end:
        more = conn.recv_into(view[received:])
        if not more:
            raise MalformedFrame("connection closed inside the vars")
        received += more
    body_prefix = bytes(view[end:received]) if received > end else b""
    return view[4:end], body_prefix


def receive_large_vars(conn: _socket.socket, head: memoryview, end: int) -> memoryview:
    """Read vars larger than the shared buffer into a buffer of their own."""
    large = memoryview(bytearray(end))
    received = len(head)
    large[:received] = head
    while received < end:
        more = conn.recv_into(large[received:])
        if not more:
            raise MalformedFrame("connection closed inside the vars")
        received += more
    return large[4:]


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


def environ_from_vars(data: memoryview, base: dict[str, Any]) -> dict[str, Any]:
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
    return unquote_to_bytes(path).decode("latin-1")


def add_fallbacks(environ: dict[str, Any]) -> None:
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
    base: dict[str, Any],
) -> tuple[dict[str, Any], InputStream]:
    data, body_prefix = receive_frame(conn, buf, view)
    environ = environ_from_vars(data, base)
    if "REQUEST_METHOD" not in environ:
        raise MalformedFrame("no REQUEST_METHOD")
    length = request_content_length(environ)
    add_fallbacks(environ)
    stream = InputStream(conn, body_prefix, length)
    environ["wsgi.input"] = stream
    return environ, stream


# --------------------------------------------------------------------------
# Serving


def answer_app_error(response: Response) -> None:
    """Log the app's exception; answer 500 if no byte of the response left."""
    log("the app raised an exception:")
    traceback.print_exc()
    sys.stderr.flush()
    if response.sent:
        return
    response.sent = True
    with contextlib.suppress(OSError):
        response.conn.sendall(INTERNAL_ERROR_RESPONSE)


def serve_connection(
    conn: _socket.socket,
    app: WSGIApp,
    buf: bytearray,
    view: memoryview,
    base: dict[str, Any],
) -> None:
    try:
        environ, stream = read_request(conn, buf, view, base)
    except MalformedFrame as exc:
        log(f"malformed request frame ({exc}); connection closed")
        return
    except OSError as exc:
        log(f"reading the request frame: {exc}")
        return
    response = Response(conn)
    try:
        run_app(app, environ, response)
        stream.drain()
    except ClientDisconnected as exc:
        log(f"client went away: {exc}")
    except Exception:
        answer_app_error(response)


class ServeState:
    """Shared between the serve loop, the SIGTERM handler and fork hooks."""

    stopping = False
    idle = False
    # Set once the app has forked: a child may then hold a copy of the
    # connection, and only shutdown() ends the response for the peer.
    forked = False


def note_fork() -> None:
    ServeState.forked = True


def close_connection(conn: _socket.socket) -> None:
    if ServeState.forked:
        try:  # noqa: SIM105 - contextlib.suppress costs too much per request
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def handle_sigterm(signum: int, frame: FrameType | None) -> None:
    ServeState.stopping = True
    if ServeState.idle:
        raise _StopServing


def serve(listener: socket.socket, app: WSGIApp) -> None:
    """Accept and serve one connection at a time until SIGTERM.

    Connections are wrapped in the C socket type: the Python subclass in
    the socket module adds a noticeable cost per request and nothing used.
    """
    accept = listener._accept  # type: ignore[attr-defined]
    family, kind = listener.family, listener.type
    new_socket = _socket.socket
    buf = bytearray(RECV_BUFFER_SIZE)
    view = memoryview(buf)
    base = wsgi_environ_base()
    state = ServeState
    while not state.stopping:
        state.idle = True
        try:
            fd = accept()[0]
        except _StopServing:
            return
        except OSError as exc:  # EMFILE, ECONNABORTED: try the next one
            state.idle = False
            log(f"accept: {exc}")
            continue
        state.idle = False
        conn = new_socket(family, kind, 0, fd)
        try:
            serve_connection(conn, app, buf, view, base)
        finally:
            close_connection(conn)


def open_listener(listen_fd: int) -> socket.socket:
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(True)
    # The app's own child processes must not hold the worker's socket.
    listener.set_inheritable(False)
    return listener


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, handle_sigterm)
    signal.signal(signal.SIGINT, handle_sigterm)


def main() -> int:
    app_root = os.environ.get("AGENT_APP_ROOT") or os.getcwd()
    startup_file = os.environ.get("AGENT_STARTUP_FILE", "wsgi.py")
    listen_fd = int(os.environ.get("AGENT_LISTEN_FD", "3"))
    ready_fd = int(os.environ.get("AGENT_READY_FD", "4"))
    fix_sys_path(app_root)
    try:
        os.set_inheritable(ready_fd, False)
        listener = open_listener(listen_fd)
    except OSError as exc:
        report_load_error(ready_fd, LoadError("exception", f"bad listening socket: {exc}", ""))
        return 1
    # Logs are read line by line; block-buffered prints would arrive late.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        app = load_application(app_root, startup_file)
    except LoadError as error:
        report_load_error(ready_fd, error)
        return 1
    install_signal_handlers()
    os.register_at_fork(after_in_parent=note_fork)
    # Objects loaded so far live as long as the worker: keep the collector
    # from walking them again and again.
    gc.freeze()
    report_ready(ready_fd)
    try:
        serve(listener, app)
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
