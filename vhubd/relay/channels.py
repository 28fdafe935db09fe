"""Channels: point-to-point byte streams between a session's agent and one
host end, inside BLIN v1 (docs/protocol.md, "Channels").

A channel carries one TCP connection of an exposed port (its host end is the
daemon's own socket, ``vhubd.portserver``) or one copy (its host end is the
client that asked, ``ClientEnd``). The daemon names it with an id of
``frames.CHANNEL_BASE`` and above and opens it with a call to the agent
(``agent.connect``, ``agent.tar``, ``agent.untar``) that carries the id and
the window. StreamData frames with that id are the data, both ways, and are
never fanned out, kept in the scrollback or counted in stream acks; an empty
one is that direction's EOF. ``chan.ack`` (bytes consumed), ``chan.reset``
and ``chan.done`` notifications go to the other end.

Bounds: at most ``Config.max_channels`` channels per session; a guest that
sends a channel more than the window beyond what its host end consumed, or a
frame for a channel that is not its own, loses the channel (reset both ways)
or the frame, never daemon memory; per channel the daemon holds at most the
window toward a host end.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .. import frames
from ..errors import CallFailed
from ..protocol import Frame, StreamRun, encode_frame, notification, rpc_request
from ..sessions import Session
from .members import Member
from .port import Limits

if TYPE_CHECKING:
    from .core import Relay

log = logging.getLogger("vhubd")
BASE = frames.CHANNEL_BASE
WINDOW = frames.CHANNEL_WINDOW
SD = int(frames.MsgType.STREAM_DATA)
SD_BIT = frames.TYPE_BIT[SD]
TYPE_BIT = frames.TYPE_BIT
RPC_RESPONSE = int(frames.MsgType.RPC_RESPONSE)
_U64 = struct.Struct("<Q")
_json_decode = msgspec.json.decode
Answer = Callable[[Any, "tuple[str, str] | None"], None]


class HostEnd(Protocol):
    """The host side of a channel: what the relay hands it."""

    def data(self, frame: memoryview, payload: memoryview) -> None: ...
    def eof(self, frame: memoryview) -> None: ...
    def ack(self, consumed: int) -> None: ...
    def reset(self, reason: str) -> None: ...
    def done(self, params: dict) -> None: ...


class Channel:
    __slots__ = ("id", "session", "agent", "end", "window", "g_sent", "g_acked", "g_eof", "h_sent", "h_acked",
                 "h_eof", "open", "closed", "done_sent", "method")

    def __init__(self, cid: int, sess: Session, agent: Member, end: HostEnd, method: str):
        self.id = cid
        self.session = sess
        self.agent = agent
        self.end = end
        self.method = method
        self.window = WINDOW  # both ways
        self.g_sent = self.g_acked = 0  # guest -> host bytes, and what the host end consumed
        self.h_sent = self.h_acked = 0  # host -> guest
        self.g_eof = self.h_eof = False
        self.open = False  # the agent answered the opening call
        self.closed = False
        self.done_sent = False


class ClientEnd:
    """A channel whose host end is a client (``vhub.channel``: a copy)."""

    __slots__ = ("member", "channel")

    def __init__(self, member: Member):
        self.member = member
        self.channel: Channel | None = None

    def data(self, frame: memoryview, payload: memoryview) -> None:
        self.member.port.write(frame)

    def eof(self, frame: memoryview) -> None:
        self.member.port.write(frame)

    def _note(self, method: str, params: dict) -> None:
        if self.channel is not None and not self.member.port.closed:
            self.member.port.send(notification(method, {"channel": self.channel.id, **params}))

    def ack(self, consumed: int) -> None:
        self._note("chan.ack", {"consumed": consumed})

    def reset(self, reason: str) -> None:
        self._note("chan.reset", {"reason": reason})

    def done(self, params: dict) -> None:
        self._note("chan.done", params)


class _Answers:
    """The ``Port`` of the daemon's own calls to agents: answers come back here."""

    label = "vhubd"
    closed = False
    limits = Limits()

    def __init__(self, channels: Channels):
        self.channels = channels

    def send(self, frame: Any) -> None:
        data = memoryview(frame)
        self.channels.answered(_U64.unpack_from(data, 12)[0], data[5], data[frames.HEADER_SIZE:])

    def write(self, data: Any) -> None:
        self.send(data)

    def write_part(self, data: Any, last: bool) -> None: ...
    def pause_reading(self, reason: str = "backpressure") -> None: ...
    def resume_reading(self, reason: str = "backpressure") -> None: ...
    def buffered(self) -> int:
        return 0

    def direct_fd(self) -> int:
        return -1

    def close(self, code: str | None = None, message: str = "") -> None: ...
    def complete(self, decision: Any) -> None: ...


