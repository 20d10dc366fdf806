"""Properties of the loader's request-frame parsing (docs/protocol.md §1),
checked with Hypothesis against a model: the vars of any frame come back as
the pairs that were encoded, however the bytes arrive; any other input is
a MalformedFrame, never another exception. The vars are decoded by Python
code and by the C speedups (csrc/loader_speedups.c): both are held to it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.loaders import wsgi_loader as loader
from agent.loaders.wsgi_loader import MalformedFrame

LATIN1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
KEYS = st.one_of(st.sampled_from(["HTTP_COOKIE", "HTTP_ACCEPT", "REQUEST_METHOD", "QUERY_STRING", "X", ""]),
                 st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", max_size=12), LATIN1)
PAIRS = st.lists(st.tuples(KEYS, LATIN1), max_size=12)
BASE = {"wsgi.version": (1, 0), "wsgi.multiprocess": True}

Decode = Callable[[bytes, int, dict[str, Any]], dict[str, Any]]
DECODERS = pytest.mark.parametrize("decode", [loader.py_environ_from_vars, loader.c_environ_from_vars],
                                   ids=["python", "c"])


def decoded(decode: Decode, data: bytes) -> dict[str, Any]:
    """*data* as the vars of a frame: after the frame's 4-byte size."""
    return decode(bytes(4) + data, 4 + len(data), BASE)


