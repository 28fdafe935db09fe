"""C BLIN codec (csrc/blin.c through cffi): the twin of _codec_py.

Importing this module raises ImportError when the extension was not built.
"""

from __future__ import annotations

from ._blin import ffi, lib  # type: ignore[import-not-found]
from .errors import error_for_status
from .frames import HEADER_SIZE, KNOWN_TYPES, MAX_U32, MAX_U64, SHORT_BUFFER

NAME = "c"
_from_buffer = ffi.from_buffer
_buffer = ffi.buffer


def _writable(buf):
    try:
        return _from_buffer(buf, require_writable=True)
    except BufferError:
        raise TypeError("buffer is not writable") from None


def check_header(buf, offset: int = 0, avail: int | None = None, max_payload: int = MAX_U32) -> int:
    n = len(buf)
    if avail is None:
        avail = n - offset
    if offset < 0 or avail < 0 or offset + avail > n:
        raise ValueError("bad offset/avail for buffer")
    return lib.blin_check_header(_from_buffer(buf) + offset, avail, max_payload)


class Scanner:
    """Batch header scanner; see _codec_py.Scanner for the contract."""

    __slots__ = ("capacity", "_out", "_res", "_view")

    def __init__(self, capacity: int = 4096):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._out = ffi.new("blin_header_t[]", capacity)
        self._res = ffi.new("blin_scan_t *")
        self._view = memoryview(_buffer(self._out)).cast("Q")

    def scan(self, buf, start: int = 0, end: int | None = None, max_payload: int = MAX_U32):
        n = len(buf)
        if end is None:
            end = n
        if not 0 <= start <= end <= n:
            raise ValueError("bad start/end for buffer")
        if not 0 <= max_payload <= MAX_U32:
            raise ValueError("max_payload out of range")
        res = self._res
        lib.blin_scan(_from_buffer(buf), start, end, max_payload, self._out, self.capacity, res)
        return res.count, res.consumed, res.pending, res.status, res.error_offset, res.type_mask

    def headers(self) -> list[int]:
        return self._view[: self._res.count * 5].tolist()


def parse_header(buf, offset: int = 0, max_payload: int = MAX_U32):
    if offset < 0:
        raise ValueError("buffer too short for a BLIN header")
    out = ffi.new("blin_header_t *")
    status = lib.blin_parse_header(_from_buffer(buf), len(buf), offset, max_payload, out)
    if status == SHORT_BUFFER:
        raise ValueError("buffer too short for a BLIN header")
    if status:
        raise error_for_status(status, offset)
    return out.msg_type, out.flags, out.length, out.request_id


def _check_fields(msg_type: int, flags: int, length: int, request_id: int) -> None:
    if not 0 <= flags <= 0xFFFF or not 0 <= length <= MAX_U32 or not 0 <= request_id <= MAX_U64:
        raise ValueError("header field out of range")
    if msg_type not in KNOWN_TYPES:
        raise ValueError(f"unknown message type {msg_type!r}")


def pack_header(msg_type: int, request_id: int, length: int, flags: int = 0) -> bytes:
    _check_fields(msg_type, flags, length, request_id)
    out = bytearray(HEADER_SIZE)
    lib.blin_pack_header(_from_buffer(out), HEADER_SIZE, 0, msg_type, flags, length, request_id)
    return bytes(out)


def pack_header_into(buf, offset: int, msg_type: int, request_id: int, length: int, flags: int = 0) -> None:
    _check_fields(msg_type, flags, length, request_id)
    if offset < 0 or lib.blin_pack_header(
        _writable(buf), len(buf), offset, msg_type, flags, length, request_id
    ):
        raise ValueError("buffer too short for a BLIN header")


def frame_boundary(buf, min_offset: int) -> int:
    if min_offset < 0:
        raise ValueError("min_offset must be >= 0")
    return lib.blin_frame_boundary(_from_buffer(buf), len(buf), min_offset)


_old = ffi.new("uint64_t *")


def rewrite_request_id(buf, offset: int, new_id: int) -> int:
    if not 0 <= new_id <= MAX_U64:
        raise ValueError("request_id out of range")
    if offset < 0 or lib.blin_rewrite_request_id(
        _writable(buf), len(buf), offset, new_id, _old
    ):
        raise ValueError("buffer too short for a BLIN header")
    return _old[0]


def _check_route_args(buf, start: int, end: int) -> None:
    if not 0 <= start <= end <= len(buf):
        raise ValueError("bad start/end for buffer")


