"""``Connection``: one BLIN connection, either side, as a state machine.

Everything that decides what a received byte means lives here: the
handshake-first rule, header validation (through ``vhubd.codec``), the payload
limit, heartbeat answers, Error frames on violations, and cut-through of large
stream frames.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .. import codec, errors
from ..frames import (
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
from .buffer import ReceiveBuffer
from .build import (
    encode_frame,
    error_frame,
    heartbeat,
    parse_error_payload,
    rpc_error,
    rpc_request,
    rpc_result,
)
from .events import (
    Frame,
    Handshake,
    Ping,
    Pong,
    RemoteErrorEvent,
    Side,
    State,
    StreamChunk,
    StreamRun,
    StreamStart,
    Violation,
)

RESERVE_AHEAD = 64 * 1024  # what a partial frame may make us allocate beyond 2x its received bytes

HT = int(MsgType.HANDSHAKE)
HB = int(MsgType.HEARTBEAT)
ER = int(MsgType.ERROR)


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


class Connection:
    """One BLIN connection, either side.

    Feed it with ``get_buffer``/``buffer_updated`` (zero copy) or
    ``receive_data``; it returns lists of events. Bytes to send accumulate in
    ``data_to_send()``. After a Violation or a received Error the state is
    CLOSED and further input is ignored.
    """

    def __init__(self, side: Side, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 cut_through: int = 256 * 1024, initial_buffer: int = 4096,
                 answer_pings: bool = True, codec_impl=None, max_handshake: int | None = None):
        self.side = side
        self.max_payload = max_payload
        # until the handshake is done, a frame may be no larger than this (checked from the header)
        self.max_handshake = max_payload if max_handshake is None else min(max_handshake, max_payload)
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
        self._lane_types: frozenset[int] = frozenset()
        self._lane: Callable[[bytearray, int, int, int], tuple[int, int]] | None = None

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

    def close(self) -> None:
        """Stop: further input is dropped (the I/O layer is closing)."""
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
            # the fast lane only while nothing waits here undelivered: it must
            # never overtake events of the bytes before it
            events += self._received(n, lane=not events)
            mv = mv[n:]
        return events

    def set_fast_lane(self, types: frozenset[int],
                      lane: Callable[[bytearray, int, int, int], tuple[int, int]] | None) -> None:
        """Once open, a read batch that starts with a complete frame of one of
        ``types`` goes to ``lane(buf, start, end, max_payload)`` first: it
        consumes whole frames from ``start`` (the relay's RPC hot loop routes
        them) and returns (where it stopped, frames consumed); what is left
        becomes events as usual."""
        self._lane_types = types
        self._lane = lane

    def buffer_updated(self, n: int) -> list:
        """``n`` bytes arrived in the buffer ``get_buffer`` gave; their events
        (deliver them before the next call: a fast lane must not overtake them)."""
        return self._received(n, lane=True)

    @property
    def pumpable(self) -> bool:
        """Whether the next bytes start a frame of an open connection: only
        then may the I/O layer's pump forward stream frames ahead of it."""
        return self.state is State.OPEN and not self._remaining and not self._held

    def pumped(self, n: int, consumed: int, count: int, need: int = 0) -> list:
        """``n`` bytes arrived in the buffer ``get_buffer`` gave, read by the
        I/O layer's pump, which already forwarded ``count`` whole stream
        frames from ``rx.start`` up to ``consumed`` (none unless
        ``pumpable``), and found after them the start of a stream frame of
        ``need`` bytes (0: anything else); the events of the rest, as
        ``buffer_updated``."""
        rx = self.rx
        rx.note_read(n)
        rx.end += n
        self.bytes_received += n
        if count:
            if not self.pumpable or not rx.start < consumed <= rx.end:
                raise errors.InvalidState("stream frames pumped past what the connection may skip")
            rx.start = consumed
            self.frames_received += count
        if need and rx.end - rx.start < need <= self.cut_through and self.pumpable:
            # the header was checked: only room for the rest of the frame to make (as _scan would)
            rx.reserve(min(need, max(2 * (rx.end - rx.start), RESERVE_AHEAD)))
            return []
        # no fast lane behind pumped frames: the caller forwards them after these events are
        # made, and a lane routes its calls at once (ahead of the output sent before them)
        return self._process(not count)

    def _received(self, n: int, lane: bool) -> list:
        rx = self.rx
        rx.note_read(n)
        rx.end += n
        self.bytes_received += n
        return self._process(lane)

    def _process(self, lane: bool) -> list:
        rx = self.rx
        if self.state is State.CLOSED:
            rx.start = rx.end
            return []
        if self._held:
            return []
        events: list = []
        if self._remaining:
            self._continue_cut_through(events)
        if (lane and self._lane is not None and not events and self.state is State.OPEN
                and rx.end - rx.start >= HEADER_SIZE and rx.buf[rx.start + 5] in self._lane_types):
            rx.start, frames = self._lane(rx.buf, rx.start, rx.end, self.max_payload)
            self.frames_received += frames
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
        limit = self.max_payload if self.state is State.OPEN else self.max_handshake
        count, consumed, pending, status, err_off, mask = self._scanner.scan(buf, rx.start, rx.end, limit)
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
            self._violate(events, self._describe(status, buf, err_off, limit))
            return False
        if pending == PENDING_MORE:
            return True
        if pending == PENDING_PAYLOAD:
            mtype, flags, length, rid = self._codec.parse_header(buf, rx.start, limit)
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

    def _describe(self, status: int, buf, off: int, limit: int) -> errors.ProtocolError:
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
            what = "" if limit == self.max_payload else " for a handshake"
            msg = f"payload_len {length} exceeds the limit of {limit} bytes{what}"
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
