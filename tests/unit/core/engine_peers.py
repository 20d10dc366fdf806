"""The engine's peers for its tests: an nginx side that writes request frames
(docs/protocol.md section 1) and fake app workers that answer in records over
connections that carry many requests (section 2), plus a harness around
the agent's own engine wrapper (agent/core/engine.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.core.engine import AppStats, Engine, EngineEvent, WorkerStats

TIMEOUT = 10.0


# -- frames -------------------------------------------------------------------


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in pairs)


def request_frame(
    app: str,
    uri: str = "/",
    method: str = "GET",
    content_length: int = 0,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """The frame up to the end of vars; the body follows separately."""
    pairs = [
        (b"AGENT_APP", app.encode()),
        (b"REQUEST_METHOD", method.encode()),
        (b"REQUEST_URI", uri.encode()),
        (b"CONTENT_LENGTH", str(content_length).encode()),
        *extra,
    ]
    return raw_frame(encode_pairs(pairs))


def raw_frame(vars_bytes: bytes) -> bytes:
    return struct.pack(">I", len(vars_bytes)) + vars_bytes


def parse_pairs(vars_bytes: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(vars_bytes):
        (klen,) = struct.unpack_from(">I", vars_bytes, pos)
        key = vars_bytes[pos + 4 : pos + 4 + klen]
        pos += 4 + klen
        (vlen,) = struct.unpack_from(">I", vars_bytes, pos)
        out[key.decode()] = vars_bytes[pos + 4 : pos + 4 + vlen]
        pos += 4 + vlen
    return out


# -- the nginx side -----------------------------------------------------------


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def send_request(path: str, frame: bytes, body: bytes = b"") -> bytes:
    """One request, one connection: the whole response up to the close."""
    with connect(path) as sock:
        sock.sendall(frame + body)
        return read_all(sock)


def split_response(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


# -- fake workers -------------------------------------------------------------


@dataclass
class SeenRequest:
    frame: bytes  # vars-size and vars, as received
    vars: dict[str, bytes]
    body_length: int
    body_sha256: str
    body: bytes  # kept only when small


# What a worker does with a request it has read. It returns whether the
# connection carries on (the worker then waits for the next frame on it) or
# is closed.
Behavior = Callable[["FakeWorker", socket.socket, SeenRequest], bool]
KEEP, CLOSE = True, False

END_RECORD = b"\x00\x00\x00\x00"


def record(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def records(response: bytes, cut: int = 0) -> bytes:
    """A whole response in records (cut: bytes per record, 0 for one) and the end record."""
    step = cut or max(len(response), 1)
    return b"".join(record(response[i : i + step]) for i in range(0, len(response), step)) + END_RECORD


def hello(worker: FakeWorker) -> bytes:
    body = f"hello from {worker.pid}\n".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def answer_hello(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    conn.sendall(records(hello(worker)))
    return KEEP


def answer_after_release(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    worker.release.wait(TIMEOUT)
    return answer_hello(worker, conn, request)


def close_without_answer(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    return CLOSE


def answer_then_close(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    """A worker may close a connection after any end record."""
    answer_hello(worker, conn, request)
    return CLOSE


def answer_in_two_parts(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    """Sends the head and a first part, then the rest once released."""
    conn.sendall(record(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part\n"))
    worker.release.wait(TIMEOUT)
    conn.sendall(record(b"second part\n") + END_RECORD)
    return KEEP


def answer_then_watch_for_close(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    """Starts a response that never ends and notes when the engine hangs up."""
    conn.sendall(record(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part\n"))
    conn.settimeout(TIMEOUT)
    try:
        data = conn.recv(1)
    except OSError:
        data = b""
    if data == b"":
        worker.saw_close.set()
    return CLOSE


def stream_forever(worker: FakeWorker, conn: socket.socket, request: SeenRequest) -> bool:
    """Starts a response and writes records of it until a send fails, then
    notes that the engine hung up."""
    conn.sendall(record(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"))
    chunk = record(b"x" * 16384)
    deadline = time.monotonic() + 3 * TIMEOUT
    try:
        while time.monotonic() < deadline:
            conn.sendall(chunk)
    except OSError:
        worker.saw_close.set()
    return CLOSE


@dataclass
class FakeWorker:
    """A worker listening on path; each connection is served by a thread."""

    path: str
    pid: int
    behavior: Behavior = answer_hello
    requests: list[SeenRequest] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    saw_close: threading.Event = field(default_factory=threading.Event)
    read_body: bool = True  # False: the behavior runs before the body is read
    connections: int = 0  # accepted
    engine_closes: int = 0  # connections the engine closed between requests

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """Requests one after another, until the engine closes the connection
        or the behavior does."""
        with self._lock:
            self._open.add(conn)
        with conn:
            conn.settimeout(TIMEOUT)
            while not self._stopping.is_set():
                try:
                    request = self._read_request(conn)
                except ConnectionResetError:  # closed with bytes of ours unread
                    request = None
                except OSError:
                    break
                if request is None:
                    with self._lock:
                        self.engine_closes += 1
                    break
                with self._lock:
                    self.requests.append(request)
                try:
                    if not self.behavior(self, conn, request):
                        break
                except OSError:
                    break
        with self._lock:
            self._open.discard(conn)

    @staticmethod
    def _read_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data = conn.recv(min(n - len(buf), 1 << 20))
            if not data:
                return None
            buf += data
        return bytes(buf)

    def _read_request(self, conn: socket.socket) -> SeenRequest | None:
        size = self._read_exact(conn, 4)
        if size is None:
            return None
        vars_bytes = self._read_exact(conn, struct.unpack(">I", size)[0])
        if vars_bytes is None:
            return None
        pairs = parse_pairs(vars_bytes)
        remaining = int(pairs["CONTENT_LENGTH"]) if self.read_body else 0
        digest = hashlib.sha256()
        kept = bytearray()
        chunk = bytearray(1 << 16)
        view = memoryview(chunk)
        length = 0
        while remaining > 0:
            n = conn.recv_into(view, min(len(chunk), remaining))
            if n == 0:
                break
            digest.update(view[:n])
            if length < 65536:
                kept += view[:n]
            length += n
            remaining -= n
        return SeenRequest(size + vars_bytes, pairs, length, digest.hexdigest(), bytes(kept))

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def closes(self) -> int:
        with self._lock:
            return self.engine_closes

    def stop(self) -> None:
        self.release.set()
        self._stopping.set()
        self._acceptor.join(TIMEOUT)
        self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for conn in still_open:  # wakes a thread that waits for a frame
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(TIMEOUT)


# -- the engine ---------------------------------------------------------------


class EngineHarness:
    """The agent's own engine wrapper on a fresh agent socket, with its events collected."""

    def __init__(self, directory: str, **config: int) -> None:
        self.directory = directory
        self.socket_path = os.path.join(directory, "agent.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(512)
        self.engine = Engine(self.listener.fileno(), **config)
        self.engine.start()
        self.events: list[EngineEvent] = []
        self.workers: list[FakeWorker] = []

    def close(self) -> None:
        self.engine.close()
        self.listener.close()
        for worker in self.workers:
            worker.stop()

    def app(self, app_id: int, name: str, max_queue: int = 0, queue_timeout_ms: int = 0) -> None:
        self.engine.set_app(app_id, name, max_queue, queue_timeout_ms)

    def worker(self, app_id: int, pid: int, behavior: Behavior = answer_hello, concurrency: int = 1) -> FakeWorker:
        worker = FakeWorker(os.path.join(self.directory, f"w{pid}.sock"), pid, behavior)
        self.workers.append(worker)
        self.engine.add_worker(app_id, pid, worker.path, concurrency)
        return worker

    def poll(self) -> list[EngineEvent]:
        self.events += self.engine.poll()
        return self.events

    def wait_event(self, type_: int, timeout: float = TIMEOUT) -> EngineEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.poll():
                if ev.type == type_:
                    self.events.remove(ev)
                    return ev
            time.sleep(0.005)
        raise AssertionError(f"no event of type {type_} within {timeout} s: {self.events}")

    def worker_stats(self) -> dict[int, WorkerStats]:
        return self.engine.worker_stats()

    def app_stats(self) -> dict[int, AppStats]:
        return self.engine.app_stats()

    def request(self, frame: bytes, body: bytes = b"") -> bytes:
        return send_request(self.socket_path, frame, body)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
