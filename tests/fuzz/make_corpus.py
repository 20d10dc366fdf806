"""Writes the fuzzers' seed corpora: tests/fuzz/corpus/<harness>/<name>.

A handful of valid inputs and edge cases per harness (docs/protocol.md §1
and §2); libFuzzer mutates from there. Run it again after changing a seed:
`python3 tests/fuzz/make_corpus.py`. Each file's name says what it is.
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def pair(key: bytes, value: bytes) -> bytes:
    return u32(len(key)) + key + u32(len(value)) + value


def frame(*pairs: bytes, body: bytes = b"") -> bytes:
    """vars-size, vars, body, as nginx sends a request."""
    vars_ = b"".join(pairs)
    return u32(len(vars_)) + vars_ + body


REQUIRED = [
    pair(b"AGENT_APP", b"/srv/shop"),
    pair(b"REQUEST_METHOD", b"GET"),
    pair(b"REQUEST_URI", b"/a?b=c"),
]


def frames() -> dict[str, bytes]:
    get = frame(*REQUIRED, pair(b"CONTENT_LENGTH", b"0"))
    return {
        "get": get,
        "post_with_body": frame(*REQUIRED, pair(b"HTTP_X_TOKEN", b"a"), pair(b"CONTENT_LENGTH", b"5"), body=b"hello"),
        "cgi_and_headers": frame(
            *REQUIRED,
            pair(b"SERVER_PROTOCOL", b"HTTP/1.1"),
            pair(b"REMOTE_ADDR", b"127.0.0.1"),
            pair(b"HTTP_COOKIE", b"a=1"),
            pair(b"HTTP_COOKIE", b"b=2"),
            pair(b"CONTENT_LENGTH", b"0"),
        ),
        "long_length": frame(*REQUIRED, pair(b"CONTENT_LENGTH", b"1844674407370955161")),
        "truncated": get[:-3],
        "size_zero": u32(0),
        "size_over_cap": u32((1 << 20) + 1) + get[4:],
        "empty_key": frame(u32(0) + u32(0), *REQUIRED),
        "key_1025_bytes": frame(pair(b"K" * 1025, b"v")),
        "lowercase_key": frame(pair(b"agent_app", b"x")),
        "two_apps": frame(*REQUIRED, REQUIRED[0], pair(b"CONTENT_LENGTH", b"0")),
        "missing_app": frame(*REQUIRED[1:], pair(b"CONTENT_LENGTH", b"0")),
        "length_20_digits": frame(*REQUIRED, pair(b"CONTENT_LENGTH", b"1" * 20)),
        "value_runs_past": frame(*REQUIRED, u32(14) + b"CONTENT_LENGTH" + u32(9) + b"1"),
        "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }


def records(*payloads: bytes, end: bool = True) -> bytes:
    return b"".join(u32(len(p)) + p for p in payloads) + (u32(0) if end else b"")


RESPONSE = [b"HTTP/1.1 200 OK\r\n", b"Content-Type: text/plain\r\n\r\n", b"hello"]


def responses() -> dict[str, bytes]:
    """Two bytes that cut the stream into reads (see fuzz_records.c), then
    the stream."""
    return {
        "one_record": b"\x00\x01" + records(b"".join(RESPONSE)),
        "three_records": b"\x12\x34" + records(*RESPONSE),
        "byte_records": b"\xff\xff" + records(*(bytes([c]) for c in b"".join(RESPONSE))),
        "empty_response": b"\x00\x00" + records(),
        "no_end_record": b"\x01\x02" + records(*RESPONSE, end=False),
        "after_end": b"\x03\x04" + records(*RESPONSE) + records(b"HTTP/1.1 200 OK\r\n\r\n"),
        "huge_length": b"\x05\x06" + u32(0xFFFFFFFF) + RESPONSE[0],
        "not_records": b"\x07\x08" + b"".join(RESPONSE),
        "short_status": b"\x09\x0a" + records(b"HTTP/1."),
        "large_body": b"\x0b\x0c" + records(RESPONSE[0] + b"\r\n", bytes(range(256)) * 2),
    }


def write(harness: str, inputs: dict[str, bytes]) -> None:
    folder = HERE / "corpus" / harness
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in inputs.items():
        (folder / name).write_bytes(data)


if __name__ == "__main__":
    write("fuzz_frame", frames())
    write("fuzz_records", responses())
