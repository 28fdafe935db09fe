"""The relay's front: one object the I/O layer talks to, dispatching to the
parts that own each job.

- ``admission``: handshakes, roles, tokens (``Accept``/``Refuse``/``Defer``)
- ``streams``: fan-out, cut-through, scrollback, acks, backpressure
- ``rpc``: request ids, in-flight calls, expiry
- ``terminals``: the writer seat of each terminal execution
- ``calls``: the daemon's own ``vhub.*`` calls

The I/O layer calls ``guest_handshake``/``client_handshake`` with a ``Port``,
then ``admitted``, ``guest_events``/``client_events`` with each batch of
protocol events, ``write_paused``/``write_resumed`` from the transport's flow
control, and ``lost`` when the connection ends. Nothing here touches I/O; time
comes from the ``clock`` and ``call_later`` it is given.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import codec, frames
from ..errors import clip
from ..protocol import (
    Frame,
    Ping,
    Pong,
    RemoteErrorEvent,
    StreamChunk,
    StreamRun,
    StreamStart,
    Violation,
    notification,
)
from ..ratelog import RateLimitedLog
from ..sessions import Session, SessionRegistry, State
from .admission import Admission
from .calls import DaemonCalls
from .channels import Channels
from .exposures import Exposures
from .members import Member
from .port import Decision, Listener, Port
from .resent import Resends
from .rpc import Rpc
from .streams import Streams
from .terminals import Terminals

log = logging.getLogger("vhubd")

RPC_REQUEST = int(frames.MsgType.RPC_REQUEST)
RPC_RESPONSE = int(frames.MsgType.RPC_RESPONSE)
RPC_ERROR = int(frames.MsgType.RPC_ERROR)
TO_AGENT = frozenset({int(frames.MsgType.STREAM_DATA), int(frames.MsgType.TTY_RESIZE)})
SD = int(frames.MsgType.STREAM_DATA)
SD_BIT = frames.TYPE_BIT[SD]
CHANNEL_BASE = frames.CHANNEL_BASE


class Booter(Protocol):
    """Boots and stops sessions (``boot.BootManager``); the relay only waits on it."""

    def boot(self, name: str, params: dict) -> Any:
        """A future: the boot's result dict, or BootFailed."""

    def stop(self, name: str) -> Any:
        """A future: the stop's result dict, or CallFailed."""

    def forget(self, name: str) -> None:
        """The session is removed: drop what is kept about it."""

    def standby(self, name: str) -> Any:
        """A future: the session paused (its result dict), or CallFailed."""

    def wake(self, name: str) -> Any:
        """A future: the session resumed from standby (its result dict)."""


class Config:
    """Relay-level settings (the daemon fills it from its own)."""

    def __init__(self, **kw: Any):
        self.max_payload = frames.DEFAULT_MAX_PAYLOAD
        self.anonymous_session: str | None = "default"
        self.rpc_timeout = 30.0
        self.scrollback = 1 << 20
        self.lossy_limit = 4 << 20
        self.high_water = 1 << 20
        self.allow_multiple_agents = False
        self.max_attached = 64  # attached guest connections per session
        self.max_channels = 1024  # open channels (exposed ports' connections, copies) per session
        self.max_channel_frame = frames.CHANNEL_FRAME  # below the guests' cut-through size
        self.default_backend = "external"
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown relay setting {k}")
            setattr(self, k, v)


