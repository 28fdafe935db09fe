"""The relay in-process: real ``protocol.Connection`` objects and a real
``Relay``, with ``FakePort`` in place of the socket layer and a manual clock.

``World`` plays the I/O layer exactly as ``server.Peer`` does (handshake
decision carried out, events delivered, flow control reported), so routing
is tested without a process or a socket, in milliseconds.
"""

from __future__ import annotations

import json
from typing import Any

from vhubd import frames
from vhubd.frames import HEADER_SIZE, MsgType
from vhubd.protocol import Connection, Frame, Handshake, RemoteErrorEvent, Side, StreamRun, encode_frame
from vhubd.relay import Accept, Config, Defer, Limits, Refuse, Relay
from vhubd.sessions import SessionRegistry

T = MsgType


class Clock:
    """``call_later`` with a manual clock: ``advance(s)`` runs what is due."""

    def __init__(self):
        self.now = 0.0
        self.timers: list[list] = []  # [when, seq, fn, cancelled]
        self._seq = 0

    def call_later(self, delay: float, fn):
        self._seq += 1
        entry = [self.now + delay, self._seq, fn, False]
        self.timers.append(entry)
        return _Handle(entry)

    def advance(self, seconds: float = 0.0) -> None:
        target = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if t[0] <= target and not t[3]), key=lambda t: (t[0], t[1]))
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = max(self.now, t[0])
            t[2]()
        self.now = target
        self.timers = [t for t in self.timers if not t[3]]


class _Handle:
    def __init__(self, entry):
        self.entry = entry

    def cancel(self) -> None:
        self.entry[3] = True


class Listener:
    def __init__(self, name: str = "vhub", role: str = "guest", token_required: bool = False,
                 fixed_session: str | None = None):
        self.name = name
        self.role = role
        self.token_required = token_required
        self.fixed_session = fixed_session


GUEST = Listener()
TCP = Listener("tcp", token_required=True)
CONTROL = Listener("control", "client")


