"""The virtio-vsock device logic (virtio spec, "Socket Device"), sans-I/O.

Everything that decides what a vsock packet means lives here: the 44-byte
header, the per-connection state machine, and credit-based flow control.
Packets come in with ``VsockDevice.receive``, which returns events; packets go
out through ``VsockDevice.next_packet`` whenever the I/O layer has a guest rx
buffer to fill. No virtqueues, no memory, no sockets.

The device is the *host* end (CID 2) of one guest's vsock: it only accepts
connections (to the ports it listens on; other ports get RST) and never
connects out. Credit, per connection and per direction:

- what the guest may send us: ``buf_alloc - (rx_cnt - fwd_cnt)``; ``fwd_cnt``
  advances only when the application has *consumed* bytes (``consumed``), so an
  application that stops reading stops the guest, and we never buffer more than
  ``buf_alloc`` bytes per connection;
- what we may send the guest: ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``,
  from the values the guest writes in every header; ``next_packet`` never
  exceeds it.

About 470 lines, on purpose: the packet header, one connection's state and
credit, and the table of connections are one state machine (like h11's).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Any, NamedTuple

from ..errors import PacketError

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
assert HEADER_SIZE == 44

HOST_CID = 2
TYPE_STREAM = 1
TYPE_SEQPACKET = 2
SHUTDOWN_RCV = 1  # the sender will receive no more data
SHUTDOWN_SEND = 2  # the sender will send no more data
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
MAX_PACKET_PAYLOAD = 64 * 1024  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, what Linux sends at most
DEFAULT_BUF_ALLOC = 1 << 20


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


def parse_header(buf) -> Header:
    """The header at the start of ``buf`` (PacketError if it is shorter)."""
    if len(buf) < HEADER_SIZE:
        raise PacketError(f"vsock packet of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header")
    return Header._make(HEADER.unpack_from(buf, 0))


def pack_header(src_cid: int, dst_cid: int, src_port: int, dst_port: int, length: int, type_: int, op: int,
                flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> bytes:
    return HEADER.pack(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
                       buf_alloc & 0xFFFFFFFF, fwd_cnt & 0xFFFFFFFF)


# --- events -------------------------------------------------------------------

class Opened:
    """The guest connected to a port we listen on (our RESPONSE is queued)."""

    __slots__ = ("conn",)

    def __init__(self, conn: VsockConnection):
        self.conn = conn

    def __repr__(self) -> str:
        return f"Opened({self.conn!r})"


class Data:
    """Bytes from the guest. ``data`` may point into guest memory: use it
    before returning the descriptor, and call ``conn.consumed(n)`` once the
    application has taken the bytes (that is what returns credit)."""

    __slots__ = ("conn", "data")

    def __init__(self, conn: VsockConnection, data):
        self.conn = conn
        self.data = data

    def __repr__(self) -> str:
        return f"Data({self.conn!r}, {len(self.data)} bytes)"


class PeerShutdown:
    """The guest shut down one or both directions (``flags``: SHUTDOWN_*).
    SHUTDOWN_SEND set means end of stream: no more Data will come."""

    __slots__ = ("conn", "flags")

    def __init__(self, conn: VsockConnection, flags: int):
        self.conn = conn
        self.flags = flags

    def __repr__(self) -> str:
        return f"PeerShutdown({self.conn!r}, flags={self.flags})"


class Closed:
    """The connection is gone (reset by the guest, both sides shut down, or
    the guest broke the protocol). Nothing more will happen on it."""

    __slots__ = ("conn", "reason")

    def __init__(self, conn: VsockConnection, reason: str):
        self.conn = conn
        self.reason = reason

    def __repr__(self) -> str:
        return f"Closed({self.conn!r}, {self.reason!r})"


# --- connections ----------------------------------------------------------------

class ConnState(enum.Enum):
    CONNECTED = "connected"
    CLOSING = "closing"  # we close: SHUTDOWN after the queued data, then wait for the guest's RST
    CLOSED = "closed"


class VsockConnection:
    """One stream connection, guest ``guest_port`` -> host ``host_port``."""

    def __init__(self, device: VsockDevice, guest_port: int, host_port: int, peer_buf_alloc: int,
                 peer_fwd_cnt: int):
        self.device = device
        self.guest_port = guest_port
        self.host_port = host_port
        self.state = ConnState.CONNECTED
        # guest -> us
        self.buf_alloc = device.buf_alloc
        self.rx_cnt = 0  # payload bytes received
        self.fwd_cnt = 0  # payload bytes the application consumed
        self.fwd_cnt_sent = 0  # fwd_cnt as last told to the guest
        # us -> guest
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.tx_cnt = 0  # payload bytes sent
        self.tx: deque = deque()  # memoryviews still to send
        self.tx_bytes = 0
        self.peer_shutdown = 0
        self.shutdown_sent = False
        self.credit_requested = False
        self.credit_update_queued = False
        self.in_ready = False
        self.user: Any = None  # the I/O layer's object for this connection

    def __repr__(self) -> str:
        return f"VsockConnection({self.device.guest_cid}:{self.guest_port} -> {self.host_port}, {self.state.value})"

    @property
    def key(self) -> tuple[int, int]:
        return (self.guest_port, self.host_port)

    def peer_credit(self) -> int:
        """Bytes we may still send before the guest must free buffer space."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)

    # -- the application's side --
    def send(self, data) -> None:
        """Queue bytes for the guest. A memoryview is kept, not copied (its
        owner must not overwrite it: protocol.py pins such buffers)."""
        if self.state is not ConnState.CONNECTED:
            return
        if isinstance(data, bytearray):
            data = bytes(data)
        mv = data if type(data) is memoryview else memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if not len(mv):
            return
        self.tx.append(mv)
        self.tx_bytes += len(mv)
        self.device._mark_ready(self)

    def consumed(self, n: int) -> None:
        """The application took ``n`` received bytes: credit goes back to the
        guest (a CREDIT_UPDATE once a quarter of the window was freed)."""
        self.fwd_cnt = (self.fwd_cnt + n) & 0xFFFFFFFF
        if (self.state is not ConnState.CLOSED and not self.credit_update_queued
                and ((self.fwd_cnt - self.fwd_cnt_sent) & 0xFFFFFFFF) >= self.device.credit_update_threshold):
            self.credit_update_queued = True
            self.device._control.append(("credit", self))

    @property
    def unconsumed(self) -> int:
        return (self.rx_cnt - self.fwd_cnt) & 0xFFFFFFFF

    def close(self) -> None:
        """Graceful close: the queued bytes, then SHUTDOWN; the guest answers
        with RST (a Closed event). If the guest already shut down its
        receiving side, there is nobody to send to: RST now."""
        if self.state is not ConnState.CONNECTED:
            return
        if self.peer_shutdown & SHUTDOWN_RCV:
            self.abort()
            return
        self.state = ConnState.CLOSING
        self.device._mark_ready(self)

    def abort(self) -> None:
        """RST now; queued bytes are dropped. No Closed event follows."""
        if self.state is ConnState.CLOSED:
            return
        self.device._control.append(("raw", self.device._reply_rst(self.guest_port, self.host_port)))
        self.device._forget(self)

    def _header(self, op: int, length: int = 0, flags: int = 0) -> bytes:
        self.fwd_cnt_sent = self.fwd_cnt
        return pack_header(HOST_CID, self.device.guest_cid, self.host_port, self.guest_port, length, TYPE_STREAM,
                           op, flags, self.buf_alloc, self.fwd_cnt)

    def _take(self, n: int) -> list:
        pieces = []
        tx = self.tx
        self.tx_bytes -= n
        while n:
            head = tx[0]
            if len(head) <= n:
                pieces.append(head)
                tx.popleft()
                n -= len(head)
            else:
                pieces.append(head[:n])
                tx[0] = head[n:]
                n = 0
        return pieces


