"""The WebSocket codec of the ASGI loader (agent/loaders/asgi_websocket.py)
on its own: the handshake's checks and accept key, frames in and out,
messages in fragments and in pieces of any size (down to a byte at a
time), and every violation of RFC 6455 with its close code."""

from __future__ import annotations

import base64
import os

import pytest

from agent.loaders import asgi_websocket as ws
from agent.loaders.asgi_websocket import FrameReader, ProtocolError, Received

MASK = b"\x11\x22\x33\x44"


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = MASK) -> bytes:
    return ws.encode_frame(opcode, payload, fin=fin, mask=mask)


def read_all(reader: FrameReader, data: bytes, step: int | None = None) -> list[Received]:
    """Everything *data* gives, fed whole or *step* bytes at a time."""
    events: list[Received] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        reader.feed(piece)
        while (event := reader.next()) is not None:
            events.append(event)
    return events


def refused(data: bytes, **kwargs: int) -> ProtocolError:
    reader = FrameReader(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as raised:
        read_all(reader, data)
    # Once broken, the reader takes nothing more.
    reader.feed(client_frame(ws.OP_TEXT, b"x"))
    assert reader.next() is None
    return raised.value


# -- the handshake -----------------------------------------------------------

HANDSHAKE = {
    "REQUEST_METHOD": "GET",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "CONTENT_LENGTH": "0",
}


def test_the_accept_key_is_rfc_6455s_example() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_good_handshake_has_no_problem() -> None:
    assert ws.handshake_problem(HANDSHAKE) is None


@pytest.mark.parametrize(("change", "problem"), [
    ({"REQUEST_METHOD": "POST"}, "the method is not GET"),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "Sec-WebSocket-Version is not 13"),
    ({"HTTP_SEC_WEBSOCKET_VERSION": None}, "Sec-WebSocket-Version is not 13"),
    ({"HTTP_SEC_WEBSOCKET_KEY": None}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(b"x" * 15).decode()}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "not base64 at all!!!!!!!"}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==, dGhlIHNhbXBsZSBub25jZQ=="},
     "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "\u00e9" * 24}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"CONTENT_LENGTH": "5"}, "the request has a body"),
])
def test_a_bad_handshake_is_named(change: dict[str, str | None], problem: str) -> None:
    environ = {**HANDSHAKE, **change}
    environ = {key: value for key, value in environ.items() if value is not None}
    assert ws.handshake_problem(environ) == problem  # type: ignore[arg-type]


def test_offered_subprotocols_are_split_and_trimmed() -> None:
    assert ws.offered_subprotocols(None) == []
    assert ws.offered_subprotocols("") == []
    assert ws.offered_subprotocols("chat, superchat ,, v2.x") == ["chat", "superchat", "v2.x"]


# -- frames out --------------------------------------------------------------

