"""Guest output to subscribers: fan-out, cut-through, scrollback, acks and
backpressure.

A batch of stream frames (a ``StreamRun``) goes to every subscriber of its
session and of "*" as the same slice of the guest's receive buffer, and once
into the session's scrollback ring. A frame too large to buffer whole arrives
as ``StreamStart`` + ``StreamChunk``s and is forwarded as it comes
(cut-through); meanwhile nothing else may reach those subscribers, so other
guests of the session wait, and a client that joins mid-frame joins after it.

Backpressure: a lossless subscriber whose transport is full pauses every
guest of the sessions it follows until it drains. Acks (``vhub.ack``) tell a
guest how many stream frames every lossless subscriber's kernel buffer has
taken, so an agent keeps the rest across a daemon restart.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import codec, frames, sessions
from ..frames import HEADER_SIZE
from ..protocol import StreamChunk, StreamRun, StreamStart, notification
from ..sessions import Session
from .members import Member
from .resent import settled

if TYPE_CHECKING:
    from .core import Relay

log = logging.getLogger("vhubd")
TYPE_BIT = frames.TYPE_BIT
ACK_RETRY = 0.01  # seconds between checks while a lossless subscriber still holds unsent bytes


class CutThrough:
    """A large stream frame in flight: who gets its parts, and the last
    ``keep`` payload bytes for the scrollback (nothing when the ring is too
    small to hold any of it), bulk parts by reference (``sessions.keep``)."""

    __slots__ = ("targets", "head", "keep", "parts", "size", "source", "waiting")

    def __init__(self, targets: list, ev: StreamStart, room: int, source: Member):
        self.targets = targets
        self.source = source  # the guest sending it
        self.waiting: list = []  # (member, events) of other guests of the session, held until it ends
        self.head = bytearray(ev.data[:HEADER_SIZE])
        self.keep = max(0, min(ev.length, room))
        self.parts: list = []  # bytes or slices of the guest's receive buffers
        self.size = 0

    def keep_tail(self, data: memoryview) -> None:
        keep = self.keep
        if not keep:
            return
        if len(data) >= keep:
            self.parts = [sessions.keep(data[len(data) - keep:])]
            self.size = keep
            return
        self.parts.append(sessions.keep(data))
        self.size += len(data)
        while self.size - len(self.parts[0]) >= keep:
            self.size -= len(self.parts.pop(0))

    def frame_for_scrollback(self) -> Any:
        """The frame's kept tail as one frame: bulk as ``Pieces`` (no copy),
        small tails joined."""
        if not self.keep:
            return b""
        parts = self.parts
        excess = self.size - self.keep
        if excess > 0:
            parts[0] = sessions.keep(memoryview(parts[0])[excess:])
        size = min(self.size, self.keep)
        self.head[8:12] = size.to_bytes(4, "little")
        if size < sessions.REFERENCE_AT:
            return b"".join([self.head, *parts])
        return sessions.Pieces(coalesced([bytes(self.head), *parts]))


def whole(events: list) -> list:
    """A gone guest's held events up to a cut-through frame that does not end
    among them (it was cut by the guest's leaving: never accepted)."""
    for i, ev in enumerate(events):
        if type(ev) is StreamStart and ev.remaining and not any(
                type(e) is StreamChunk and e.remaining == 0 for e in events[i + 1:]):
            return events[:i]
    return events


def coalesced(parts: list) -> list:
    """Copied parts (small reads) joined between the referenced ones: a frame
    that arrived a few bytes a read is kept as few objects, not one per read."""
    out: list = []
    small: list = []
    for p in parts:
        if type(p) is memoryview:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(p)
        else:
            small.append(p)
    if small:
        out.append(b"".join(small))
    return out


def run_of(chunk: bytes) -> StreamRun:
    """Complete stream frames (a scrollback chunk) as a StreamRun."""
    sc = codec.Scanner(max(1, len(chunk) // HEADER_SIZE))
    count, _, _, _, _, mask = sc.scan(chunk)
    return StreamRun(memoryview(chunk), count, mask)


class Streams:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.counters = relay.counters

    # ---------------------------------------------------------------- fan-out
    def subscribers(self, sess: Session) -> list[Member]:
        return [c for c in (*sess.clients, *self.relay.star_clients) if c.subscribe_mask]

    def _kept(self, sess: Session, run: StreamRun) -> None:
        """A batch of ``sess``'s output counted and into its scrollback."""
        self.counters["stream_bytes"] += len(run.data)
        self.counters["stream_frames"] += run.count
        sess.scrollback.append(run.data)

    def fan_out(self, sess: Session, run: StreamRun) -> None:
        self._kept(sess, run)
        deliver = self.deliver
        for c in sess.clients:
            deliver(c, run)
        for c in self.relay.star_clients:
            deliver(c, run)

    @staticmethod
    def deliver(c: Member, run: StreamRun) -> None:
        want = c.subscribe_mask
        if not want or not c.joined:
            return
        mask = run.type_mask
        if mask & ~want == 0:
            c.port.write(run.data)
        elif mask & want:
            # a mixed run and a partial subscription: the frames this client wants
            write = c.port.write
            for f in run.frames():
                if TYPE_BIT[f.msg_type] & want:
                    write(f.data)

    # ---------------------------------------------------------------- the stream pump
    def pumped(self, member: Member, sess: Session, run: StreamRun, pump: Any) -> None:
        """A batch of guest output the I/O layer's pump read: its ``send``
        writes it straight to every subscriber that nothing is queued for
        (``Port.direct_fd``: it comes in order), the rest of it (their socket
        was full) and the whole batch to everyone else go as in ``fan_out``."""
        if member.skip:  # frames taken before come first: the usual way, without them
            kept = self.relay.resends.skip_resent(member, run)
            if kept is not None:
                self.fan_out(sess, kept)
                member.stream_frames += kept.count
            sess.last_activity = time.monotonic()
            self.owed(member)
            return
        data = run.data
        size = len(data)
        self._kept(sess, run)
        self.counters["stream_pumped"] += size
        direct: list = []
        fds: list = []
        wants: list = []
        deliver = self.deliver
        capacity = pump.capacity
        for group in (sess.clients, self.relay.star_clients):
            for c in group:
                if not c.subscribe_mask or not c.joined:
                    continue
                fd = c.port.direct_fd() if len(fds) < capacity else -1
                if fd < 0:
                    deliver(c, run)
                else:
                    direct.append(c)
                    fds.append(fd)
                    wants.append(c.subscribe_mask)
        if direct:
            written = 0
            for c, took in zip(direct, pump.send(data, run.type_mask, fds, wants), strict=True):
                if took < 0:
                    deliver(c, run)
                    continue
                written += took
                if took < size:
                    c.port.write(data[took:])
            self.counters["stream_direct"] += written
        sess.last_activity = time.monotonic()
        member.stream_frames += run.count
        self.owed(member)

    def owed(self, member: Member) -> None:
        """A guest's frames taken since its last ack: one is on its way."""
        if member.ack and member.stream_frames != member.acked and not member.ack_pending:
            self.schedule_ack(member)

    def replay(self, member: Member) -> None:
        """The scrollback of the member's session (or of every session, for "*")."""
        followed = [member.session] if member.session is not None else list(self.relay.registry)
        for s in followed:
            for chunk in s.scrollback.replay():
                self.deliver(member, run_of(chunk))

    # ---------------------------------------------------------------- cut-through
    def busy_with(self, sess: Session, ev: StreamStart) -> CutThrough | None:
        """Another session's cut-through frame in flight to a subscriber this
        frame would go to (a "*" client): this one must wait for its end."""
        bit = TYPE_BIT[ev.msg_type]
        for c in self.relay.star_clients:
            ct = c.frame_in
            if ct is not None and c.subscribe_mask & bit and c.joined and not c.port.closed:
                return ct
        return None

    def cut_through_start(self, sess: Session, ev: StreamStart, source: Member) -> None:
        bit = TYPE_BIT[ev.msg_type]
        targets = [c for c in self.subscribers(sess) if c.subscribe_mask & bit and c.joined]
        ct = sess.cut_through = CutThrough(targets, ev, sess.scrollback.capacity - HEADER_SIZE, source)
        for c in targets:
            c.frame_in = ct
        self.counters["stream_bytes"] += len(ev.data)
        self.counters["stream_frames"] += 1
        for c in targets:
            c.port.write_part(ev.data, False)
        ct.keep_tail(ev.data[HEADER_SIZE:])

    def cut_through_chunk(self, sess: Session, ev: StreamChunk) -> None:
        ct = sess.cut_through
        last = ev.remaining == 0
        self.counters["stream_bytes"] += len(ev.data)
        for c in ct.targets:
            if not c.port.closed:
                c.port.write_part(ev.data, last)
        ct.keep_tail(ev.data)
        if last:
            frame = ct.frame_for_scrollback()
            if frame:
                sess.scrollback.append(frame)
            self._end_cut_through(sess)

    def hold_behind(self, ct: CutThrough, member: Member, events: list) -> None:
        """Another guest's events arrived mid cut-through frame (of its session,
        or of another one to a subscriber they share): they wait (and it does)."""
        ct.waiting.append((member, events))
        member.held_by = ct
        member.port.pause_reading("cut_through")

    def _end_cut_through(self, sess: Session) -> None:
        """The frame in flight is over: everyone joins again, and what other
        guests sent meanwhile goes out now, in order."""
        ct, sess.cut_through = sess.cut_through, None
        for c in ct.targets:
            if c.frame_in is ct:
                c.frame_in = None
        for c in (*sess.clients, *self.relay.star_clients):
            if not c.joined:
                c.joined = True
                if c.replay_pending:  # joined mid-frame asking for replay: the scrollback now holds it
                    c.replay_pending = False
                    self.replay(c)
        waiting, ct.waiting = ct.waiting, []
        for member, events in waiting:  # a guest that left meanwhile still had these frames accepted
            member.held_by = None
            if member.port.closed:
                events = whole(events)  # not a frame whose rest will never come
            self.relay.guest_events(member, events)  # may start the next cut-through frame, or wait again
            if member.port.closed and member.session is not None:
                self.relay.resends.outbox_gone(member, member.session)  # what it sent last is taken now
            if member.held_by is None:
                member.port.resume_reading("cut_through")

    def cut_through_lost(self, sess: Session, member: Member) -> None:
        """The guest sending a cut-through frame is gone mid-frame: its
        subscribers hold a partial frame that can never be completed (and an
        Error frame would land inside its payload), so they are closed; the
        rest of the frame was never accepted and the scrollback does not keep it."""
        for c in sess.cut_through.targets:
            if not c.port.closed:
                log.warning("closing subscriber peer=%s: the guest %s left in the middle of a frame",
                            c.label, member.label)
                c.port.close()
        self._end_cut_through(sess)

    # ---------------------------------------------------------------- acks
    def hello(self, member: Member) -> None:
        """Tell an agent that asked for acks that it gets them, the session it is
        in and the attach token for the programs it starts."""
        sess = member.session
        member.port.send(notification("vhub.hello", {"ack": True, "session": sess.name,
                                                     "attach_token": sess.attach_token}))

    def schedule_ack(self, member: Member) -> None:
        member.ack_pending = True
        self.relay.call_later(0, lambda: self._send_ack(member))

    def ack_now(self, member: Member) -> bool:
        """At shutdown: acknowledge what every lossless subscriber has taken; False
        if one has not (those frames stay unacknowledged: the agent resends them)."""
        sess = member.session
        if sess is None or any(not c.lossy and c.port.buffered() for c in self.subscribers(sess)):
            return False
        self._ack(member)
        return True

    def _ack(self, member: Member) -> None:
        """``vhub.ack`` for the frames taken whole (not one still cut through:
        if the link drops in its middle, the agent must send it again)."""
        taken = settled(member)
        if taken != member.acked:
            member.acked = taken
            member.port.send(notification("vhub.ack", {"frames": taken}))

    def _send_ack(self, member: Member) -> None:
        """Ack stream frames once every lossless destination has taken them
        (the kernel then owns the bytes: a daemon crash cannot lose them)."""
        member.ack_pending = False
        sess = member.session
        if sess is None or member.port.closed:
            return
        for c in self.subscribers(sess):
            if not c.lossy and c.port.buffered():
                member.ack_pending = True
                self.relay.call_later(ACK_RETRY, lambda: self._send_ack(member))
                return
        self._ack(member)

    # ---------------------------------------------------------------- backpressure
    def session_blocked(self, sess: Session) -> bool:
        """A lossless subscriber of ``sess`` is full: its guests must not be read."""
        return any(sess in c.sessions_blocked for c in (*sess.clients, *self.relay.star_clients))

    def write_paused(self, member: Member, frame_in_flight: bool = False) -> None:
        """A destination's transport is above its high-water mark (or, with
        ``frame_in_flight``, what waits behind a cut-through frame to it is:
        then the guest sending that frame goes on, so that it can end). A
        lossless subscriber stops its sessions' guests; whoever writes to it
        otherwise is stopped as it writes (``note_write``)."""
        if member.role == "client" and not member.lossy and member.subscribe_mask:
            sessions: Any = self.relay.registry if member.all_sessions else (
                [member.session] if member.session is not None else [])
            for s in sessions:
                member.sessions_blocked.add(s)
                ct = s.cut_through
                for g in s.guests:
                    if not (frame_in_flight and ct is not None and ct.source is g):
                        g.port.pause_reading("backpressure")

    def write_resumed(self, member: Member) -> None:
        if member.sessions_blocked:
            blocked, member.sessions_blocked = member.sessions_blocked, set()
            for s in blocked:
                if not self.session_blocked(s):
                    for g in s.guests:
                        g.port.resume_reading("backpressure")
        self.release_writers(member)

    @staticmethod
    def note_write(origin: Member, dest: Member) -> None:
        """``origin`` just wrote to ``dest`` (a forwarded request, input for an
        agent): if ``dest`` is not taking it, ``origin`` is not read until it does."""
        if dest.port.buffered() > dest.port.limits.high_water and origin is not dest:
            dest.blocked_writers.add(origin)
            origin.port.pause_reading("writer")

    @staticmethod
    def release_writers(member: Member) -> None:
        writers, member.blocked_writers = member.blocked_writers, set()
        for w in writers:
            if not w.port.closed:
                w.port.resume_reading("writer")
