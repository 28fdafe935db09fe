"""Sans-I/O BLIN connection: bytes in, events and bytes out.

Everything that decides what a received byte means lives here: the
handshake-first rule, header validation (through ``vhubd.codec``), the payload
limit, heartbeat answers, Error frames on violations, and cut-through of large
stream frames. No sockets, no asyncio: the daemon, the client library and the
tests all drive this same object.

Receive path without copies: the connection owns its receive buffer. The I/O
layer asks ``get_buffer()`` for a writable memoryview, reads into it, and calls
``buffer_updated(n)``; the events it gets back carry memoryview slices of that
buffer. A buffer that still has live slices (a transport that has not yet
written them, say) is *pinned*: the connection never overwrites it and reads
into a fresh one instead (a live slice keeps its bytearray alive). Plain
``receive_data(bytes)`` feeds the same path for callers that have bytes.

Events, one shape per kind of frame:

- ``StreamRun``: every Stdout/Stderr/StreamData frame arrives in a run of
  consecutive stream frames (``count`` >= 1), as one slice of the receive
  buffer (headers included) that a relay forwards with one write; iterate
  ``run.frames()`` for the frames, each a ``Frame``.
- ``Frame``: any other frame after the handshake (RPC, TtyResize).
- ``StreamStart`` + ``StreamChunk``s: a stream frame larger than the
  connection's ``cut_through`` size, forwarded while it arrives (only the
  daemon's guest connections enable it).
- ``Handshake``, ``Ping``, ``Pong``, ``RemoteErrorEvent``, ``Violation``.

Every frame the package sends is built here: ``encode_frame`` and the
builders below it (``rpc_request``, ``rpc_result``, ``rpc_error``,
``notification``, ``error_frame``, ``heartbeat``).
"""

from __future__ import annotations

import enum
import sys
import threading

import msgspec

from . import codec, errors
from .frames import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    OK,
    PENDING_HEADER,
    PENDING_MORE,
    PENDING_PAYLOAD,
    PONG_PAYLOAD,
    STREAM_MASK,
    STREAM_TYPES,
    TYPE_BIT,
    MsgType,
)

_getrefcount = sys.getrefcount
_probe = [bytearray(1)]
_SPARE_FREE = _getrefcount(_probe[0])  # refcount of a list-held bytearray with no live slices
del _probe
_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

RESERVE_AHEAD = 64 * 1024  # what a partial frame may make us allocate beyond 2x its received bytes

HT = int(MsgType.HANDSHAKE)
HB = int(MsgType.HEARTBEAT)
ER = int(MsgType.ERROR)
RQ = int(MsgType.RPC_REQUEST)
RS = int(MsgType.RPC_RESPONSE)
RE = int(MsgType.RPC_ERROR)


# --- events -----------------------------------------------------------------

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


# --- helpers ----------------------------------------------------------------

def encode_frame(msg_type: int, request_id: int, payload=b"", flags: int = 0) -> bytes:
    """Header + payload as one bytes object (for small frames)."""
    return codec.pack_header(msg_type, request_id, len(payload), flags) + bytes(payload)


def error_payload(code: str, message: str) -> bytes:
    return _json_encode({"code": code, "message": message})


def rpc_request(request_id: int, method: str, params=None, **extra) -> bytes:
    """An RpcRequest (request_id 0: a notification); ``extra`` keys go beside method/params."""
    body = {"method": method, "params": {} if params is None else params, **extra}
    return encode_frame(RQ, request_id, _json_encode(body))


def rpc_result(request_id: int, result) -> bytes:
    return encode_frame(RS, request_id, _json_encode(result))


def rpc_error(request_id: int, code: str, message: str) -> bytes:
    return encode_frame(RE, request_id, error_payload(code, message))


def notification(method: str, params) -> bytes:
    """An RpcRequest with request_id 0: no answer expected."""
    return encode_frame(RQ, 0, _json_encode({"method": method, "params": params}))


def error_frame(code: str, message: str, request_id: int = 0) -> bytes:
    """An Error frame: sent right before a connection is closed."""
    return encode_frame(ER, request_id, error_payload(code, message))


def heartbeat(request_id: int, pong: bool = False) -> bytes:
    return encode_frame(HB, request_id, PONG_PAYLOAD if pong else b"")


def parse_error_payload(payload) -> tuple[str, str]:
    """(code, message) of an Error/RpcError payload, tolerant of junk."""
    try:
        obj = _json_decode(payload)
        if isinstance(obj, dict):
            return str(obj.get("code", "error")), str(obj.get("message", ""))
    except msgspec.DecodeError:
        pass
    return "error", bytes(payload[:200]).decode("utf-8", "replace")


