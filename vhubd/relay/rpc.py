"""RPC routing: request ids, calls in flight, expiry.

A guest's RpcRequest goes to the host client that serves its method for that
session (or for "*"); a client's goes to the session's agent, or to the
daemon itself for ``vhub.*``. A forwarded request gets an id of the
destination's own (rewritten in place in the receive buffer, no copy), and
its answer goes back with the origin's id. Every forwarded call has a
deadline; one timer serves them all, so nobody waits forever.

The hot loop: once a guest's method was routed here to a handler, the
guest's next requests for it, and the handler's answers to them, are routed
by ``codec.Router`` (csrc/route.c, or its pure-Python twin) for a whole read
batch in one call, up to the first frame that needs this module (the
connection's fast lane, ``lane``). It decides every frame it takes as this
module would, with ids of its own (``frames.ROUTE_ID_BIT`` set) and its own
table of calls in flight; the bounds (max_inflight, deadlines, a handler
that leaves) hold for both tables. ``BLINK_RPC_LANE=0`` turns it off.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING

from .. import codec
from ..errors import CallFailed, clip
from ..frames import MAX_U32, ROUTE_ID_BIT, MsgType
from ..paths import env
from ..protocol import Frame, rpc_error, rpc_result
from ..sessions import Session
from .members import Member

if TYPE_CHECKING:
    from .core import Relay

log = logging.getLogger("vhubd")

# The forwarded RPC's request_id is rewritten in place with struct: for one
# 8-byte store a cffi call costs 4-8x more than the work (bench/RESULTS.md).
_set_request_id = struct.Struct("<Q").pack_into
DEFERRED = object()  # a daemon call whose answer is written later (boot, stop)
GUEST_LANE = frozenset({MsgType.RPC_REQUEST})
CLIENT_LANE = frozenset({MsgType.RPC_RESPONSE, MsgType.RPC_ERROR})


class Rpc:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.counters = relay.counters
        self._expiry = None  # the one timer for RPC deadlines
        on = env("BLINK_RPC_LANE", "1").strip() not in ("0", "no", "off")
        self.router = codec.Router() if on else None
        self.by_slot: dict[int, Member] = {}
        self._next_session = 1  # sessions are numbered for the router (Session.route_id)

    # ---------------------------------------------------------------- the hot loop
    def lane(self, member: Member):
        """(frame types, function) for the member's connection (``Connection.
        set_fast_lane``), or None: a guest's requests, a client's answers."""
        router = self.router
        if router is None:
            return None
        relay = self.relay
        by_slot = self.by_slot
        if member.role == "guest":
            sess = member.session
            if sess is None:
                return None
            counters = self.counters
            note_write = relay.streams.note_write

            def requests(buf, start: int, end: int, max_payload: int) -> tuple[int, int]:
                ct = sess.cut_through
                if ct is not None and ct.source is not member:
                    return start, 0  # held behind another guest's frame: relay.guest_events decides
                stop, n, forwarded, _, outs = router.route(self.slot_of(member), buf, start, end, max_payload,
                                                           relay.clock() + relay.config.rpc_timeout,
                                                           member.outstanding)
                if n:
                    sess.last_activity = time.monotonic()
                    counters["rpc_forwarded"] += forwarded
                    for slot, data in outs:
                        dest = by_slot[slot]
                        dest.port.write(data)
                        note_write(member, dest)
                    if self._expiry is None:
                        self.arm_expiry()
                return stop, n

            return GUEST_LANE, requests

        def answers(buf, start: int, end: int, max_payload: int) -> tuple[int, int]:
            stop, n, _, _, outs = router.route(self.slot_of(member), buf, start, end, max_payload, 0.0, 0)
            for slot, data in outs:
                by_slot[slot].port.send(data)  # answers: the origin must read what it asked for
            return stop, n

        return CLIENT_LANE, answers

    def slot_of(self, member: Member) -> int:
        if member.slot < 0:
            sess = member.session
            member.slot = self.router.add(member.role == "guest", self._session_id(sess) if sess else 0,  # type: ignore[union-attr]
                                          member.port.limits.max_inflight)
            self.by_slot[member.slot] = member
        return member.slot

    def _session_id(self, sess: Session) -> int:
        sid = sess.route_id
        if not sid:
            if self._next_session > MAX_U32:  # after 4 billion sessions: numbers again, nothing remembered
                self._next_session = 1
                self.router.forget()  # type: ignore[union-attr]
            sid = sess.route_id = self._next_session
            self._next_session += 1
        return sid

    def routes_changed(self) -> None:
        """Who serves what changed (a client came or went): methods are looked up again."""
        if self.router is not None:
            self.router.forget()

    def _routed(self, member: Member) -> int:
        """The member's calls in flight that the hot loop forwarded."""
        return self.router.outstanding(member.slot) if member.slot >= 0 else 0  # type: ignore[union-attr]

    # ---------------------------------------------------------------- requests
    def from_guest(self, member: Member, sess: Session, ev: Frame) -> None:
        relay = self.relay
        rid = ev.request_id
        port = member.port
        try:
            req = ev.json()
            if not isinstance(req, dict):
                raise ValueError
        except Exception:
            if rid:
                port.send(rpc_error(rid, "bad_request", "RpcRequest payload must be a JSON object"))
            return
        method = req.get("method") or req.get("event")
        if not isinstance(method, str):
            if rid:
                port.send(rpc_error(rid, "bad_request", "RpcRequest needs a method (or event)"))
            return
        if method == "vhub.ping":
            if rid:
                port.send(rpc_result(rid, {"pong": True, "session": sess.name, "time": time.time()}))
            return
        if method == "output_seqs" and "method" not in req:
            if relay.resends.seqs(member, sess, req):
                return  # published once what it sends again is dropped (counted in)
        elif method == "execution_result" and "method" not in req:
            sess.last_result = req
            if type(req.get("execution_id")) is int:
                relay.terminals.ended(sess, req["execution_id"])
            relay.publish(sess, {"type": "execution_result", **req})
            if rid:
                port.send(rpc_result(rid, {}))
            return
        if method.startswith("chan."):  # a channel's ack, reset or done (relay.channels)
            relay.channels.from_guest(member, method, req.get("params"))
            return
        handler = self.find_handler(sess, method)
        if handler is None:
            if rid:
                port.send(rpc_error(rid, "no_handler", f"no host client serves {clip(method)} "
                                                       f"for session {sess.name!r}"))
            else:
                relay.publish(sess, {"type": "notification", "method": method,
                                     "params": req.get("params", {k: v for k, v in req.items() if k != "event"})})
            return
        if rid and member.slot >= 0:  # the guest's lane routes this method from now on
            self.router.learn(self._session_id(sess), method, self.slot_of(handler))  # type: ignore[union-attr]
        self.forward(member, rid, handler, ev)

    def from_client(self, member: Member, ev: Frame) -> None:
        relay = self.relay
        rid = ev.request_id
        port = member.port
        try:
            req = ev.json()
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise ValueError
        except Exception:
            if rid:
                port.send(rpc_error(rid, "bad_request", 'RpcRequest payload must be {"method": str, "params": any}'))
            return
        method = req["method"]
        if method.startswith("chan."):
            relay.channels.from_client(member, method, req.get("params"))
            return
        if method.startswith("vhub."):
            try:
                result = relay.calls.call(member, method, req.get("params") or {}, rid)
            except CallFailed as exc:
                if rid:
                    port.send(rpc_error(rid, exc.code, exc.message))
                return
            if result is not DEFERRED and rid:
                port.send(rpc_result(rid, result))
            return
        sess = member.session
        target = req.get("session")
        if target is not None and (sess is None or target != sess.name):
            sess = relay.registry.get(target) if isinstance(target, str) else None
            if sess is None:
                if rid:
                    port.send(rpc_error(rid, "unknown_session", f"no session named {clip(target)}"))
                return
        if sess is None:
            if rid:
                port.send(rpc_error(rid, "session_required",
                                    "this connection is attached to '*': name a session in the request"))
            return
        if sess.agent is None:
            if rid:
                port.send(rpc_error(rid, "no_agent", f"session {sess.name!r} has no agent connected "
                                                     f"(state {sess.state.value})"))
            return
        self.forward(member, rid, sess.agent, ev)

    def find_handler(self, sess: Session, method: str) -> Member | None:
        for c in sess.clients:
            if c.serves(method):
                return c
        for c in self.relay.star_clients:
            if c.serves(method):
                return c
        return None

    def forward(self, origin: Member, origin_id: int, dest: Member, ev: Frame) -> None:
        """Forward an RpcRequest, rewriting its id in the receive buffer. A peer
        has at most ``Limits.max_inflight`` calls in flight; past that the answer
        is ``too_many_requests`` at once."""
        if origin_id == 0:  # a notification: no id, no reply
            self.counters["rpc_forwarded"] += 1
            dest.port.write(ev.data)
            self.relay.streams.note_write(origin, dest)
            return
        outstanding = origin.outstanding + self._routed(origin)
        if outstanding >= origin.port.limits.max_inflight:
            self.counters["too_many_requests"] += 1
            origin.port.send(rpc_error(origin_id, "too_many_requests",
                                       f"{outstanding} calls of this connection are in flight already "
                                       "(the limit): wait for their answers"))
            return
        self.counters["rpc_forwarded"] += 1  # a refused call is not forwarded
        new_id = dest.new_id()
        _set_request_id(ev.data, 12, new_id)
        # a deadline per call and one relay timer for the earliest (not a timer per call)
        dest.inflight[new_id] = (origin, origin_id, self.relay.clock() + self.relay.config.rpc_timeout)
        origin.outstanding += 1
        self.arm_expiry()
        dest.port.write(ev.data)
        self.relay.streams.note_write(origin, dest)

    def arm_expiry(self) -> None:
        """A call went out with a deadline: make sure the one timer runs."""
        if self._expiry is None:
            self._expiry = self.relay.call_later(self.relay.config.rpc_timeout, self._expire_due)

    # ---------------------------------------------------------------- answers
    def answer(self, member: Member, ev: Frame) -> None:
        if ev.request_id & ROUTE_ID_BIT:  # a call the hot loop forwarded; this answer came another way
            self._routed_answer(member, ev)
            return
        entry = member.inflight.pop(ev.request_id, None)
        if entry is None:
            return  # late (after a timeout) or unknown: dropped
        origin, origin_id, _ = entry
        origin.outstanding -= 1
        if origin.port.closed:
            return
        if member.role == "guest":
            self.relay.terminals.maybe_started(member, origin, ev)
        _set_request_id(ev.data, 12, origin_id)
        origin.port.send(ev.data)  # an answer: the origin must read what it asked for

    def _routed_answer(self, member: Member, ev: Frame) -> None:
        found = self.router.take(member.slot, ev.request_id) if member.slot >= 0 else None  # type: ignore[union-attr]
        if found is None:
            return  # late or unknown: dropped
        origin = self.by_slot[found[0]]
        if not origin.port.closed:
            _set_request_id(ev.data, 12, found[1])
            origin.port.send(ev.data)

    def fail_inflight(self, member: Member, code: str, message: str) -> None:
        """The member is gone: every call it owed an answer fails (the calls it
        made are forgotten: their answers are dropped)."""
        inflight, member.inflight = member.inflight, {}
        for origin, origin_id, _ in inflight.values():
            origin.outstanding -= 1
            if not origin.port.closed:
                origin.port.send(rpc_error(origin_id, code, message))
        if member.slot >= 0:
            for slot, origin_id in self.router.release(member.slot):  # type: ignore[union-attr]
                origin = self.by_slot[slot]
                if not origin.port.closed:
                    origin.port.send(rpc_error(origin_id, code, message))
            del self.by_slot[member.slot]
            member.slot = -1

    # ---------------------------------------------------------------- expiry
    def _members(self):
        return (*self.relay.guests, *self.relay.clients)

    def _expire_due(self) -> None:
        self._expiry = None
        now = self.relay.clock()
        self.expire(now)
        due = [next(iter(m.inflight.values()))[2] for m in self._members() if m.inflight]
        routed = self.router.earliest() if self.router is not None else None
        if routed is not None:
            due.append(routed)
        if due:
            self._expiry = self.relay.call_later(max(0.0, min(due) - now) + 0.001, self._expire_due)

    def expire(self, now: float) -> None:
        """Answer ``timeout`` for calls past their deadline. Entries go in with
        one constant timeout, so each member's dict is in deadline order."""
        for member in self._members():
            if not member.inflight:
                continue
            late = []
            for rid, entry in member.inflight.items():
                if entry[2] > now:
                    break
                late.append(rid)
            for rid in late:
                entry = member.inflight.pop(rid)
                entry[0].outstanding -= 1
                self._timed_out(member, entry[0], entry[1])
        if self.router is not None:
            by_slot = self.by_slot
            for dest, origin, origin_id in self.router.expire(now):
                self._timed_out(by_slot[dest], by_slot[origin], origin_id)

    def _timed_out(self, dest: Member, origin: Member, origin_id: int) -> None:
        self.counters["rpc_timeouts"] += 1
        if not origin.port.closed:
            origin.port.send(rpc_error(origin_id, "timeout", f"no answer from {dest.role} {dest.label} within "
                                                             f"{self.relay.config.rpc_timeout:g} s"))

    def inflight_count(self) -> int:
        return sum(len(m.inflight) for m in self._members()) + (self.router.count() if self.router else 0)
