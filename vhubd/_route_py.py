"""The relay's RPC hot loop in pure Python: the twin of csrc/route.c (the
payload rules, the router), same decisions, same bytes. vhubd._codec_py
exports it as the pure-Python backend's ``Router`` and ``route_method``."""

from __future__ import annotations

import struct

from .frames import (
    HEADER,
    HEADER_SIZE,
    KNOWN_TYPES,
    MAGIC,
    MAX_U32,
    MAX_U64,
    ROUTE_DEPTH_MAX,
    ROUTE_DIGITS_MAX,
    ROUTE_FRAME_MAX,
    ROUTE_ID_BIT,
    ROUTE_METHOD_MAX,
    ROUTE_METHODS_MAX,
    VERSION,
)

_unpack_from = HEADER.unpack_from
_u64 = struct.Struct("<Q")


_RPC_REQUEST, _RPC_RESPONSE, _RPC_ERROR = 0x10, 0x11, 0x12
_WS = frozenset(b" \t\n\r")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGITS = frozenset(b"0123456789")


def _skip_ws(p, n: int, i: int) -> int:
    while i < n and p[i] in _WS:
        i += 1
    return i


def _skip_string(p, n: int, i: int) -> tuple[int, bool]:
    """The string at p[i] == '"': (index past its closing quote, escaped); 0 if invalid."""
    escaped = False
    i += 1
    while i < n:
        c = p[i]
        if c == 0x22:
            return i + 1, escaped
        if c < 0x20 or c >= 0x7F:
            return 0, escaped
        if c == 0x5C:
            if i + 1 >= n or p[i + 1] not in _ESCAPES:
                return 0, escaped
            escaped = True
            i += 1
        i += 1
    return 0, escaped


def _skip_digits(p, n: int, i: int) -> tuple[int, int]:
    start = i
    while i < n and p[i] in _DIGITS:
        i += 1
    return i, i - start


def _skip_number(p, n: int, i: int) -> int:
    if i < n and p[i] == 0x2D:  # -
        i += 1
    if i >= n or p[i] not in _DIGITS:
        return 0
    if p[i] == 0x30:
        i += 1
    else:
        i, d = _skip_digits(p, n, i)
        if d > ROUTE_DIGITS_MAX:
            return 0
    if i < n and p[i] == 0x2E:  # .
        i, d = _skip_digits(p, n, i + 1)
        if d == 0 or d > ROUTE_DIGITS_MAX:
            return 0
    if i < n and p[i] in (0x65, 0x45):  # e E
        return 0
    return i


def route_method(p) -> tuple[int, int] | None:
    """(offset, length) of the method in an RpcRequest payload the RPC hot loop
    may route, else None. The rules (csrc/route.c has them in words): a JSON
    object, ASCII only, no \\u escape, numbers without exponent and at most
    ROUTE_DIGITS_MAX digits a part, nesting at most ROUTE_DEPTH_MAX, a top-level
    "method" key exactly once whose value is 1..ROUTE_METHOD_MAX bytes without escapes."""
    p = bytes(p)
    n = len(p)
    i = _skip_ws(p, n, 0)
    if i >= n or p[i] != 0x7B:
        return None
    stack = [0x7D]  # the closer each open container waits for
    found = None
    i = _skip_ws(p, n, i + 1)
    if i < n and p[i] == 0x7D:
        return None
    while True:
        value_done = False
        if stack[-1] == 0x7D:  # a member: key first
            if i >= n or p[i] != 0x22:
                return None
            j, escaped = _skip_string(p, n, i)
            if not j:
                return None
            is_method = len(stack) == 1 and not escaped and p[i + 1:j - 1] == b"method"
            i = _skip_ws(p, n, j)
            if i >= n or p[i] != 0x3A:
                return None
            i = _skip_ws(p, n, i + 1)
            if is_method:
                if found is not None or i >= n or p[i] != 0x22:
                    return None
                j, escaped = _skip_string(p, n, i)
                if not j or escaped or not 0 < j - i - 2 <= ROUTE_METHOD_MAX:
                    return None
                found = (i + 1, j - i - 2)
                i = j
                value_done = True
        if not value_done:
            if i >= n:
                return None
            c = p[i]
            if c == 0x7B or c == 0x5B:
                if len(stack) == ROUTE_DEPTH_MAX:
                    return None
                stack.append(0x7D if c == 0x7B else 0x5D)
                i = _skip_ws(p, n, i + 1)
                if i < n and p[i] == stack[-1]:
                    stack.pop()
                    i += 1
                else:
                    continue
            else:
                if c == 0x22:
                    j = _skip_string(p, n, i)[0]
                elif c == 0x74:
                    j = i + 4 if p[i:i + 4] == b"true" else 0
                elif c == 0x66:
                    j = i + 5 if p[i:i + 5] == b"false" else 0
                elif c == 0x6E:
                    j = i + 4 if p[i:i + 4] == b"null" else 0
                else:
                    j = _skip_number(p, n, i)
                if not j:
                    return None
                i = j
        while True:  # after a value: a comma, or closers
            i = _skip_ws(p, n, i)
            if i >= n:
                return None
            if p[i] == 0x2C:
                i = _skip_ws(p, n, i + 1)
                break
            if p[i] != stack[-1]:
                return None
            stack.pop()
            i += 1
            if not stack:
                if _skip_ws(p, n, i) != n or found is None:
                    return None
                return found


