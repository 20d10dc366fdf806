"""WebSockets (RFC 6455) for the ASGI loader: the checks of the opening
handshake, the accept key, and the frame codec.

FrameReader takes the client's bytes as they come, in pieces of any size,
and gives back whole messages (fragments joined), pings, pongs and the
close, one at a time. It holds at most one frame header, one control
payload (125 bytes) and the message being assembled (at most its limit):
a frame that would make the message larger is refused as soon as its
header is read. Anything RFC 6455 forbids raises ProtocolError with the
close code the server must send. encode_frame and encode_close make the
server's frames (unmasked); with a mask, a client's.

Standard library only; Python 3.9 and later. The core copies this file
next to asgi_loader.py (agent/core/spawner.py LOADER_MODULES).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# The largest message (all its fragments) a client may send; past it the
# connection is closed with 1009.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# RFC 6455 5.5: a control frame's payload.
MAX_CONTROL_PAYLOAD = 125
# The close reason fits in a control frame after its 2-byte code.
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2
# RFC 6455 1.3: appended to Sec-WebSocket-Key for Sec-WebSocket-Accept.
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005       # received a close without a code (never sent)
CLOSE_ABNORMAL = 1006        # the connection ended without a close (never sent)
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


class ProtocolError(Exception):
    """The client broke RFC 6455; *code* is the close code to send it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


class Received:
    """One thing the client sent: a whole message (``OP_TEXT`` with ``text``,
    ``OP_BINARY`` with ``data``), a ping or a pong (``data``), or the close
    (``code``, ``reason``; ``data`` is its payload, to echo)."""

    __slots__ = ("code", "data", "opcode", "reason", "text")

    def __init__(self, opcode: int, data: bytes = b"", text: str = "", code: int = 0, reason: str = "") -> None:
        self.opcode = opcode
        self.data = data
        self.text = text
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Received(opcode={self.opcode}, size={len(self.data) + len(self.text)}, code={self.code})"


# --------------------------------------------------------------------------
# The opening handshake (RFC 6455 4.2.1)