class Channels:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.by_id: dict[int, Channel] = {}
        self.next_id = BASE + 1
        self.origin = Member(_Answers(self), "client")  # the daemon, as the origin of its calls
        self.calls: dict[int, tuple[Channel, Answer]] = {}
        self.counters = relay.counters
        for k in ("channels_opened", "channels_refused", "channels_reset", "channel_frames_dropped"):
            self.counters.setdefault(k, 0)

    # ---------------------------------------------------------------- opening
    def open(self, sess: Session, method: str, params: dict, end: HostEnd, on_answer: Answer) -> Channel:
        """Ask the agent to open a channel (raises ``CallFailed``: no agent, too
        many channels); ``on_answer(result, None)`` or ``(None, (code, message))``
        once it answers."""
        agent = sess.agent
        if agent is None:
            raise CallFailed("no_agent", f"session {sess.name!r} has no agent connected (state {sess.state.value})")
        limit = self.relay.config.max_channels
        if len(sess.channels) >= limit:
            self.counters["channels_refused"] += 1
            raise CallFailed("too_many_channels", f"session {sess.name!r} has {limit} channels open (the limit)")
        cid = self.next_id
        self.next_id = cid + 1 if cid < frames.MAX_U64 else BASE + 1
        ch = Channel(cid, sess, agent, end, method)
        self.by_id[cid] = ch
        sess.channels.add(ch)
        self.counters["channels_opened"] += 1
        cb = self.origin.new_id()
        self.calls[cb] = (ch, on_answer)
        rid = agent.new_id()
        agent.inflight[rid] = (self.origin, cb, self.relay.clock() + self.relay.config.rpc_timeout)
        self.origin.outstanding += 1
        self.relay.rpc.arm_expiry()
        agent.port.send(rpc_request(rid, method, {**params, "channel": cid, "window": WINDOW,
                                                   "max_frame": self.relay.config.max_channel_frame}))
        return ch

    def answered(self, cb: int, msg_type: int, payload: memoryview) -> None:
        entry = self.calls.pop(cb, None)
        if entry is None:
            return
        ch, on_answer = entry
        try:
            body = _json_decode(payload)
        except Exception:
            body = None
        if msg_type == RPC_RESPONSE and isinstance(body, dict) and not ch.closed:
            ch.open = True
            on_answer(body, None)
            return
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            err = (body["code"][:64], str(body.get("message", ""))[:300])
        elif ch.closed:
            err = ("channel_reset", "the channel was reset while it opened")
        else:
            err = ("bad_answer", "the agent's answer is not an object")
        self._forget(ch)
        on_answer(None, err)

    # ---------------------------------------------------------------- from the guest
    def guest_run(self, member: Member, sess: Session, run: StreamRun) -> int:
        """A guest's run with StreamData in it: channel frames to their ends,
        the rest fanned out as usual. Returns how many frames were fanned out."""
        data = run.data
        pos = start = count = mask = fanned = 0
        fan_out = self.relay.streams.fan_out
        for f in run.frames():
            n = len(f.data)
            if f.request_id >= BASE and f.msg_type == SD:
                if count:
                    fan_out(sess, StreamRun(data[start:pos], count, mask))
                    fanned += count
                    count = mask = 0
                self._guest_frame(member, f)
                pos += n
                start = pos
            else:
                count += 1
                mask |= TYPE_BIT[f.msg_type]
                pos += n
        if count:
            fan_out(sess, StreamRun(data[start:pos], count, mask))
            fanned += count
        return fanned

    def _guest_frame(self, member: Member, f: Frame) -> None:
        ch = self.by_id.get(f.request_id)
        if ch is None or ch.agent is not member or ch.g_eof:
            self.counters["channel_frames_dropped"] += 1
            return
        payload = f.payload
        n = len(payload)
        if n == 0:
            ch.g_eof = True
            ch.end.eof(f.data)
            self._maybe_forget(ch)
            return
        ch.g_sent += n
        if ch.g_sent - ch.g_acked > ch.window:
            self.reset(ch, "the guest sent past the channel's window")
            return
        ch.end.data(f.data, payload)

    def from_guest(self, member: Member, method: str, params: Any) -> None:
        """``chan.ack`` / ``chan.reset`` / ``chan.done`` from an agent."""
        ch = self.by_id.get(params.get("channel")) if isinstance(params, dict) else None  # type: ignore[arg-type]
        if ch is None or ch.agent is not member:
            return
        if method == "chan.ack":
            consumed = params.get("consumed")
            if type(consumed) is int and ch.h_acked < consumed <= ch.h_sent:
                ch.h_acked = consumed
                ch.end.ack(consumed)
        elif method == "chan.reset":
            reason = params.get("reason")
            self.reset(ch, "reset by the guest" + (f": {reason[:200]}" if isinstance(reason, str) else ""),
                       to_agent=False)
        elif method == "chan.done" and not ch.done_sent and isinstance(ch.end, ClientEnd):
            ch.done_sent = True
            out: dict = {"ok": params.get("ok") is True}
            for key in ("sha256", "bytes", "entries", "error"):
                v = params.get(key)
                if isinstance(v, str) and key in ("sha256", "error"):
                    out[key] = v[:300]
                elif type(v) is int and key in ("bytes", "entries"):
                    out[key] = v
            ch.end.done(out)

    # ---------------------------------------------------------------- from a client end
    def client_stream(self, member: Member, run: StreamRun) -> None:
        """A client's stream frames: those of its channels go to their agent,
        the others on as input (``terminals``)."""
        to_agent = self.relay.terminals.to_agent
        for f in run.frames():
            if f.request_id < BASE:
                to_agent(member, f)
                continue
            ch = self.by_id.get(f.request_id)
            end = ch.end if ch is not None else None
            if ch is None or not isinstance(end, ClientEnd) or end.member is not member or ch.h_eof:
                self.counters["channel_frames_dropped"] += 1
                continue
            n = len(f.data) - frames.HEADER_SIZE
            ch.h_sent += n
            ch.agent.port.write(f.data)
            self.relay.streams.note_write(member, ch.agent)
            if n == 0:
                ch.h_eof = True
                self._maybe_forget(ch)

    def from_client(self, member: Member, method: str, params: Any) -> None:
        ch = self.by_id.get(params.get("channel")) if isinstance(params, dict) else None  # type: ignore[arg-type]
        end = ch.end if ch is not None else None
        if ch is None or not isinstance(end, ClientEnd) or end.member is not member:
            return
        if method == "chan.ack":
            consumed = params.get("consumed")
            if type(consumed) is int:
                self.host_ack(ch, consumed)
        elif method == "chan.reset":
            self.reset(ch, "reset by the host client", to_end=False)

    # ---------------------------------------------------------------- from a daemon end (I/O)
    def host_data(self, ch: Channel, data: bytes) -> None:
        if ch.closed or ch.h_eof:
            return
        ch.h_sent += len(data)
        ch.agent.port.write(encode_frame(SD, ch.id, data))  # input, not an answer: the window bounds it

    def host_eof(self, ch: Channel) -> None:
        if ch.closed or ch.h_eof:
            return
        ch.h_eof = True
        ch.agent.port.write(encode_frame(SD, ch.id, b""))
        self._maybe_forget(ch)

    def host_ack(self, ch: Channel, consumed: int) -> None:
        if not ch.closed and ch.g_acked < consumed <= ch.g_sent:
            ch.g_acked = consumed
            ch.agent.port.write(notification("chan.ack", {"channel": ch.id, "consumed": consumed}))

    def host_reset(self, ch: Channel, reason: str) -> None:
        self.reset(ch, reason, to_end=False)

    # ---------------------------------------------------------------- ending
    def reset(self, ch: Channel, reason: str, to_agent: bool = True, to_end: bool = True) -> None:
        if ch.closed:
            return
        self.counters["channels_reset"] += 1
        self._forget(ch)
        if to_agent and not ch.agent.port.closed:
            ch.agent.port.write(notification("chan.reset", {"channel": ch.id, "reason": reason}))
        if to_end:
            ch.end.reset(reason)

    def _maybe_forget(self, ch: Channel) -> None:
        if ch.g_eof and ch.h_eof:
            self._forget(ch)

    def _forget(self, ch: Channel) -> None:
        if not ch.closed:
            ch.closed = True
            self.by_id.pop(ch.id, None)
            ch.session.channels.discard(ch)

    def agent_lost(self, member: Member) -> None:
        sess = member.session
        if sess is None or not sess.channels:
            return
        for ch in [c for c in sess.channels if c.agent is member]:
            self.reset(ch, "the agent disconnected", to_agent=False)

    def client_lost(self, member: Member) -> None:
        for ch in [c for c in self.by_id.values() if isinstance(c.end, ClientEnd) and c.end.member is member]:
            self.reset(ch, "the host client disconnected", to_end=False)