def test_the_c_speedups_are_built_and_loaded() -> None:
    assert loader.SPEEDUPS is not None
    assert loader.environ_from_vars is loader.c_environ_from_vars
    assert loader.encode_head is loader.SPEEDUPS.encode_head


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def encode(pairs: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(u32(len(k.encode("latin-1"))) + k.encode("latin-1") + u32(len(v.encode("latin-1")))
                    + v.encode("latin-1") for k, v in pairs)


def model_environ(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Section 1: a repeated HTTP_ key is joined with ", " ("; " for
    cookies); any other repeated key keeps its last value."""
    environ: dict[str, Any] = dict(BASE)
    for key, value in pairs:
        if key in environ and key.startswith("HTTP_"):
            value = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
        environ[key] = value
    return environ


@DECODERS
@given(pairs=PAIRS)
@example(pairs=[("HTTP_COOKIE", "a=1"), ("HTTP_COOKIE", "b=2"), ("X", "1"), ("X", "2")])
@example(pairs=[("wsgi.version", "1")])
def test_vars_decode_to_the_encoded_pairs(decode: Decode, pairs: list[tuple[str, str]]) -> None:
    data = encode(pairs)
    if any(key == "" for key, _ in pairs):
        try:
            decoded(decode, data)
        except MalformedFrame:
            return
        raise AssertionError("an empty key was accepted")
    assert decoded(decode, data) == model_environ(pairs)


@DECODERS
@given(data=st.binary(max_size=200))
def test_any_vars_are_an_environ_or_malformed(decode: Decode, data: bytes) -> None:
    try:
        environ = decoded(decode, data)
    except MalformedFrame:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items() if k not in BASE)


@given(data=st.binary(max_size=200))
def test_the_c_and_python_decoders_agree_on_any_vars(data: bytes) -> None:
    outcomes = []
    for decode in (loader.py_environ_from_vars, loader.c_environ_from_vars):
        try:
            outcomes.append(decoded(decode, data))
        except MalformedFrame:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("end", [0, 3, 9])
def test_the_c_decoder_refuses_an_end_outside_the_buffer(end: int) -> None:
    with pytest.raises(MalformedFrame):
        loader.c_environ_from_vars(bytearray(8), end, BASE)


@DECODERS
@given(pairs=PAIRS, cut=st.integers(min_value=1, max_value=200))
def test_a_truncated_vars_is_malformed(decode: Decode, pairs: list[tuple[str, str]], cut: int) -> None:
    named = [(k or "K", v) for k, v in pairs] or [("K", "v")]
    data = encode(named)
    cut = min(cut, len(data))
    try:
        decoded(decode, data[:-cut])
    except MalformedFrame:
        return
    # Cutting whole pairs off the end leaves a shorter, valid vars.
    assert any(data[:-cut] == encode(named[:n]) for n in range(len(named)))


class Chunked:
    """A socket whose recv_into hands out the stream in the given pieces."""

    def __init__(self, stream: bytes, sizes: Sequence[int]) -> None:
        self.stream = stream
        self.sizes = list(sizes)

    def recv_into(self, view: memoryview) -> int:
        if not self.stream:
            return 0
        size = min(len(view), len(self.stream), self.sizes.pop(0) if self.sizes else len(self.stream))
        view[:size] = self.stream[:size]
        self.stream = self.stream[size:]
        return size


@settings(max_examples=300)
@given(PAIRS, st.binary(max_size=60), st.lists(st.integers(min_value=1, max_value=50), max_size=30),
       st.integers(min_value=8, max_value=128))
def test_a_frame_in_any_pieces_gives_its_vars_and_a_prefix_of_its_body(
        pairs: list[tuple[str, str]], body: bytes, sizes: list[int], buffer_size: int) -> None:
    vars_ = encode(pairs) or encode([("K", "")])
    stream = u32(len(vars_)) + vars_ + body
    conn = Chunked(stream, sizes)
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    first = conn.recv_into(view)
    buffer, end, body_prefix = loader.receive_frame(conn, buf, view, first)  # type: ignore[arg-type]
    assert bytes(buffer[4:end]) == vars_
    assert body.startswith(body_prefix)
    assert conn.stream == body[len(body_prefix):]


@given(st.binary(max_size=80), st.lists(st.integers(min_value=1, max_value=20), max_size=10))
def test_a_frame_cut_short_or_with_a_bad_size_is_malformed(stream: bytes, sizes: list[int]) -> None:
    (size,) = struct.unpack(">I", (stream + bytes(4))[:4])
    complete = len(stream) >= 4 + size and 0 < size <= loader.MAX_VARS_SIZE
    conn = Chunked(stream, sizes)
    buf = bytearray(64)
    view = memoryview(buf)
    try:
        buffer, end, _ = loader.receive_frame(conn, buf, view, 0)  # type: ignore[arg-type]
    except MalformedFrame:
        assert not complete
        return
    assert complete and bytes(buffer[4:end]) == stream[4:4 + size]


@given(st.one_of(st.none(), LATIN1, st.integers(min_value=0, max_value=10**15).map(str)))
@example("\u00b2")
@example("0")
@example("007")
def test_content_length_is_ascii_digits_or_malformed(value: str | None) -> None:
    environ = {} if value is None else {"CONTENT_LENGTH": value}
    valid = value is not None and value != "" and all("0" <= c <= "9" for c in value)
    try:
        length = loader.request_content_length(environ)
    except MalformedFrame:
        assert not valid
        return
    assert valid and value is not None and length == int(value)


# --------------------------------------------------------------------------
# The response head: Python and C encode the same, and refuse the same


TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=300), max_size=12)
STATUS = st.one_of(st.sampled_from(["200 OK", "404 Not Found", "204", "200", "2000 OK", "20 OK", "\u00b200 OK",
                                    "200\r\nX: y", "abc"]), TEXT)
HEADER = st.one_of(st.tuples(TEXT, TEXT), st.lists(TEXT, min_size=2, max_size=2), st.tuples(TEXT),
                   st.tuples(st.integers(), TEXT), st.just(("X-Split", "a\r\nInjected: 1")))


def outcome(encode: Callable[..., bytes], status: Any, headers: Any) -> bytes | None:
    try:
        return encode(status, headers)
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return None


@given(status=STATUS, headers=st.lists(HEADER, max_size=5))
@example(status="200 OK", headers=[("Content-Type", "text/plain"), ("Content-Length", "5")])
def test_the_c_and_python_heads_agree(status: str, headers: list[Any]) -> None:
    python = outcome(loader.py_encode_head, status, headers)
    assert outcome(loader.SPEEDUPS.encode_head, status, headers) == python
    if python is not None:
        # What is accepted is a head the engine can parse: one status line,
        # one line per header, a blank line, nothing else.
        assert python.count(b"\r\n") == len(headers) + 2 and python.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("encode", [loader.py_encode_head, loader.SPEEDUPS.encode_head], ids=["python", "c"])
@pytest.mark.parametrize(("status", "headers"), [
    ("200 OK", [("X-A", "1\n2")]),
    ("200 OK\r\nX-B: 2", []),
    ("200 OK", [("X-\rA", "1")]),
    ("OK 200", []),
    ("20", []),
    ("\u00b200 OK", []),
    ("200 OK", [("X-A", "\u20ac")]),
    ("200 OK", [("X-A", 1)]),
    ("200 OK", [("X-A", "1", "2")]),
    ("200 OK", None),
])
def test_a_bad_head_is_refused(encode: Callable[..., bytes], status: str, headers: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode(status, headers)