def handshake_problem(environ: Mapping[str, str]) -> str | None:
    """Why a request's CGI variables are not a WebSocket opening handshake
    a server may accept, or None when they are."""
    if environ.get("REQUEST_METHOD") != "GET":
        return "the method is not GET"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return "Sec-WebSocket-Version is not 13"
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        decoded = base64.b64decode(key.encode("latin-1"), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        return "Sec-WebSocket-Key is not 16 bytes in base64"
    if environ.get("CONTENT_LENGTH", "0") != "0":
        return "the request has a body"
    return None


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a request's Sec-WebSocket-Key."""
    digest = hashlib.sha1(key.strip().encode("latin-1") + ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def offered_subprotocols(header: str | None) -> list[str]:
    """The subprotocols a Sec-WebSocket-Protocol header offers, in order
    (several header lines arrive joined with ", ")."""
    if not header:
        return []
    return [name.strip() for name in header.split(",") if name.strip()]


# --------------------------------------------------------------------------
# Frames


def valid_close_code(code: int) -> bool:
    """A code an endpoint may put in a close frame (RFC 6455 7.4, and the
    registry's 1012-1014)."""
    return (1000 <= code <= 1014 and code not in (1004, CLOSE_NO_STATUS, CLOSE_ABNORMAL)) or 3000 <= code <= 4999


def unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """*data* XORed with the 4-byte *mask*, starting at the mask's byte
    *offset* (a frame's payload may arrive in pieces)."""
    size = len(data)
    if not size:
        return b""
    key = mask[offset:] + mask[:offset]
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame: unmasked (the server's), or masked with the 4 bytes of
    *mask* (a client's)."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        header = bytes((first, mask_bit | 126)) + _U16.pack(size)
    else:
        header = bytes((first, mask_bit | 127)) + _U64.pack(size)
    if mask is None:
        return header + payload
    return header + mask + unmask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload; the reason is cut to fit (at a character)."""
    reason_bytes = reason.encode("utf-8")
    if len(reason_bytes) > MAX_CLOSE_REASON:
        reason_bytes = reason_bytes[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(code) + reason_bytes


def encode_close(code: int, reason: str = "", mask: bytes | None = None) -> bytes:
    return encode_frame(OP_CLOSE, close_payload(code, reason), mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005 when it has none)."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a close frame of 1 byte")
    (code,) = _U16.unpack_from(payload)
    if not valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} is not one a peer may send")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "a close reason that is not UTF-8") from None
    return code, reason


class FrameReader:
    """The client's side of a connection, parsed: feed() the bytes as they
    arrive, then call next() until it returns None (more bytes needed).
    After a close, or once it raised ProtocolError, it returns None for
    good and drops what it is fed."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE, require_mask: bool = True) -> None:
        self.max_message_size = max_message_size
        self.require_mask = require_mask
        self.buffer = bytearray()
        self.done = False
        # The frame being read: its header is parsed once whole.
        self.in_frame = False
        self.fin = False
        self.opcode = 0
        self.mask = b""
        self.remaining = 0
        self.mask_offset = 0
        self.control = bytearray()
        # The message being assembled, across its fragments.
        self.message_opcode = 0  # 0: none
        self.message_size = 0
        self.parts: list[bytes] = []
        self.text_parts: list[str] = []
        self.decoder: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> None:
        if not self.done:
            self.buffer += data

    def next(self) -> Received | None:
        try:
            return self._next()
        except ProtocolError:
            self.done = True
            self.buffer.clear()
            self.parts.clear()
            self.text_parts.clear()
            raise

    def _next(self) -> Received | None:
        while not self.done:
            if not self.in_frame:
                whole = self._whole_message()
                if whole is not None:
                    return whole
                if not self._read_header():
                    return None
            elif self.remaining:
                if not self.buffer:
                    return None
                take = min(self.remaining, len(self.buffer))
                chunk = bytes(self.buffer[:take])
                del self.buffer[:take]
                if self.mask:
                    chunk = unmask(chunk, self.mask, self.mask_offset)
                    self.mask_offset = (self.mask_offset + take) % 4
                self.remaining -= take
                self._add_payload(chunk)
            if self.in_frame and not self.remaining:
                self.in_frame = False
                event = self._end_frame()
                if event is not None:
                    return event
        return None

    def _whole_message(self) -> Received | None:
        """The common case in one step: a masked text or binary frame that
        is a whole message (FIN, no fragment before it) of under 64 KiB,
        all in the buffer. None: not that case; the general path reads it."""
        buffer = self.buffer
        if self.message_opcode or len(buffer) < 6:
            return None
        first, second = buffer[0], buffer[1]
        if (first != 0x81 and first != 0x82) or not second & 0x80:
            return None
        length = second & 0x7F
        start = 6
        if length == 126:
            if len(buffer) < 8:
                return None
            (length,) = _U16.unpack_from(buffer, 2)
            start = 8
        elif length == 127:
            return None
        end = start + length
        if len(buffer) < end or length > self.max_message_size:
            return None
        payload = unmask(bytes(buffer[start:end]), bytes(buffer[start - 4 : start]))
        del buffer[:end]
        if first == 0x82:
            return Received(OP_BINARY, payload)
        try:
            return Received(OP_TEXT, text=payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(CLOSE_INVALID_DATA, "a text message that is not UTF-8") from None

    def _read_header(self) -> bool:
        buffer = self.buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        self._check_first_byte(first)
        masked = bool(second & 0x80)
        if self.require_mask and not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "an unmasked frame from the client")
        length = second & 0x7F
        size = 2
        if length == 126:
            size = 4
        elif length == 127:
            size = 10
        if first & 0x08 and length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a control frame over 125 bytes")
        if len(buffer) < size + (4 if masked else 0):
            return False
        if length == 126:
            (length,) = _U16.unpack_from(buffer, 2)
        elif length == 127:
            (length,) = _U64.unpack_from(buffer, 2)
            if length >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a frame length with its top bit set")
        opcode = first & 0x0F
        if opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION) and self.message_size + length > self.max_message_size:
            raise ProtocolError(CLOSE_TOO_BIG, f"a message over {self.max_message_size} bytes")
        self.mask = bytes(buffer[size : size + 4]) if masked else b""
        del buffer[: size + (4 if masked else 0)]
        self.in_frame = True
        self.fin = bool(first & 0x80)
        self.opcode = opcode
        self.remaining = length
        self.mask_offset = 0
        if opcode in (OP_TEXT, OP_BINARY):
            self.message_opcode = opcode
            if opcode == OP_TEXT:
                self.decoder = codecs.getincrementaldecoder("utf-8")()
        return True

    def _check_first_byte(self, first: int) -> None:
        if first & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a reserved bit is set")
        opcode = first & 0x0F
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode in CONTROL_OPCODES:
            if not first & 0x80:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a fragmented control frame")
        elif opcode == OP_CONTINUATION:
            if not self.message_opcode:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a continuation frame outside a message")
        elif self.message_opcode:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")

    def _add_payload(self, chunk: bytes) -> None:
        if self.opcode in CONTROL_OPCODES:
            self.control += chunk
            return
        self.message_size += len(chunk)
        if self.decoder is not None:
            try:
                self.text_parts.append(self.decoder.decode(chunk))
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "a text message that is not UTF-8") from None
        else:
            self.parts.append(chunk)

    def _end_frame(self) -> Received | None:
        opcode = self.opcode
        if opcode in CONTROL_OPCODES:
            payload = bytes(self.control)
            self.control.clear()
            if opcode == OP_CLOSE:
                code, reason = parse_close(payload)
                self.done = True
                self.buffer.clear()
                return Received(OP_CLOSE, payload, code=code, reason=reason)
            return Received(opcode, payload)
        if not self.fin:
            return None
        kind = self.message_opcode
        self.message_opcode = 0
        self.message_size = 0
        if self.decoder is not None:
            try:
                self.text_parts.append(self.decoder.decode(b"", True))
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "a text message that is not UTF-8") from None
            self.decoder = None
            text = "".join(self.text_parts)
            self.text_parts.clear()
            return Received(OP_TEXT, text=text)
        data = b"".join(self.parts)
        self.parts.clear()
        return Received(kind, data)
