"""Pure-Python BLIN codec: the twin of csrc/blin.c, same functions, same results."""

from __future__ import annotations

import errno as _errno
import os as _os

from ._route_py import Router, route_method  # noqa: F401  (the RPC hot loop's twin)
from .errors import error_for_status
from .frames import (
    BAD_MAGIC,
    BAD_VERSION,
    FRAME_TOO_LARGE,
    HEADER,
    HEADER_SIZE,
    KNOWN_TYPES,
    MAGIC,
    MAGIC_BYTES,
    MAX_U32,
    MAX_U64,
    OK,
    PENDING_HEADER,
    PENDING_MORE,
    PENDING_NONE,
    PENDING_PAYLOAD,
    TYPE_BIT,
    UNKNOWN_TYPE,
    VERSION,
)

NAME = "python"
_unpack_from = HEADER.unpack_from
_pack_into = HEADER.pack_into
_u64 = __import__("struct").Struct("<Q")


def check_header(buf, offset: int = 0, avail: int | None = None, max_payload: int = MAX_U32) -> int:
    """Status of the (possibly partial) header at ``buf[offset:]``."""
    n = len(buf)
    if avail is None:
        avail = n - offset
    if offset < 0 or avail < 0 or offset + avail > n:
        raise ValueError("bad offset/avail for buffer")
    m = avail if avail < 4 else 4
    if bytes(buf[offset:offset + m]) != MAGIC_BYTES[:m]:
        return BAD_MAGIC
    if avail > 4 and buf[offset + 4] != VERSION:
        return BAD_VERSION
    if avail > 5 and buf[offset + 5] not in KNOWN_TYPES:
        return UNKNOWN_TYPE
    if avail >= 12 and int.from_bytes(buf[offset + 8:offset + 12], "little") > max_payload:
        return FRAME_TOO_LARGE
    return OK


class Scanner:
    """Batch header scanner. ``scan`` returns (count, consumed, pending, status,
    error_offset, type_mask); ``headers()`` the flat list [offset, type, flags, length,
    request_id] * count of the last scan."""

    __slots__ = ("capacity", "_flat")

    def __init__(self, capacity: int = 4096):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._flat: list[int] = []

    def scan(self, buf, start: int = 0, end: int | None = None, max_payload: int = MAX_U32):
        if end is None:
            end = len(buf)
        if not 0 <= start <= end <= len(buf):
            raise ValueError("bad start/end for buffer")
        if not 0 <= max_payload <= MAX_U32:
            raise ValueError("max_payload out of range")
        flat: list[int] = []
        append = flat.extend
        pos = start
        count = 0
        cap = self.capacity
        pending = PENDING_NONE
        status = OK
        mask = 0
        while pos < end:
            avail = end - pos
            if count == cap:
                pending = PENDING_MORE
                break
            if avail < HEADER_SIZE:
                status = check_header(buf, pos, avail, max_payload)
                if status == OK:
                    pending = PENDING_HEADER
                break
            magic, version, mtype, flags, length, rid = _unpack_from(buf, pos)
            if magic != MAGIC:
                status = BAD_MAGIC
                break
            if version != VERSION:
                status = BAD_VERSION
                break
            if mtype not in KNOWN_TYPES:
                status = UNKNOWN_TYPE
                break
            if length > max_payload:
                status = FRAME_TOO_LARGE
                break
            if avail - HEADER_SIZE < length:
                pending = PENDING_PAYLOAD
                break
            append((pos, mtype, flags, length, rid))
            mask |= TYPE_BIT[mtype]
            count += 1
            pos += HEADER_SIZE + length
        self._flat = flat
        return count, pos, pending, status, (pos if status else 0), mask

    def headers(self) -> list[int]:
        return self._flat


def parse_header(buf, offset: int = 0, max_payload: int = MAX_U32):
    """(msg_type, flags, length, request_id) of the header at ``buf[offset:]``;
    raises the ProtocolError of the first violation, ValueError if short."""
    if offset < 0 or len(buf) - offset < HEADER_SIZE:
        raise ValueError("buffer too short for a BLIN header")
    status = check_header(buf, offset, HEADER_SIZE, max_payload)
    if status:
        raise error_for_status(status, offset)
    _, _, mtype, flags, length, rid = _unpack_from(buf, offset)
    return mtype, flags, length, rid