class FakePort:
    """A ``relay.Port`` that records what the relay does to it."""

    def __init__(self, world: World, label: str, role: str, limits: Limits):
        self.world = world
        self.label = label
        self.role = role
        self.limits = limits
        self.closed = False
        self.error: tuple[str | None, str] | None = None
        self.reasons: set[str] = set()
        self.writes: list[Any] = []  # exactly what the relay handed over (memoryview slices included)
        self.out = bytearray()
        self.queued = 0  # what buffered() reports: set it to play a full transport
        self.member: Any = None
        self.conn = Connection(Side.SERVER, max_payload=world.max_payload, cut_through=world.cut_through
                               if role == "guest" else 1 << 62)
        self.decision: Any = None
        self.parts_open = False

    # -- the Port --
    def write(self, data) -> None:
        if not self.closed:
            self.writes.append(data)
            self.out += bytes(data)

    send = write

    def write_part(self, data, last: bool) -> None:
        if not self.closed:
            self.writes.append(data)
            self.out += bytes(data)
            self.parts_open = not last

    def pause_reading(self, reason: str = "backpressure") -> None:
        self.reasons.add(reason)

    def direct_fd(self) -> int:
        return -1  # no socket: the pump never writes past it

    def resume_reading(self, reason: str = "backpressure") -> None:
        self.reasons.discard(reason)

    @property
    def paused(self) -> bool:
        """Not read, for any reason (backpressure, cut_through, writer...)."""
        return bool(self.reasons)

    def buffered(self) -> int:
        return self.queued

    def close(self, code: str | None = None, message: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.error = (code, message)

    def complete(self, decision) -> None:
        self.world._carry_out(self, decision)

    # -- for tests --
    def frames(self) -> list[Frame]:
        """Every whole frame written to this peer, parsed (the bytes are consumed)."""
        data, self.out = bytes(self.out), bytearray()
        out, off = [], 0
        while off + HEADER_SIZE <= len(data):
            _, _, mt, fl, n, rid = frames.HEADER.unpack_from(data, off)
            if off + HEADER_SIZE + n > len(data):
                break
            out.append(Frame(mt, fl, rid, memoryview(data[off:off + HEADER_SIZE + n])))
            off += HEADER_SIZE + n
        self.out = bytearray(data[off:])
        return out

    def json_frames(self, msg_type: int | None = None) -> list[tuple[int, int, Any]]:
        return [(f.msg_type, f.request_id, f.json()) for f in self.frames()
                if msg_type is None or f.msg_type == msg_type]

    def feed(self, *raw: bytes) -> None:
        """Bytes from the peer, through its Connection, into the relay."""
        self.world.feed(self, b"".join(raw))

    def lose(self, reason: str = "connection closed") -> None:
        self.world.lose(self, reason)


class World:
    """A relay with a registry, a clock and fake ports; plays the I/O layer."""

    def __init__(self, boots=None, max_payload: int = frames.DEFAULT_MAX_PAYLOAD, cut_through: int = 256 * 1024,
                 limits: Limits | None = None, **config):
        self.clock = Clock()
        self.registry = SessionRegistry(config.get("scrollback", 1 << 20),
                                        max_sessions=config.pop("max_sessions", 10_000))
        self.relay = Relay(Config(**config), self.registry, self.clock.call_later, boots=boots,
                           clock=lambda: self.clock.now)
        self.max_payload = max_payload
        self.cut_through = cut_through
        self.limits = limits or Limits()
        self._n = 0

    # -- peers --
    def port(self, role: str) -> FakePort:
        self._n += 1
        return FakePort(self, f"{role}-{self._n}", role, self.limits)

    def guest(self, payload: Any = b"", listener: Listener = GUEST, rid: int = 1) -> FakePort:
        """A guest that sent its handshake; ``port.decision`` is the relay's answer."""
        port = self.port("guest")
        port.listener = listener
        port.feed(encode_frame(T.HANDSHAKE, rid, _payload(payload)))
        return port

    def client(self, session: str = "*", **hs) -> FakePort:
        port = self.port("client")
        port.listener = CONTROL
        body = {"role": "client", "session": session, **hs}
        port.feed(encode_frame(T.HANDSHAKE, 1, _payload(body)))
        return port

    def register(self, name: str) -> str:
        """vhub.register ``name`` from a "*" client; its token."""
        c = self.client()
        c.feed(rpc(1, "vhub.register", {"session": name}))
        [(_, _, res)] = c.json_frames(T.RPC_RESPONSE)
        return res["token"]

    # -- the I/O layer's part --
    def feed(self, port: FakePort, data: bytes) -> None:
        """Bytes from the peer, read by read as server.Peer gets them: each
        read's events are delivered before the next read."""
        mv = memoryview(data)
        while mv and not port.closed:  # a closed transport reads nothing more
            dst = port.conn.get_buffer()
            n = min(len(dst), len(mv))
            dst[:n] = mv[:n]
            del dst
            mv = mv[n:]
            self._read(port, port.conn.buffer_updated(n))

    def _read(self, port: FakePort, events: list) -> None:
        for ev in events:
            if type(ev) is Handshake and port.member is None and port.decision is None:
                payload = bytes(ev.payload)
                if port.role == "guest":
                    d = self.relay.guest_handshake(port, port.listener, payload)
                else:
                    d = self.relay.client_handshake(port, payload)
                port.hs_request_id = ev.request_id
                self._carry_out(port, d)
                return
        if port.member is not None and events:
            self._deliver(port, events)

    def _deliver(self, port: FakePort, events: list) -> None:
        (self.relay.guest_events if port.role == "guest" else self.relay.client_events)(port.member, events)
        for out in port.conn.data_to_send():  # pongs
            port.write(out)

    def _carry_out(self, port: FakePort, d) -> None:
        port.decision = d
        if type(d) is Accept:
            port.conn.accept(d.payload, port.hs_request_id)
            for out in port.conn.data_to_send():
                port.out += out
            port.member = d.member
            lane = self.relay.rpc.lane(d.member)  # the RPC hot loop, as server.Peer sets it
            if lane is not None:
                port.conn.set_fast_lane(*lane)
            self.relay.admitted(d.member)
            more = port.conn.resume()
            if more:
                self._deliver(port, more)
        elif type(d) is Refuse:
            port.closed = True
            port.error = (d.code, d.message)
        elif type(d) is Defer:
            port.member = d.member
            port.deferred = True

    def lose(self, port: FakePort, reason: str) -> None:
        port.closed = True
        if port.member is not None:
            self.relay.lost(port.member, reason)

    def fill(self, port: FakePort, queued: int = 2 << 20) -> None:
        """The peer's transport went above its high-water mark."""
        port.queued = queued
        self.relay.write_paused(port.member)

    def drain(self, port: FakePort) -> None:
        port.queued = 0
        self.relay.write_resumed(port.member)


def _payload(p: Any) -> bytes:
    if isinstance(p, (dict, list)):
        return json.dumps(p).encode()
    return bytes(p)


def frame(msg_type: int, rid: int, payload: Any = b"") -> bytes:
    return encode_frame(msg_type, rid, _payload(payload))


def rpc(rid: int, method: str, params: Any = None, **extra) -> bytes:
    return frame(T.RPC_REQUEST, rid, {"method": method, "params": {} if params is None else params, **extra})


def handshake_answer(port: FakePort) -> Handshake | RemoteErrorEvent | None:
    """The handshake answer the peer got (consumed from its output)."""
    c = Connection(Side.CLIENT, cut_through=1 << 62)
    c.send_handshake()
    data, port.out = bytes(port.out), bytearray()
    for ev in c.receive_data(data):
        if isinstance(ev, (Handshake, RemoteErrorEvent)):
            rest = data[HEADER_SIZE + len(ev.payload):] if isinstance(ev, Handshake) else b""
            port.out = bytearray(rest)
            return ev
    return None


__all__ = ["CONTROL", "GUEST", "TCP", "Clock", "FakePort", "Listener", "StreamRun", "T", "World", "frame",
           "handshake_answer", "rpc"]
