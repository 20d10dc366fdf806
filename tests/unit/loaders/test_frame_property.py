"""Properties of the loader's request-frame parsing (docs/protocol.md §1),
checked with Hypothesis against a model: the vars of any frame come back as
the pairs that were encoded, however the bytes arrive; any other input is
a MalformedFrame, never another exception."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.loaders import wsgi_loader as loader
from agent.loaders.wsgi_loader import MalformedFrame

LATIN1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
KEYS = st.one_of(st.sampled_from(["HTTP_COOKIE", "HTTP_ACCEPT", "REQUEST_METHOD", "QUERY_STRING", "X", ""]),
                 st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", max_size=12), LATIN1)
PAIRS = st.lists(st.tuples(KEYS, LATIN1), max_size=12)
BASE = {"wsgi.version": (1, 0), "wsgi.multiprocess": True}


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


@given(PAIRS)
@example([("HTTP_COOKIE", "a=1"), ("HTTP_COOKIE", "b=2"), ("X", "1"), ("X", "2")])
def test_vars_decode_to_the_encoded_pairs(pairs: list[tuple[str, str]]) -> None:
    data = memoryview(encode(pairs))
    if any(key == "" for key, _ in pairs):
        try:
            loader.environ_from_vars(data, BASE)
        except MalformedFrame:
            return
        raise AssertionError("an empty key was accepted")
    assert loader.environ_from_vars(data, BASE) == model_environ(pairs)


@given(st.binary(max_size=200))
def test_any_vars_are_an_environ_or_malformed(data: bytes) -> None:
    try:
        environ = loader.environ_from_vars(memoryview(data), BASE)
    except MalformedFrame:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items() if k not in BASE)


@given(PAIRS, st.integers(min_value=1, max_value=200))
def test_a_truncated_vars_is_malformed(pairs: list[tuple[str, str]], cut: int) -> None:
    named = [(k or "K", v) for k, v in pairs] or [("K", "v")]
    data = encode(named)
    cut = min(cut, len(data))
    try:
        loader.environ_from_vars(memoryview(data[:-cut]), BASE)
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
    data, body_prefix = loader.receive_frame(conn, buf, view, first)  # type: ignore[arg-type]
    assert bytes(data) == vars_
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
        data, _ = loader.receive_frame(conn, buf, view, 0)  # type: ignore[arg-type]
    except MalformedFrame:
        assert not complete
        return
    assert complete and bytes(data) == stream[4:4 + size]


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
