"""The fast path's shared table (csrc/fastpath.h) seen from a test: maps
<instance>/fastpath.table and plays the engine's part by hand (publish a
slot, open an app row, read the words and counters), and a throwaway app
worker that speaks the records protocol (docs/protocol.md section 2) with
behaviours a test picks."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pwd
import socket
import struct
import threading
import time
from pathlib import Path

MAGIC = 0x50464741
VERSION = 2
COLUMNS, LANES = 16, 128
APPS, SLOTS, PROCS = 64, COLUMNS * LANES, 64
NAME_MAX, SOCKET_MAX, METHOD_MAX, URI_MAX, BUCKETS = 128, 48, 16, 128, 12

FREE, IDLE, CLAIMED, DETACHED, FAILED = 0, 1, 2, 3, 4
DETACH, TIMED_OUT, UNTIMED = 0x10, 0x20, 0x40


class Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("epoch", ctypes.c_uint32), ("engine_pid", ctypes.c_uint32), ("generations", ctypes.c_uint32),
                ("slots_used", ctypes.c_uint32), ("reserved", ctypes.c_uint32 * 9)]


class App(ctypes.Structure):
    _fields_ = [("open", ctypes.c_uint32), ("name_len", ctypes.c_uint32), ("name", ctypes.c_char * NAME_MAX),
                ("max_queue", ctypes.c_uint32), ("queue_timeout_ms", ctypes.c_uint32),
                ("request_time_ms", ctypes.c_uint32), ("engine_queue", ctypes.c_uint32),
                ("waiting", ctypes.c_uint32), ("engine_spare", ctypes.c_uint32),
                ("queue_full", ctypes.c_uint64), ("queue_timeouts", ctypes.c_uint64),
                ("request_timeouts", ctypes.c_uint64), ("failed", ctypes.c_uint64),
                ("duration_buckets", ctypes.c_uint64 * BUCKETS), ("duration_sum_us", ctypes.c_uint64)]


class Slot(ctypes.Structure):
    _fields_ = [("word", ctypes.c_uint64), ("app", ctypes.c_uint32), ("worker_pid", ctypes.c_uint32),
                ("socket", ctypes.c_char * SOCKET_MAX), ("claims", ctypes.c_uint64), ("claim_ms", ctypes.c_uint64),
                ("method", ctypes.c_char * METHOD_MAX), ("uri", ctypes.c_char * URI_MAX),
                ("pad", ctypes.c_uint8 * (256 - 8 - 8 - SOCKET_MAX - 16 - METHOD_MAX - URI_MAX))]


class Proc(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("waiting", ctypes.c_uint32 * APPS),
                ("oldest_ms", ctypes.c_uint64 * APPS)]


class Table(ctypes.Structure):
    _fields_ = [("header", Header), ("apps", App * APPS), ("slots", Slot * SLOTS), ("procs", Proc * PROCS)]


assert ctypes.sizeof(Slot) == 256


def word(kind: int, flags: int = 0, pid: int = 0, generation: int = 0) -> int:
    return generation << 32 | (pid & 0xFFFFFF) << 8 | (flags & 0xF0) | (kind & 0x0F)


def kind(w: int) -> int:
    return w & 0x0F


def flags(w: int) -> int:
    return w & 0xF0


def pid_of(w: int) -> int:
    return (w >> 8) & 0xFFFFFF


def generation(w: int) -> int:
    return w >> 32


class FastPathTable:
    """The mapped table; the test writes what the engine would."""

    def __init__(self, instance: Path) -> None:
        self.path = instance / "fastpath.table"
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        self.map = mmap.mmap(self.fd, ctypes.sizeof(Table))
        self.t = Table.from_buffer(self.map)
        assert self.t.header.magic == MAGIC and self.t.header.size == ctypes.sizeof(Table)

    def close(self) -> None:
        del self.t
        with contextlib.suppress(BufferError):  # a row or slot a test still holds keeps the mapping
            self.map.close()
        os.close(self.fd)

    def forget(self, row: int, slot: int) -> None:
        """One app row closed and zeroed, one slot FREE; the engine's rows and
        slots, and nginx's proc rows, are left as they are."""
        ctypes.memset(ctypes.addressof(self.t.apps[row]), 0, ctypes.sizeof(App))
        ctypes.memset(ctypes.addressof(self.t.slots[slot]), 0, ctypes.sizeof(Slot))

    def open_app(self, row: int, name: str, max_queue: int = 100, queue_timeout_ms: int = 0,
                 request_time_ms: int = 0) -> App:
        a = self.t.apps[row]
        a.name = name.encode()
        a.name_len = len(name.encode())
        a.max_queue, a.queue_timeout_ms, a.request_time_ms = max_queue, queue_timeout_ms, request_time_ms
        a.engine_queue = 0
        a.open = 1
        return a

    def publish(self, index: int, row: int, socket_name: str, worker_pid: int = 0) -> int:
        """A slot for a worker: a new generation, the word IDLE last."""
        s = self.t.slots[index]
        s.app, s.worker_pid, s.socket = row, worker_pid, socket_name.encode()
        s.claims = 0
        self.t.header.generations += 1
        gen = self.t.header.generations
        s.word = word(IDLE, generation=gen)
        self.t.header.slots_used = max(self.t.header.slots_used, index + 1)
        return gen

    def slot(self, index: int) -> Slot:
        return self.t.slots[index]

    def app(self, row: int) -> App:
        return self.t.apps[row]

    # -- reading what the engine and nginx wrote --------------------------

    @property
    def epoch(self) -> int:
        return int(self.t.header.epoch)

    def row_of(self, name: str) -> int | None:
        """The row the engine gave the app named `name`, open or not."""
        wanted = name.encode()
        for row in range(APPS):
            a = self.t.apps[row]
            if a.name_len == len(wanted) and bytes(a.name)[:a.name_len] == wanted:
                return row
        return None

    def app_slots(self, name: str) -> list[Slot]:
        """The slots holding a worker of the app (any state but FREE)."""
        row = self.row_of(name)
        if row is None:
            return []
        used = min(int(self.t.header.slots_used), SLOTS)
        return [s for s in self.t.slots[:used] if s.app == row and kind(s.word) != FREE]

    def serving_pids(self, name: str) -> set[int]:
        """Workers nginx may claim or holds: IDLE or CLAIMED, in an open row."""
        row = self.row_of(name)
        if row is None or not self.t.apps[row].open:
            return set()
        return {int(s.worker_pid) for s in self.app_slots(name) if kind(s.word) in (IDLE, CLAIMED)}

    def failed(self, name: str) -> int:
        """502s nginx answered for the app on the fast path."""
        row = self.row_of(name)
        return 0 if row is None else int(self.t.apps[row].failed)

    def claims(self, name: str) -> int:
        return sum(int(s.claims) for s in self.app_slots(name))

    def worker_slot(self, worker_pid: int) -> Slot | None:
        used = min(int(self.t.header.slots_used), SLOTS)
        found = [s for s in self.t.slots[:used] if s.worker_pid == worker_pid and kind(s.word) != FREE]
        return found[0] if found else None

    def claimed_by_nginx(self, worker_pid: int) -> bool:
        s = self.worker_slot(worker_pid)
        return s is not None and kind(s.word) == CLAIMED and pid_of(s.word) != self.t.header.engine_pid

    def detach_requested(self, worker_pid: int) -> bool:
        s = self.worker_slot(worker_pid)
        return s is not None and bool(flags(s.word) & DETACH)