@pytest.mark.parametrize(("size", "header"), [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"), (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_a_server_frame_is_unmasked_with_the_shortest_length(size: int, header: bytes) -> None:
    payload = os.urandom(size)
    assert ws.encode_frame(ws.OP_BINARY, payload) == header + payload


def test_a_close_frame_cuts_a_long_reason_at_a_character() -> None:
    frame = ws.encode_close(1000, "\u00e9" * 100)
    # 61 two-byte characters fit in the 123 bytes after the code; half of one would not be UTF-8.
    assert frame[:2] == b"\x88\x7c" and len(frame) == 2 + 2 + 122
    assert ws.parse_close(frame[2:]) == (1000, "\u00e9" * 61)
    assert ws.encode_close(4000) == b"\x88\x02\x0f\xa0"


def test_unmask_at_any_offset_matches_a_whole_unmask() -> None:
    data = os.urandom(1001)
    whole = ws.unmask(data, MASK)
    assert ws.unmask(whole, MASK) == data
    pieces, offset = [], 0
    for start in range(0, len(data), 7):
        pieces.append(ws.unmask(data[start : start + 7], MASK, offset))
        offset = (offset + 7) % 4
    assert b"".join(pieces) == whole


# -- frames in ---------------------------------------------------------------

@pytest.mark.parametrize("step", [None, 1, 3, 1000])
def test_messages_pings_and_the_close_come_out_whole_however_the_bytes_are_cut(step: int | None) -> None:
    big = os.urandom(70_000)
    stream = (
        client_frame(ws.OP_TEXT, "h\u00e9llo".encode())
        + client_frame(ws.OP_BINARY, big)
        + client_frame(ws.OP_TEXT, "fr\u00e9".encode()[:3], fin=False)  # cut inside the é
        + client_frame(ws.OP_PING, b"are you there")  # a control frame between fragments
        + client_frame(ws.OP_CONTINUATION, "fr\u00e9".encode()[3:], fin=False)
        + client_frame(ws.OP_CONTINUATION, b"!", fin=True)
        + client_frame(ws.OP_PONG, b"")
        + client_frame(ws.OP_BINARY, b"")
        + client_frame(ws.OP_CLOSE, ws.close_payload(4001, "bye"))
        + client_frame(ws.OP_TEXT, b"after the close: dropped")
    )
    events = read_all(FrameReader(), stream, step)
    assert [e.opcode for e in events] == [ws.OP_TEXT, ws.OP_BINARY, ws.OP_PING, ws.OP_TEXT, ws.OP_PONG,
                                          ws.OP_BINARY, ws.OP_CLOSE]
    assert events[0].text == "h\u00e9llo"
    assert events[1].data == big
    assert events[2].data == b"are you there"
    assert events[3].text == "fr\u00e9!"
    assert events[5].data == b""
    assert (events[6].code, events[6].reason) == (4001, "bye")
    assert events[6].data == ws.close_payload(4001, "bye")


def test_a_close_without_a_code_is_1005() -> None:
    (event,) = read_all(FrameReader(), client_frame(ws.OP_CLOSE, b""))
    assert (event.code, event.reason, event.data) == (ws.CLOSE_NO_STATUS, "", b"")


def test_the_reader_holds_no_more_than_what_it_was_fed_beyond_the_message() -> None:
    reader = FrameReader()
    frame = client_frame(ws.OP_BINARY, os.urandom(300_000))
    for start in range(0, len(frame) - 1, 65536):
        reader.feed(frame[start : min(start + 65536, len(frame) - 1)])
        assert reader.next() is None
        # The payload moves out of the raw buffer as it comes.
        assert len(reader.buffer) == 0
    reader.feed(frame[-1:])
    event = reader.next()
    assert event is not None and len(event.data) == 300_000


@pytest.mark.parametrize(("data", "code", "what"), [
    (ws.encode_frame(ws.OP_TEXT, b"hi"), 1002, "unmasked"),
    (bytes([0x80 | 0x40 | ws.OP_TEXT, 0x80]) + MASK, 1002, "reserved bit"),
    (bytes([0x80 | 0x10 | ws.OP_TEXT, 0x80]) + MASK, 1002, "reserved bit"),
    (bytes([0x83, 0x80]) + MASK, 1002, "unknown opcode 0x3"),
    (bytes([0x8B, 0x80]) + MASK, 1002, "unknown opcode 0xb"),
    (client_frame(ws.OP_PING, b"x" * 126), 1002, "control frame over 125 bytes"),
    (client_frame(ws.OP_PING, b"x", fin=False), 1002, "fragmented control frame"),
    (client_frame(ws.OP_CONTINUATION, b"x"), 1002, "continuation frame outside a message"),
    (client_frame(ws.OP_TEXT, b"a", fin=False) + client_frame(ws.OP_BINARY, b"b"), 1002, "new message inside"),
    (bytes([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]) + MASK, 1002, "top bit"),
    (client_frame(ws.OP_CLOSE, b"\x03"), 1002, "close frame of 1 byte"),
    (client_frame(ws.OP_CLOSE, b"\x03\xed"), 1002, "close code 1005"),
    (client_frame(ws.OP_CLOSE, b"\x03\xee"), 1002, "close code 1006"),
    (client_frame(ws.OP_CLOSE, b"\x03\xe7"), 1002, "close code 999"),
    (client_frame(ws.OP_CLOSE, b"\x13\x88"), 1002, "close code 5000"),
    (client_frame(ws.OP_CLOSE, b"\x03\xe8\xff"), 1007, "close reason"),
    (client_frame(ws.OP_TEXT, b"\xff"), 1007, "not UTF-8"),
    (client_frame(ws.OP_TEXT, b"\xc3"), 1007, "not UTF-8"),  # cut short at the message's end
    (client_frame(ws.OP_TEXT, b"\xed\xa0\x80", fin=False), 1007, "not UTF-8"),  # a surrogate, before the end
])
def test_violations_close_with_rfc_6455s_codes(data: bytes, code: int, what: str) -> None:
    error = refused(data)
    assert error.code == code
    assert what in error.reason


def test_a_message_over_the_limit_is_refused_at_the_header_of_the_frame_that_passes_it() -> None:
    assert refused(client_frame(ws.OP_BINARY, b"x" * 101), max_message_size=100).code == ws.CLOSE_TOO_BIG
    # Fragments count together; the frame that passes the limit is refused
    # from its header alone, before its payload is read.
    reader = FrameReader(max_message_size=100)
    assert read_all(reader, client_frame(ws.OP_BINARY, b"x" * 60, fin=False)) == []
    header = client_frame(ws.OP_CONTINUATION, b"y" * 41)[:6]
    with pytest.raises(ProtocolError) as raised:
        read_all(reader, header)
    assert raised.value.code == ws.CLOSE_TOO_BIG
    # A declared 2**62 bytes: refused, nothing allocated.
    huge = bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + MASK
    assert refused(huge).code == ws.CLOSE_TOO_BIG


def test_a_message_at_the_limit_is_taken() -> None:
    (event,) = read_all(FrameReader(max_message_size=100), client_frame(ws.OP_BINARY, b"x" * 100))
    assert event.data == b"x" * 100


def test_valid_close_codes() -> None:
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999):
        assert ws.valid_close_code(code), code
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        assert not ws.valid_close_code(code), code
