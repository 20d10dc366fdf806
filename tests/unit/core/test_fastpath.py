"""The engine's side of the fast path (csrc/fastpath.c) against csrc/fastpath.h.

The real engine runs behind its Python wrapper with a real table file, which
the test maps with mmap and writes as nginx would: words, counters, process
rows, display fields, and garbage in all of them. Everything nginx writes
is untrusted: the engine must stay sound (no crash, no index out of range),
fail the slots the spec says, and clamp what it counts."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.engine import (
    EV_QUEUED,
    EV_REQUEST_TIMEOUT,
    EV_WORKER_FAILED,
    EV_WORKER_IDLE,
    FASTPATH_FILE,
    NOTIFY_HOLD,
    NOTIFY_IDLE,
    NOTIFY_QUEUED,
    WORKER_ACTIVE,
    WORKER_DETACHED,
    NativeError,
)
from agent.core.main import FastPathAttacher
from tests.integration.fastpath_table import (
    APPS,
    CLAIMED,
    COLUMNS,
    DETACH,
    DETACHED,
    FAILED,
    FREE,
    IDLE,
    LANES,
    MAGIC,
    SLOTS,
    TIMED_OUT,
    VERSION,
    Header,
    Slot,
    Table,
    pid_of,
)
from tests.integration.fastpath_table import App as AppRow
from tests.integration.fastpath_table import flags as flags_of
from tests.unit.core.engine_peers import (
    EngineHarness,
    FakeWorker,
    answer_after_release,
    connect,
    read_all,
    request_frame,
    wait_until,
)

APP = "/srv/shop"
ROOT = Path(__file__).resolve().parents[3]

# -- the table's layout (csrc/fastpath.h) -------------------------------------

TABLE_SIZE = ctypes.sizeof(Table)


def word(kind: int, flags: int = 0, pid: int = 0, gen: int = 0) -> int:
    return gen << 32 | (pid & 0xFFFFFF) << 8 | flags | kind


def kind_of(w: int) -> int:
    return w & 0x0F


def gen_of(w: int) -> int:
    return w >> 32


def make_table(path: str, size: int = TABLE_SIZE, magic: int = MAGIC, version: int = VERSION) -> None:
    """What nginx's master does: a fresh table, mode 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if size >= ctypes.sizeof(Header):
            os.pwrite(fd, bytes(Header(magic, version, TABLE_SIZE)), 0)
    finally:
        os.close(fd)


def dead_pid() -> int:
    """A pid that no process has any more."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


class Nginx:
    """The test's view of the table: it acts as nginx by writing it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, TABLE_SIZE)
        self.table = Table.from_buffer(self.map)

    def close(self) -> None:
        del self.table
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # a test's local views still use it: it goes with them
            self.map.close()

    @property
    def header(self) -> Header:
        return self.table.header

    def row(self, app: int) -> AppRow:
        return self.table.apps[app]

    def slot(self, i: int) -> Slot:
        return self.table.slots[i]

    def slot_of(self, pid: int) -> tuple[int, Slot]:
        for i in range(SLOTS):
            s = self.table.slots[i]
            if s.worker_pid == pid and kind_of(s.word) != FREE:
                return i, s
        raise AssertionError(f"no slot for worker {pid}")


class FastPath:
    def __init__(self, harness: EngineHarness, nginx: Nginx, path: str) -> None:
        self.e = harness
        self.nginx = nginx
        self.path = path

    def request(self, uri: str = "/") -> bytes:
        return self.e.request(request_frame(APP, uri))

    def events(self, type_: int) -> list[Any]:
        return [ev for ev in self.e.poll() if ev.type == type_]


@pytest.fixture
def fp() -> Iterator[FastPath]:
    with tempfile.TemporaryDirectory(prefix="fastpath-") as directory:
        path = os.path.join(directory, FASTPATH_FILE)
        make_table(path)
        harness = EngineHarness(directory, frame_timeout_ms=300)
        nginx = Nginx(path)
        try:
            harness.engine.attach_fastpath(path, None)
            yield FastPath(harness, nginx, path)
        finally:
            harness.close()
            nginx.close()


@pytest.fixture
def bare() -> Iterator[tuple[EngineHarness, str]]:
    with tempfile.TemporaryDirectory(prefix="fastpath-") as directory:
        harness = EngineHarness(directory, frame_timeout_ms=300)
        try:
            yield harness, directory
        finally:
            harness.close()


