"""Admission: who a new peer is, and whether it gets in.

Guests (on guest listeners) become a session's agent, or a program attached
beside it; clients (on the control socket) attach to one session or to "*",
with their subscriptions, served methods and flow. Everything here answers
with a decision value (``Accept``, ``Refuse``, ``Defer``); the I/O layer
carries it out, then calls ``admitted`` once the answer is on its way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .. import frames
from ..errors import CallFailed, InvalidName, clip
from ..sessions import State, validate_name
from .members import Member
from .port import Accept, Decision, Defer, Listener, Port, Refuse

if TYPE_CHECKING:
    from .core import Relay

log = logging.getLogger("vhubd")
_decode = msgspec.json.decode
_encode = msgspec.json.encode

KIND_MASK = {"stdout": frames.TYPE_BIT[frames.MsgType.STDOUT], "stderr": frames.TYPE_BIT[frames.MsgType.STDERR],
             "stream": frames.TYPE_BIT[frames.MsgType.STREAM_DATA]}


class Admission:
    def __init__(self, relay: Relay):
        self.relay = relay

    def refuse(self, port: Port, code: str, message: str) -> Refuse:
        """Refusals are counted by code (vhub.stats) and logged at a bounded rate."""
        relay = self.relay
        relay.counters["refused"] += 1
        relay.refusals[code] += 1
        relay.refusal_log.warning("refused peer=%s code=%s %s", port.label, code, message)
        return Refuse(code, message)

    # ---------------------------------------------------------------- guests
    def guest(self, port: Port, listener: Listener, payload: bytes) -> Decision:
        relay = self.relay
        registry = relay.registry
        fixed = listener.fixed_session
        info: dict = {}
        name: Any
        if fixed is not None:
            # the transport names the session (a VM's own vsock device, a per-session
            # socket): whatever the payload claims, only its agent details, the ack and
            # the attach flag count
            name = fixed
            decoded = _decode_object(payload) if payload.strip() else {}
            info = decoded if isinstance(decoded, dict) else {}
        elif not payload.strip():
            name = None
        else:
            decoded = _decode_object(payload)
            if not isinstance(decoded, dict):
                return self.refuse(port, "bad_handshake", "guest handshake payload must be empty or a JSON object"
                                   + (" (nested too deeply)" if decoded is _TOO_DEEP else ""))
            info = decoded
            if info.get("role", "guest") != "guest":
                return self.refuse(port, "wrong_role",
                                   f"role {clip(info.get('role'))} is not accepted on a guest listener")
            name = info.get("session")
        if name is None:
            anon = relay.config.anonymous_session
            if anon is None:
                return self.refuse(port, "session_required", "anonymous agents are disabled on this daemon")
            if listener.token_required:
                return self.refuse(port, "token_required", "this listener requires a session and token")
            sess = registry.get(anon)
        else:
            try:
                validate_name(name)
            except InvalidName as exc:
                return self.refuse(port, exc.code, str(exc))
            sess = registry.get(name)
            if sess is None:
                return self.refuse(port, "unknown_session", f"no session named {name!r} on this daemon")
            attach = info.get("attach") is True
            if fixed is None and listener.token_required and sess.token is None and not attach:
                # the anonymous session has nothing to prove: this listener admits only
                # sessions with tokens
                return self.refuse(port, "token_required", f"session {name!r} has no token; register it "
                                                           "(vhub.register) to admit agents over this listener")
            if fixed is None:
                token = info.get("token")
                if not (sess.check_attach(token) if attach else sess.check_token(token)):
                    return self.refuse(port, "bad_token", f"wrong token for session {name!r}")
        assert sess is not None
        member = Member(port, "guest")
        member.session = sess
        if info.get("attach") is True:
            # a program inside the guest (not the resident agent) doing RPCs and
            # output for its session, with a credential the daemon gave that session's
            # agent; host->guest calls never go to it
            if name is None:
                return self.refuse(port, "session_required", "attach needs a session and its token")
            attached = sum(1 for g in sess.guests if g.attached)
            if attached >= relay.config.max_attached:
                return self.refuse(port, "too_many_attached", f"session {sess.name!r} has {attached} attached "
                                                              "connections already (the limit)")
            member.attached = True
        else:
            if sess.agent is not None and not relay.config.allow_multiple_agents:
                return self.refuse(port, "session_busy", f"session {sess.name!r} already has an agent connected")
            if sess.state is State.STOPPING:
                return self.refuse(port, "session_stopping", f"session {sess.name!r} is stopping")
            member.ack = info.get("ack") is True
            sess.agent = member
            sess.agent_info = {k: _short(info[k]) for k in ("agent", "pid", "version") if k in info}
            sess.agent_info["peer"] = port.label
        sess.guests.add(member)
        relay.guests.add(member)
        return Accept(member, frames.READY_PAYLOAD)

    def _guest_admitted(self, member: Member) -> None:
        relay = self.relay
        sess = member.session
        relay.counters["guests_accepted"] += 1
        sess.last_activity = time.monotonic()
        if member.attached:
            log.info("guest attached session=%s peer=%s", sess.name, member.label)
        else:
            if member.ack:
                relay.streams.hello(member)
            log.info("guest accepted session=%s peer=%s agent=%s", sess.name, member.label, sess.agent_info)
            relay.registry.set_state(sess, State.READY, "agent connected")
        if relay.streams.session_blocked(sess):
            member.port.pause_reading("backpressure")  # lossless subscribers are full: it waits like the others

    # ---------------------------------------------------------------- clients
    def client(self, port: Port, payload: bytes) -> Decision:
        relay = self.relay
        hs = _decode_object(payload) if payload.strip() else {}
        if not isinstance(hs, dict):
            return self.refuse(port, "bad_handshake", "client handshake must be a JSON object"
                               + (" (nested too deeply)" if hs is _TOO_DEEP else ""))
        if hs.get("role") != "client":
            return self.refuse(port, "wrong_role", "the control socket accepts only the client role "
                                                   "(guests connect to the guest socket)")
        subs = hs.get("subscribe", [])
        if not isinstance(subs, list) or any(s not in KIND_MASK and s != "events" for s in subs):
            return self.refuse(port, "bad_handshake", "subscribe must be a list of stdout, stderr, stream, events")
        serve = hs.get("serve", [])
        if not isinstance(serve, list) or not all(isinstance(m, str) for m in serve):
            return self.refuse(port, "bad_handshake", "serve must be a list of method names")
        flow = hs.get("flow", "lossless")
        if flow not in ("lossless", "lossy"):
            return self.refuse(port, "bad_handshake", "flow must be lossless or lossy")
        name = hs.get("session", "*")
        sess = None
        boot = bool(hs.get("boot")) and relay.boots is not None
        if name != "*":
            try:
                validate_name(name)
            except InvalidName as exc:
                return self.refuse(port, exc.code, str(exc))
            sess = relay.registry.get(name)
            if sess is None and not boot:
                return self.refuse(port, "unknown_session", f"no session named {name!r} (boot it, or register it "
                                                            "first)")
        member = Member(port, "client")
        for s in subs:
            member.subscribe_mask |= KIND_MASK.get(s, 0)
        member.events = "events" in subs
        member.serve_exact = {m for m in serve if not m.endswith("*")}
        member.serve_prefix = tuple(m[:-1] for m in serve if m.endswith("*"))
        member.lossy = flow == "lossy"
        member.replay = bool(hs.get("replay"))
        member.session = sess
        member.all_sessions = sess is None
        if name != "*" and boot and relay.boots is not None and (sess is None or sess.agent is None):
            params = hs.get("boot_params")
            member.boot_params = params if isinstance(params, dict) else {}
            try:
                fut = relay.boots.boot(name, member.boot_params)  # creates the session if need be
            except CallFailed as exc:
                return self.refuse(port, exc.code, exc.message)
            member.session = relay.registry.get(name)
            relay.clients.add(member)
            fut.add_done_callback(lambda f: self._booted(member, f))
            return Defer(member)
        relay.clients.add(member)
        return self._accept_client(member, hs)

    def _accept_client(self, member: Member, hs: dict | None = None) -> Accept:
        relay = self.relay
        sess = member.session
        if sess is None:
            relay.star_clients.add(member)
            result: dict = {"ok": True, "session": None, "daemon": relay.daemon_info()}
        else:
            sess.clients.add(member)
            result = {"ok": True, "session": sess.info()}
        relay.rpc.routes_changed()
        return Accept(member, _encode(result))

    def _booted(self, member: Member, fut: Any) -> None:
        """The boot a client's handshake waited for has ended."""
        if member.port.closed:
            return
        exc = fut.exception() if not fut.cancelled() else None
        if fut.cancelled():
            decision: Accept | Refuse = self.refuse(member.port, "boot_failed", "boot cancelled (session stopping)")
        elif exc is not None:
            decision = self.refuse(member.port, "boot_failed", str(exc))
        else:
            decision = self._accept_client(member)
        if isinstance(decision, Refuse):
            self.relay.clients.discard(member)
        member.port.complete(decision)

    def _client_admitted(self, member: Member) -> None:
        relay = self.relay
        sess = member.session
        relay.counters["clients_accepted"] += 1
        if sess is not None and sess.cut_through is not None:
            # mid cut-through frame: join after it ends (with the replay, which then holds it)
            member.joined = False
            member.replay_pending = member.replay and bool(member.subscribe_mask)
        elif member.replay and member.subscribe_mask:
            relay.streams.replay(member)
        subs = [k for k, bit in KIND_MASK.items() if member.subscribe_mask & bit] + (["events"] if member.events else [])
        serves = sorted(member.serve_exact) + [p + "*" for p in member.serve_prefix]
        log.info("client accepted peer=%s session=%s subscribe=%s serve=%s flow=%s", member.label,
                 sess.name if sess else "*", subs, clip(serves), "lossy" if member.lossy else "lossless")

    def admitted(self, member: Member) -> None:
        if member.role == "guest":
            self._guest_admitted(member)
        else:
            self._client_admitted(member)


_TOO_DEEP = object()


def _decode_object(payload: bytes) -> Any:
    """The JSON value of a handshake payload; None if it is not JSON, ``_TOO_DEEP``
    if it nests past what the decoder allows (never a RecursionError traceback)."""
    try:
        return _decode(payload)
    except msgspec.DecodeError:
        return None
    except RecursionError:
        return _TOO_DEEP


def _short(value: Any) -> Any:
    """What a guest says of itself (agent, pid, version): kept small, it is shown and logged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value[:64] if isinstance(value, str) else clip(value, 64)