_scanners = threading.local()


def shared_scanner(impl):
    """The batch scanner of ``impl`` for this thread, shared by every
    Connection: a scan's headers are read before the next scan starts, and a
    scanner per connection (4096 headers, 160 KiB) made every idle connection
    cost that much."""
    cache = getattr(_scanners, "cache", None)
    if cache is None:
        cache = _scanners.cache = {}
    sc = cache.get(impl)
    if sc is None:
        sc = cache[impl] = impl.Scanner(4096)
    return sc


# --- the receive buffer -------------------------------------------------------

class ReceiveBuffer:
    """A growable receive buffer that never overwrites bytes a live slice
    still references (see the module docstring).

    Size follows the sender: a read that fills the whole offered space makes
    the next buffer 4x larger (up to ``grow_limit``); ``shrink()`` on idle
    goes back to ``initial``. A pinned buffer is retired to a small spare pool
    and reused once its slices are gone, so a busy stream does not allocate
    (and zero-fill) a fresh buffer per read.
    """

    __slots__ = ("buf", "start", "end", "initial", "grow_limit", "target", "_baseline", "_offered", "_spare")

    def __init__(self, initial: int = 4096, grow_limit: int = 256 * 1024):
        self.initial = initial
        self.grow_limit = max(grow_limit, initial)
        self.target = initial
        self.buf = bytearray(initial)
        self.start = 0  # first unconsumed byte
        self.end = 0  # end of received bytes
        self._rebase()
        self._offered = 0
        self._spare: list[bytearray] = []

    def pinned(self) -> bool:
        return _getrefcount(self.buf) > self._baseline

    def _fresh(self, size: int) -> bytearray:
        spare = self._spare
        for i in range(len(spare)):
            if len(spare[i]) >= size and _getrefcount(spare[i]) == _SPARE_FREE:
                return spare.pop(i)
        return bytearray(size)

    def _replace(self, size: int) -> None:
        """Move the live bytes to another buffer of at least ``size``."""
        old, start, end = self.buf, self.start, self.end
        new = self._fresh(size)
        live = end - start
        if live:
            new[:live] = old[start:end]
        self.buf = new
        del new
        self._rebase()
        if len(old) == self.target and len(self._spare) < 2:
            self._spare.append(old)  # maybe pinned now; reused once its slices are gone
        self.start = 0
        self.end = live

    def _rebase(self) -> None:
        # refcount of self.buf when nothing but this object holds it
        self._baseline = _getrefcount(self.buf)

    def reserve(self, need: int) -> None:
        """Make room for ``need`` bytes past ``start`` (a whole frame)."""
        if need > len(self.buf) - self.start:
            if need <= len(self.buf) and not self.pinned():
                self._compact()
            else:
                self._replace(max(need, self.target))

    def _compact(self) -> None:
        live = self.end - self.start
        if live:
            self.buf[:live] = self.buf[self.start:self.end]
        self.start = 0
        self.end = live

    def get_buffer(self, min_free: int = 1024) -> memoryview:
        live = self.end - self.start
        size = len(self.buf)
        if self.pinned():
            if size - self.end < min_free or size < self.target:
                self._replace(max(self.target, live + min_free))
        elif live == 0:
            self.start = self.end = 0
            if size < self.target:
                self._replace(self.target)
        elif size - self.end < min_free or size < self.target:
            if live + min_free <= size and size >= self.target:
                self._compact()
            else:
                self._replace(max(self.target, live + min_free))
        view = memoryview(self.buf)[self.end:]
        self._offered = len(view)
        return view

    def note_read(self, n: int) -> None:
        """A read that filled all the offered space hints at a fast sender."""
        if n >= self._offered and self.target < self.grow_limit:
            self.target = min(self.target * 4, self.grow_limit)

    def shrink(self) -> None:
        """Give memory back when idle: back to the initial size, spares dropped."""
        self.target = self.initial
        self._spare.clear()
        if self.start == self.end and len(self.buf) > self.initial:
            self.buf = bytearray(self.initial)
            self._rebase()
            self.start = self.end = 0


# --- the connection ---------------------------------------------------------