class Router:
    """The relay's RPC hot loop (csrc/route.c); see _route_py.Router for the contract."""

    __slots__ = ("_r", "_res")

    def __init__(self):
        r = lib.blin_router_new()
        if r == ffi.NULL:
            raise MemoryError("cannot allocate the RPC router")
        self._r = ffi.gc(r, lib.blin_router_free)
        self._res = ffi.new("blin_route_t *")

    def add(self, guest: bool, session: int, max_inflight: int) -> int:
        if not 0 <= session <= MAX_U32 or not 0 <= max_inflight <= MAX_U32:
            raise ValueError("session or max_inflight out of range")
        slot = lib.blin_router_add(self._r, 1 if guest else 0, session, max_inflight)
        if slot < 0:
            raise MemoryError("cannot grow the RPC router")
        return slot

    def release(self, slot: int) -> list[tuple[int, int]]:
        n = lib.blin_router_release(self._r, slot)
        calls = lib.blin_router_calls(self._r)
        return [(calls[i].origin, calls[i].origin_id) for i in range(n)]

    def expire(self, now: float) -> list[tuple[int, int, int]]:
        n = lib.blin_router_expire(self._r, now)
        calls = lib.blin_router_calls(self._r)
        return [(calls[i].dest, calls[i].origin, calls[i].origin_id) for i in range(n)]

    def learn(self, session: int, method: str, dest: int) -> None:
        try:
            raw = method.encode()
        except UnicodeEncodeError:
            return  # a lone surrogate: never the bytes of a routable payload
        if 0 <= session <= MAX_U32:
            lib.blin_router_learn(self._r, session, raw, len(raw), dest)

    def forget(self) -> None:
        lib.blin_router_forget(self._r)

    def route(self, slot: int, buf, start: int, end: int, max_payload: int, deadline: float, extra: int):
        _check_route_args(buf, start, end)
        res = self._res
        stop = lib.blin_route(self._r, slot, _from_buffer(buf), start, end, max_payload, deadline, extra, res)
        n = res.nout
        if not n:
            return stop, res.frames, res.forwarded, res.answered, []
        outs = res.outs
        return stop, res.frames, res.forwarded, res.answered, [
            (outs[i].slot, _buffer(outs[i].data, outs[i].len)[:]) for i in range(n)]

    def take(self, dest: int, request_id: int) -> tuple[int, int] | None:
        origin, origin_id = ffi.new("int32_t *"), ffi.new("uint64_t *")
        if 0 <= request_id <= MAX_U64 and lib.blin_router_take(self._r, dest, request_id, origin, origin_id):
            return origin[0], origin_id[0]
        return None

    def outstanding(self, slot: int) -> int:
        return lib.blin_router_outstanding(self._r, slot)

    def count(self) -> int:
        return lib.blin_router_count(self._r)

    def earliest(self) -> float | None:
        at = ffi.new("double *")
        return at[0] if lib.blin_router_earliest(self._r, at) else None


_off = ffi.new("size_t *")
_len = ffi.new("size_t *")


def route_method(payload) -> tuple[int, int] | None:
    """(offset, length) of the method in an RpcRequest payload the RPC hot loop may route, else None."""
    if lib.blin_route_method(_from_buffer(payload), len(payload), _off, _len):
        return _off[0], _len[0]
    return None



class Pump:
    """The stream pump; see _codec_py.Pump for the contract."""

    __slots__ = ("capacity", "_targets", "_res")

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._targets = ffi.new("blin_target_t[]", capacity)
        self._res = ffi.new("blin_pump_t *")

    def read(self, fd: int, buf, start: int, end: int, max_payload: int,
             fast_mask: int) -> tuple[int, int, int, int, int]:
        n = len(buf)
        if not 0 <= start <= end <= n:
            raise ValueError("bad start/end for buffer")
        res = self._res
        lib.blin_pump_read(fd, _writable(buf), start, end, n, max_payload, fast_mask, res)
        return res.nread, res.consumed, res.count, res.type_mask, res.need

    def send(self, data, type_mask: int, fds: list[int], wants: list[int]) -> list[int]:
        n = len(fds)
        if len(wants) != n or n > self.capacity:
            raise ValueError("targets: as many wants as fds, at most capacity")
        targets = self._targets
        for i in range(n):
            t = targets[i]
            t.fd = fds[i]
            t.want = wants[i]
        lib.blin_pump_send(_from_buffer(data), len(data), type_mask, targets, n)
        return [targets[i].sent for i in range(n)]