def tick() -> None:
    """Lets the engine's sweep (every 100 ms) run at least once."""
    time.sleep(0.25)


# -- the layout ------------------------------------------------------------------


def test_layout_matches_the_header() -> None:
    text = (ROOT / "csrc" / "fastpath.h").read_text()
    assert f'#define AGENT_FP_FILE           "{FASTPATH_FILE}"' in text
    assert ctypes.sizeof(Slot) == 256
    assert Slot.word.offset == 0 and Table.slots.offset % 8 == 0


# -- attaching -------------------------------------------------------------------


def attach_error(harness: EngineHarness, path: str, nginx_uid: int | None = None) -> int:
    with pytest.raises(NativeError) as info:
        harness.engine.attach_fastpath(path, nginx_uid)
    assert not harness.engine.fastpath_attached()
    return int(info.value.errno or 0)


def test_attach_refuses_a_table_that_fails_a_check_and_the_slow_path_still_serves(
        bare: tuple[EngineHarness, str]) -> None:
    harness, directory = bare
    harness.app(1, APP)
    harness.worker(1, 101)
    base = os.path.join(directory, "t")
    assert attach_error(harness, base + "-missing") == errno.ENOENT
    make_table(base + "-small", size=TABLE_SIZE - 8)
    assert attach_error(harness, base + "-small") == errno.EINVAL
    make_table(base + "-big", size=TABLE_SIZE + 4096)
    assert attach_error(harness, base + "-big") == errno.EINVAL
    make_table(base + "-magic", magic=0x12345678)
    assert attach_error(harness, base + "-magic") == errno.EPROTO
    make_table(base + "-version", version=99)
    assert attach_error(harness, base + "-version") == errno.EPROTO
    make_table(base + "-good")
    os.symlink(base + "-good", base + "-link")
    assert attach_error(harness, base + "-link") == errno.ELOOP
    os.link(base + "-good", base + "-hardlink")
    assert attach_error(harness, base + "-hardlink") == errno.EMLINK
    os.unlink(base + "-hardlink")
    os.mkdir(base + "-dir")
    assert attach_error(harness, base + "-dir") in (errno.EISDIR, errno.EINVAL)
    os.mkfifo(base + "-fifo", 0o600)
    assert attach_error(harness, base + "-fifo") == errno.EINVAL
    make_table(base + "-writable")
    os.chmod(base + "-writable", 0o622)
    assert attach_error(harness, base + "-writable") == errno.EPERM
    if os.geteuid() == 0:  # root expects nginx's worker user as the owner
        assert attach_error(harness, base + "-good", nginx_uid=54321) == errno.EPERM
        make_table(base + "-owned")
        os.chown(base + "-owned", 54321, 54321)
        assert attach_error(harness, base + "-owned") == errno.EPERM
        harness.engine.attach_fastpath(base + "-owned", 54321)
        assert harness.engine.fastpath_attached()
    assert harness.request(request_frame(APP)).startswith(b"HTTP/1.1 200 OK")


def test_attach_starts_an_epoch_resets_slots_and_rows_and_keeps_nginx_fields(bare: tuple[EngineHarness, str]) -> None:
    harness, directory = bare
    path = os.path.join(directory, FASTPATH_FILE)
    make_table(path)
    nginx = Nginx(path)
    try:
        h = nginx.header
        h.epoch, h.generations, h.slots_used, h.engine_pid = 7, 1000, 99, 1
        for i in range(SLOTS):
            nginx.slot(i).word = word(CLAIMED, 0, 4242, 5)
            nginx.slot(i).claims = 77
            nginx.slot(i).socket = b"evil"
        for i in range(APPS):
            nginx.row(i).open = 1
            nginx.row(i).engine_queue = 9
            nginx.row(i).waiting = 3
        nginx.table.procs[2].pid = os.getpid()
        nginx.table.procs[2].waiting[5] = 3
        harness.engine.attach_fastpath(path, None)
        assert harness.engine.fastpath_attached()
        with pytest.raises(NativeError) as info:
            harness.engine.attach_fastpath(path, None)
        assert info.value.errno == errno.EALREADY
        assert (h.epoch, h.engine_pid, h.generations, h.slots_used) == (8, os.getpid(), 1000, 0)
        assert all(bytes(nginx.slot(i)) == bytes(256) for i in range(SLOTS))
        assert all(nginx.row(i).open == 0 and nginx.row(i).engine_queue == 0 for i in range(APPS))
        assert all(nginx.row(i).waiting == 3 for i in range(APPS))
        assert nginx.table.procs[2].pid == os.getpid() and nginx.table.procs[2].waiting[5] == 3
        # The generations go on from the table's counter.
        harness.app(1, APP)
        harness.worker(1, 101)
        assert nginx.row(1).open == 1
        assert gen_of(nginx.slot_of(101)[1].word) == 1001
    finally:
        nginx.close()


