"""RPC routing: request ids, calls in flight, expiry.

A guest's RpcRequest goes to the host client that serves its method for that
session (or for "*"); a client's goes to the session's agent, or to the
daemon itself for ``vhub.*``. A forwarded request gets an id of the
destination's own (rewritten in place in the receive buffer, no copy), and
its answer goes back with the origin's id. Every forwarded call has a
deadline; one timer serves them all, so nobody waits forever.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING

from ..errors import CallFailed, clip
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


class Rpc:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.counters = relay.counters
        self._expiry = None  # the one timer for RPC deadlines

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
        if method == "execution_result" and "method" not in req:
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
        if origin.outstanding >= origin.port.limits.max_inflight:
            self.counters["too_many_requests"] += 1
            origin.port.send(rpc_error(origin_id, "too_many_requests",
                                       f"{origin.outstanding} calls of this connection are in flight already "
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

    def fail_inflight(self, member: Member, code: str, message: str) -> None:
        """The destination is gone: every call it owed an answer fails."""
        inflight, member.inflight = member.inflight, {}
        for origin, origin_id, _ in inflight.values():
            origin.outstanding -= 1
            if not origin.port.closed:
                origin.port.send(rpc_error(origin_id, code, message))

    # ---------------------------------------------------------------- expiry
    def _members(self):
        return (*self.relay.guests, *self.relay.clients)

    def _expire_due(self) -> None:
        self._expiry = None
        now = self.relay.clock()
        self.expire(now)
        nxt = min((next(iter(m.inflight.values()))[2] for m in self._members() if m.inflight), default=None)
        if nxt is not None:
            self._expiry = self.relay.call_later(max(0.0, nxt - now) + 0.001, self._expire_due)

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
                self._timeout(member, rid)

    def _timeout(self, dest: Member, rid: int) -> None:
        entry = dest.inflight.pop(rid, None)
        if entry is None:
            return
        origin, origin_id, _ = entry
        origin.outstanding -= 1
        self.counters["rpc_timeouts"] += 1
        if not origin.port.closed:
            origin.port.send(rpc_error(origin_id, "timeout", f"no answer from {dest.role} {dest.label} within "
                                                             f"{self.relay.config.rpc_timeout:g} s"))

    def inflight_count(self) -> int:
        return sum(len(m.inflight) for m in self._members())
