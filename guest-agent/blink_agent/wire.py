"""The BLIN v1 wire format: constants, frame encoding and an incremental decoder.

Sans-I/O: bytes in, frames out. A frame is a 20-byte little-endian header
(``struct`` format ``<IBBHIQ``: magic, version, msg_type, flags, payload_len,
request_id) followed by ``payload_len`` bytes. The decoder validates each header
(magic, version, type, length, in that order) as soon as its 20 bytes are there and
before it buffers any of the payload, so an oversized length costs no memory.
This is the agent's own twin of the host codec: it shares the spec, not the code.
"""

from __future__ import annotations

import enum
import struct
from typing import Iterator, NamedTuple, Union

from .errors import ProtocolError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER",
    "HEADER_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "MsgType",
    "STREAM_TYPES",
    "Frame",
    "encode_header",
    "encode_frame",
    "FrameDecoder",
    "ProtocolError",
]

MAGIC = 0x424C494E
VERSION = 1
HEADER = struct.Struct("<IBBHIQ")
HEADER_SIZE = HEADER.size  # 20
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

Bytes = Union[bytes, bytearray, memoryview]


class MsgType(enum.IntEnum):
    Handshake = 0x01
    Heartbeat = 0x02
    Error = 0x03
    RpcRequest = 0x10
    RpcResponse = 0x11
    RpcError = 0x12
    StreamData = 0x20
    TtyResize = 0x21
    Stdout = 0x30
    Stderr = 0x31


_KNOWN_TYPES = frozenset(int(t) for t in MsgType)

#: Frame types that count as output in the ack/buffer contract.
STREAM_TYPES = frozenset((MsgType.Stdout, MsgType.Stderr, MsgType.StreamData))


class Frame(NamedTuple):
    msg_type: int
    flags: int
    request_id: int
    payload: bytes


def encode_header(msg_type: int, request_id: int, payload_len: int, flags: int = 0) -> bytes:
    """The 20 header bytes of a frame; raises ``ValueError`` on out-of-range fields."""
    if int(msg_type) not in _KNOWN_TYPES:
        raise ValueError(f"unknown BLIN message type {msg_type!r}")
    if not 0 <= request_id <= _U64:
        raise ValueError(f"request_id {request_id!r} is not a u64")
    if not 0 <= payload_len <= _U32:
        raise ValueError(f"payload of {payload_len} bytes does not fit a BLIN frame")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"flags {flags!r} is not a u16")
    return HEADER.pack(MAGIC, VERSION, int(msg_type), flags, payload_len, request_id)


def encode_frame(msg_type: int, request_id: int, payload: Bytes = b"", flags: int = 0) -> bytes:
    """One whole frame: header followed by ``payload``."""
    return encode_header(msg_type, request_id, len(payload), flags) + bytes(payload)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` yields every frame completed so far.

    A header that breaks the rules raises :class:`ProtocolError` (``bad_magic``,
    ``bad_version``, ``unknown_type``, ``frame_too_large``) from the header alone; the
    decoder is then unusable and every later ``feed`` raises the same error, because
    BLIN never resynchronises.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._header: tuple | None = None  # validated header whose payload is pending
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for EOF)."""
        return not self._buf and self._header is None

    def feed(self, data: Bytes) -> Iterator[Frame]:
        """Add received bytes (at once) and return an iterator over every frame now
        complete. A bad header raises :class:`ProtocolError` from the iterator, after
        the good frames before it were yielded."""
        if self._error is not None:
            raise self._error
        if data:
            self._buf += data
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        buf = self._buf
        while self._error is None:
            if self._header is None:
                if len(buf) < HEADER_SIZE:
                    return
                self._header = self._check_header(buf)
                del buf[:HEADER_SIZE]
            length = self._header[4]
            if len(buf) < length:
                return
            _magic, _version, msg_type, flags, _length, request_id = self._header
            payload = bytes(buf[:length])
            del buf[:length]
            self._header = None
            yield Frame(msg_type, flags, request_id, payload)

    def _check_header(self, buf: bytearray) -> tuple:
        fields = HEADER.unpack_from(buf, 0)
        magic, version, msg_type, _flags, length, _rid = fields
        if magic != MAGIC:
            self._fail("bad_magic", f"bad magic 0x{magic:08X} (expected 0x{MAGIC:08X})")
        if version != VERSION:
            self._fail("bad_version", f"unsupported BLIN version {version} (expected {VERSION})")
        if msg_type not in _KNOWN_TYPES:
            self._fail("unknown_type", f"unknown message type 0x{msg_type:02X}")
        if length > self.max_payload:
            self._fail(
                "frame_too_large",
                f"payload of {length} bytes exceeds the limit of {self.max_payload}",
            )
        return fields

    def _fail(self, code: str, message: str) -> None:
        self._error = ProtocolError(code, message)
        self._buf.clear()
        raise self._error