def _check_fields(msg_type: int, flags: int, length: int, request_id: int) -> None:
    if not 0 <= flags <= 0xFFFF or not 0 <= length <= MAX_U32 or not 0 <= request_id <= MAX_U64:
        raise ValueError("header field out of range")
    if msg_type not in KNOWN_TYPES:
        raise ValueError(f"unknown message type {msg_type!r}")


def pack_header(msg_type: int, request_id: int, length: int, flags: int = 0) -> bytes:
    _check_fields(msg_type, flags, length, request_id)
    return HEADER.pack(MAGIC, VERSION, msg_type, flags, length, request_id)


def pack_header_into(buf, offset: int, msg_type: int, request_id: int, length: int, flags: int = 0) -> None:
    _check_fields(msg_type, flags, length, request_id)
    if offset < 0 or len(buf) - offset < HEADER_SIZE:
        raise ValueError("buffer too short for a BLIN header")
    _pack_into(buf, offset, MAGIC, VERSION, msg_type, flags, length, request_id)


def frame_boundary(buf, min_offset: int) -> int:
    """Walking whole frames from ``buf[0]``, the first frame boundary at or
    after ``min_offset`` (``len(buf)`` when the walk runs past the end)."""
    n = len(buf)
    if min_offset < 0:
        raise ValueError("min_offset must be >= 0")
    pos = 0
    while pos < min_offset:
        if n - pos < HEADER_SIZE:
            return n
        pos += HEADER_SIZE + int.from_bytes(buf[pos + 8:pos + 12], "little")
        if pos > n:
            return n
    return pos


def rewrite_request_id(buf, offset: int, new_id: int) -> int:
    """Replace the request_id of the header at ``buf[offset:]`` in place; return the old one."""
    if not 0 <= new_id <= MAX_U64:
        raise ValueError("request_id out of range")
    if offset < 0 or len(buf) - offset < HEADER_SIZE:
        raise ValueError("buffer too short for a BLIN header")
    old = _u64.unpack_from(buf, offset + 12)[0]
    _u64.pack_into(buf, offset + 12, new_id)
    return old



class Pump:
    """The stream pump (csrc/pump.h). ``read`` reads once from a guest's
    socket into ``buf[end:]`` and returns (nread, consumed, count, type_mask,
    need): nread as the syscall (-errno on error), then the prefix of whole
    frames from ``start`` whose types are all in ``fast_mask`` (it ends at
    ``consumed``), and ``need``, the size of a frame of those types that
    follows it incomplete (0: anything else follows). ``send`` offers such a
    prefix to each target socket without blocking and returns what each took
    (-1: not offered, its ``want`` lacks a type of the prefix)."""

    __slots__ = ("capacity",)

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity

    def read(self, fd: int, buf, start: int, end: int, max_payload: int,
             fast_mask: int) -> tuple[int, int, int, int, int]:
        if not 0 <= start <= end <= len(buf):
            raise ValueError("bad start/end for buffer")
        while True:
            try:
                nread = _os.readv(fd, [memoryview(buf)[end:]])
                break
            except InterruptedError:
                continue
            except OSError as exc:
                return -(exc.errno or _errno.EIO), start, 0, 0, 0
        if nread == 0:
            return 0, start, 0, 0, 0
        end += nread
        pos, count, mask, need = start, 0, 0, 0
        while end - pos >= HEADER_SIZE:
            magic, version, mtype, _, length, _ = _unpack_from(buf, pos)
            if magic != MAGIC or version != VERSION or mtype not in KNOWN_TYPES or length > max_payload:
                break  # the checks of check_header, in its order: left to the Connection
            bit = TYPE_BIT[mtype]
            if not bit & fast_mask:
                break
            if end - pos - HEADER_SIZE < length:
                need = HEADER_SIZE + length
                break
            mask |= bit
            count += 1
            pos += HEADER_SIZE + length
        return nread, pos, count, mask, need

    def send(self, data, type_mask: int, fds: list[int], wants: list[int]) -> list[int]:
        if len(fds) != len(wants) or len(fds) > self.capacity:
            raise ValueError("targets: as many wants as fds, at most capacity")
        sent = [-1] * len(fds)
        for i, target in enumerate(fds):
            if type_mask & ~wants[i]:
                continue
            while True:
                try:
                    sent[i] = _os.write(target, data)  # SIGPIPE is ignored in Python: EPIPE is an OSError
                    break
                except InterruptedError:
                    continue
                except OSError:
                    sent[i] = 0
                    break
        return sent
