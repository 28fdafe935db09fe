"""Routing between guests and host clients (DESIGN §3, §4, §6).

The relay decides where every frame goes: handshakes and roles, RPC id
rewriting both ways, fan-out of stream frames to subscribers and the
scrollback ring, daemon calls (``vhub.*``), timeouts and backpressure
decisions. It works on *peers*: objects with ``conn`` (a protocol.Connection),
``write(data)``, ``close()``, ``pause_reading()``, ``resume_reading()``,
``write_buffer_size()``, ``write_frame_part(data, last)`` (the bytes of a
cut-through frame; other writes to that peer wait until its last part) and
``label``. It never touches sockets itself; the server module gives it peers
and a ``call_later``.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec

from . import codec, frames
from .frames import HEADER_SIZE, MsgType
from .protocol import (
    Frame,
    Handshake,
    RemoteErrorEvent,
    StreamChunk,
    StreamRun,
    StreamStart,
    Violation,
    encode_frame,
    error_payload,
)
from .sessions import InvalidName, Session, SessionRegistry, State, new_token, validate_name

log = logging.getLogger("vhubd")
_encode = msgspec.json.encode
_decode = msgspec.json.decode

RPC_REQUEST = int(MsgType.RPC_REQUEST)
RPC_RESPONSE = int(MsgType.RPC_RESPONSE)
RPC_ERROR = int(MsgType.RPC_ERROR)
STREAM_KIND = {int(MsgType.STDOUT): "stdout", int(MsgType.STDERR): "stderr", int(MsgType.STREAM_DATA): "stream"}
KIND_MASK = {"stdout": frames.TYPE_BIT[MsgType.STDOUT], "stderr": frames.TYPE_BIT[MsgType.STDERR],
             "stream": frames.TYPE_BIT[MsgType.STREAM_DATA]}
ALL_STREAMS = frames.STREAM_MASK
GUEST_TO_AGENT_TYPES = frozenset({int(MsgType.STREAM_DATA), int(MsgType.TTY_RESIZE)})


# The forwarded RPC's request_id is rewritten in place with struct: for one
# 8-byte store a cffi call costs 4-8x more than the work (bench/RESULTS.md).
_set_request_id = struct.Struct("<Q").pack_into


class Config:
    """Relay-level settings (the daemon fills it from the command line)."""

    def __init__(self, **kw: Any):
        self.max_payload = frames.DEFAULT_MAX_PAYLOAD
        self.anonymous_session: str | None = "default"
        self.rpc_timeout = 30.0
        self.scrollback = 1 << 20
        self.lossy_limit = 4 << 20
        self.high_water = 1 << 20
        self.allow_multiple_agents = False
        self.default_backend = "external"
        self.once = False
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown relay setting {k}")
            setattr(self, k, v)


class PeerState:
    """Relay bookkeeping attached to each peer as ``peer.rs``."""

    __slots__ = ("role", "session", "subscribe_mask", "events", "serve_exact", "serve_prefix", "lossy",
                 "inflight", "next_id", "sessions_blocked", "all_sessions", "ack", "acked",
                 "stream_frames", "ack_pending", "joined", "attached")

    def __init__(self, role: str):
        self.role = role  # "guest" | "client"
        self.session: Session | None = None
        self.subscribe_mask = 0
        self.events = False
        self.serve_exact: set[str] = set()
        self.serve_prefix: tuple[str, ...] = ()
        self.lossy = False
        self.inflight: dict[int, tuple] = {}  # our id on this peer -> (origin peer, origin id, deadline)
        self.next_id = 1
        self.sessions_blocked: set = set()
        self.all_sessions = False
        self.ack = False  # guest asked for stream acks
        self.acked = 0
        self.stream_frames = 0
        self.ack_pending = False
        self.joined = True
        self.attached = False

    def new_id(self) -> int:
        i = self.next_id
        self.next_id = i + 1 if i < frames.MAX_U64 else 1
        return i

    def serves(self, method: str) -> bool:
        return method in self.serve_exact or any(method.startswith(p) for p in self.serve_prefix)


def rpc_error_frame(rid: int, code: str, message: str) -> bytes:
    return encode_frame(RPC_ERROR, rid, error_payload(code, message))


def rpc_result_frame(rid: int, result: Any) -> bytes:
    return encode_frame(RPC_RESPONSE, rid, _encode(result))


def notification(method: str, params: Any) -> bytes:
    return encode_frame(RPC_REQUEST, 0, _encode({"method": method, "params": params}))


class Relay:
    """The routing core. One per daemon."""

    def __init__(self, config: Config, call_later: Callable[[float, Callable], Any],
                 backends: Any = None, on_stats: Callable | None = None):
        self.config = config
        self.call_later = call_later
        self.on_stats = on_stats  # extra vhub.stats figures from the I/O layer (connections, tasks)
        self.registry = SessionRegistry(config.scrollback, on_change=self._state_changed)
        self.guests: set = set()
        self.session_guests: dict = {}  # Session -> its guest peers (agent and attached): what backpressure pauses
        self.clients: set = set()
        self.star_clients: set = set()  # clients attached to "*"
        self.started = time.time()
        self.counters: dict[str, int] = {
            "guests_accepted": 0, "clients_accepted": 0, "refused": 0, "violations": 0,
            "frames_in": 0, "stream_frames": 0, "stream_bytes": 0, "rpc_forwarded": 0,
            "rpc_timeouts": 0, "slow_consumers": 0, "tty_input_dropped": 0,
        }
        # terminal executions (agent.run with tty): (session, execution id) -> the one
        # client whose StreamData/TtyResize reach the agent (None: the seat is free)
        self.tty_writers: dict[tuple[str, int], Any] = {}
        self.backends = backends  # sessions issue: boot on demand
        self._expiry: Any = None  # the one timer for RPC deadlines
        if config.anonymous_session:
            sess = self.registry.create(config.anonymous_session, "external", anonymous=True)
            self.registry.set_state(sess, State.WAITING_AGENT, "waiting for an agent")

    # ------------------------------------------------------------------ guests
    def guest_connected(self, peer) -> None:
        peer.rs = PeerState("guest")
        self.guests.add(peer)

    def guest_handshake(self, peer, ev: Handshake, *, token_required: bool, fixed_session: str | None = None
                        ) -> bool:
        """Accept or refuse a guest; True when accepted."""
        payload = bytes(ev.payload)
        name: str | None
        info: dict = {}
        if fixed_session is not None:
            # the transport names the session (a VM's own vsock device): whatever the
            # payload claims, only its agent details and the attach flag count
            name = fixed_session
            try:
                decoded = _decode(payload) if payload.strip() else {}
                info = decoded if isinstance(decoded, dict) else {}
            except msgspec.DecodeError:
                info = {}
        elif not payload.strip():
            name = None
        else:
            try:
                info = _decode(payload)
                if not isinstance(info, dict):
                    raise ValueError("not an object")
            except (msgspec.DecodeError, ValueError):
                return self._refuse(peer, "bad_handshake", "guest handshake payload must be empty or a JSON object")
            if info.get("role", "guest") != "guest":
                return self._refuse(peer, "wrong_role",
                                    f"role {info.get('role')!r} is not accepted on a guest listener")
            name = info.get("session")
        if name is None:
            anon = self.config.anonymous_session
            if anon is None:
                return self._refuse(peer, "session_required", "anonymous agents are disabled on this daemon")
            if token_required:
                return self._refuse(peer, "token_required", "this listener requires a session and token")
            sess = self.registry.get(anon)
        else:
            try:
                validate_name(name)
            except InvalidName as exc:
                return self._refuse(peer, exc.code, str(exc))
            sess = self.registry.get(name)
            if sess is None:
                return self._refuse(peer, "unknown_session", f"no session named {name!r} on this daemon")
            if fixed_session is None and token_required and sess.token is None:
                # a tokenless session (anonymous, or created by a client attaching) has
                # nothing to prove: this listener admits only registered sessions
                return self._refuse(peer, "token_required", f"session {name!r} has no token; register it "
                                                            "(vhub.register) to admit agents over this listener")
            if fixed_session is None and (sess.token is not None or token_required):
                if not sess.check_token(info.get("token")):
                    log.warning("guest refused: bad token for session %s from %s", name, peer.label)
                    return self._refuse(peer, "bad_token", f"wrong token for session {name!r}")
        assert sess is not None
        if info.get("attach") is True:
            # a program inside the guest (not the resident agent) doing RPCs and
            # output for its session; host->guest calls never go to it
            if name is None:
                return self._refuse(peer, "session_required", "attach needs a session and its token")
            peer.rs.session = sess
            peer.rs.attached = True
            self.session_guests.setdefault(sess, set()).add(peer)
            peer.conn.accept(frames.READY_PAYLOAD, ev.request_id)
            peer.flush()
            if any(sess in c.rs.sessions_blocked for c in (*sess.clients, *self.star_clients)):
                peer.pause_reading()  # lossless subscribers are full: it waits like the agent
            self.counters["guests_accepted"] += 1
            log.info("guest attached session=%s peer=%s", sess.name, peer.label)
            return True
        if sess.agent is not None and not self.config.allow_multiple_agents:
            return self._refuse(peer, "session_busy", f"session {sess.name!r} already has an agent connected")
        if sess.state in (State.STOPPING,):
            return self._refuse(peer, "session_stopping", f"session {sess.name!r} is stopping")
        peer.rs.session = sess
        peer.rs.ack = bool(info.get("ack")) and isinstance(info.get("ack"), bool)
        sess.agent = peer
        self.session_guests.setdefault(sess, set()).add(peer)
        sess.agent_info = {k: info[k] for k in ("agent", "pid", "version") if k in info}
        sess.agent_info["peer"] = peer.label
        sess.last_activity = time.monotonic()
        peer.conn.accept(frames.READY_PAYLOAD, ev.request_id)
        peer.flush()
        if peer.rs.ack:
            peer.write(notification("vhub.hello", {"ack": True}))
        self.counters["guests_accepted"] += 1
        self.registry.set_state(sess, State.READY, "agent connected")
        log.info("guest accepted session=%s peer=%s agent=%s", sess.name, peer.label, sess.agent_info)
        if self.backends is not None:
            self.backends.agent_ready(sess)
        # lossless clients that are paused block this new agent too
        if any(c.rs.sessions_blocked and sess in c.rs.sessions_blocked for c in sess.clients):
            peer.pause_reading()
        return True

    def _refuse(self, peer, code: str, message: str) -> bool:
        self.counters["refused"] += 1
        log.warning("refused peer=%s code=%s %s", peer.label, code, message)
        peer.conn.fail(code, message)
        peer.flush()
        peer.close()
        return False

    def guest_events(self, peer, events: list) -> None:
        sess = peer.rs.session
        if sess is None:
            return
        sess.last_activity = time.monotonic()
        for i, ev in enumerate(events):
            ct = sess.cut_through
            if ct is not None and ct.source is not peer:
                # another guest of this session (attached, or --multiple-agents) is in the
                # middle of a cut-through frame: its subscribers must not get these bytes
                # inside that frame's payload. Hold them (and this guest) until it ends.
                ct.waiting.append((peer, events[i:]))
                peer.pause_reading()
                break
            t = type(ev)
            if t is StreamRun:
                self._fan_out(sess, ev.data, ev.type_mask, ev)
                peer.rs.stream_frames += ev.count
            elif t is Frame:
                mt = ev.msg_type
                if mt in STREAM_KIND:
                    self._fan_out(sess, ev.data, frames.TYPE_BIT[mt], None)
                    peer.rs.stream_frames += 1
                elif mt == RPC_REQUEST:
                    self._guest_rpc(peer, sess, ev)
                elif mt == RPC_RESPONSE or mt == RPC_ERROR:
                    self._answer(peer, ev)
                # TtyResize / unknown-direction frames from a guest: ignored
            elif t is StreamStart:
                self._cut_through_start(sess, ev, peer)
                peer.rs.stream_frames += 1
            elif t is StreamChunk:
                self._cut_through_chunk(sess, ev)
            elif t is Violation:
                self.counters["violations"] += 1
                log.warning("protocol violation session=%s peer=%s code=%s %s", sess.name, peer.label,
                            ev.error.code, ev.error.message)
            elif t is RemoteErrorEvent:
                log.info("guest sent error session=%s code=%s %s", sess.name, ev.code, ev.message)
            # Ping/Pong: answered by the connection; liveness tracked by the server
        if peer.rs.ack and peer.rs.stream_frames != peer.rs.acked and not peer.rs.ack_pending:
            peer.rs.ack_pending = True
            self.call_later(0, lambda: self._send_ack(peer))

    def _send_ack(self, peer) -> None:
        """Ack stream frames once every lossless destination has taken them
        (the kernel then owns the bytes: a daemon crash cannot lose them)."""
        rs = peer.rs
        rs.ack_pending = False
        sess = rs.session
        if sess is None or peer.closed:
            return
        for c in self._subscribers(sess):
            if not c.rs.lossy and c.write_buffer_size():
                rs.ack_pending = True
                self.call_later(0.01, lambda: self._send_ack(peer))
                return
        if rs.stream_frames != rs.acked:
            rs.acked = rs.stream_frames
            peer.write(notification("vhub.ack", {"frames": rs.acked}))

    def guest_lost(self, peer, reason: str = "disconnected") -> None:
        self.guests.discard(peer)
        rs = getattr(peer, "rs", None)
        if rs is None:
            return
        self._fail_inflight(peer, "agent_lost", f"the agent disconnected: {reason}")
        sess = rs.session
        if sess is not None and sess in self.session_guests:
            self.session_guests[sess].discard(peer)
            if not self.session_guests[sess]:
                del self.session_guests[sess]
        if sess is not None and sess.cut_through is not None and sess.cut_through.source is peer:
            self._cut_through_lost(sess, peer)
        if sess is not None and sess.agent is peer:
            sess.agent = None
            if sess.state is State.READY:
                self.registry.set_state(sess, State.AGENT_LOST, reason)
            log.info("guest gone session=%s peer=%s reason=%s", sess.name, peer.label, reason)
            if self.backends is not None:
                self.backends.agent_lost(sess)

    # ---------------------------------------------------------------- fan-out
    def _subscribers(self, sess: Session):
        if self.star_clients:
            return [c for c in sess.clients if c.rs.subscribe_mask] + [
                c for c in self.star_clients if c.rs.subscribe_mask]
        return [c for c in sess.clients if c.rs.subscribe_mask]

    def _fan_out(self, sess: Session, data: memoryview, mask: int, run: StreamRun | None) -> None:
        self.counters["stream_bytes"] += len(data)
        sess.scrollback.append(data)
        for c in sess.clients:
            self._deliver(c, data, mask, run)
        for c in self.star_clients:
            self._deliver(c, data, mask, run)

    def _deliver(self, c, data, mask: int, run: StreamRun | None) -> None:
        rs = c.rs
        want = rs.subscribe_mask
        if not want or not rs.joined:
            return
        if mask & ~want == 0:
            c.write(data)
        elif mask & want:
            # mixed run, partial subscription: the frames this client wants
            for mtype, _, _, fdata in (run.frames() if run is not None else ()):
                if frames.TYPE_BIT[mtype] & want:
                    c.write(fdata)
        else:
            return
        if rs.lossy and c.write_buffer_size() > self.config.lossy_limit:
            self.counters["slow_consumers"] += 1
            log.warning("slow consumer dropped peer=%s buffered=%d", c.label, c.write_buffer_size())
            c.abort_with_error("slow_consumer", "subscriber too slow: its output buffer passed "
                                                f"{self.config.lossy_limit} bytes")

    def _cut_through_start(self, sess: Session, ev: StreamStart, source=None) -> None:
        mask = frames.TYPE_BIT[ev.msg_type]
        targets = [c for c in self._subscribers(sess) if c.rs.subscribe_mask & mask and c.rs.joined]
        ct = sess.cut_through = CutThrough(targets, ev, sess.scrollback.capacity - HEADER_SIZE)
        ct.source = source
        self.counters["stream_bytes"] += len(ev.data)
        for c in targets:
            c.write_frame_part(ev.data, False)
            self._check_lossy(c)
        ct.keep_tail(ev.data[HEADER_SIZE:])

    def _cut_through_chunk(self, sess: Session, ev: StreamChunk) -> None:
        ct = sess.cut_through
        self.counters["stream_bytes"] += len(ev.data)
        for c in ct.targets:
            if not c.closed:
                c.write_frame_part(ev.data, ev.remaining == 0)
                self._check_lossy(c, at_boundary=ev.remaining == 0)
        ct.keep_tail(ev.data)
        if ev.remaining == 0:
            frame = ct.frame_for_scrollback()
            if frame:
                sess.scrollback.append(frame)
            self._end_cut_through(sess)

    def _end_cut_through(self, sess: Session) -> None:
        """The frame in flight is over: everyone joins again, and what other
        guests sent meanwhile goes out now, in order."""
        ct, sess.cut_through = sess.cut_through, None
        for c in list(sess.clients) + list(self.star_clients):
            c.rs.joined = True
        waiting, ct.waiting = ct.waiting, []
        for peer, events in waiting:  # a guest that left meanwhile still had these frames accepted
            self.guest_events(peer, events)  # may start the next cut-through frame, or wait again
            now = sess.cut_through
            held = now is not None and any(p is peer for p, _ in now.waiting)
            if not held and not any(sess in c.rs.sessions_blocked for c in (*sess.clients, *self.star_clients)):
                peer.resume_reading()

    def _cut_through_lost(self, sess: Session, peer) -> None:
        """The guest sending a cut-through frame is gone mid-frame: its
        subscribers hold a partial frame that can never be completed (and an
        Error frame would land inside its payload), so they are closed; the
        rest of the frame was never accepted and the scrollback does not keep it."""
        ct = sess.cut_through
        for c in ct.targets:
            if not c.closed:
                log.warning("closing subscriber peer=%s: the guest %s left in the middle of a frame",
                            c.label, peer.label)
                c.close()
        self._end_cut_through(sess)

    def _check_lossy(self, c, at_boundary: bool = False) -> None:
        if c.rs.lossy and c.write_buffer_size() > self.config.lossy_limit:
            self.counters["slow_consumers"] += 1
            log.warning("slow consumer dropped peer=%s buffered=%d (mid-frame: %s)", c.label,
                        c.write_buffer_size(), not at_boundary)
            if at_boundary:
                c.abort_with_error("slow_consumer", "subscriber too slow: its output buffer passed "
                                                    f"{self.config.lossy_limit} bytes")
            else:
                c.close()  # an Error frame here would land inside the payload of a frame

    # ---------------------------------------------------------------- RPC
    def _guest_rpc(self, peer, sess: Session, ev: Frame) -> None:
        rid = ev.request_id
        try:
            req = ev.json()
            if not isinstance(req, dict):
                raise ValueError
        except Exception:
            if rid:
                peer.write(rpc_error_frame(rid, "bad_request", "RpcRequest payload must be a JSON object"))
            return
        method = req.get("method") or req.get("event")
        if not isinstance(method, str):
            if rid:
                peer.write(rpc_error_frame(rid, "bad_request", "RpcRequest needs a method (or event)"))
            return
        if method == "vhub.ping":
            if rid:
                peer.write(rpc_result_frame(rid, {"pong": True, "session": sess.name, "time": time.time()}))
            return
        if method == "execution_result" and "method" not in req:
            sess.last_result = req
            if self.tty_writers and type(req.get("execution_id")) is int:
                self.tty_writers.pop((sess.name, req["execution_id"]), None)
            self._publish(sess, {"type": "execution_result", **req})
            if rid:
                peer.write(rpc_result_frame(rid, {}))
            return
        handler = self._find_handler(sess, method)
        if handler is None:
            if rid:
                peer.write(rpc_error_frame(rid, "no_handler", f"no host client serves {method!r} "
                                                              f"for session {sess.name!r}"))
            else:
                self._publish(sess, {"type": "notification", "method": method,
                                     "params": req.get("params", {k: v for k, v in req.items() if k != "event"})})
            return
        self._forward_request(peer, rid, handler, ev)

    def _find_handler(self, sess: Session, method: str):
        for c in sess.clients:
            if c.rs.serves(method):
                return c
        for c in self.star_clients:
            if c.rs.serves(method):
                return c
        return None

    def _forward_request(self, origin, origin_id: int, dest, ev: Frame) -> None:
        """Forward an RpcRequest, rewriting its id in the receive buffer."""
        self.counters["rpc_forwarded"] += 1
        if origin_id == 0:  # notification: no id, no reply
            dest.write(ev.data)
            return
        new_id = dest.rs.new_id()
        _set_request_id(ev.data, 12, new_id)
        # a deadline per call and one relay timer for the earliest (not a timer per call)
        dest.rs.inflight[new_id] = (origin, origin_id, time.monotonic() + self.config.rpc_timeout)
        if self._expiry is None:
            self._expiry = self.call_later(self.config.rpc_timeout, self._expire_due)
        dest.write(ev.data)

    def _expire_due(self) -> None:
        self._expiry = None
        now = time.monotonic()
        self.expire_rpcs(now)
        nxt = min((next(iter(p.rs.inflight.values()))[2] for p in (*self.guests, *self.clients)
                   if p.rs is not None and p.rs.inflight), default=None)
        if nxt is not None:
            self._expiry = self.call_later(max(0.0, nxt - now) + 0.001, self._expire_due)

    def expire_rpcs(self, now: float) -> None:
        """Answer ``timeout`` for calls past their deadline. Entries go in with
        one constant timeout, so each peer's dict is in deadline order."""
        for peer in (*self.guests, *self.clients):
            rs = peer.rs
            if rs is None or not rs.inflight:
                continue
            late = []
            for rid, entry in rs.inflight.items():
                if entry[2] > now:
                    break
                late.append(rid)
            for rid in late:
                self._timeout(peer, rid)

    def _timeout(self, dest, rid: int) -> None:
        entry = dest.rs.inflight.pop(rid, None)
        if entry is None:
            return
        origin, origin_id, _ = entry
        self.counters["rpc_timeouts"] += 1
        if not origin.closed:
            origin.write(rpc_error_frame(origin_id, "timeout",
                                         f"no answer from {dest.rs.role} {dest.label} within "
                                         f"{self.config.rpc_timeout:g} s"))

    def _answer(self, peer, ev: Frame) -> None:
        entry = peer.rs.inflight.pop(ev.request_id, None)
        if entry is None:
            return  # late (after a timeout) or unknown: dropped
        origin, origin_id, _ = entry
        if origin.closed:
            return
        if peer.rs.role == "guest" and ev.msg_type == RPC_RESPONSE and len(ev.data) < 512 \
                and b'"tty"' in bytes(ev.payload):
            self._terminal_started(peer, origin, ev)
        _set_request_id(ev.data, 12, origin_id)
        origin.write(ev.data)

    def _fail_inflight(self, peer, code: str, message: str) -> None:
        inflight, peer.rs.inflight = peer.rs.inflight, {}
        for origin, origin_id, _ in inflight.values():
            if not origin.closed:
                origin.write(rpc_error_frame(origin_id, code, message))

    # ---------------------------------------------------------------- clients
    def client_connected(self, peer) -> None:
        peer.rs = PeerState("client")
        self.clients.add(peer)

    def client_handshake(self, peer, ev: Handshake) -> bool | None:
        try:
            hs = _decode(bytes(ev.payload)) if bytes(ev.payload).strip() else {}
            if not isinstance(hs, dict):
                raise ValueError
        except (msgspec.DecodeError, ValueError):
            return self._refuse(peer, "bad_handshake", "client handshake must be a JSON object")
        if hs.get("role") != "client":
            return self._refuse(peer, "wrong_role", "the control socket accepts only the client role "
                                                    "(guests connect to the guest socket)")
        name = hs.get("session", "*")
        rs = peer.rs
        mask = 0
        subs = hs.get("subscribe", [])
        if not isinstance(subs, list) or any(s not in KIND_MASK and s != "events" for s in subs):
            return self._refuse(peer, "bad_handshake", "subscribe must be a list of stdout, stderr, stream, events")
        for s in subs:
            mask |= KIND_MASK.get(s, 0)
        serve = hs.get("serve", [])
        if not isinstance(serve, list) or not all(isinstance(m, str) for m in serve):
            return self._refuse(peer, "bad_handshake", "serve must be a list of method names")
        flow = hs.get("flow", "lossless")
        if flow not in ("lossless", "lossy"):
            return self._refuse(peer, "bad_handshake", "flow must be lossless or lossy")
        rs.subscribe_mask = mask
        rs.events = "events" in subs
        rs.serve_exact = {m for m in serve if not m.endswith("*")}
        rs.serve_prefix = tuple(m[:-1] for m in serve if m.endswith("*"))
        rs.lossy = flow == "lossy"
        if rs.lossy:
            peer.set_write_limits(self.config.lossy_limit * 2)
        if name == "*":
            rs.all_sessions = True
            sess = None
        else:
            try:
                validate_name(name)
            except InvalidName as exc:
                return self._refuse(peer, exc.code, str(exc))
            sess = self.registry.get(name)
            if sess is None:
                sess = self.registry.create(name, self.config.default_backend)
            rs.session = sess
        peer.hs = hs
        peer.hs_request_id = ev.request_id
        if sess is not None and hs.get("boot") and sess.agent is None and self.backends is not None:
            boot_params = hs.get("boot_params") if isinstance(hs.get("boot_params"), dict) else {}
            self.backends.request_boot(sess, peer, boot_params)
            return None  # answered when the boot ends (finish_client_handshake)
        self._complete_client(peer)
        return True

    def finish_client_handshake(self, peer, error: str | None) -> None:
        """The boot a client's handshake waited for has ended."""
        if peer.closed:
            return
        if error is not None:
            self._refuse(peer, "boot_failed", error)
            return
        self._complete_client(peer)
        peer.handshake_done()

    def _complete_client(self, peer) -> None:
        rs, hs = peer.rs, peer.hs
        sess = rs.session
        if sess is None:
            self.star_clients.add(peer)
        else:
            sess.clients.add(peer)
        result = ({"ok": True, "session": None, "daemon": self.daemon_info()} if sess is None
                  else {"ok": True, "session": sess.info()})
        self.counters["clients_accepted"] += 1
        peer.conn.accept(_encode(result), peer.hs_request_id)
        peer.flush()
        if hs.get("replay") and rs.subscribe_mask:
            for s in ([sess] if sess else list(self.registry)):
                for chunk in s.scrollback.replay():
                    run = run_of(chunk)
                    self._deliver(peer, run.data, run.type_mask, run)
        if sess is not None and sess.cut_through is not None:
            rs.joined = False  # mid cut-through frame: join after it ends
        log.info("client accepted peer=%s session=%s subscribe=%s serve=%s flow=%s", peer.label,
                 sess.name if sess else "*", hs.get("subscribe", []), hs.get("serve", []),
                 hs.get("flow", "lossless"))

    def client_events(self, peer, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is Frame:
                mt = ev.msg_type
                if mt == RPC_REQUEST:
                    self._client_rpc(peer, ev)
                elif mt == RPC_RESPONSE or mt == RPC_ERROR:
                    self._answer(peer, ev)
                elif mt in GUEST_TO_AGENT_TYPES:
                    self._to_agent(peer, ev)
            elif t is StreamRun:
                self._to_agent(peer, ev)
            elif t is Violation:
                self.counters["violations"] += 1
                log.warning("protocol violation client peer=%s code=%s %s", peer.label, ev.error.code,
                            ev.error.message)

    def _to_agent(self, peer, ev) -> None:
        sess = peer.rs.session
        if sess is None or sess.agent is None:
            return
        if not self.tty_writers:
            sess.agent.write(ev.data)
        elif type(ev) is Frame:
            if self._may_write(peer, sess, ev.request_id):
                sess.agent.write(ev.data)
        else:
            for _, _, rid, data in ev.frames():
                if self._may_write(peer, sess, rid):
                    sess.agent.write(data)

    # ---------------------------------------------------------------- terminals: one writer
    def _terminal_started(self, guest, origin, ev: Frame) -> None:
        """An agent answered ``{"execution_id": N, "tty": true}``: the client that
        started terminal N is its writer."""
        try:
            res = ev.json()
        except Exception:
            return
        if isinstance(res, dict) and res.get("tty") is True and type(res.get("execution_id")) is int \
                and guest.rs.session is not None:
            self.tty_writers[(guest.rs.session.name, res["execution_id"])] = origin

    def _may_write(self, peer, sess: Session, rid: int) -> bool:
        """Input for a terminal reaches the agent only from its writer; a free seat
        (the writer left) goes to the first client that types. Other stream ids pass."""
        key = (sess.name, rid)
        writer = self.tty_writers.get(key, peer)
        if writer is peer:
            return True
        if writer is None or writer.closed:
            self.tty_writers[key] = peer
            return True
        self.counters["tty_input_dropped"] += 1
        return False

    def _client_rpc(self, peer, ev: Frame) -> None:
        rid = ev.request_id
        try:
            req = ev.json()
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise ValueError
        except Exception:
            if rid:
                peer.write(rpc_error_frame(rid, "bad_request", "RpcRequest payload must be "
                                                               '{"method": str, "params": any}'))
            return
        method = req["method"]
        if method.startswith("vhub."):
            try:
                result = self.daemon_call(peer, method, req.get("params") or {}, rid)
            except RpcFailure as exc:
                if rid:
                    peer.write(rpc_error_frame(rid, exc.code, exc.message))
                return
            if result is not _DEFERRED and rid:
                peer.write(rpc_result_frame(rid, result))
            return
        sess = peer.rs.session
        target = req.get("session")
        if target is not None and (sess is None or target != sess.name):
            sess = self.registry.get(target) if isinstance(target, str) else None
            if sess is None:
                if rid:
                    peer.write(rpc_error_frame(rid, "unknown_session", f"no session named {target!r}"))
                return
        if sess is None:
            if rid:
                peer.write(rpc_error_frame(rid, "session_required",
                                           "this connection is attached to '*': name a session in the request"))
            return
        if sess.agent is None:
            if rid:
                peer.write(rpc_error_frame(rid, "no_agent", f"session {sess.name!r} has no agent connected "
                                                            f"(state {sess.state.value})"))
            return
        self._forward_request(peer, rid, sess.agent, ev)

    def client_lost(self, peer) -> None:
        self.clients.discard(peer)
        self.star_clients.discard(peer)
        rs = getattr(peer, "rs", None)
        if rs is None:
            return
        self._fail_inflight(peer, "handler_lost", f"the host client {peer.label} serving this call disconnected")
        for key, writer in self.tty_writers.items():
            if writer is peer:
                self.tty_writers[key] = None
        if rs.session is not None:
            rs.session.clients.discard(peer)
            rs.session.last_activity = time.monotonic()
        self.writer_resumed(peer)
        if self.backends is not None and rs.session is not None:
            self.backends.client_gone(rs.session)

    # ---------------------------------------------------------------- backpressure
    def writer_paused(self, peer, frame_in_flight: bool = False) -> None:
        """A destination's transport is above its high-water mark (or, with
        ``frame_in_flight``, what waits behind a cut-through frame to it is:
        then the guest sending that frame goes on, so that it can end)."""
        rs = getattr(peer, "rs", None)
        if rs is None:
            return
        if rs.role == "client":
            if rs.lossy:
                return
            sessions = list(self.registry) if rs.all_sessions else [rs.session] if rs.session else []
            for s in sessions:
                rs.sessions_blocked.add(s)
                for g in self.session_guests.get(s, ()):
                    if not (frame_in_flight and s.cut_through is not None and s.cut_through.source is g):
                        g.pause_reading()
        else:
            sess = rs.session
            if sess is not None:
                for c in sess.clients:
                    c.pause_reading()

    def writer_resumed(self, peer) -> None:
        rs = getattr(peer, "rs", None)
        if rs is None:
            return
        if rs.role == "client":
            blocked, rs.sessions_blocked = rs.sessions_blocked, set()
            for s in blocked:
                if not any(s in c.rs.sessions_blocked for c in list(s.clients) + list(self.star_clients)):
                    for g in self.session_guests.get(s, ()):
                        g.resume_reading()
        else:
            sess = rs.session
            if sess is not None:
                for c in sess.clients:
                    c.resume_reading()

    # ---------------------------------------------------------------- events
    def _publish(self, sess: Session, event: dict) -> None:
        event.setdefault("session", sess.name)
        data = notification("vhub.event", event)
        for c in list(sess.clients) + list(self.star_clients):
            if c.rs.events and not c.closed:
                c.write(data)

    def _state_changed(self, sess: Session, old: State) -> None:
        log.info("session state session=%s %s -> %s %s", sess.name, old.value, sess.state.value, sess.reason)
        self._publish(sess, {"type": "state", "state": sess.state.value, "previous": old.value,
                             "reason": sess.reason})

    # ---------------------------------------------------------------- daemon calls
    def daemon_info(self) -> dict:
        return {"version": _version(), "pid": os.getpid(), "uptime": time.time() - self.started,
                "codec": codec.BACKEND, "backend": self.config.default_backend,
                "sessions": len(self.registry), "guests": len(self.guests), "clients": len(self.clients),
                "sandbox": self.config.default_backend not in ("local",),
                "notes": (["the local backend runs agents as host processes: NOT a sandbox"]
                          if self.config.default_backend == "local" else [])}

    def daemon_call(self, peer, method: str, params: Any, rid: int):
        if not isinstance(params, dict):
            raise RpcFailure("bad_params", f"{method} takes an object of params")
        if method == "vhub.ping":
            return {"pong": True, "time": time.time()}
        if method == "vhub.sessions":
            return [s.info() for s in self.registry]
        if method == "vhub.stats":
            return {**self.daemon_info(), "counters": dict(self.counters),
                    "scrollback_bytes": sum(s.scrollback.size for s in self.registry),
                    "inflight_rpcs": sum(len(p.rs.inflight) for p in (*self.guests, *self.clients)
                                         if p.rs is not None),
                    **(self.on_stats() if self.on_stats is not None else {})}
        if method == "vhub.info":
            name = params.get("session")
            if name is None:
                sess = peer.rs.session
                if sess is None:
                    return self.daemon_info()
            else:
                sess = self._session_param(params)
            return {**sess.info(), "daemon": self.daemon_info(),
                    "sandbox": sess.backend not in ("local",),
                    **({"warning": "local backend: the agent is a host process, NOT a sandbox"}
                       if sess.backend == "local" else {})}
        if method == "vhub.register":
            name = params.get("session")
            try:
                name = validate_name(name)
            except InvalidName as exc:
                raise RpcFailure(exc.code, str(exc)) from None
            sess = self.registry.get(name)
            if sess is None:
                sess = self.registry.create(name, "external", token=new_token())
            elif sess.token is None and not sess.anonymous:
                sess.token = new_token()
            elif sess.anonymous:
                raise RpcFailure("session_exists", f"{name!r} is the anonymous session")
            if sess.state in (State.STOPPED, State.FAILED):
                self.registry.set_state(sess, State.WAITING_AGENT, "registered; waiting for an agent")
            return {"session": sess.name, "token": sess.token}
        if method in ("vhub.boot", "vhub.stop"):
            if self.backends is None:
                raise RpcFailure("not_supported", f"{method}: this daemon has no session backends")
            sess_name = params.get("session")
            try:
                validate_name(sess_name)
            except InvalidName as exc:
                raise RpcFailure(exc.code, str(exc)) from None
            if method == "vhub.boot":
                self.backends.boot_call(peer, rid, sess_name, params)
            else:
                self.backends.stop_call(peer, rid, sess_name)
            return _DEFERRED
        if method == "vhub.takeover":
            eid = params.get("execution_id")
            sess = peer.rs.session
            if sess is None or type(eid) is not int or (sess.name, eid) not in self.tty_writers:
                raise RpcFailure("no_such_terminal", f"no terminal execution {eid!r} in this client's session")
            self.tty_writers[(sess.name, eid)] = peer
            return {"session": sess.name, "execution_id": eid, "writer": True}
        raise RpcFailure("no_such_method", f"unknown daemon call {method!r}")

    def _session_param(self, params: dict) -> Session:
        name = params.get("session")
        sess = self.registry.get(name) if isinstance(name, str) else None
        if sess is None:
            raise RpcFailure("unknown_session", f"no session named {name!r}")
        return sess


class CutThrough:
    """A large stream frame in flight: who gets its chunks, and the last
    ``keep`` payload bytes for the scrollback (nothing when the ring is too
    small to hold any of it)."""

    __slots__ = ("targets", "head", "keep", "parts", "size", "source", "waiting")

    def __init__(self, targets: list, ev: StreamStart, room: int):
        self.targets = targets
        self.source = None  # the guest peer sending it
        self.waiting: list = []  # (peer, events) of other guests of the session, held until it ends
        self.head = bytearray(ev.data[:HEADER_SIZE])
        self.keep = max(0, min(ev.length, room))
        self.parts: list[bytes] = []
        self.size = 0

    def keep_tail(self, data: memoryview) -> None:
        keep = self.keep
        if not keep:
            return
        if len(data) >= keep:
            self.parts = [bytes(data[len(data) - keep:])]
            self.size = keep
            return
        self.parts.append(bytes(data))
        self.size += len(data)
        while self.size - len(self.parts[0]) >= keep:
            self.size -= len(self.parts.pop(0))

    def frame_for_scrollback(self) -> bytes:
        if not self.keep:
            return b""
        body = b"".join(self.parts)[-self.keep:]
        self.head[8:12] = len(body).to_bytes(4, "little")
        return bytes(self.head) + body


class RpcFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_DEFERRED = object()  # the answer is written later (boot/stop)


def _version() -> str:
    from . import __version__

    return __version__


def run_of(chunk: bytes) -> StreamRun:
    """A scrollback chunk (complete stream frames) as a StreamRun."""
    sc = codec.Scanner(max(1, len(chunk) // HEADER_SIZE))
    count, _, _, _, _, mask = sc.scan(chunk)
    return StreamRun(memoryview(chunk), count, mask)
