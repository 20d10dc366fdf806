"""The WSGI loader as a real process on real sockets (docs/protocol.md).

Each worker is started the way the core starts it: the listening Unix socket
as fd 3, the write end of the handshake pipe as fd 4, the AGENT_* variables
in its environment and the app root as its cwd.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[3]
LOADER = ROOT / "agent" / "loaders" / "wsgi_loader.py"
APPS = Path(__file__).resolve().parent / "apps"

STARTUP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0

# Runs before the loader (then replaced by it through exec) to put the two
# descriptors at 3 and 4 without clobbering each other.
FD_PLACER = """
import fcntl, os, sys
sources = [int(sys.argv[1]), int(sys.argv[2])]
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in sources]
for fd in sources:
    os.close(fd)
os.dup2(copies[0], 3)
os.dup2(copies[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


# --------------------------------------------------------------------------
# Frames and responses


def encode_pairs(pairs: Sequence[tuple[str | bytes, str | bytes]]) -> bytes:
    out = bytearray()
    for key, value in pairs:
        key_bytes = key.encode("latin-1") if isinstance(key, str) else key
        value_bytes = value.encode("latin-1") if isinstance(value, str) else value
        out += struct.pack(">I", len(key_bytes)) + key_bytes
        out += struct.pack(">I", len(value_bytes)) + value_bytes
    return bytes(out)


def build_frame(pairs: Sequence[tuple[str | bytes, str | bytes]]) -> bytes:
    """A request frame head: u32 vars size, then the pairs (section 1)."""
    encoded = encode_pairs(pairs)
    return struct.pack(">I", len(encoded)) + encoded


def request_pairs(
    uri: str = "/hello",
    method: str = "GET",
    content_length: int = 0,
    headers: Sequence[tuple[str, str]] = (),
    https: bool = False,
) -> list[tuple[str | bytes, str | bytes]]:
    path, _, query = uri.partition("?")
    pairs: list[tuple[str | bytes, str | bytes]] = [
        ("AGENT_APP", "/srv/test"),
        ("REQUEST_METHOD", method),
        ("REQUEST_URI", uri),
        ("PATH_INFO", path),
        ("QUERY_STRING", query),
        ("SCRIPT_NAME", ""),
        ("SERVER_NAME", "example.test"),
        ("SERVER_PORT", "8080"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "40000"),
        ("CONTENT_LENGTH", str(content_length)),
    ]
    if https:
        pairs.append(("HTTPS", "on"))
    for name, value in headers:
        pairs.append(("HTTP_" + name.upper().replace("-", "_"), value))
    return pairs


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    # The end record arrived (section 2); false when the connection closed
    # before it, which cuts the response off.
    ended: bool = True
    # The lengths of the records the response came in.
    records: tuple[int, ...] = ()

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_reply(raw: bytes, ended: bool = True, records: Sequence[int] = ()) -> Reply:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no end of head in {raw[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, code, reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = [tuple(line.split(": ", 1)) for line in header_lines]
    return Reply(int(code), reason, headers, body, ended, tuple(records))  # type: ignore[arg-type]


def receive_all(conn: socket.socket) -> bytes:
    """Raw bytes until the worker closes the connection."""
    chunks: list[bytes] = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def receive_exactly(conn: socket.socket, size: int) -> bytes:
    """*size* bytes, or fewer if the connection closes first."""
    chunks: list[bytes] = []
    while size:
        chunk = conn.recv(min(size, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive_record(conn: socket.socket) -> bytes | None:
    """One record's bytes: b"" for the end record, None for a close
    between records. A close inside a record is a framing error."""
    header = receive_exactly(conn, 4)
    if not header:
        return None
    assert len(header) == 4, f"the connection closed inside a record length: {header!r}"
    (size,) = struct.unpack(">I", header)
    data = receive_exactly(conn, size)
    assert len(data) == size, f"the connection closed {len(data)} bytes into a record of {size}"
    return data


def receive_reply(conn: socket.socket) -> Reply:
    """Read records up to the end record, or up to a close that cuts the
    response off, and parse the bytes they carry."""
    parts: list[bytes] = []
    while True:
        record = receive_record(conn)
        if not record:
            break
        parts.append(record)
    return parse_reply(b"".join(parts), record is not None, [len(part) for part in parts])


def receive_reply_tail(conn: socket.socket) -> bytes:
    """The bytes of the remaining records, up to the end record."""
    parts: list[bytes] = []
    while (record := receive_record(conn)) is not None:
        if not record:
            return b"".join(parts)
        parts.append(record)
    raise AssertionError("the connection closed before the end record")


def assert_closed(conn: socket.socket) -> None:
    """The worker closed the connection: end of file, or a reset when it
    left bytes unread, and nothing before it."""
    with contextlib.suppress(ConnectionResetError):
        assert conn.recv(65536) == b""


def assert_open(conn: socket.socket, wait: float = 0.2) -> None:
    """Nothing arrives on the connection, and it does not close."""
    ready, _, _ = select.select([conn], [], [], wait)
    assert not ready, conn.recv(65536, socket.MSG_PEEK)


def connect(sock_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(REQUEST_TIMEOUT)
    conn.connect(str(sock_path))
    return conn


def exchange(sock_path: Path, data: bytes) -> bytes:
    """Send *data*, then read raw bytes until the worker closes."""
    with connect(sock_path) as conn:
        conn.sendall(data)
        return receive_all(conn)


def request_frame(
    uri: str = "/hello",
    method: str = "GET",
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    https: bool = False,
) -> bytes:
    return build_frame(request_pairs(uri, method, len(body), headers, https)) + body


def request_on(conn: socket.socket, uri: str = "/hello", method: str = "GET", body: bytes = b"") -> Reply:
    """One request on an open connection, which stays open."""
    conn.sendall(request_frame(uri, method, body))
    return receive_reply(conn)


def request(
    sock_path: Path,
    uri: str = "/hello",
    method: str = "GET",
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    https: bool = False,
    ended: bool = True,
) -> Reply:
    """One request on a connection of its own; the response must end with
    the end record (or must not, when *ended* is false)."""
    with connect(sock_path) as conn:
        conn.sendall(request_frame(uri, method, body, headers, https))
        reply = receive_reply(conn)
    assert reply.ended == ended, reply
    return reply


# --------------------------------------------------------------------------
# Workers


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    sock_path: Path
    log_path: Path
    handshake: dict[str, object]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_peak_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def read_handshake(read_fd: int, process: subprocess.Popen[bytes]) -> dict[str, object]:
    data = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the loader did not answer the handshake in time"
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            data += chunk
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    message: dict[str, object] = json.loads(data)
    assert message["pid"] == process.pid
    # Exactly one line, then the loader closes its end.
    assert os.read(read_fd, 1) == b""
    return message


def start_worker(
    tmp_path: Path,
    startup_file: str,
    app_root: Path = APPS,
    python: str = sys.executable,
    loader: Path = LOADER,
    extra_env: dict[str, str] | None = None,
    socket_mode: int | None = None,
) -> Worker:
    sock_path = tmp_path / f"worker-{time.monotonic_ns()}.sock"
    log_path = sock_path.with_suffix(".log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    if socket_mode is not None:
        os.chmod(sock_path, socket_mode)
    listener.listen(64)
    read_fd, write_fd = os.pipe()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AGENT_APP_ROOT": str(app_root),
        "AGENT_STARTUP_FILE": startup_file,
        "AGENT_APP_TYPE": "wsgi",
        "AGENT_LISTEN_FD": "3",
        "AGENT_READY_FD": "4",
        "AGENT_APP_NAME": str(app_root),
        **(extra_env or {}),
    }
    command = [
        sys.executable, "-I", "-c", FD_PLACER,
        str(listener.fileno()), str(write_fd), python, str(loader),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=app_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(listener.fileno(), write_fd),
        )
    listener.close()
    os.close(write_fd)
    try:
        handshake = read_handshake(read_fd, process)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    finally:
        os.close(read_fd)
    return Worker(process, sock_path, log_path, handshake)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = start_worker(tmp_path_factory.mktemp("loader"), "loader_app.py")
    assert started.handshake == {
        "status": "ready",
        "pid": started.process.pid,
        "concurrency": 1,
    }
    yield started
    assert started.stop() == 0


@pytest.fixture(scope="module")
def validated_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = start_worker(tmp_path_factory.mktemp("validated"), "loader_validated.py")
    yield started
    assert started.stop() == 0


# --------------------------------------------------------------------------
# Requests and responses


def test_hello(worker: Worker) -> None:
    reply = request(worker.sock_path, "/hello")
    assert (reply.status, reply.reason) == (200, "OK")
    assert reply.headers == [("Content-Type", "text/plain"), ("Content-Length", "13")]
    assert reply.body == b"Hello, world!"
    # A small response is one record: head and body leave together.
    assert len(reply.records) == 1


def test_many_requests_one_worker(worker: Worker) -> None:
    for _ in range(200):
        assert request(worker.sock_path, "/hello").body == b"Hello, world!"


# --------------------------------------------------------------------------
# Connections that carry many requests (section 2)


def test_many_requests_on_one_connection(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        for number in range(10):
            reply = request_on(conn, f"/echo?mode=read&n={number}", "POST", f"request {number}".encode())
            assert (reply.status, reply.body, reply.ended) == (200, f"request {number}".encode(), True)
        # Nothing follows the end record until the next frame.
        assert_open(conn, wait=0.05)


def test_idle_connection_closed_by_the_peer(worker: Worker) -> None:
    """The engine may close an idle connection at any time: the worker
    goes back to accept()."""
    for _ in range(3):
        with connect(worker.sock_path) as conn:
            assert request_on(conn).ended
    assert request(worker.sock_path).body == b"Hello, world!"


def test_idle_connection_reset_by_the_peer(worker: Worker) -> None:
    """A peer that closes with response bytes unread resets the connection
    (on Unix sockets): the worker treats it as a close."""
    with connect(worker.sock_path) as conn:
        conn.sendall(request_frame())
        time.sleep(0.1)  # the response now waits, unread, on the peer's side
    assert request(worker.sock_path).body == b"Hello, world!"


def test_second_connection_is_served_while_the_first_stays_open(worker: Worker) -> None:
    """Each nginx worker process keeps a connection of its own: a second
    connection is served at once, and the first still carries requests."""
    with connect(worker.sock_path) as first, connect(worker.sock_path) as second:
        assert request_on(first).ended
        reply = request_on(second)
        assert (reply.body, reply.ended) == (b"Hello, world!", True)
        assert request_on(first).ended
        assert_open(first, wait=0.05)
        assert_open(second, wait=0.05)


# --------------------------------------------------------------------------
# The environ


def test_environ(worker: Worker) -> None:
    reply = request(
        worker.sock_path,
        "/environ?a=1&b=%20x",
        method="POST",
        body=b"xyz",
        headers=[
            ("X-Token", "abc"),
            ("Accept", "text/html"),
            ("Accept", "application/json"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("User-Agent", "caf\xe9"),
        ],
    )
    environ = json.loads(reply.body)
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["REQUEST_URI"] == "/environ?a=1&b=%20x"
    assert environ["PATH_INFO"] == "/environ"
    assert environ["QUERY_STRING"] == "a=1&b=%20x"
    assert environ["SCRIPT_NAME"] == ""
    assert environ["SERVER_NAME"] == "example.test"
    assert environ["SERVER_PORT"] == "8080"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["CONTENT_LENGTH"] == "3"
    assert environ["AGENT_APP"] == "/srv/test"
    assert environ["HTTP_X_TOKEN"] == "abc"
    assert environ["HTTP_ACCEPT"] == "text/html, application/json"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_USER_AGENT"] == "caf\xe9"  # latin-1, as PEP 3333 says
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.version"] == [1, 0]
    assert environ["wsgi.multithread"] is False
    assert environ["wsgi.multiprocess"] is True
    assert environ["wsgi.run_once"] is False
    assert environ["wsgi.input_terminated"] is True
    assert environ["wsgi.errors is stderr"] is True
    assert environ["file_wrapper is a class"] is True


def test_environ_https_and_fallbacks(worker: Worker) -> None:
    pairs: list[tuple[str | bytes, str | bytes]] = [
        ("AGENT_APP", "/srv/test"),
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", "/%65nviron?q=1"),
        ("CONTENT_LENGTH", "0"),
        ("HTTPS", "on"),
    ]
    with connect(worker.sock_path) as conn:
        conn.sendall(build_frame(pairs))
        reply = receive_reply(conn)
    assert reply.ended
    environ = json.loads(reply.body)
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["PATH_INFO"] == "/environ"
    assert environ["QUERY_STRING"] == ""
    assert environ["SERVER_NAME"] and environ["SERVER_PORT"]
    assert environ["SCRIPT_NAME"] == ""


def test_sys_path_and_module_name(worker: Worker) -> None:
    environ = json.loads(request(worker.sock_path, "/environ").body)
    assert environ["sys.path"][0] == str(APPS)
    assert str(LOADER.parent) not in environ["sys.path"]
    assert environ["module"] == "loader_app"
    assert environ["cwd"] == str(APPS)


def test_loader_directory_not_on_sys_path(tmp_path: Path) -> None:
    """A module next to the (copied) loader must not shadow the app's own."""
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    copied = loaders / "wsgi_loader.py"
    shutil.copy(LOADER, copied)
    (loaders / "wsgi.py").write_text("raise RuntimeError('loader dir on sys.path')\n")
    app_root = tmp_path / "app"
    app_root.mkdir()
    (app_root / "helper.py").write_text("WORD = b'from the app'\n")
    (app_root / "wsgi.py").write_text(
        "import helper\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [helper.WORD]\n"
    )
    started = start_worker(tmp_path, "wsgi.py", app_root=app_root, loader=copied)
    try:
        assert started.handshake["status"] == "ready"
        assert request(started.sock_path, "/").body == b"from the app"
    finally:
        assert started.stop() == 0


# What only the loader's rare paths use (an error handshake, an app's
# exception, the preloader, a frame without PATH_INFO): a worker that has
# served requests has not imported them (docs/design.md, "A lean worker").
NOT_FOR_SERVING = ("json", "traceback", "linecache", "tokenize", "urllib.parse", "socket", "selectors", "re")


def test_a_worker_imports_only_what_serving_needs(tmp_path: Path) -> None:
    (tmp_path / "wsgi.py").write_text(
        "import sys\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [' '.join(sorted(sys.modules)).encode()]\n"
    )
    # Under the apps' default interpreter: this suite's virtualenv imports
    # urllib.parse and re at its own start (its editable install's finder).
    started = start_worker(tmp_path, "wsgi.py", app_root=tmp_path, python="/usr/bin/python3")
    try:
        request(started.sock_path, "/")
        modules = set(request(started.sock_path, "/").body.decode().split())
        assert "_agent_loader_speedups" in modules  # the list is the worker's own
        assert modules.isdisjoint(NOT_FOR_SERVING), sorted(modules.intersection(NOT_FOR_SERVING))
    finally:
        assert started.stop() == 0


def test_pickling_classes_of_the_startup_file(tmp_path: Path) -> None:
    started = start_worker(tmp_path, "loader_pickles.py")
    try:
        assert request(started.sock_path, "/").body == b"loader_pickles:round trip"
    finally:
        assert started.stop() == 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("read", b"one\ntwo\n\nthree"),
        ("read5", b"one\ntwo\n\nthree"),
        ("readline", b"one\n|two\n|\n|three"),
        ("readline3", b"one|\n|two|\n|\n|thr|ee"),
        ("readlines", b"one\n|two\n|\n|three"),
        ("readlines_hint", b"one\n#two\n\nthree"),
        ("iter", b"one\n|two\n|\n|three"),
    ],
)
def test_post_body(worker: Worker, mode: str, expected: bytes) -> None:
    reply = request(worker.sock_path, f"/echo?mode={mode}", "POST", body=b"one\ntwo\n\nthree")
    assert reply.status == 200
    assert reply.body == expected


def test_body_sent_after_the_frame(worker: Worker) -> None:
    """The body may arrive in pieces, after the frame, as the engine copies it."""
    body = b"line one\nline two\n" * 1000
    frame = build_frame(request_pairs("/echo?mode=readline", "POST", len(body)))
    with connect(worker.sock_path) as conn:
        conn.sendall(frame)
        for start in range(0, len(body), 7001):
            time.sleep(0.001)
            conn.sendall(body[start : start + 7001])
        reply = receive_reply(conn)
    assert reply.ended
    assert reply.body == body.replace(b"\n", b"\n|")[:-1]


def test_large_upload_is_streamed(tmp_path: Path) -> None:
    started = start_worker(tmp_path, "loader_app.py")
    try:
        size = 50 * 1024 * 1024
        block = os.urandom(1024 * 1024)
        expected = hashlib.sha256()
        frame = build_frame(request_pairs("/digest", "PUT", size))
        with connect(started.sock_path) as conn:
            conn.sendall(frame)
            for _ in range(size // len(block)):
                conn.sendall(block)
                expected.update(block)
            reply = receive_reply(conn)
        assert reply.ended
        assert reply.body == f"{size} {expected.hexdigest()}".encode()
        # The whole body never sits in the worker: its peak RSS stays far
        # below the upload's size.
        assert started.rss_peak_kib() < 40 * 1024, started.rss_peak_kib()
    finally:
        assert started.stop() == 0


def test_streamed_response(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        conn.sendall(build_frame(request_pairs("/stream?pause=1.5")))
        started = time.monotonic()
        first = b""
        while b"first;" not in first:
            record = receive_record(conn)
            assert record, "the response ended before its first chunk"
            first += record
        # The head and the first chunk leave before the app pauses.
        assert time.monotonic() - started < 1.2
        rest = receive_reply_tail(conn)
    reply = parse_reply(first + rest)
    assert reply.status == 200
    assert reply.body == b"first;chunk-0;chunk-1;chunk-2;"


def test_write_callable(worker: Worker) -> None:
    reply = request(worker.sock_path, "/write")
    assert reply.status == 200
    assert reply.body == b"written;returned"


def test_file_wrapper(worker: Worker, tmp_path: Path) -> None:
    content = os.urandom(300_000)
    path = tmp_path / "payload.bin"
    path.write_bytes(content)
    uri = f"/file?path={quote(str(path))}"
    assert request(worker.sock_path, uri).body == content
    assert request(worker.sock_path, uri + "&offset=1000").body == content[1000:]
    limited = request(worker.sock_path, uri + "&offset=10&length=100")
    assert limited.body == content[10:110]
    path.write_bytes(b"")
    assert request(worker.sock_path, uri).body == b""


def test_file_wrapper_larger_than_a_record(worker: Worker, tmp_path: Path) -> None:
    """A file is sent in records of at most 16 MiB, each announced before
    sendfile() sends its bytes."""
    block = os.urandom(1024 * 1024)
    path = tmp_path / "large.bin"
    path.write_bytes(block * 17 + block[:123])
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, f"/file?path={quote(str(path))}")
        assert reply.ended
        assert reply.body == path.read_bytes()
        assert max(reply.records) <= 16 * 1024 * 1024
        assert request_on(conn).body == b"Hello, world!"


@pytest.mark.parametrize(
    ("size", "parts"),
    [(300_000, 1), (300_000, 3), (100, 3), (20 * 1024 * 1024, 1)],
)
def test_large_chunks(worker: Worker, size: int, parts: int) -> None:
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, f"/big?size={size}&parts={parts}")
        assert reply.ended
        expected = b"".join(bytes([ord("a") + number]) * size for number in range(parts))
        assert reply.body == expected
        assert request_on(conn).body == b"Hello, world!"


def test_empty_body_sends_the_head(worker: Worker) -> None:
    reply = request(worker.sock_path, "/empty")
    assert (reply.status, reply.reason, reply.headers, reply.body) == (
        204,
        "No Content",
        [],
        b"",
    )


def test_exception_before_headers_is_500(worker: Worker) -> None:
    reply = request(worker.sock_path, "/error-before")
    assert reply.status == 500
    assert reply.header("Content-Type") == "text/plain"
    assert b"Internal Server Error" in reply.body
    assert "RuntimeError: raised before start_response" in worker.log()
    assert request(worker.sock_path, "/hello").status == 200


def test_exception_before_headers_keeps_the_connection(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, "/error-before")
        assert (reply.status, reply.ended) == (500, True)
        for _ in range(3):
            assert request_on(conn).body == b"Hello, world!"


def test_exception_after_headers_cuts_the_response_off(worker: Worker) -> None:
    """No end record: the connection closes, and the engine cuts off the
    response it was forwarding."""
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, "/error-after")
        assert (reply.status, reply.body, reply.ended) == (200, b"partial;", False)
        assert_closed(conn)
    assert "RuntimeError: raised after the head was sent" in worker.log()
    assert request(worker.sock_path, "/hello").status == 200


def test_exc_info_replaces_unsent_headers(worker: Worker) -> None:
    reply = request(worker.sock_path, "/exc-info")
    assert (reply.status, reply.body) == (503, b"replaced by exc_info")


def test_exc_info_after_headers_sent_reraises(worker: Worker) -> None:
    reply = request(worker.sock_path, "/exc-info-after-sent", ended=False)
    assert reply.status == 200
    assert reply.body == b"sent;"
    assert "ValueError: too late" in worker.log()


def test_body_that_is_not_bytes_is_500(worker: Worker) -> None:
    assert request(worker.sock_path, "/str-body").status == 500


@pytest.mark.parametrize("size", [10, 100_000, 1024 * 1024])
def test_unread_small_body_is_drained(worker: Worker, size: int) -> None:
    """A body of at most 1 MiB the app ignores is read and dropped: the
    connection then carries the next request."""
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, "/hello", "POST", b"b" * size)
        assert (reply.body, reply.ended) == (b"Hello, world!", True)
        reply = request_on(conn, "/echo?mode=read", "POST", b"next")
        assert (reply.body, reply.ended) == (b"next", True)


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 8 * 1024 * 1024])
def test_unread_large_body_closes_after_the_end_record(worker: Worker, size: int) -> None:
    with connect(worker.sock_path) as conn:
        conn.sendall(build_frame(request_pairs("/hello", "POST", size)))
        with contextlib.suppress(OSError):  # the worker closes mid-upload
            conn.sendall(b"u" * size)
        reply = receive_reply(conn)
        assert (reply.body, reply.ended) == (b"Hello, world!", True)
        assert_closed(conn)
    assert request(worker.sock_path, "/hello").status == 200


def test_header_injection_is_refused(worker: Worker) -> None:
    reply = request(worker.sock_path, "/header-injection")
    assert reply.status == 500
    assert reply.header("X-Injected") is None


@pytest.mark.parametrize("fail", [False, True])
def test_close_is_always_called(worker: Worker, tmp_path: Path, fail: bool) -> None:
    marker = tmp_path / "closed"
    uri = f"/close?marker={quote(str(marker))}&fail={int(fail)}"
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, uri)
        assert reply.body == b"body;"
        assert reply.ended is not fail
        if fail:
            assert_closed(conn)
        else:
            # close() runs after the end record; the worker serves the next
            # request only once it has returned.
            assert request_on(conn).status == 200
    assert marker.read_text() == "closed"


def test_close_raising_after_the_end_record_keeps_the_connection(worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with connect(worker.sock_path) as conn:
        reply = request_on(conn, f"/close?marker={quote(str(marker))}&close_fails=1")
        assert (reply.body, reply.ended) == (b"body;", True)
        assert request_on(conn).body == b"Hello, world!"
    assert marker.read_text() == "closed"
    assert "RuntimeError: failing close" in worker.log()


def test_client_gone_before_reading(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        conn.sendall(build_frame(request_pairs("/stream?pause=0.2")))
    time.sleep(0.5)
    assert request(worker.sock_path, "/hello").status == 200


def test_client_gone_during_upload(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        conn.sendall(build_frame(request_pairs("/digest", "PUT", 1_000_000)))
        conn.sendall(b"x" * 1000)
    time.sleep(0.2)
    assert request(worker.sock_path, "/hello").status == 200
    assert "client went away" in worker.log()


# --------------------------------------------------------------------------
# Malformed frames


def truncated_pair_frame() -> bytes:
    encoded = encode_pairs(request_pairs())
    return struct.pack(">I", len(encoded) + 8) + encoded + struct.pack(">I", 100)


def leftover_bytes_frame() -> bytes:
    encoded = encode_pairs(request_pairs()) + b"\x00\x00"
    return struct.pack(">I", len(encoded)) + encoded


def frame_without(key: str) -> bytes:
    return build_frame([pair for pair in request_pairs() if pair[0] != key])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x00\x00\x00", id="zero-vars-size"),
        pytest.param(b"\xff\xff\xff\xff", id="huge-vars-size"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-garbage"),
        pytest.param(b"\x00\x00\x00\x10" + b"\x00" * 16, id="zero-key-size"),
        pytest.param(truncated_pair_frame(), id="truncated-pair"),
        pytest.param(leftover_bytes_frame(), id="leftover-bytes"),
        pytest.param(frame_without("CONTENT_LENGTH"), id="no-content-length"),
        pytest.param(frame_without("REQUEST_METHOD"), id="no-request-method"),
        pytest.param(b"\x00\x00", id="short-size"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_frame_closes_and_keeps_serving(worker: Worker, data: bytes) -> None:
    with connect(worker.sock_path) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        assert receive_all(conn) == b""
    assert request(worker.sock_path, "/hello").status == 200


def test_malformed_frame_after_a_request(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        assert request_on(conn).ended
        conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert_closed(conn)
    assert request(worker.sock_path, "/hello").status == 200


def test_connection_closed_inside_a_frame(worker: Worker) -> None:
    with connect(worker.sock_path) as conn:
        assert request_on(conn).ended
        conn.sendall(request_frame()[:20])
        conn.shutdown(socket.SHUT_WR)
        assert receive_all(conn) == b""
    assert "malformed request frame" in worker.log()
    assert request(worker.sock_path, "/hello").status == 200


def test_bytes_past_the_body_are_refused(worker: Worker) -> None:
    """The engine sends a frame only after the end record of the previous
    response; bytes past a body are no request, and the connection closes."""
    with connect(worker.sock_path) as conn:
        conn.sendall(request_frame("/hello", "POST", b"abc") + request_frame())
        assert receive_all(conn) == b""
    assert "bytes past the end of the request body" in worker.log()
    assert request(worker.sock_path, "/hello").status == 200


def test_bad_content_length_is_malformed(worker: Worker) -> None:
    pairs = [p for p in request_pairs() if p[0] != "CONTENT_LENGTH"]
    pairs.append(("CONTENT_LENGTH", "-1"))
    assert exchange(worker.sock_path, build_frame(pairs)) == b""
    assert "malformed request frame" in worker.log()


def test_large_vars(worker: Worker) -> None:
    """Headers far above 64 KiB fit (32-bit sizes) and are read whole."""
    big = "v" * 300_000
    reply = request(worker.sock_path, "/environ", headers=[("X-Big", big)])
    assert json.loads(reply.body)["HTTP_X_BIG"] == big


# --------------------------------------------------------------------------
# wsgiref.validate


@pytest.mark.parametrize(
    ("uri", "body", "status"),
    [
        ("/hello", b"", 200),
        ("/environ?x=1", b"", 200),
        ("/echo?mode=read5", b"a\nb\nc", 200),
        ("/echo?mode=readline", b"a\nb\nc", 200),
        ("/echo?mode=readline3", b"abcdef\nb", 200),
        ("/echo?mode=readlines", b"a\nb\nc", 200),
        ("/echo?mode=iter", b"a\nb\nc", 200),
        ("/digest", b"x" * 100_000, 200),
        ("/stream", b"", 200),
        ("/write", b"", 200),
        ("/exc-info", b"", 503),
        ("/empty", b"", 204),
    ],
)
def test_validated_app(validated_worker: Worker, uri: str, body: bytes, status: int) -> None:
    method = "POST" if body else "GET"
    reply = request(validated_worker.sock_path, uri, method, body)
    assert reply.status == status, validated_worker.log()
    log = validated_worker.log()
    assert "Warning" not in log and "AssertionError" not in log, log


def test_validated_file_wrapper(validated_worker: Worker, tmp_path: Path) -> None:
    path = tmp_path / "payload.txt"
    path.write_bytes(b"file contents\n" * 1000)
    reply = request(validated_worker.sock_path, f"/file?path={quote(str(path))}")
    assert reply.body == path.read_bytes()
    assert "Warning" not in validated_worker.log()


# --------------------------------------------------------------------------
# Startup errors


def expect_start_error(tmp_path: Path, startup_file: str, app_root: Path = APPS) -> Worker:
    started = start_worker(tmp_path, startup_file, app_root=app_root)
    assert started.process.wait(timeout=10) == 1
    assert started.handshake["status"] == "error"
    assert set(started.handshake) == {"status", "pid", "kind", "summary", "traceback"}
    return started


def test_import_error(tmp_path: Path) -> None:
    started = expect_start_error(tmp_path, "loader_import_error.py")
    assert started.handshake["kind"] == "import_error"
    assert started.handshake["summary"] == ("ModuleNotFoundError: No module named 'loader_module_that_does_not_exist'")
    trace = str(started.handshake["traceback"])
    assert trace.startswith("Traceback (most recent call last):")
    assert "loader_import_error.py" in trace
    assert "wsgi_loader.py" not in trace
    assert "ModuleNotFoundError" in started.log()


def test_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def application(:\n    pass\n")
    started = expect_start_error(tmp_path, "broken.py", app_root=tmp_path)
    assert started.handshake["kind"] == "syntax_error"
    assert str(started.handshake["summary"]).startswith("SyntaxError: ")
    assert "broken.py" in str(started.handshake["traceback"])


def test_exception_while_loading(tmp_path: Path) -> None:
    started = expect_start_error(tmp_path, "loader_raises.py")
    assert started.handshake["kind"] == "exception"
    assert started.handshake["summary"] == "RuntimeError: the app refuses to start"


@pytest.mark.parametrize("startup_file", ["loader_no_application.py", "loader_not_callable.py"])
def test_no_application(tmp_path: Path, startup_file: str) -> None:
    started = expect_start_error(tmp_path, startup_file)
    assert started.handshake["kind"] == "no_application"
    assert "application" in str(started.handshake["summary"])


def test_missing_startup_file(tmp_path: Path) -> None:
    started = expect_start_error(tmp_path, "no_such_file.py")
    assert started.handshake["kind"] == "missing_startup_file"
    assert "no_such_file.py" in str(started.handshake["summary"])


def test_absolute_startup_file(tmp_path: Path) -> None:
    started = start_worker(tmp_path, str(APPS / "loader_app.py"), app_root=tmp_path)
    try:
        assert request(started.sock_path, "/hello").body == b"Hello, world!"
    finally:
        assert started.stop() == 0


# --------------------------------------------------------------------------
# SIGTERM


def test_sigterm_when_idle_exits_promptly(tmp_path: Path) -> None:
    """Idle in accept(): no connection open."""
    started = start_worker(tmp_path, "loader_app.py")
    assert request(started.sock_path, "/hello").status == 200
    time.sleep(0.1)  # the worker is back in accept()
    began = time.monotonic()
    assert started.stop() == 0
    assert time.monotonic() - began < 2


def test_sigterm_when_idle_on_an_open_connection(tmp_path: Path) -> None:
    """Idle waiting for the next frame: the worker closes and exits."""
    started = start_worker(tmp_path, "loader_app.py")
    with connect(started.sock_path) as conn:
        assert request_on(conn).ended
        time.sleep(0.1)  # the worker waits for the next frame
        began = time.monotonic()
        assert started.stop() == 0
        assert time.monotonic() - began < 2
        assert_closed(conn)


def test_sigterm_during_request_finishes_it(tmp_path: Path) -> None:
    started = start_worker(tmp_path, "loader_app.py")
    with connect(started.sock_path) as conn:
        assert request_on(conn).ended
        conn.sendall(request_frame("/slow?seconds=1"))
        time.sleep(0.3)
        started.process.send_signal(signal.SIGTERM)
        reply = receive_reply(conn)
        assert (reply.status, reply.body, reply.ended) == (200, b"slept", True)
        # Then the connection closes: the worker takes no further request.
        assert_closed(conn)
    assert started.process.wait(timeout=10) == 0


# --------------------------------------------------------------------------
# Other interpreters: the loader needs only the standard library, 3.9+


def other_interpreters() -> list[str]:
    found = {os.path.realpath(sys.executable)}
    candidates = ["/usr/bin/python3", *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3"))]
    chosen = []
    for candidate in candidates:
        if os.access(candidate, os.X_OK) and os.path.realpath(candidate) not in found:
            found.add(os.path.realpath(candidate))
            chosen.append(candidate)
    return chosen


@pytest.mark.parametrize("python", other_interpreters() or [pytest.param("", marks=pytest.mark.skip("none"))])
def test_other_interpreter(tmp_path: Path, python: str) -> None:
    started = start_worker(tmp_path, "loader_app.py", python=python)
    try:
        assert request(started.sock_path, "/hello").body == b"Hello, world!"
        assert request(started.sock_path, "/echo?mode=readline", "POST", b"a\nb").body == b"a\n|b"
    finally:
        assert started.stop() == 0