def test_the_engine_that_stops_closes_its_rows(bare: tuple[EngineHarness, str]) -> None:
    harness, directory = bare
    path = os.path.join(directory, FASTPATH_FILE)
    make_table(path)
    nginx = Nginx(path)
    try:
        harness.engine.attach_fastpath(path, None)
        harness.app(1, APP)
        harness.worker(1, 101)
        assert nginx.row(1).open == 1
        harness.engine.close()
        assert nginx.row(1).open == 0
    finally:
        nginx.close()


# -- publishing ------------------------------------------------------------------


def test_worker_add_publishes_a_slot(fp: FastPath) -> None:
    h = fp.nginx.header
    before = h.generations
    fp.e.app(1, APP, max_queue=7, queue_timeout_ms=1500)
    fp.e.engine.set_request_time(1, 2500)
    fp.e.worker(1, 101)
    fp.e.worker(1, 102)
    i, s = fp.nginx.slot_of(101)
    j, t = fp.nginx.slot_of(102)
    assert s.word == word(IDLE, gen=before + 1) and t.word == word(IDLE, gen=before + 2)
    assert (s.app, s.socket, t.socket) == (1, b"w101.sock", b"w102.sock")
    assert h.slots_used == max(i, j) + 1
    row = fp.nginx.row(1)
    assert (row.open, row.name, row.name_len) == (1, APP.encode(), len(APP))
    assert (row.max_queue, row.queue_timeout_ms, row.request_time_ms) == (7, 1500, 2500)


