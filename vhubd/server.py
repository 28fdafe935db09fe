"""The only module that touches transports.

Listeners (guest Unix socket, loopback TCP, AF_VSOCK, control socket), one
``Peer`` (an ``asyncio.BufferedProtocol``) per connection that pumps bytes
between its transport and its sans-I/O ``Connection``, and a once-a-second
tick for handshake/stall/heartbeat timeouts and buffer shrinking. Routing is
the relay's; ``OSError`` is translated here.

About 420 lines, on purpose: ``Peer`` is where a transport, its ``Connection``
and the relay's ``Port`` meet, and its timers, holds and bounds share that state.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import sys
import time

from . import codec
from .frames import TYPE_BIT, MsgType
from .listeners import ListenerSpec, peer_label, unlink_socket
from .paths import env
from .protocol import Connection, Handshake, Side, State, StreamRun, Violation, error_frame, heartbeat
from .relay import Accept, Decision, Limits, Member, Refuse, Relay
from .sessions import State as SessionState

log = logging.getLogger("vhubd")
_monotonic = time.monotonic
# Slowloris: a peer in the middle of a frame must finish it, or send at least
# this many bytes a second, over each stall_timeout window (not only "some byte").
MIN_FRAME_RATE = 1024
JOIN_BELOW = 64 * 1024  # a batch's writes to one peer up to this size are joined into one buffer
# what the stream pump forwards itself: guest output (a channel's StreamData goes point to point)
PUMP_TYPES = TYPE_BIT[MsgType.STDOUT] | TYPE_BIT[MsgType.STDERR]
PUMP_AT = 32 * 1024  # a guest's read this large (bulk output) hands it to the pump ...
PUMP_SMALL = 4096  # ... and this many reads in a row smaller than this (RPCs, a prompt) hand it back
PUMP_IDLE_READS = 64
_AGAIN = (-errno.EAGAIN, -errno.EWOULDBLOCK, -errno.EINTR)



class DeviceListener:
    """Guest connections that a VM's own vsock device delivers: the device
    names the session, so no token is asked."""

    role = "guest"
    token_required = False

    def __init__(self, name: str, session: str):
        self.name = name
        self.fixed_session: str | None = session


class InProcessListener:
    """Control connections the daemon makes to itself (the HTTP API's clients):
    a socketpair, so they take the same path through the relay as any client."""

    role = "client"
    token_required = False
    fixed_session: str | None = None
    name = "http"


class Peer(asyncio.BufferedProtocol):
    """One accepted connection: pumps bytes between its transport and its
    sans-I/O ``Connection``, and is the relay's ``Port`` for it."""

    def __init__(self, hub: Server, spec: ListenerSpec | DeviceListener | InProcessListener):
        self.hub = hub
        self.spec = spec
        self.relay = hub.relay
        self.limits: Limits = hub.limits
        self.transport: asyncio.Transport | None = None
        # only guest output is forwarded cut-through; a client's StreamData goes to
        # one agent as a whole frame (the relay has no cut-through path towards agents)
        self.conn = Connection(Side.SERVER, max_payload=hub.config.max_payload,
                               cut_through=hub.config.cut_through if spec.role == "guest" else 1 << 62,
                               initial_buffer=hub.config.initial_buffer, max_handshake=hub.config.max_handshake)
        self.member: Member | None = None  # the relay's view of this peer, once admitted (or deferred)
        self.on_events = self.relay.guest_events if spec.role == "guest" else self.relay.client_events
        self.handshaken = False
        self.hs_request_id = 0
        self.closed = False
        self.lossy = False
        self.label = "?"
        now = _monotonic()
        self.connected_at = now
        self.last_rx = now
        self.frames_counted = 0  # of conn.frames_received, added to the frames_in counter
        self.last_ping = now
        self.ping_id = 0
        self.read_paused = False
        self.pause_reasons: set[str] = set()  # why we do not read it: backpressure, cut_through, writer, replies
        self.replies_blocked_at: float | None = None  # since when it has not read its own answers
        self.write_paused = False  # the transport is above its high-water mark
        # while a cut-through frame is being written to this peer, everything else
        # written to it (pings, pongs, RPC answers, events) waits here: inside the
        # frame's payload it would corrupt the stream
        self.held: list | None = None
        self.held_bytes = 0
        # what was written to it while a read batch (of any peer) is handled: written
        # at the batch's end, in one call (one syscall per destination per batch)
        self.pending: list = []
        self.pending_bytes = 0
        self.held_paused = False
        self.awaiting_boot = False
        self.frame_mark: tuple[float, int, int] | None = None  # (since, bytes, frames) while mid-frame
        self.abort_timer: asyncio.TimerHandle | None = None  # after close(): abort if the close hangs
        self.out_fd = -1  # its socket, for the stream pump's direct writes (direct_fd)
        self.pump_fd = -1  # an admitted guest read by the stream pump: our dup of its socket
        self.pump_small = 0  # small reads in a row through the pump
        self.pump_error: str | None = None  # what the pump's read met (the transport then sees EOF)

    # -- asyncio callbacks (never raise) --
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.label = peer_label(transport, self.spec.name)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.type == socket.SOCK_STREAM:  # not a VM device's own transport
            self.out_fd = sock.fileno()
        transport.set_write_buffer_limits(high=self.limits.high_water)
        self.hub.peers.add(self)
        counts = self.hub.role_counts
        counts[self.spec.role] += 1
        limit = self.hub.config.max_connections if self.spec.role == "guest" else self.hub.config.max_clients
        if counts[self.spec.role] > limit:
            # guests and the operator's control socket count apart: no guest locks the operator out
            self.relay.counters["refused"] += 1
            self.relay.refusals["too_many_connections"] += 1
            self.relay.refusal_log.warning("refused peer=%s code=too_many_connections (%d %s connections)",
                                           self.label, limit, self.spec.role)
            self.conn.fail("too_many_connections", f"the daemon serves at most {limit} {self.spec.role} "
                                                   "connections")
            self.flush()
            self.close()
            return
        log.debug("connected peer=%s", self.label)

    def _count_frames(self) -> None:
        """``frames_in``: every frame from every peer after its handshake (heartbeats too)."""
        n = self.conn.frames_received
        if n != self.frames_counted:
            self.relay.counters["frames_in"] += n - self.frames_counted
            self.frames_counted = n

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.rx.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        hub = self.hub
        outer = not hub.batching
        hub.batching = True
        try:
            self.last_rx = _monotonic()
            self._handle(self.conn.buffer_updated(nbytes))
            if nbytes >= PUMP_AT and not self.closed and self.pump_fd < 0 and self.handshaken \
                    and self.spec.role == "guest":
                self._start_pump()  # bulk output: the pump reads it from now on
        except Exception:
            self._internal_error()
        finally:
            if outer:
                hub.batching = False
                hub.write_pending()

    def _handle(self, events: list) -> None:
        """A read's events to the relay, then the Connection's answers; a
        Connection that closed closes the peer."""
        self._count_frames()
        if events:
            if self.handshaken:
                self.on_events(self.member, events)  # type: ignore[arg-type]
            else:
                self._before_handshake(events)
        if self.conn._out:
            self.flush()
        if self.conn.state is State.CLOSED and not self.closed:
            self.close()

    def _internal_error(self) -> None:
        log.exception("internal error handling peer=%s", self.label)
        self.conn.fail("internal_error", "the daemon hit an internal error on this connection")
        self.flush()
        self.close()

    def _before_handshake(self, events: list) -> None:
        for ev in events:
            if type(ev) is Handshake:
                self.hs_request_id = ev.request_id
                payload = bytes(ev.payload)
                if self.spec.role == "guest":
                    decision = self.relay.guest_handshake(self, self.spec, payload)
                else:
                    decision = self.relay.client_handshake(self, payload)
                self._carry_out(decision)
                return
            if type(ev) is Violation:
                self.relay.counters["violations"] += 1
                log.warning("protocol violation before handshake peer=%s code=%s %s", self.label,
                            ev.error.code, ev.error.message)
                return

    def _carry_out(self, decision: Decision) -> None:
        """Answer the handshake as the relay decided."""
        t = type(decision)
        if t is Accept:
            member = decision.member  # type: ignore[union-attr]
            self.conn.accept(decision.payload, self.hs_request_id)  # type: ignore[union-attr]
            self.flush()
            self.member = member
            lane = self.relay.rpc.lane(member)
            if lane is not None:
                self.conn.set_fast_lane(*lane)
            self.awaiting_boot = False
            self.handshaken = True
            if member.lossy:
                self.lossy = True
                if self.transport is not None:  # lossy: never pauses anyone; its own bound drops it
                    self.transport.set_write_buffer_limits(high=2 * self.limits.lossy_limit)
            self.relay.admitted(member)
            more = self.conn.resume()  # what the peer sent behind its handshake
            self._count_frames()
            if more:
                self.on_events(member, more)
            if self.conn._out:
                self.flush()
        elif t is Refuse:
            self.conn.fail(decision.code, decision.message)  # type: ignore[union-attr]
            self.flush()
            self.close()
        else:
            self.member = decision.member  # type: ignore[union-attr]
            self.awaiting_boot = True  # settled by complete() when the boot ends

    def complete(self, decision: Accept | Refuse) -> None:
        if self.closed or self.transport is None:
            return
        try:
            self._carry_out(decision)
        except Exception:
            log.exception("internal error completing the handshake of peer=%s", self.label)
            self.close("internal_error", "the daemon hit an internal error on this connection")

    def eof_received(self):
        self.conn.receive_eof()
        return False

    def connection_lost(self, exc) -> None:
        self._stop_pump(resume=False)
        if self.abort_timer is not None:  # gone already: the timer would keep this peer alive for nothing
            self.abort_timer.cancel()
            self.abort_timer = None
        if self.closed and self.transport is None:
            return
        self.closed = True
        self.pending, self.pending_bytes = [], 0
        if self in self.hub.peers:
            self.hub.peers.discard(self)
            self.hub.role_counts[self.spec.role] -= 1
        if self.member is not None:
            try:
                reason = str(exc) if exc is not None else self.pump_error or "connection closed"
                self.relay.lost(self.member, reason)
            except Exception:
                log.exception("internal error while dropping peer=%s", self.label)
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.member is not None:
            self.relay.write_paused(self.member)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.replies_blocked_at is not None:
            self.replies_blocked_at = None
            self.resume_reading("replies")
        if self.member is not None:
            self.relay.write_resumed(self.member)

    # -- the Port: what the relay calls --
    def write(self, data) -> None:
        """Bytes another peer produced for this one (stream output, a forwarded
        request, input): above the high-water mark their sources pause."""
        if self.transport is not None and not self.closed:
            if self.held is not None:
                self._hold(data)
            else:
                self._put(data)
            self._bound(True)
            self._wanted()

    def _wanted(self) -> None:
        """Bytes for a guest of a session in standby: the relay wakes it."""
        m = self.member
        if m is not None and m.role == "guest" and m.session is not None and m.session.state is SessionState.STANDBY:
            self.relay.wanted(m.session)

    def send(self, frame) -> None:
        """An answer to what this peer sent (a reply, a pong, an ack): a peer
        that does not read its answers is not read either, until it does."""
        if self.transport is not None and not self.closed:
            if self.held is not None:
                self._hold(frame)
            else:
                self._put(frame)
            if self.buffered() > self.limits.high_water:
                self._replies_unread()
            self._bound(True)

    def _replies_unread(self) -> None:
        if self.replies_blocked_at is None:
            self.replies_blocked_at = _monotonic()
            self.pause_reading("replies")

    def _bound(self, at_boundary: bool) -> None:
        """Every byte queued toward a peer is bounded: a lossy subscriber past its
        limit, or anyone past the hard bound, is dropped with slow_consumer."""
        queued = self.buffered()
        limit = self.limits.lossy_limit if self.lossy else self.limits.max_output
        if queued > limit:
            self.relay.counters["slow_consumers"] += 1
            log.warning("slow consumer dropped peer=%s buffered=%d (mid-frame: %s)", self.label, queued,
                        not at_boundary)
            # mid-frame, close() sends no Error: it would land inside the frame's payload
            self.close("slow_consumer", f"too slow: {queued} bytes were waiting for it (the limit is {limit})")

    def write_part(self, data, last: bool) -> None:
        """Bytes of a cut-through frame: written now; any other write waits
        until the ``last`` part is out."""
        if self.transport is None or self.closed:
            return
        if self.held is None:
            self.held = []
        self._put(data)
        if last:
            held, self.held, self.held_bytes = self.held, None, 0
            for d in held:
                self._put(d)
            if self.held_paused:
                self.held_paused = False
                if not self.write_paused and self.member is not None:
                    self.relay.write_resumed(self.member)
        self._bound(last)

    def _hold(self, data) -> None:
        assert self.held is not None  # only while a cut-through frame is in flight
        self.held.append(bytes(data))
        self.held_bytes += len(data)
        if self.held_bytes > self.limits.high_water and not self.held_paused:
            # backpressure counts what waits here too (a '*' subscriber gets other
            # sessions' output): pause its sources, except the frame in flight
            self.held_paused = True
            if self.member is not None:
                self.relay.write_paused(self.member, frame_in_flight=True)

    def flush(self) -> None:
        """What the Connection queued (pongs, handshake answers, Error frames):
        answers to the peer, bounded as ``send``."""
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.closed:
            if self.held is not None and not self.closed:
                for d in out:
                    self._hold(d)
            else:
                for d in out:
                    self._put(d)
            if not self.closed:
                if self.buffered() > self.limits.high_water:
                    self._replies_unread()
                self._bound(True)

    def close(self, code: str | None = None, message: str = "") -> None:
        """Close after what is queued (with ``code``, an Error first), without a
        reset: half-close, then read and drop until the peer goes (or the close
        grace passes), so a peer still writing reads the Error instead of EPIPE."""
        if self.closed or self.transport is None:
            return
        transport = self.transport
        self.write_pending()  # what was accepted for it goes first
        if code is not None and self.held is None:  # never inside a cut-through frame's payload
            transport.write(error_frame(code, message))
        self.closed = True
        self.conn.close()  # what it sends from now on is dropped
        self._stop_pump(resume=not self.read_paused)  # the transport reads (and drops) what comes
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered
            self.pause_reasons.clear()
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
        else:
            transport.close()  # flushes what is buffered first
        self.abort_timer = self.hub.loop.call_later(self.hub.config.close_grace, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, reason: str = "backpressure") -> None:
        self.pause_reasons.add(reason)
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.frame_mark = None  # a paused peer's slowness is ours
            if self.pump_fd >= 0:
                self.hub.loop.remove_reader(self.pump_fd)
            else:
                self.transport.pause_reading()

    def resume_reading(self, reason: str = "backpressure") -> None:
        self.pause_reasons.discard(reason)
        if self.read_paused and not self.pause_reasons and self.transport is not None and not self.closed:
            self.read_paused = False
            self.last_rx = _monotonic()  # the time spent paused does not count as idle
            if self.pump_fd >= 0:
                self.hub.loop.add_reader(self.pump_fd, self._pumped)
            else:
                self.transport.resume_reading()

    def buffered(self) -> int:
        return ((self.transport.get_write_buffer_size() if self.transport is not None else 0) + self.held_bytes
                + self.pending_bytes)

    def direct_fd(self) -> int:
        t = self.transport
        if (self.out_fd < 0 or t is None or self.closed or self.held is not None or self.pending
                or t.get_write_buffer_size() or t.is_closing()):
            return -1
        return self.out_fd

    # -- the stream pump (admitted guests) --
    def _start_pump(self) -> None:
        """A guest sending bulk output is read by the codec's pump from now
        on: one call reads, another writes the plain stream frames a read
        completes straight to the subscribers' sockets; the rest of each read
        goes through the Connection and the relay as before. It reads through
        a dup of the socket, so that the transport (paused for reading) keeps
        writing to it. Back to the transport after PUMP_IDLE_READS small reads."""
        self.pump_small = 0
        t = self.transport
        if self.hub.pump is None or self.out_fd < 0 or t is None or self.closed or self.pump_fd >= 0:
            return
        try:
            fd = os.dup(self.out_fd)
        except OSError:
            return
        self.pump_fd = fd
        if self.read_paused:
            return  # the transport is paused already; resume_reading() adds the reader
        t.pause_reading()
        self.hub.loop.add_reader(fd, self._pumped)

    def _stop_pump(self, resume: bool) -> None:
        """Back to the transport's reads (it meets EOF and errors itself)."""
        fd, self.pump_fd = self.pump_fd, -1
        if fd < 0:
            return
        self.hub.loop.remove_reader(fd)
        os.close(fd)
        if resume and not self.read_paused and self.transport is not None:
            self.transport.resume_reading()

    def _pumped(self) -> None:
        """The guest's socket is readable: one pump call, then what it did not
        forward goes to the Connection and the relay, in order."""
        if self.pump_fd < 0 or self.closed:
            return
        hub = self.hub
        pump = hub.pump
        assert pump is not None  # only started with one
        outer = not hub.batching
        hub.batching = True
        try:
            conn = self.conn
            rx = conn.rx
            rx.make_room()
            member = self.member
            sess = member.session  # type: ignore[union-attr]
            fast = PUMP_TYPES if conn.pumpable and sess is not None and sess.cut_through is None else 0
            start = rx.start
            nread, consumed, count, mask, need = pump.read(self.pump_fd, rx.buf, start, rx.end, conn.max_payload,
                                                           fast)
            if nread <= 0:
                if nread not in _AGAIN:
                    if nread < 0:  # consumed by our read: the transport will only see EOF
                        self.pump_error = os.strerror(-nread)
                    self._stop_pump(resume=True)  # EOF or an error: the transport meets it itself
                return
            self.last_rx = _monotonic()
            if nread < PUMP_SMALL:
                self.pump_small += 1
                if self.pump_small >= PUMP_IDLE_READS:
                    self._stop_pump(resume=True)  # no bulk any more: the transport's reads cost less
            else:
                self.pump_small = 0
            run = StreamRun(memoryview(rx.buf)[start:consumed], count, mask) if count else None
            events = conn.pumped(nread, consumed, count, need)  # the rest's events: delivered after the run
            if run is not None:
                self.relay.streams.pumped(member, sess, run, pump)  # type: ignore[arg-type]
                del run
            self._handle(events)
        except Exception:
            self._internal_error()
        finally:
            if outer:
                hub.batching = False
                hub.write_pending()

    def _put(self, data) -> None:
        """Write ``data`` now, or, while a read batch is handled, at its end
        (``Server.write_pending``): one write per destination per batch."""
        if self.hub.batching:
            if not self.pending:
                self.hub.dirty.append(self)
            self.pending.append(data)
            self.pending_bytes += len(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def write_pending(self) -> None:
        out = self.pending
        if out:
            size = self.pending_bytes
            self.pending = []
            self.pending_bytes = 0
            transport = self.transport
            if transport is None or self.closed or transport.is_closing():
                return  # closed (half-closed after its Error) or gone: what was queued for it goes nowhere
            if len(out) == 1:
                transport.write(out[0])
            elif size <= JOIN_BELOW:  # small frames (RPCs): one copy beats a writev of many pieces
                transport.write(b"".join(out))
            else:
                transport.writelines(out)
            # who was paused because these bytes were waiting (replies it did not read
            # yet, writers to it) goes on if the transport took them below its mark:
            # then no resume_writing() will come to say so
            if (not self.write_paused and (self.replies_blocked_at is not None or
                                           (self.member is not None and self.member.blocked_writers))
                    and self.buffered() <= self.limits.high_water):
                self.resume_writing()

    # -- shutdown --
    def subscriber_backlog(self) -> int:
        """Stream output still queued toward this lossless subscriber."""
        m = self.member
        if self.closed or m is None or m.role != "client" or m.lossy or not m.subscribe_mask:
            return 0
        return self.buffered()

    def shut_down(self) -> None:
        """``Error shutting_down`` after whatever was queued, then the close
        without a reset: it reads the Error and goes (to the next daemon)."""
        self.flush()
        self.close("shutting_down", "the daemon is shutting down; connect again")

    # -- the tick --
    def tick(self, now: float) -> None:
        cfg = self.hub.config
        if self.closed:
            return
        if not self.handshaken:
            if not self.awaiting_boot and now - self.connected_at > cfg.handshake_timeout:
                self._timeout("handshake_timeout", f"no handshake within {cfg.handshake_timeout:g} s")
            return
        if self.replies_blocked_at is not None and now - self.replies_blocked_at > cfg.stall_timeout:
            self.relay.counters["slow_consumers"] += 1
            self._timeout("slow_consumer", f"it did not read its answers for {cfg.stall_timeout:g} s")
            return
        if self.read_paused:
            self.frame_mark = None
            return  # we stopped reading it (backpressure): its silence is ours, not a stall
        m = self.member
        if m is not None and m.session is not None and m.session.state is SessionState.STANDBY and m.role == "guest":
            self.last_rx = now  # paused on purpose: no heartbeats, no stall; idle counts from the wake
            self.frame_mark = None
            return
        idle = now - self.last_rx
        if self.conn.mid_frame and idle > cfg.stall_timeout:
            self._timeout("stalled", f"no bytes for {cfg.stall_timeout:g} s in the middle of a frame")
            return
        if self._dripping(now, cfg.stall_timeout):
            return
        if cfg.heartbeat_interval > 0:
            # a peer that answered pings once must keep answering; an attached program
            # (our library) must answer at all: silent connections do not pile up
            attached = self.member is not None and self.member.attached
            if (self.conn.pongs_received or attached) and idle > cfg.dead_after:
                self._timeout("heartbeat_timeout", f"no answer to heartbeats for {cfg.dead_after:g} s")
                return
            if idle >= cfg.heartbeat_interval and now - self.last_ping >= cfg.heartbeat_interval:
                self.ping_id += 1
                self.last_ping = now
                self.write(heartbeat(self.ping_id))
        if idle > 2.0 and not self.conn.mid_frame:
            self.conn.rx.shrink()
            if self.pump_fd >= 0:
                self._stop_pump(resume=True)  # quiet: its dup and reader go (back at the next bulk read)

    def _dripping(self, now: float, window: float) -> bool:
        """Close a peer that keeps one frame open by dripping bytes (slowloris):
        no frame finished and under MIN_FRAME_RATE for a whole window."""
        conn = self.conn
        if not conn.mid_frame:
            self.frame_mark = None
            return False
        mark = self.frame_mark
        if mark is None or mark[2] != conn.frames_received:
            self.frame_mark = (now, conn.bytes_received, conn.frames_received)
            return False
        since, got = now - mark[0], conn.bytes_received - mark[1]
        if since <= window:
            return False
        if got < MIN_FRAME_RATE * since:
            self._timeout("stalled", f"a frame open for {since:.0f} s at {got / since:.0f} bytes/s "
                                     f"(the minimum mid-frame is {MIN_FRAME_RATE} bytes/s)")
            return True
        self.frame_mark = (now, conn.bytes_received, conn.frames_received)
        return False

    def _timeout(self, code: str, message: str) -> None:
        log.warning("closing peer=%s code=%s %s", self.label, code, message)
        self.conn.fail(code, message)
        self.flush()
        self.close()


class Server:
    """Listeners + peers + the relay."""

    def __init__(self, config, relay: Relay, loop: asyncio.AbstractEventLoop, limits: Limits | None = None):
        self.config = config
        self.relay = relay
        self.loop = loop
        self.limits = limits or Limits(high_water=config.high_water, lossy_limit=config.lossy_limit,
                                       max_output=config.max_output, max_inflight=config.max_inflight)
        self.peers: set[Peer] = set()
        self.role_counts = {"guest": 0, "client": 0}  # connections by role: separate limits
        self.batching = False  # a read batch is being handled: writes wait for its end
        self.dirty: list[Peer] = []  # peers with writes waiting for the batch's end
        # reads admitted guests (Peer._pumped); BLINK_PUMP=0: through their transports, as before it
        self.pump = codec.Pump() if env("BLINK_PUMP", "1").strip() not in ("0", "no", "off") else None
        self.listeners: list[ListenerSpec] = []
        self._tick_handle: asyncio.TimerHandle | None = None

    async def start(self, specs: list[ListenerSpec]) -> None:
        for spec in specs:
            await self.add_listener(spec)
        self._schedule_tick()

    async def add_listener(self, spec: ListenerSpec) -> None:
        """Serve a bound, listening socket (connections already queue in the kernel)."""
        if spec.sock.fileno() < 0:
            return  # removed before it was served
        addr = spec.owned_path or spec.sock.getsockname()
        spec.address = list(addr) if isinstance(addr, tuple) else addr
        factory = functools.partial(Peer, self, spec)
        if spec.sock.family == socket.AF_UNIX:
            kw: dict = {}
            if spec.owned_path is None and sys.version_info >= (3, 13) \
                    and isinstance(self.loop, asyncio.BaseEventLoop):
                kw["cleanup_socket"] = False  # asyncio >= 3.13 would unlink a path systemd gave us
            spec.server = await self.loop.create_unix_server(factory, sock=spec.sock, backlog=1024, **kw)
        else:
            spec.server = await self.loop.create_server(factory, sock=spec.sock, backlog=1024)
        self.listeners.append(spec)

    def remove_listener(self, spec: ListenerSpec) -> None:
        """Stop accepting on ``spec`` and remove its socket file (if it is ours)."""
        if spec in self.listeners:
            self.listeners.remove(spec)
        if spec.server is not None:
            spec.server.close()
        else:
            spec.sock.close()
        unlink_socket(spec.owned_path)

    def addresses(self) -> dict:
        """Each listener's address: a path, or [host, port], or a vsock port
        (known from its start: a closed listener still names where it was)."""
        return {spec.name: spec.address for spec in self.listeners}

    def guest_protocol(self, name: str, session: str):
        """A protocol factory for guest connections that a transport of its own
        (a VM's vsock device) delivers for ``session``: no token, the session is fixed."""
        return functools.partial(Peer, self, DeviceListener(name, session))

    def write_pending(self) -> None:
        """The batch is over: each peer written to gets what it was given, in one write."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for p in dirty:
                try:
                    p.write_pending()
                except Exception:  # one peer's failure must not leave the others' bytes unwritten
                    log.exception("internal error writing to peer=%s", p.label)
                    p.pending, p.pending_bytes = [], 0
                    p.close("internal_error", "the daemon hit an internal error on this connection")

    async def connect_in_process(self) -> socket.socket:
        """A control connection from inside the daemon: one end of a socketpair is
        served as a client peer (counted, bounded and routed like any other),
        the other is returned for ``vhubd.client.Client.connect(sock=...)``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.loop.connect_accepted_socket(functools.partial(Peer, self, InProcessListener()), ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs

    def _schedule_tick(self) -> None:
        self._tick_handle = self.loop.call_later(self.config.tick, self._tick)

    def _tick(self) -> None:
        now = _monotonic()
        for p in list(self.peers):
            try:
                p.tick(now)
            except Exception:
                log.exception("tick failed for peer=%s", p.label)
        self._schedule_tick()

    def stop_accepting(self) -> None:
        """Close the listening sockets without unlinking them: a socket systemd
        passed stays open in PID 1, so new connections wait in its queue for the
        next daemon instead of being refused."""
        for spec in self.listeners:
            if spec.server is not None:
                spec.server.close()
            else:
                spec.sock.close()

    async def shutdown(self, drain: float = 5.0) -> None:
        """A restart that drops nothing. Stop accepting; stop reading guests'
        output and let what was read reach its subscribers, then acknowledge it
        (an agent resends only what the next daemon has not seen); tell every
        connection ``shutting_down`` after what it was sent, half-close, and read
        (and drop) until it closes, so nobody writing to us gets a reset."""
        if self._tick_handle:
            self._tick_handle.cancel()
        self.stop_accepting()
        loop = self.loop
        deadline = loop.time() + drain
        peers = [p for p in self.peers if not p.closed]
        for p in peers:
            if p.spec.role == "guest":
                p.pause_reading("shutdown")
        while loop.time() < deadline and any(p.subscriber_backlog() for p in peers):
            await asyncio.sleep(0.01)
        for p in peers:
            if p.member is not None and p.member.ack and not p.closed:
                self.relay.streams.ack_now(p.member)
        for p in list(self.peers):
            p.shut_down()
        grace = max(deadline, loop.time() + 1.0)
        while any(p.transport is not None for p in self.peers) and loop.time() < grace:
            await asyncio.sleep(0.01)
        for p in list(self.peers):
            if p.transport is not None:
                p.transport.abort()
        for spec in self.listeners:
            unlink_socket(spec.owned_path)