class Connection:
    """One BLIN connection, either side.

    Feed it with ``get_buffer``/``buffer_updated`` (zero copy) or
    ``receive_data``; it returns lists of events. Bytes to send accumulate in
    ``data_to_send()``. After a Violation or a received Error the state is
    CLOSED and further input is ignored.
    """

    def __init__(self, side: Side, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 cut_through: int = 256 * 1024, initial_buffer: int = 4096,
                 answer_pings: bool = True, codec_impl=None):
        self.side = side
        self.max_payload = max_payload
        self.cut_through = cut_through  # stream frames larger than this go cut-through
        self.answer_pings = answer_pings
        self.state = State.HANDSHAKE
        self.rx = ReceiveBuffer(initial_buffer, max(cut_through, initial_buffer))
        self._codec = codec_impl or codec
        self._scanner = shared_scanner(self._codec)
        self._out: list[bytes] = []
        self._remaining = 0  # payload bytes of a cut-through frame still to come
        self._handshake_sent = False
        self._held = False  # server side: peer handshake seen, not yet answered
        self.frames_received = 0
        self.bytes_received = 0
        self.pongs_received = 0

    # -- sending --
    def send(self, msg_type: int, request_id: int, payload=b"", flags: int = 0) -> None:
        if self.state is State.CLOSED:
            raise errors.InvalidState("connection is closed")
        self._out.append(encode_frame(msg_type, request_id, payload, flags))

    def request(self, request_id: int, method: str, params=None, **extra) -> None:
        """Queue an RpcRequest (request_id 0: a notification)."""
        self.send_frame(rpc_request(request_id, method, params, **extra))

    def respond(self, request_id: int, result) -> None:
        self.send_frame(rpc_result(request_id, result))

    def respond_error(self, request_id: int, code: str, message: str) -> None:
        self.send_frame(rpc_error(request_id, code, message))

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame built by one of the builders above."""
        if self.state is State.CLOSED:
            raise errors.InvalidState("connection is closed")
        self._out.append(frame)

    def send_handshake(self, payload=b"", request_id: int = 1) -> None:
        if self.side is not Side.CLIENT or self._handshake_sent:
            raise errors.InvalidState("only a client sends the first handshake, once")
        self._handshake_sent = True
        self.send(HT, request_id, payload)

    def accept(self, payload=b"blink-vhub-ready", request_id: int = 0) -> None:
        """Server side: answer the peer's handshake and open the connection."""
        if self.side is not Side.SERVER or self.state is not State.HANDSHAKE:
            raise errors.InvalidState("accept() answers a peer handshake once")
        self.send(HT, request_id, payload)
        self.state = State.OPEN
        self._held = False

    def resume(self) -> list:
        """Events for bytes that arrived after the peer's handshake, once
        accept() has opened the connection."""
        return self.buffer_updated(0)

    def fail(self, code: str, message: str, request_id: int = 0) -> None:
        """Queue an Error frame and close."""
        if self.state is not State.CLOSED:
            self._out.append(error_frame(code, message, request_id))
            self.state = State.CLOSED

    def ping(self, request_id: int = 0) -> None:
        self.send_frame(heartbeat(request_id))

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # -- receiving --
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self.rx.get_buffer()

    def receive_data(self, data) -> list:
        """Copying entry point: feed bytes, get events."""
        events: list = []
        mv = memoryview(data)
        while mv:
            dst = self.get_buffer()
            n = min(len(dst), len(mv))
            dst[:n] = mv[:n]
            del dst
            events += self.buffer_updated(n)
            mv = mv[n:]
        return events

    def buffer_updated(self, n: int) -> list:
        rx = self.rx
        rx.note_read(n)
        rx.end += n
        self.bytes_received += n
        if self.state is State.CLOSED:
            rx.start = rx.end
            return []
        if self._held:
            return []
        events: list = []
        if self._remaining:
            self._continue_cut_through(events)
        while rx.start < rx.end and self.state is not State.CLOSED:
            if not self._scan(events):
                break
        return events

    def _continue_cut_through(self, events: list) -> None:
        rx = self.rx
        take = min(self._remaining, rx.end - rx.start)
        self._remaining -= take
        events.append(StreamChunk(memoryview(rx.buf)[rx.start:rx.start + take], self._remaining))
        rx.start += take

    def _scan(self, events: list) -> bool:
        """Scan once from rx.start; True if another scan may find more."""
        rx = self.rx
        buf = rx.buf
        count, consumed, pending, status, err_off, mask = self._scanner.scan(
            buf, rx.start, rx.end, self.max_payload)
        if count:
            if self.state is State.OPEN and not (mask & ~STREAM_MASK):
                # the fast path: a batch of stream frames, forwarded as one slice
                events.append(StreamRun(memoryview(buf)[rx.start:consumed], count, mask))
                self.frames_received += count
                rx.start = consumed
            else:
                stop = self._frames(events, buf, self._scanner.headers())
                if self.state is State.CLOSED:
                    rx.start = rx.end
                    return False
                if stop >= 0:  # held after the peer's handshake, until accept()
                    rx.start = stop
                    return False
                rx.start = consumed
        if self.state is State.CLOSED:
            return False
        if status != OK:
            self._violate(events, self._describe(status, buf, err_off))
            return False
        if pending == PENDING_MORE:
            return True
        if pending == PENDING_PAYLOAD:
            mtype, flags, length, rid = self._codec.parse_header(buf, rx.start, self.max_payload)
            total = HEADER_SIZE + length
            if mtype in STREAM_TYPES and self.state is State.OPEN and total > self.cut_through:
                have = rx.end - rx.start
                self._remaining = total - have
                events.append(StreamStart(mtype, flags, rid, length,
                                          memoryview(buf)[rx.start:rx.end], self._remaining))
                self.frames_received += 1
                rx.start = rx.end
            else:
                # room for the whole frame, but never much more than the peer
                # has actually sent: a bare header claiming 16 MiB must not
                # make us allocate 16 MiB (memory follows bytes received)
                rx.reserve(min(total, max(2 * (rx.end - rx.start), RESERVE_AHEAD)))
        elif pending == PENDING_HEADER:
            rx.reserve(HEADER_SIZE)
        return False

    def _frames(self, events: list, buf, flat: list) -> int:
        """Turn scanned headers into events; returns the offset where it
        stopped early (server side, after the peer's handshake), else -1.
        Consecutive stream frames become one StreamRun."""
        mv = memoryview(buf)
        run_start = run_end = run_count = run_mask = 0
        for i in range(0, len(flat), 5):
            off, mtype, flags, length, rid = flat[i:i + 5]
            end = off + HEADER_SIZE + length
            if mtype in STREAM_TYPES and self.state is State.OPEN:
                if not run_count:
                    run_start = off
                run_end = end
                run_count += 1
                run_mask |= TYPE_BIT[mtype]
                self.frames_received += 1
                continue
            if run_count:
                events.append(StreamRun(mv[run_start:run_end], run_count, run_mask))
                run_count = run_mask = 0
            data = mv[off:end]
            if self.state is State.HANDSHAKE:
                if mtype == ER:
                    code, message = parse_error_payload(data[HEADER_SIZE:])
                    events.append(RemoteErrorEvent(code, message))
                    self.state = State.CLOSED
                    return -1
                if mtype != HT:
                    self._violate(events, errors.HandshakeRequired(
                        f"first frame must be a Handshake, got {MsgType(mtype).name}", off))
                    return -1
                events.append(Handshake(rid, data[HEADER_SIZE:]))
                if self.side is Side.CLIENT:
                    self.state = State.OPEN
                    continue
                # the server decides with accept() or fail(); what follows
                # waits until then, and resume() delivers it
                self._held = True
                return off + HEADER_SIZE + length
            self.frames_received += 1
            if mtype == HB:
                if bytes(data[HEADER_SIZE:]) == PONG_PAYLOAD:
                    self.pongs_received += 1
                    events.append(Pong(rid))
                else:
                    if self.answer_pings:
                        self._out.append(heartbeat(rid, pong=True))
                    events.append(Ping(rid))
            elif mtype == ER:
                code, message = parse_error_payload(data[HEADER_SIZE:])
                events.append(RemoteErrorEvent(code, message))
                self.state = State.CLOSED
                return -1
            else:
                events.append(Frame(mtype, flags, rid, data))
        if run_count:
            events.append(StreamRun(mv[run_start:run_end], run_count, run_mask))
        return -1

    def _describe(self, status: int, buf, off: int) -> errors.ProtocolError:
        head = bytes(buf[off:min(off + HEADER_SIZE, self.rx.end)])
        cls = errors.STATUS_ERRORS.get(status, errors.ProtocolError)
        if cls is errors.BadMagic:
            i = next(k for k in range(len(head)) if head[k] != b"NILB"[k])
            msg = f"bad magic: byte {i} is 0x{head[i]:02x}, expected 0x{b'NILB'[i]:02x} (BLIN magic 4e494c42)"
        elif cls is errors.BadVersion:
            msg = f"unsupported BLIN version {head[4]} (expected 1)"
        elif cls is errors.UnknownType:
            msg = f"unknown message type 0x{head[5]:02x}"
        else:
            length = int.from_bytes(head[8:12], "little")
            msg = f"payload_len {length} exceeds the limit of {self.max_payload} bytes"
        return cls(f"{msg} at stream offset {self.bytes_received - (self.rx.end - off)}", off)

    def _violate(self, events: list, err: errors.ProtocolError) -> None:
        events.append(Violation(err))
        self.fail(err.code, err.message)
        self.rx.start = self.rx.end

    def receive_eof(self) -> None:
        """The peer closed; a frame cut in the middle is simply dropped."""
        self.state = State.CLOSED

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return bool(self._remaining) or self.rx.start < self.rx.end