def read_frame(conn: socket.socket, buf: bytearray) -> dict[str, bytes] | None:
    """One request frame (docs/protocol.md section 1) and its body; None at end of file."""
    def need(n: int) -> bool:
        while len(buf) < n:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            buf.extend(chunk)
        return True

    if not need(4):
        return None
    size = struct.unpack(">I", buf[:4])[0]
    if not need(4 + size):
        return None
    vars_: dict[str, bytes] = {}
    p = 4
    while p < 4 + size:
        klen = struct.unpack(">I", buf[p:p + 4])[0]
        key = bytes(buf[p + 4:p + 4 + klen]).decode()
        p += 4 + klen
        vlen = struct.unpack(">I", buf[p:p + 4])[0]
        vars_[key] = bytes(buf[p + 4:p + 4 + vlen])
        p += 4 + vlen
    body_len = int(vars_["CONTENT_LENGTH"])
    if not need(4 + size + body_len):
        return None
    vars_["BODY"] = bytes(buf[4 + size:4 + size + body_len])
    del buf[:4 + size + body_len]
    return vars_


END = b"\0\0\0\0"


def record(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class RecordsWorker:
    """A throwaway app worker on <instance>/workers/<name>, owned by nginx's
    worker user: one request at a time, on any number of connections in
    turn. `mode` picks the answer: ok, garbage, extra, eof, slow."""

    def __init__(self, instance: Path, name: str, owner: str) -> None:
        workers = instance / "workers"
        os.chmod(workers, 0o711)   # the core's 0700 until the engine's side sets 0710
        self.path = workers / name
        self.name = name
        self.mode = "ok"
        self.delay = 0.0
        self.accepts = 0
        self.requests = 0
        self.stop_flag = False
        if self.path.exists():
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        user = pwd.getpwnam(owner)
        os.chown(self.path, user.pw_uid, user.pw_gid)
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop_flag:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:
                    frame = read_frame(conn, buf)
                except OSError:
                    return
                if frame is None:
                    return
                self.requests += 1
                if self.delay:
                    time.sleep(self.delay)
                body = b"fast " + frame["REQUEST_URI"] + b" " + frame["BODY"]
                response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
                try:
                    if self.mode == "garbage":
                        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nnot records at all")
                        return
                    if self.mode == "extra":
                        conn.sendall(record(response) + END + b"more")
                        return
                    if self.mode == "eof":
                        conn.sendall(record(response)[:20])
                        return
                    # two records (their boundaries mean nothing) and the end, in one write
                    conn.sendall(record(response[:10]) + record(response[10:]) + END)
                except OSError:
                    return

    def close(self) -> None:
        self.stop_flag = True
        self.sock.close()
        self.thread.join(timeout=2)