# --- the device -------------------------------------------------------------------

class VsockDevice:
    """The host end of one guest's vsock device.

    ``receive(header, payload)`` takes one packet from the guest's tx queue
    and returns events; ``next_packet(room)`` gives the next packet for the
    guest's rx queue (header bytes + a list of payload pieces), or None.
    """

    def __init__(self, guest_cid: int, ports=(10000,), *, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 credit_update_threshold: int | None = None):
        if guest_cid <= HOST_CID or guest_cid >= 0xFFFFFFFF:
            raise ValueError(f"guest CID must be 3..4294967294, got {guest_cid}")
        self.guest_cid = guest_cid
        self.ports = set(ports)
        self.buf_alloc = buf_alloc
        self.credit_update_threshold = credit_update_threshold or max(1, buf_alloc // 4)
        self.conns: dict[tuple[int, int], VsockConnection] = {}
        self._control: deque = deque()  # ("raw", bytes) | ("credit"|"credit_request", conn)
        self._ready: deque[VsockConnection] = deque()  # connections with data or a SHUTDOWN to send
        self.counters = {"packets_in": 0, "packets_out": 0, "bytes_in": 0, "bytes_out": 0, "refused": 0,
                         "dropped": 0, "resets_sent": 0, "violations": 0}

    # -- packets from the guest --
    def receive(self, header, payload=b"") -> list:
        """One packet from the guest: ``header`` (a Header or its 44 bytes)
        and its payload. Returns events (Opened, Data, PeerShutdown, Closed)."""
        h = header if isinstance(header, Header) else parse_header(header)
        c = self.counters
        c["packets_in"] += 1
        if h.src_cid != self.guest_cid or h.dst_cid != HOST_CID:
            c["dropped"] += 1  # not addressed host <- this guest: what a real host would drop too
            return []
        op = h.op
        key = (h.src_port, h.dst_port)
        conn = self.conns.get(key)
        if h.type != TYPE_STREAM or h.len != len(payload):
            c["violations"] += 1
            if op != Op.RST:
                self._rst_reply(h)
            if conn is not None:
                self._forget(conn)
                why = (f"unsupported socket type {h.type}" if h.type != TYPE_STREAM
                       else f"header len {h.len} but {len(payload)} payload bytes")
                return [Closed(conn, why)]
            return []
        if conn is None:
            if op == Op.REQUEST:
                if h.dst_port not in self.ports:
                    c["refused"] += 1
                    self._rst_reply(h)
                    return []
                conn = VsockConnection(self, h.src_port, h.dst_port, h.buf_alloc, h.fwd_cnt)
                self.conns[key] = conn
                self._control.append(("raw", conn._header(Op.RESPONSE)))  # a prebuilt control packet
                return [Opened(conn)]
            if op != Op.RST:
                self._rst_reply(h)
            return []
        # every packet carries the guest's view of its receive buffer
        conn.peer_buf_alloc = h.buf_alloc
        conn.peer_fwd_cnt = h.fwd_cnt
        if conn.tx_bytes and conn.peer_credit() > 0:
            conn.credit_requested = False
            self._mark_ready(conn)
        if op == Op.RW:
            n = h.len
            if conn.peer_shutdown & SHUTDOWN_SEND:
                return self._violation(conn, "data after the guest shut down its sending side")
            if conn.unconsumed + n > conn.buf_alloc:
                return self._violation(conn, f"the guest sent {n} bytes beyond its credit")
            if not n:
                return []
            conn.rx_cnt = (conn.rx_cnt + n) & 0xFFFFFFFF
            c["bytes_in"] += n
            return [Data(conn, payload)]
        if op == Op.CREDIT_UPDATE:
            return []
        if op == Op.CREDIT_REQUEST:
            if not conn.credit_update_queued and conn.state is not ConnState.CLOSED:
                conn.credit_update_queued = True
                self._control.append(("credit", conn))
            return []
        if op == Op.SHUTDOWN:
            new = h.flags & SHUTDOWN_BOTH & ~conn.peer_shutdown
            conn.peer_shutdown |= h.flags & SHUTDOWN_BOTH
            events: list = [PeerShutdown(conn, conn.peer_shutdown)] if new else []
            if conn.state is ConnState.CLOSING and conn.peer_shutdown == SHUTDOWN_BOTH:
                # both sides are done: we end it, as Linux does
                self._control.append(("raw", self._reply_rst(conn.guest_port, conn.host_port)))
                self._forget(conn)
                events.append(Closed(conn, "closed"))
            return events
        if op == Op.RST:
            closing = conn.state is ConnState.CLOSING
            self._forget(conn)
            return [Closed(conn, "closed" if closing else "reset by the guest")]
        # REQUEST on a live connection, RESPONSE (we never connect), unknown ops
        name = Op(op).name if op in Op._value2member_map_ else str(op)
        return self._violation(conn, f"unexpected {name} on an established connection")

    def _violation(self, conn: VsockConnection, why: str) -> list:
        self.counters["violations"] += 1
        self._control.append(("raw", self._reply_rst(conn.guest_port, conn.host_port)))
        self._forget(conn)
        return [Closed(conn, why)]

    def _rst_reply(self, h: Header) -> None:
        self._control.append(("raw", self._reply_rst(h.src_port, h.dst_port)))

    def _reply_rst(self, guest_port: int, host_port: int) -> bytes:
        return pack_header(HOST_CID, self.guest_cid, host_port, guest_port, 0, TYPE_STREAM, Op.RST)

    def _forget(self, conn: VsockConnection) -> None:
        conn.state = ConnState.CLOSED
        conn.tx.clear()
        conn.tx_bytes = 0
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]

    def _mark_ready(self, conn: VsockConnection) -> None:
        if not conn.in_ready:
            conn.in_ready = True
            self._ready.append(conn)

    # -- packets to the guest --
    def has_output(self) -> bool:
        """True when next_packet() may return a packet: check before taking a
        guest rx buffer."""
        if self._control:
            return True
        for conn in self._ready:
            if conn.state is ConnState.CLOSED:
                continue
            if conn.tx_bytes and (conn.peer_credit() > 0 or not conn.credit_requested):
                return True
            if conn.state is ConnState.CLOSING and not conn.tx_bytes and not conn.shutdown_sent:
                return True
        return False

    def next_packet(self, room: int = HEADER_SIZE + MAX_PACKET_PAYLOAD) -> tuple[bytes, list] | None:
        """The next packet for a guest rx buffer of ``room`` bytes: (header,
        payload pieces), or None when nothing may be sent now. Control packets
        first; data round-robin over connections, within each one's credit."""
        c = self.counters
        while self._control:
            kind, item = self._control.popleft()
            if kind == "raw":
                c["packets_out"] += 1
                if HEADER.unpack_from(item)[6] == Op.RST:
                    c["resets_sent"] += 1
                return item, []
            conn = item
            if kind == "credit":
                conn.credit_update_queued = False
            if conn.state is ConnState.CLOSED:
                continue
            c["packets_out"] += 1
            return conn._header(Op.CREDIT_UPDATE if kind == "credit" else Op.CREDIT_REQUEST), []
        ready = self._ready
        while ready:
            conn = ready[0]
            if conn.state is ConnState.CLOSED:
                ready.popleft()
                conn.in_ready = False
                continue
            if conn.tx_bytes:
                credit = conn.peer_credit()
                if credit <= 0:
                    ready.popleft()
                    conn.in_ready = False
                    if not conn.credit_requested:
                        # out of credit: ask, in case the guest's update was lost or never sent
                        conn.credit_requested = True
                        c["packets_out"] += 1
                        return conn._header(Op.CREDIT_REQUEST), []
                    continue
                n = min(room - HEADER_SIZE, credit, conn.tx_bytes, MAX_PACKET_PAYLOAD)
                if n <= 0:
                    return None
                pieces = conn._take(n)
                conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
                ready.popleft()
                if conn.tx_bytes or conn.state is ConnState.CLOSING:
                    ready.append(conn)  # round robin
                else:
                    conn.in_ready = False
                c["packets_out"] += 1
                c["bytes_out"] += n
                return conn._header(Op.RW, n), pieces
            ready.popleft()
            conn.in_ready = False
            if conn.state is ConnState.CLOSING and not conn.shutdown_sent:
                conn.shutdown_sent = True
                c["packets_out"] += 1
                return conn._header(Op.SHUTDOWN, 0, SHUTDOWN_BOTH), []
        return None

    def reset(self) -> list[VsockConnection]:
        """The device went away (QEMU disconnected, the driver reset it): every
        connection is gone. Returns them so the I/O layer can tell their
        users; nothing is sent."""
        conns = list(self.conns.values())
        for conn in conns:
            self._forget(conn)
        self._control.clear()
        self._ready.clear()
        for conn in conns:
            conn.in_ready = False
        return conns
