"""What a ``Connection`` reports: one event class per kind of thing that
arrived (see the package docstring for which frames come as which event)."""

from __future__ import annotations

import enum

import msgspec

from .. import codec, errors
from ..frames import HEADER_SIZE, MsgType

_json_decode = msgspec.json.decode


class Handshake:
    """The peer's handshake (server side) or the answer to ours (client side)."""

    __slots__ = ("request_id", "payload")

    def __init__(self, request_id: int, payload: memoryview):
        self.request_id = request_id
        self.payload = payload

    def __repr__(self) -> str:
        return f"Handshake(request_id={self.request_id}, payload={bytes(self.payload)!r})"


class Frame:
    """One complete frame after the handshake. ``data`` is header + payload."""

    __slots__ = ("msg_type", "flags", "request_id", "data")

    def __init__(self, msg_type: int, flags: int, request_id: int, data: memoryview):
        self.msg_type = msg_type
        self.flags = flags
        self.request_id = request_id
        self.data = data

    @property
    def payload(self) -> memoryview:
        return self.data[HEADER_SIZE:]

    def json(self):
        """The payload decoded as JSON; BadPayload if it is not."""
        try:
            return _json_decode(self.data[HEADER_SIZE:])
        except msgspec.DecodeError as exc:
            raise errors.BadPayload(f"payload of {MsgType(self.msg_type).name} is not JSON: {exc}") from None
        except RecursionError:
            raise errors.BadPayload(f"payload of {MsgType(self.msg_type).name} nests too deeply") from None

    def __repr__(self) -> str:
        return (f"Frame({MsgType(self.msg_type).name}, request_id={self.request_id}, "
                f"payload={bytes(self.data[HEADER_SIZE:HEADER_SIZE + 64])!r})")


class StreamRun:
    """Consecutive complete stream frames (Stdout/Stderr/StreamData), headers
    included, as one slice: forwarded with one write, no per-frame work."""

    __slots__ = ("data", "count", "type_mask")

    def __init__(self, data: memoryview, count: int, type_mask: int):
        self.data = data
        self.count = count
        self.type_mask = type_mask

    def frames(self) -> list[Frame]:
        """The run's frames, each a ``Frame`` whose ``data`` is a slice of the run."""
        sc = codec.Scanner(max(self.count, 1))
        sc.scan(self.data)
        flat = sc.headers()
        data = self.data
        return [Frame(flat[i + 1], flat[i + 2], flat[i + 4], data[flat[i]:flat[i] + HEADER_SIZE + flat[i + 3]])
                for i in range(0, len(flat), 5)]

    def __repr__(self) -> str:
        return f"StreamRun(count={self.count}, bytes={len(self.data)})"


class StreamStart:
    """Head of a large stream frame forwarded cut-through: ``data`` holds the
    header and the payload bytes present so far; ``remaining`` more follow as
    StreamChunk events."""

    __slots__ = ("msg_type", "flags", "request_id", "length", "data", "remaining")

    def __init__(self, msg_type, flags, request_id, length, data, remaining):
        self.msg_type = msg_type
        self.flags = flags
        self.request_id = request_id
        self.length = length
        self.data = data
        self.remaining = remaining


class StreamChunk:
    __slots__ = ("data", "remaining")

    def __init__(self, data: memoryview, remaining: int):
        self.data = data
        self.remaining = remaining


class Ping:
    """The peer pinged (the pong is already queued)."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: int):
        self.request_id = request_id


class Pong:
    __slots__ = ("request_id",)

    def __init__(self, request_id: int):
        self.request_id = request_id


class RemoteErrorEvent:
    """The peer sent an Error frame; the connection is closed."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RemoteErrorEvent({self.code!r}, {self.message!r})"


class Violation:
    """The peer broke the protocol; our Error frame is queued and the
    connection is closed."""

    __slots__ = ("error",)

    def __init__(self, error: errors.ProtocolError):
        self.error = error

    def __repr__(self) -> str:
        return f"Violation({self.error.code}: {self.error.message})"


class State(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for the peer's handshake (or its answer)
    OPEN = "open"
    CLOSED = "closed"


class Side(enum.Enum):
    SERVER = "server"  # the peer handshakes first; we answer (accept/reject)
    CLIENT = "client"  # we handshake first; the peer answers