def test_no_slot_for_a_long_socket_name_or_an_app_past_the_rows(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.app(70, "/srv/other")
    long_path = os.path.join(os.path.dirname(fp.path), "w" * 48 + ".sock")
    worker = FakeWorker(long_path, 102)
    fp.e.workers.append(worker)
    fp.e.engine.add_worker(1, 102, long_path, 1)
    fp.e.worker(70, 103)
    assert all(kind_of(fp.nginx.slot(i).word) == FREE for i in range(SLOTS))
    assert fp.nginx.row(1).open == 0  # no slotted worker: nginx sends everything to agent.sock
    assert fp.request().startswith(b"HTTP/1.1 200 OK")


# -- lanes: workers of more than one request at once ------------------------------


def lanes_of(fp: FastPath, pid: int) -> list[int]:
    return [i for i in range(SLOTS) if fp.nginx.slot(i).worker_pid == pid and kind_of(fp.nginx.slot(i).word) != FREE]


def test_a_worker_of_n_requests_gets_n_lanes_of_one_column_from_the_last(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101, concurrency=3)
    fp.e.worker(1, 102, concurrency=2)
    fp.e.worker(1, 103)
    last = COLUMNS - 1
    assert lanes_of(fp, 101) == [last, COLUMNS + last, 2 * COLUMNS + last]
    assert lanes_of(fp, 102) == [last - 1, COLUMNS + last - 1]
    assert lanes_of(fp, 103) == [0]  # a worker of one request: the first free slot
    # nginx's scan in index order meets every worker's first lane first.
    first_three = sorted(lanes_of(fp, 101) + lanes_of(fp, 102) + lanes_of(fp, 103))[:3]
    assert {fp.nginx.slot(i).worker_pid for i in first_three} == {101, 102, 103}
    gens = [gen_of(fp.nginx.slot(i).word) for i in lanes_of(fp, 101)]
    assert len(set(gens)) == 3  # each lane names itself
    assert fp.nginx.header.slots_used == 2 * COLUMNS + last + 1
    assert fp.nginx.row(1).engine_spare == 0  # every request has a lane


def test_concurrency_past_the_lanes_is_the_engines_spare(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101, concurrency=LANES + 36)
    assert len(lanes_of(fp, 101)) == LANES
    assert fp.nginx.row(1).engine_spare == 36
    assert fp.e.worker_stats()[101].concurrency == LANES + 36


def test_a_worker_the_table_has_no_column_for_is_served_by_the_engine_alone(fp: FastPath) -> None:
    fp.e.app(1, APP)
    for n in range(COLUMNS):
        fp.e.worker(1, 200 + n, concurrency=LANES)
    fp.e.worker(1, 101, concurrency=4)
    assert lanes_of(fp, 101) == []
    assert fp.nginx.row(1).engine_spare == 4
    assert fp.request().startswith(b"HTTP/1.1 200 OK")


def test_the_slow_path_uses_its_own_room_before_the_lanes(fp: FastPath) -> None:
    fp.e.app(1, APP)
    worker = fp.e.worker(1, 101, answer_after_release, concurrency=LANES + 1)
    socks = []
    for n in range(3):
        sock = connect(fp.e.socket_path)
        sock.sendall(request_frame(APP))
        socks.append(sock)
        wait_until(lambda n=n: len(worker.requests) == n + 1)
    # The first took the room beyond the lanes, the next two a lane each.
    claimed = [i for i in lanes_of(fp, 101) if kind_of(fp.nginx.slot(i).word) == CLAIMED]
    assert len(claimed) == 2 and all(pid_of(fp.nginx.slot(i).word) == os.getpid() for i in claimed)
    assert fp.nginx.row(1).engine_spare == 0
    assert fp.e.worker_stats()[101].sessions == 3
    worker.release.set()
    for sock in socks:
        assert read_all(sock).startswith(b"HTTP/1.1 200 OK")
        sock.close()
    wait_until(lambda: all(kind_of(fp.nginx.slot(i).word) == IDLE for i in lanes_of(fp, 101)))
    wait_until(lambda: fp.nginx.row(1).engine_spare == 1)


def test_lanes_nginx_holds_are_sessions_and_the_slow_path_takes_the_rest(fp: FastPath) -> None:
    fp.e.app(1, APP)
    worker = fp.e.worker(1, 101, concurrency=3)
    lanes = lanes_of(fp, 101)
    for i in lanes[:2]:
        s = fp.nginx.slot(i)
        s.word = word(CLAIMED, 0, os.getppid(), gen_of(s.word))
    stats = fp.e.worker_stats()[101]
    assert stats.sessions == 2
    assert fp.e.app_stats()[1].free_slots == 1
    assert fp.request().startswith(b"HTTP/1.1 200 OK")
    assert len(worker.requests) == 1
    s = fp.nginx.slot(lanes[2])
    s.word = word(CLAIMED, 0, os.getppid(), gen_of(s.word))
    assert fp.e.app_stats()[1].free_slots == 0
    sock = connect(fp.e.socket_path)
    sock.sendall(request_frame(APP))
    wait_until(lambda: fp.e.app_stats()[1].unserved == 1)  # every lane is nginx's: it waits
    s.word = word(IDLE, gen=gen_of(s.word))
    assert read_all(sock).startswith(b"HTTP/1.1 200 OK")
    sock.close()


def test_one_lane_failing_takes_the_worker_out_of_every_lane(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.engine.set_request_time(1, 100)
    fp.e.worker(1, 101, concurrency=3)
    lanes = [fp.nginx.slot(i) for i in lanes_of(fp, 101)]
    busy, other, idle = lanes
    busy.word = word(CLAIMED, 0, os.getppid(), gen_of(busy.word))
    busy.claims += 1
    other.word = word(CLAIMED, 0, os.getppid(), gen_of(other.word))
    other.claims += 1
    time.sleep(0.05)
    other.claims += 1  # a hand-off: this lane's request is new
    ev = fp.e.wait_event(EV_REQUEST_TIMEOUT)
    assert ev.pid == 101
    assert busy.word == word(FAILED, TIMED_OUT, 0, gen_of(busy.word))
    assert idle.word == word(DETACHED, gen=gen_of(idle.word))  # nginx can claim it no more
    assert kind_of(other.word) == CLAIMED and flags_of(other.word) == DETACH  # stores DETACHED at release
    assert fp.nginx.row(1).open == 0
    assert fp.e.worker_stats()[101].sessions == 1  # the request on the other lane runs on until the kill


def test_a_detached_worker_is_idle_when_its_last_lane_comes_back(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101, concurrency=2)
    first, second = (fp.nginx.slot(i) for i in lanes_of(fp, 101))
    first.word = word(CLAIMED, 0, os.getppid(), gen_of(first.word))
    second.word = word(CLAIMED, 0, os.getppid(), gen_of(second.word))
    fp.e.engine.detach_worker(101)
    assert flags_of(first.word) == DETACH and flags_of(second.word) == DETACH
    first.word = word(DETACHED, gen=gen_of(first.word))
    tick()
    assert not fp.events(EV_WORKER_IDLE)
    assert fp.e.worker_stats()[101].sessions == 1
    second.word = word(DETACHED, gen=gen_of(second.word))
    assert fp.e.wait_event(EV_WORKER_IDLE).pid == 101
    assert fp.e.worker_stats()[101].sessions == 0


def test_a_removed_worker_frees_its_slot_and_a_new_one_gets_a_new_generation(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    i, s = fp.nginx.slot_of(101)
    old = gen_of(s.word)
    fp.e.engine.remove_worker(101)
    assert s.word == 0
    assert fp.nginx.row(1).open == 0
    fp.e.worker(1, 102)
    j, t = fp.nginx.slot_of(102)
    assert j == i and gen_of(t.word) == old + 1


# -- rows ------------------------------------------------------------------------


def test_a_row_is_open_only_with_an_active_slotted_worker_no_failure_and_no_hold(fp: FastPath) -> None:
    row = fp.nginx.row(1)
    fp.e.app(1, APP)
    assert row.open == 0
    fp.e.worker(1, 101)
    assert row.open == 1
    fp.e.engine.fail_app(1, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    assert row.open == 0
    fp.e.engine.clear_app_failure(1)
    assert row.open == 1
    fp.e.engine.notify_app(1, NOTIFY_IDLE | NOTIFY_HOLD)
    assert row.open == 0
    fp.e.engine.notify_app(1, NOTIFY_IDLE | NOTIFY_QUEUED)
    assert row.open == 1
    fp.e.engine.detach_worker(101)
    assert row.open == 0
    fp.e.worker(1, 102)
    assert row.open == 1
    fp.e.engine.set_app(1, "/srv/renamed", 0, 0)
    assert (row.open, row.name) == (1, b"/srv/renamed")
    fp.e.engine.remove_app(1)
    assert row.open == 0


# -- the slow path's claims ------------------------------------------------------


def slow_path_request(fp: FastPath) -> tuple[Any, Any, int, socket.socket]:
    """A request through agent.sock to app 1's only worker (pid 101), which
    answers once the test releases it: (worker, its slot, generation, the
    client's socket)."""
    fp.e.app(1, APP)
    worker = fp.e.worker(1, 101, answer_after_release)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    sock = connect(fp.e.socket_path)
    sock.sendall(request_frame(APP))
    return worker, s, gen, sock


def test_the_slow_path_claims_and_releases_the_slot(fp: FastPath) -> None:
    worker, s, gen, sock = slow_path_request(fp)
    wait_until(lambda: s.word == word(CLAIMED, 0, os.getpid(), gen))
    assert s.claims == 1
    worker.release.set()
    assert read_all(sock).startswith(b"HTTP/1.1 200 OK")
    sock.close()
    wait_until(lambda: s.word == word(IDLE, gen=gen))
    tick()
    assert fp.e.worker_stats()[101].processed == 1  # the engine's claim is not counted twice
    assert fp.e.app_stats()[1].requests == 1


def test_the_slow_path_skips_a_slot_nginx_holds(fp: FastPath) -> None:
    fp.e.app(1, APP)
    held = fp.e.worker(1, 101)
    free = fp.e.worker(1, 102)
    _, s = fp.nginx.slot_of(101)
    s.word = word(CLAIMED, 0, os.getppid(), gen_of(s.word))
    for _ in range(4):
        assert fp.request().startswith(b"HTTP/1.1 200 OK")
    assert len(held.requests) == 0 and len(free.requests) == 4
    stats = fp.e.worker_stats()
    assert stats[101].sessions == 1 and stats[102].sessions == 0  # nginx's claim is a session
    assert fp.e.app_stats()[1].free_slots == 1


def test_a_queued_request_takes_the_worker_nginx_releases_within_milliseconds(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    s.word = word(CLAIMED, 0, os.getppid(), gen)
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(fp.request()))
    thread.start()
    wait_until(lambda: fp.nginx.row(1).engine_queue == 1)
    assert fp.e.app_stats()[1].queue_length == 1
    time.sleep(0.05)
    assert not result
    released = time.monotonic()
    s.word = word(IDLE, gen=gen)  # nginx's release, which tells the engine nothing
    thread.join(5)
    assert result and result[0].startswith(b"HTTP/1.1 200 OK")
    assert time.monotonic() - released < 0.08  # the 1 ms retry, not the 100 ms tick
    assert fp.nginx.row(1).engine_queue == 0


# -- detaching -------------------------------------------------------------------


def test_detaching_an_idle_slot(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    fp.e.engine.detach_worker(101)
    assert s.word == word(DETACHED, gen=gen)
    ev = fp.e.wait_event(EV_WORKER_IDLE)
    assert ev.pid == 101


def test_detaching_a_claimed_slot_waits_for_its_release(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    nginx_pid = os.getppid()
    s.word = word(CLAIMED, 0, nginx_pid, gen)
    fp.e.engine.detach_worker(101)
    assert s.word == word(CLAIMED, DETACH, nginx_pid, gen)
    tick()
    assert not fp.events(EV_WORKER_IDLE)
    stats = fp.e.worker_stats()[101]
    assert (stats.state, stats.sessions) == (WORKER_DETACHED, 1)
    s.claims += 1
    s.word = word(DETACHED, gen=gen)  # the claimant's release
    ev = fp.e.wait_event(EV_WORKER_IDLE)
    assert ev.pid == 101
    stats = fp.e.worker_stats()[101]
    assert (stats.sessions, stats.processed) == (0, 1)
    tick()
    assert not fp.events(EV_WORKER_IDLE)  # once


def test_detaching_a_slot_the_slow_path_holds(fp: FastPath) -> None:
    worker, s, gen, sock = slow_path_request(fp)
    wait_until(lambda: kind_of(s.word) == CLAIMED)
    fp.e.engine.detach_worker(101)
    assert s.word == word(CLAIMED, DETACH, os.getpid(), gen)
    worker.release.set()
    assert read_all(sock).startswith(b"HTTP/1.1 200 OK")
    sock.close()
    wait_until(lambda: s.word == word(DETACHED, gen=gen))


# -- the sweep -------------------------------------------------------------------


def test_a_dead_claimant_fails_the_slot(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    s.word = word(CLAIMED, 0, dead_pid(), gen)
    ev = fp.e.wait_event(EV_WORKER_FAILED)
    assert ev.pid == 101
    assert s.word == word(FAILED, gen=gen)
    assert fp.e.worker_stats()[101].state == WORKER_DETACHED
    assert fp.nginx.row(1).open == 0
    tick()
    assert not fp.events(EV_WORKER_FAILED)  # once
    assert kind_of(s.word) == FAILED  # until the worker is removed
    fp.e.engine.remove_worker(101)
    assert s.word == 0


def test_a_claim_held_past_the_request_time_limit_times_out(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.engine.set_request_time(1, 100)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    s.word = word(CLAIMED, 0, os.getppid(), gen)
    s.claims += 1
    started = time.monotonic()
    ev = fp.e.wait_event(EV_REQUEST_TIMEOUT)
    assert ev.pid == 101 and ev.value >= 200
    assert time.monotonic() - started >= 0.2
    assert s.word == word(FAILED, TIMED_OUT, 0, gen)
    assert not fp.events(EV_WORKER_FAILED)


def test_a_claim_that_keeps_changing_hands_is_not_timed_out(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.engine.set_request_time(1, 100)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    s.word = word(CLAIMED, 0, os.getppid(), gen_of(s.word))
    for _ in range(8):  # a hand-off within nginx: claims += 1, no store
        s.claims += 1
        time.sleep(0.06)
    assert not fp.events(EV_REQUEST_TIMEOUT)
    assert kind_of(s.word) == CLAIMED


def test_a_slot_nginx_failed_is_reported_and_the_timed_out_one_as_a_timeout(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    fp.e.worker(1, 102)
    _, s = fp.nginx.slot_of(101)
    _, t = fp.nginx.slot_of(102)
    s.word = word(FAILED, gen=gen_of(s.word))
    t.word = word(FAILED, TIMED_OUT, gen=gen_of(t.word))
    assert fp.e.wait_event(EV_WORKER_FAILED).pid == 101
    assert fp.e.wait_event(EV_REQUEST_TIMEOUT).pid == 102
    assert fp.nginx.row(1).open == 0
    assert all(st.state == WORKER_DETACHED for st in fp.e.worker_stats().values())


@pytest.mark.parametrize("bad", [
    "generation", "kind", "free", "claimed_pid_0", "claimed_engine_pid", "pid_when_idle", "flags", "detached_active",
])
def test_a_word_nginx_could_not_have_written_fails_the_slot(fp: FastPath, bad: str) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    gen = gen_of(s.word)
    s.word = {
        "generation": word(IDLE, gen=gen + 1000),
        "kind": word(9, gen=gen),
        "free": word(FREE, gen=gen),
        "claimed_pid_0": word(CLAIMED, 0, 0, gen),
        "claimed_engine_pid": word(CLAIMED, 0, os.getpid(), gen),
        "pid_when_idle": word(IDLE, 0, 1234, gen),
        "flags": word(IDLE, 0x40, 0, gen),
        "detached_active": word(DETACHED, gen=gen),
    }[bad]
    assert fp.e.wait_event(EV_WORKER_FAILED).pid == 101
    assert s.word == word(FAILED, gen=gen)
    assert fp.e.worker_stats()[101].processed == 0
    assert fp.nginx.row(1).open == 0


def test_garbage_everywhere_leaves_the_engine_sound(fp: FastPath) -> None:
    rng = random.Random(9)
    fp.e.app(1, APP, max_queue=5, queue_timeout_ms=200)
    fp.e.app(63, "/srv/last")
    for pid in range(101, 109):
        fp.e.worker(1 if pid < 105 else 63, pid)
    for _ in range(10):
        fp.nginx.map.seek(0)
        garbage = bytearray(rng.randbytes(TABLE_SIZE))
        # Keep the header (nginx's master wrote it) but scramble everything else.
        fp.nginx.map[ctypes.sizeof(Header):] = bytes(garbage[ctypes.sizeof(Header):])
        tick()
        apps = fp.e.app_stats()
        assert apps[1].queue_length <= 5  # waiting clamped to max_queue
        assert apps[63].queue_length <= 1_000_000
        assert all(st.processed <= 10 * 1_000_000 for st in fp.e.worker_stats().values())
        fp.e.engine.requests()
        fp.e.engine.app_durations()
        fp.e.poll()
    # Every slot was failed and reported; the engine still answers.
    assert all(st.state == WORKER_DETACHED for st in fp.e.worker_stats().values())
    assert fp.request().startswith(b"HTTP/1.1 504 Gateway Timeout")


# -- stats -----------------------------------------------------------------------


def test_claims_by_nginx_count_as_processed_and_requests(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    _, s = fp.nginx.slot_of(101)
    before = fp.e.worker_stats()[101].last_used_ms
    s.claims += 5
    ev = fp.e.wait_event(EV_WORKER_IDLE)
    assert (ev.pid, ev.value) == (101, 5)
    stats = fp.e.worker_stats()[101]
    assert stats.processed == 5 and stats.last_used_ms > before
    assert fp.e.app_stats()[1].requests == 5
    s.claims += 10**12  # a jump is clamped per tick
    tick()
    assert fp.e.worker_stats()[101].processed == 5 + 1_000_000
    s.claims = 3  # backwards: nothing counted
    tick()
    assert fp.e.worker_stats()[101].processed == 5 + 1_000_000


def test_row_counters_are_merged_as_clamped_deltas(fp: FastPath) -> None:
    row = fp.nginx.row(1)
    row.queue_full, row.failed = 40, 40  # before the app: not its
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    row.queue_full += 3
    row.queue_timeouts += 2
    row.request_timeouts += 1
    row.failed += 4
    row.duration_buckets[0] += 6
    row.duration_buckets[11] += 1
    row.duration_sum_us += 123_456
    tick()
    stats = fp.e.app_stats()[1]
    assert (stats.queue_full, stats.queue_timeouts, stats.request_timeouts, stats.failed) == (3, 2, 1, 4)
    durations = fp.e.engine.app_durations()[1]
    assert durations.buckets[0] == 6 and durations.buckets[11] == 1 and durations.count == 7
    assert durations.sum_seconds == pytest.approx(0.123456)
    row.queue_full += 2**62
    row.duration_sum_us += 2**62  # no new durations: no time either
    tick()
    stats = fp.e.app_stats()[1]
    assert stats.queue_full == 3 + 1_000_000
    assert fp.e.engine.app_durations()[1].sum_seconds == pytest.approx(0.123456)


def test_requests_waiting_in_nginx_count_in_the_queue(fp: FastPath) -> None:
    fp.e.app(1, APP, max_queue=3)
    fp.e.app(2, "/srv/other")
    fp.e.worker(1, 101)
    fp.e.worker(2, 102)
    fp.nginx.row(1).waiting = 2
    assert fp.e.app_stats()[1].queue_length == 2
    ev = fp.e.wait_event(EV_QUEUED)
    assert (ev.app, ev.value) == (1, 2)
    fp.nginx.row(1).waiting = 4000
    fp.nginx.row(2).waiting = 0xFFFFFFFF
    stats = fp.e.app_stats()
    assert stats[1].queue_length == 3 and stats[2].queue_length == 1_000_000


def test_a_dead_nginx_process_gives_back_its_waiting_counts(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    procs = fp.nginx.table.procs
    row = fp.nginx.row(1)
    row.waiting = 5
    procs[3].pid = dead_pid()
    procs[3].waiting[1] = 3
    procs[3].oldest_ms[1] = 12345
    procs[4].pid = os.getppid()  # alive: kept
    procs[4].waiting[1] = 2
    procs[5].pid = 0xFFFFFFFF  # no such pid: cleared, never signalled
    procs[5].waiting[2] = 7
    tick()
    assert row.waiting == 2
    assert (procs[3].pid, procs[3].waiting[1], procs[3].oldest_ms[1]) == (0, 0, 0)
    assert (procs[4].pid, procs[4].waiting[1]) == (os.getppid(), 2)
    assert procs[5].pid == 0 and fp.nginx.row(2).waiting == 0
    procs[6].pid = dead_pid()
    procs[6].waiting[1] = 50  # more than the row says: the row stops at 0
    tick()
    assert row.waiting == 0


def test_requests_lists_what_nginx_serves(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    fp.e.worker(1, 102)
    _, s = fp.nginx.slot_of(101)
    _, t = fp.nginx.slot_of(102)
    now_ms = time.monotonic_ns() // 1_000_000
    s.claim_ms = now_ms - 1500
    s.method = b"PO\x01ST"
    s.uri = b"/a\x1b[31m\xff" + b"x" * 120  # fills the field: no NUL
    s.word = word(CLAIMED, 0, os.getppid(), gen_of(s.word))
    t.claim_ms = now_ms + 10**9  # in the future: age 0
    t.method = b"GET"
    t.uri = b"/b"
    t.word = word(CLAIMED, 0, os.getppid(), gen_of(t.word))
    reqs = {r.pid: r for r in fp.e.engine.requests()}
    assert set(reqs) == {101, 102}
    a, b = reqs[101], reqs[102]
    assert a.state == "forwarding" and a.app == 1 and 1.4 < a.age < 5
    assert a.method == "PO?ST" and a.path == "/a?[31m?" + "x" * 120 and len(a.path) == 128
    assert (b.age, b.method, b.path) == (0, "GET", "/b")
    t.word = word(IDLE, gen=gen_of(t.word))
    assert [r.pid for r in fp.e.engine.requests()] == [101]


# -- the core ----------------------------------------------------------------------


def test_the_core_attaches_once_the_table_is_there(bare: tuple[EngineHarness, str]) -> None:
    harness, directory = bare
    root = Path(directory)
    core: Any = SimpleNamespace(engine=harness.engine, instance=SimpleNamespace(root=root,
                                agent_socket=root / "agent.sock"), tickers=[])
    harness.app(1, APP)
    harness.worker(1, 101)
    attacher = FastPathAttacher(core)
    attacher.tick()
    assert not attacher.attached and attacher.last_error == errno.ENOENT
    make_table(str(root / FASTPATH_FILE))
    attacher.tick()
    assert attacher.attached and harness.engine.fastpath_attached()
    attacher.tick()  # no second attach
    nginx = Nginx(str(root / FASTPATH_FILE))
    try:  # what the engine had before is published by the attach
        assert nginx.row(1).open == 1 and kind_of(nginx.slot_of(101)[1].word) == IDLE
    finally:
        nginx.close()


def test_worker_stats_state_of_a_plain_worker_is_untouched(fp: FastPath) -> None:
    fp.e.app(1, APP)
    fp.e.worker(1, 101)
    tick()
    stats = fp.e.worker_stats()[101]
    assert (stats.state, stats.sessions, stats.processed) == (WORKER_ACTIVE, 0, 0)
