"""The loader's system calls per request (docs/design.md, "The loader's
system calls"): one receive for a frame that fits the buffer, one send for a
whole response, a large chunk gathered by sendmsg() rather than copied, and
a sendmsg() cut short by a signal finished with the rest, in order.

serve_request runs in-process, request after request, on a connection that
records each call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from agent.loaders import wsgi_loader as loader

from .test_wsgi_loader import build_frame, parse_reply, request_pairs

TEXT = [("Content-Type", "text/plain")]


class RecordingConn:
    """Serves the given frames, one per recv_into(), then end of file;
    keeps every byte sent and the name of each call. sendmsg() sends at
    most `sendmsg_limit` bytes per call, as a signal could make it."""

    def __init__(self, frames: list[bytes], sendmsg_limit: int | None = None) -> None:
        self.frames = list(frames)
        self.sendmsg_limit = sendmsg_limit
        self.calls: list[str] = []
        self.out = bytearray()

    def recv_into(self, buf: Any, size: int = 0) -> int:
        self.calls.append("recv")
        if not self.frames:
            return 0
        frame = self.frames.pop(0)
        buf[: len(frame)] = frame
        return len(frame)

    def recv(self, size: int) -> bytes:
        raise AssertionError("no request body to receive")

    def sendall(self, data: Any) -> None:
        self.calls.append("sendall")
        self.out += data

    def sendmsg(self, parts: list[Any]) -> int:
        self.calls.append("sendmsg")
        data = b"".join(bytes(part) for part in parts)
        if self.sendmsg_limit is not None:
            data = data[: self.sendmsg_limit]
        self.out += data
        return len(data)

    def fileno(self) -> int:
        return -1


def split_responses(raw: bytes) -> list[tuple[bytes, list[int]]]:
    """The responses on the wire: each one's bytes and record sizes."""
    responses = []
    pos = 0
    while pos < len(raw):
        body = bytearray()
        records = []
        while True:
            (size,) = struct.unpack_from(">I", raw, pos)
            pos += 4
            if size == 0:
                break
            records.append(size)
            body += raw[pos : pos + size]
            pos += size
        responses.append((bytes(body), records))
    return responses


def serve(app: Callable[..., Iterable[bytes]], requests: int = 1, sendmsg_limit: int | None = None) -> RecordingConn:
    conn = RecordingConn([build_frame(request_pairs("/"))] * requests, sendmsg_limit)
    buf = bytearray(loader.RECV_BUFFER_SIZE)
    view, base = memoryview(buf), loader.wsgi_environ_base()
    while loader.serve_request(conn, app, buf, view, base):  # type: ignore[arg-type]
        pass
    return conn


def body_app(chunks: list[bytes], as_list: bool = True) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        if as_list:
            return list(chunks)

        def generate() -> Iterator[bytes]:
            yield from chunks

        return generate()

    return app


def test_a_small_response_is_one_send_per_request() -> None:
    conn = serve(body_app([b"Hello, world\n"]), requests=3)
    # Three requests, then the end of file that closes the connection.
    assert conn.calls == ["recv", "sendall"] * 3 + ["recv"]
    for body, records in split_responses(bytes(conn.out)):
        assert parse_reply(body).body == b"Hello, world\n"
        assert len(records) == 1


@pytest.mark.parametrize("size", [loader.COALESCE_LIMIT + 1, 100 * 1024, 300_000])
def test_a_large_single_chunk_is_one_sendmsg(size: int) -> None:
    conn = serve(body_app([b"x" * size]))
    assert conn.calls == ["recv", "sendmsg", "recv"]
    ((raw, records),) = split_responses(bytes(conn.out))
    assert parse_reply(raw).body == b"x" * size
    assert len(records) == 1


def test_a_chunk_at_the_limit_is_copied_into_one_send() -> None:
    conn = serve(body_app([b"x" * loader.COALESCE_LIMIT]))
    assert conn.calls == ["recv", "sendall", "recv"]


@pytest.mark.parametrize("as_list", [True, False])
def test_large_chunks_in_sequence(as_list: bool) -> None:
    chunks = [b"a" * 40_000, b"b" * 10, b"c" * 70_000]
    conn = serve(body_app(chunks, as_list))
    ((raw, _),) = split_responses(bytes(conn.out))
    assert parse_reply(raw).body == b"".join(chunks)
    # One call per chunk: the head goes with the first, the end record
    # with the last (a generator's end is known only after its last chunk).
    expected = ["sendmsg", "sendall", "sendmsg"] if as_list else ["sendmsg", "sendall", "sendmsg", "sendall"]
    assert conn.calls == ["recv", *expected, "recv"]


@pytest.mark.parametrize("limit", [1, 3, 4, 50, 100 * 1024 + 60])
def test_a_sendmsg_cut_short_sends_the_rest_in_order(limit: int) -> None:
    size = 100 * 1024
    conn = serve(body_app([b"y" * size]), requests=2, sendmsg_limit=limit)
    responses = split_responses(bytes(conn.out))
    assert [parse_reply(raw).body for raw, _ in responses] == [b"y" * size] * 2


def test_a_large_body_that_is_not_bytes_is_answered_500() -> None:
    conn = serve(body_app(["x" * 100_000]))  # type: ignore[list-item]
    ((raw, _),) = split_responses(bytes(conn.out))
    assert parse_reply(raw).status == 500


def test_requests_without_a_body_share_the_empty_input() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen.append(stream)
        assert stream.read() == b""
        assert stream.read(10) == b""
        assert stream.readline() == b""
        assert stream.readlines() == []
        assert list(stream) == []
        start_response("200 OK", TEXT)
        return [b"ok"]

    serve(app, requests=2)
    assert seen[0] is seen[1] is loader.EMPTY_INPUT
    assert loader.EMPTY_INPUT.unread == 0