class Relay:
    """The routing core. One per daemon."""

    def __init__(self, config: Config, registry: SessionRegistry, call_later: Callable[[float, Callable], Any],
                 boots: Booter | None = None, on_stats: Callable[[], dict] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.registry = registry
        self.call_later = call_later
        self.clock = clock  # the one clock: deadlines and timers use it (tests pass a manual one)
        self.boots = boots
        self.on_stats = on_stats  # what the I/O layer adds to vhub.info/stats (listeners, connections, tasks)
        self.guests: set[Member] = set()
        self.clients: set[Member] = set()
        self.star_clients: set[Member] = set()  # clients of "*"
        self.started = time.time()
        self.counters: dict[str, int] = {
            "guests_accepted": 0, "clients_accepted": 0, "refused": 0, "violations": 0,
            "frames_in": 0, "stream_frames": 0, "stream_bytes": 0, "stream_pumped": 0, "stream_direct": 0, "stream_resent_dropped": 0,
            "rpc_forwarded": 0,
            "rpc_timeouts": 0, "slow_consumers": 0, "tty_input_dropped": 0, "too_many_requests": 0,
        }
        self.refusals: collections.Counter[str] = collections.Counter()  # refused handshakes by code
        self.refusal_log = RateLimitedLog(log, "refusals", call_later=call_later, clock=clock)
        self.violation_log = RateLimitedLog(log, "protocol violations", call_later=call_later, clock=clock)
        self.admission = Admission(self)
        self.streams = Streams(self)
        self.resends = Resends(self)
        self.rpc = Rpc(self)
        self.terminals = Terminals(self)
        self.channels = Channels(self)
        self.exposures = Exposures(self)
        self.calls = DaemonCalls(self)
        registry.watch(self._state_changed)
        if config.anonymous_session:
            sess = registry.create(config.anonymous_session, "external", anonymous=True)
            registry.set_state(sess, State.WAITING_AGENT, "waiting for an agent")

    # ---------------------------------------------------------------- from the I/O layer
    def guest_handshake(self, port: Port, listener: Listener, payload: bytes) -> Decision:
        return self.admission.guest(port, listener, payload)

    def client_handshake(self, port: Port, payload: bytes) -> Decision:
        return self.admission.client(port, payload)

    def admitted(self, member: Member) -> None:
        """The handshake answer is out: what follows it (hello, replay, state)."""
        self.admission.admitted(member)

    def guest_events(self, member: Member, events: list) -> None:
        sess = member.session
        if any(type(e) not in _HEARTBEATS for e in events):  # heartbeats are not activity (idle policies)
            sess.last_activity = time.monotonic()
        streams = self.streams
        for i, ev in enumerate(events):
            ct = sess.cut_through
            if ct is not None and ct.source is not member:
                # another guest of this session is in the middle of a cut-through frame:
                # these must not land inside its payload; hold them (and this guest)
                streams.hold_behind(ct, member, events[i:])
                return
            t = type(ev)
            if t is StreamRun:
                if member.skip:
                    ev = self.resends.skip_resent(member, ev)
                    if ev is None:
                        continue
                if ev.type_mask & SD_BIT:  # channel frames go point to point, and are not acked
                    member.stream_frames += self.channels.guest_run(member, sess, ev)
                else:
                    streams.fan_out(sess, ev)
                    member.stream_frames += ev.count
            elif t is Frame:
                mt = ev.msg_type
                if mt == RPC_REQUEST:
                    self.rpc.from_guest(member, sess, ev)
                elif mt == RPC_RESPONSE or mt == RPC_ERROR:
                    self.rpc.answer(member, ev)
                # TtyResize from a guest: meaningless, ignored
            elif t is StreamStart:
                if ev.request_id >= CHANNEL_BASE and ev.msg_type == SD:
                    ch = self.channels.by_id.get(ev.request_id)
                    if ch is not None and ch.agent is member:
                        self.channels.reset(ch, "the guest sent a channel frame too large to pass whole")
                    member.port.close("frame_too_large", f"a channel's StreamData frame carries at most "
                                                         f"{self.config.max_channel_frame} bytes (max_frame)")
                    return
                if member.skip:  # taken before the agent's last connection dropped
                    self.resends.skip_frame(member, ev.request_id)
                    member.dropping = ev.remaining > 0
                    continue
                busy = streams.busy_with(sess, ev)
                if busy is not None:  # a "*" subscriber is in the middle of another session's frame
                    streams.hold_behind(busy, member, events[i:])
                    return
                streams.cut_through_start(sess, ev, member)
                member.stream_frames += 1
            elif t is StreamChunk:
                if member.dropping:
                    member.dropping = ev.remaining > 0
                    continue
                streams.cut_through_chunk(sess, ev)
            elif t is Violation:
                self.counters["violations"] += 1
                self.violation_log.warning("protocol violation session=%s peer=%s code=%s %s", sess.name,
                                           member.label, ev.error.code, ev.error.message)
            elif t is RemoteErrorEvent:
                self.violation_log.warning("guest sent error session=%s peer=%s code=%s %s", sess.name,
                                           member.label, clip(ev.code, 64), clip(ev.message))
            # Ping/Pong: answered by the connection, liveness kept by the I/O layer
        streams.owed(member)

    def client_events(self, member: Member, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is Frame:
                mt = ev.msg_type
                if mt == RPC_REQUEST:
                    self.rpc.from_client(member, ev)
                elif mt == RPC_RESPONSE or mt == RPC_ERROR:
                    self.rpc.answer(member, ev)
                elif mt in TO_AGENT:
                    self.terminals.to_agent(member, ev)
            elif t is StreamRun:
                if self.channels.by_id:
                    self.channels.client_stream(member, ev)
                else:
                    self.terminals.to_agent(member, ev)
            elif t is Violation:
                self.counters["violations"] += 1
                self.violation_log.warning("protocol violation client peer=%s code=%s %s", member.label,
                                           ev.error.code, ev.error.message)

    def write_paused(self, member: Member, frame_in_flight: bool = False) -> None:
        self.streams.write_paused(member, frame_in_flight)

    def write_resumed(self, member: Member) -> None:
        self.streams.write_resumed(member)

    def lost(self, member: Member, reason: str = "disconnected") -> None:
        self.streams.release_writers(member)
        if member.role == "guest":
            self._guest_lost(member, reason)
        else:
            self._client_lost(member)

    def _guest_lost(self, member: Member, reason: str) -> None:
        self.guests.discard(member)
        self.rpc.fail_inflight(member, "agent_lost", f"the agent disconnected: {reason}")
        self.channels.agent_lost(member)
        sess = member.session
        if sess is None:
            return
        sess.guests.discard(member)
        self.resends.outbox_gone(member, sess)
        if sess.cut_through is not None and sess.cut_through.source is member:
            self.streams.cut_through_lost(sess, member)
        if sess.agent is member:
            sess.agent = None
            sess.last_activity = time.monotonic()
            if sess.state in (State.READY, State.STANDBY):  # SAVING: a snapshot unplugged it; it comes back
                self.registry.set_state(sess, State.AGENT_LOST, reason)
            log.info("guest gone session=%s peer=%s reason=%s", sess.name, member.label, reason)

    def _client_lost(self, member: Member) -> None:
        self.clients.discard(member)
        self.star_clients.discard(member)
        self.rpc.fail_inflight(member, "handler_lost",
                               f"the host client {member.label} serving this call disconnected")
        self.terminals.released(member)
        self.channels.client_lost(member)
        sess = member.session
        if sess is not None:
            sess.clients.discard(member)
            sess.last_activity = time.monotonic()
        self.rpc.routes_changed()
        self.streams.write_resumed(member)

    # ---------------------------------------------------------------- events
    def publish(self, sess: Session, event: dict) -> None:
        """A ``vhub.event`` to every events subscriber of ``sess`` and of "*"."""
        event.setdefault("session", sess.name)
        data = notification("vhub.event", event)
        for c in (*sess.clients, *self.star_clients):
            if c.events and not c.port.closed:
                c.port.send(data)

    def wanted(self, sess: Session) -> None:
        """Bytes are on their way to ``sess``'s guests (a request, input, a
        connection's data): a session in standby wakes; the bytes wait in the
        kernel meanwhile, so the caller waits only for the resume."""
        if sess.state is State.STANDBY and self.boots is not None:
            self.boots.wake(sess.name)

    def _state_changed(self, sess: Session, old: State) -> None:
        log.info("session state session=%s %s -> %s %s", sess.name, old.value, sess.state.value, sess.reason)
        if sess.state is State.STOPPING and sess.agent is not None:
            sess.agent.port.close("session_stopped", f"session {sess.name!r} is stopping")
        if sess.exposed and sess.state in (State.STOPPING, State.STOPPED, State.FAILED):
            self.exposures.session_ended(sess)  # exposures last while the session lives
        self.publish(sess, {"type": "state", "state": sess.state.value, "previous": old.value,
                            "reason": sess.reason})

    def daemon_info(self) -> dict:
        backend = self.config.default_backend
        return {"version": _version(), "pid": os.getpid(), "uptime": time.time() - self.started,
                "codec": codec.BACKEND, "backend": backend,
                "sessions": len(self.registry), "guests": len(self.guests), "clients": len(self.clients),
                "sandbox": backend not in ("local",),
                "snapshots": bool(getattr(getattr(self.boots, "backend", None), "snapshots", False)),
                "notes": (["the local backend runs agents as host processes: NOT a sandbox"]
                          if backend == "local" else []),
                **(self.on_stats() if self.on_stats is not None else {})}


_HEARTBEATS = (Ping, Pong)


def _version() -> str:
    from .. import __version__

    return __version__
