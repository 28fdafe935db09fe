"""Frame helpers shared by the tests: build frames, read Error frames."""

from __future__ import annotations

import json
import struct

from vhubd.frames import MAGIC, MsgType
from vhubd.protocol import Connection, RemoteErrorEvent, Side, encode_frame

READY = b"blink-vhub-ready"
T = MsgType


def header(msg_type: int, length: int, rid: int, *, magic: int = MAGIC, version: int = 1, flags: int = 0) -> bytes:
    return struct.pack("<IBBHIQ", magic, version, msg_type, flags, length, rid)


def frame(msg_type: int, rid: int, payload=b"") -> bytes:
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return encode_frame(msg_type, rid, payload)


def error_of(raw: bytes):
    """(code, message) of the first Error frame in raw bytes, or None."""
    c = Connection(Side.CLIENT, cut_through=1 << 62)
    c.send_handshake()
    for ev in c.receive_data(raw):
        if isinstance(ev, RemoteErrorEvent):
            return ev.code, ev.message
    # the Error may come as the very first frame (before any handshake answer)
    if raw[:4] == b"NILB" and raw[5] == MsgType.ERROR:
        p = json.loads(raw[20:20 + int.from_bytes(raw[8:12], "little")])
        return p["code"], p["message"]
    return None
