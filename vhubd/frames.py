"""BLIN v1 wire constants and the frame header layout (DESIGN §2).

Owns every number of the wire format; nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct

MAGIC = 0x424C494E
MAGIC_BYTES = b"NILB"  # MAGIC written little-endian
VERSION = 1
HEADER = struct.Struct("<IBBHIQ")
HEADER_SIZE = HEADER.size  # 20
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF
READY_PAYLOAD = b"blink-vhub-ready"
SESSIONS_PAGE = 1000  # vhub.sessions answers at most this many sessions; a shorter page is the last
PONG_PAYLOAD = b"pong"
# StreamData request_ids from here up name channels (exposed ports' connections,
# copies): point to point, never fanned out (docs/protocol.md, "Channels")
CHANNEL_BASE = 1 << 62
CHANNEL_WINDOW = 1 << 20  # bytes one side may have in flight toward the other, per channel
CHANNEL_FRAME = 128 * 1024  # largest channel StreamData payload (and below the cut-through size)
# The relay's RPC hot loop (csrc/route.h; the twin is _route_py.Router): the ids
# it hands out have this bit set, the Python relay's never do
ROUTE_ID_BIT = 1 << 63
ROUTE_FRAME_MAX = 65536  # larger frames go the Python way
ROUTE_METHOD_MAX = 64  # longer method names are not remembered
ROUTE_METHODS_MAX = 4096  # remembered methods; one more forgets them all
ROUTE_DEPTH_MAX = 32  # JSON nesting the loop accepts
ROUTE_DIGITS_MAX = 15  # digits of a JSON number's integer or fraction part


class MsgType(enum.IntEnum):
    HANDSHAKE = 0x01
    HEARTBEAT = 0x02
    ERROR = 0x03
    RPC_REQUEST = 0x10
    RPC_RESPONSE = 0x11
    RPC_ERROR = 0x12
    STREAM_DATA = 0x20
    TTY_RESIZE = 0x21
    STDOUT = 0x30
    STDERR = 0x31


KNOWN_TYPES = frozenset(int(t) for t in MsgType)
STREAM_TYPES = frozenset({MsgType.STDOUT, MsgType.STDERR, MsgType.STREAM_DATA})

# Bit of each type in a scan's type_mask (csrc/blin.h blin_type_bit).
TYPE_BIT = {int(t): 1 << i for i, t in enumerate(MsgType)}
STREAM_MASK = TYPE_BIT[MsgType.STDOUT] | TYPE_BIT[MsgType.STDERR] | TYPE_BIT[MsgType.STREAM_DATA]

# Codec status codes, shared by both backends and csrc/blin.h.
OK = 0
BAD_MAGIC = 1
BAD_VERSION = 2
UNKNOWN_TYPE = 3
FRAME_TOO_LARGE = 4
SHORT_BUFFER = 5

# What follows the last complete frame of a scan.
PENDING_NONE = 0
PENDING_HEADER = 1
PENDING_PAYLOAD = 2
PENDING_MORE = 3