class _Slot:
    __slots__ = ("guest", "session", "max_inflight", "outstanding", "next_id")

    def __init__(self, guest: bool, session: int, max_inflight: int):
        self.guest = guest
        self.session = session
        self.max_inflight = max_inflight
        self.outstanding = 0
        self.next_id = ROUTE_ID_BIT | 1


class Router:
    """The relay's RPC hot loop, twin of csrc/route.c: same decisions, same bytes.

    Peers are slots (``add``; ``release`` when gone). ``route(slot, buf, start,
    end, max_payload, deadline, extra)`` consumes, from a guest slot, the
    RpcRequests whose method ``learn`` named a handler for (each gets an id of
    the handler's, ROUTE_ID_BIT set, and is remembered until its answer,
    ``release`` of the handler or ``expire``), and from a client slot the
    answers to them (their id back to the guest's); it stops at the first
    frame that is anything else (incomplete, larger than ROUTE_FRAME_MAX, a
    payload ``route_method`` refuses, an unknown method, the guest's calls at
    ``max_inflight`` with ``extra`` counted). Returns (stop offset, frames,
    forwarded, answered, [(slot, bytes) per peer written to, in first-write
    order]). The receive buffer is never written.
    """

    __slots__ = ("_slots", "_flights", "_methods")

    def __init__(self):
        self._slots: list[_Slot | None] = []
        self._flights: dict[tuple[int, int], tuple[int, int, float]] = {}  # (dest, id) -> (origin, its id, deadline)
        self._methods: dict[tuple[int, bytes], int] = {}

    def _valid(self, slot: int) -> _Slot | None:
        return self._slots[slot] if 0 <= slot < len(self._slots) else None

    def add(self, guest: bool, session: int, max_inflight: int) -> int:
        if not 0 <= session <= MAX_U32 or not 0 <= max_inflight <= MAX_U32:
            raise ValueError("session or max_inflight out of range")
        slots = self._slots
        i = next((k for k, s in enumerate(slots) if s is None), len(slots))
        if i == len(slots):
            slots.append(None)
        slots[i] = _Slot(bool(guest), session, max_inflight)
        return i

    def _end(self, match) -> list[tuple[int, int, int, int]]:
        ended = sorted((dest, rid, entry[0], entry[1]) for (dest, rid), entry in self._flights.items()
                       if match(dest, entry))
        for dest, rid, origin, _ in ended:
            del self._flights[dest, rid]
            self._slots[origin].outstanding -= 1  # type: ignore[union-attr]
        return ended

    def release(self, slot: int) -> list[tuple[int, int]]:
        if self._valid(slot) is None:
            return []
        ended = self._end(lambda dest, entry: dest == slot)
        for key in [k for k, entry in self._flights.items() if entry[0] == slot]:
            del self._flights[key]
        self._slots[slot] = None
        self._methods.clear()
        return [(origin, origin_id) for _, _, origin, origin_id in ended]

    def expire(self, now: float) -> list[tuple[int, int, int]]:
        return [(dest, origin, origin_id) for dest, _, origin, origin_id in
                self._end(lambda dest, entry: entry[2] <= now)]

    def learn(self, session: int, method: str, dest: int) -> None:
        try:
            raw = method.encode()
        except UnicodeEncodeError:
            return
        d = self._valid(dest)
        if not 0 < len(raw) <= ROUTE_METHOD_MAX or d is None or d.guest or not 0 <= session <= MAX_U32:
            return
        key = (session, raw)
        if key not in self._methods and len(self._methods) >= ROUTE_METHODS_MAX:
            self._methods.clear()  # bounded: whatever a guest calls
        self._methods[key] = dest

    def forget(self) -> None:
        self._methods.clear()

    def route(self, slot: int, buf, start: int, end: int, max_payload: int, deadline: float, extra: int):
        if not 0 <= start <= end <= len(buf):
            raise ValueError("bad start/end for buffer")
        pos = start
        frames = forwarded = answered = 0
        outs: dict[int, bytearray] = {}
        s = self._valid(slot)
        mv = memoryview(buf)
        flights = self._flights
        while s is not None and end - pos >= HEADER_SIZE:
            magic, version, mtype, _, length, rid = _unpack_from(buf, pos)
            if magic != MAGIC or version != VERSION or mtype not in KNOWN_TYPES or length > max_payload:
                break  # the Python relay reports the violation
            total = HEADER_SIZE + length
            if total > ROUTE_FRAME_MAX or end - pos < total:
                break
            if s.guest:
                if mtype != _RPC_REQUEST or rid == 0:
                    break
                payload = bytes(mv[pos + HEADER_SIZE:pos + total])
                found = route_method(payload)
                if found is None:
                    break
                dest = self._methods.get((s.session, payload[found[0]:found[0] + found[1]]))
                d = self._valid(dest) if dest is not None else None
                if d is None or d.guest or s.outstanding + extra >= s.max_inflight:
                    break
                new_id = d.next_id
                d.next_id = ROUTE_ID_BIT | 1 if new_id == MAX_U64 else new_id + 1
                out = outs.setdefault(dest, bytearray())  # type: ignore[arg-type]
                at = len(out)
                out += mv[pos:pos + total]
                _u64.pack_into(out, at + 12, new_id)
                flights[dest, new_id] = (slot, rid, deadline)  # type: ignore[index]
                s.outstanding += 1
                forwarded += 1
            else:
                if (mtype != _RPC_RESPONSE and mtype != _RPC_ERROR) or not rid & ROUTE_ID_BIT:
                    break
                entry = flights.pop((slot, rid), None)
                if entry is not None:  # else a late or unknown id: dropped
                    origin, origin_id, _ = entry
                    out = outs.setdefault(origin, bytearray())
                    at = len(out)
                    out += mv[pos:pos + total]
                    _u64.pack_into(out, at + 12, origin_id)
                    self._slots[origin].outstanding -= 1  # type: ignore[union-attr]
                    answered += 1
            pos += total
            frames += 1
        return pos, frames, forwarded, answered, [(k, bytes(v)) for k, v in outs.items()]

    def take(self, dest: int, request_id: int) -> tuple[int, int] | None:
        """The call ``request_id`` toward ``dest`` ends with an answer the caller
        passes back itself: (origin slot, origin id), or None (late or unknown)."""
        if self._valid(dest) is None:
            return None
        entry = self._flights.pop((dest, request_id), None)
        if entry is None:
            return None
        self._slots[entry[0]].outstanding -= 1  # type: ignore[union-attr]
        return entry[0], entry[1]

    def outstanding(self, slot: int) -> int:
        s = self._valid(slot)
        return s.outstanding if s is not None else 0

    def count(self) -> int:
        return len(self._flights)

    def earliest(self) -> float | None:
        return min((entry[2] for entry in self._flights.values()), default=None)
