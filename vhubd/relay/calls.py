"""The daemon's own calls: ``vhub.*`` RpcRequests from host clients.

Each call returns its result, raises ``CallFailed`` (answered as an
RpcError), or returns ``DEFERRED`` when the answer comes later (boot, stop).
Parameters and results are documented in docs/protocol.md.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import frames
from ..errors import CallFailed, InvalidName, clip
from ..protocol import rpc_error, rpc_result
from ..sessions import Session, State, new_token, validate_name
from .channels import ClientEnd
from .members import Member
from .rpc import DEFERRED

PAGE = frames.SESSIONS_PAGE
CHANNEL_METHODS = ("agent.tar", "agent.untar")

if TYPE_CHECKING:
    from .core import Relay


class DaemonCalls:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.table = {
            "vhub.ping": self.ping, "vhub.sessions": self.sessions, "vhub.stats": self.stats,
            "vhub.info": self.info, "vhub.register": self.register, "vhub.boot": self.boot,
            "vhub.stop": self.stop, "vhub.remove": self.remove, "vhub.takeover": self.takeover,
            "vhub.standby": self.standby, "vhub.wake": self.wake,
            "vhub.snapshot": self.snapshot, "vhub.snapshots": self.snapshots, "vhub.restore": self.restore,
            "vhub.remove_snapshot": self.remove_snapshot,
            "vhub.channel": self.channel, "vhub.expose": relay.exposures.expose,
            "vhub.unexpose": relay.exposures.unexpose, "vhub.exposed": relay.exposures.exposed,
        }

    def call(self, member: Member, method: str, params: Any, rid: int) -> Any:
        if not isinstance(params, dict):
            raise CallFailed("bad_params", f"{method} takes an object of params")
        fn = self.table.get(method)
        if fn is None:
            raise CallFailed("no_handler", f"unknown daemon call {clip(method)}")
        return fn(member, params, rid)

    # ---------------------------------------------------------------- answered now
    def ping(self, member: Member, params: dict, rid: int) -> dict:
        return {"pong": True, "time": time.time()}

    def sessions(self, member: Member, params: dict, rid: int) -> list:
        """A page of sessions in name order: ``limit`` (at most 1000), names
        after ``after``, starting with ``prefix``, in ``state``. A page shorter
        than ``limit`` is the last one."""
        limit = params.get("limit", PAGE)
        after, prefix, state = params.get("after", ""), params.get("prefix", ""), params.get("state")
        if type(limit) is not int or not 1 <= limit <= PAGE:
            raise CallFailed("bad_params", f"limit must be an integer from 1 to {PAGE}")
        if not isinstance(after, str) or not isinstance(prefix, str) or not (state is None or isinstance(state, str)):
            raise CallFailed("bad_params", "after, prefix and state are strings")
        return [s.info() for s in self.relay.registry.page(after, limit, prefix, state)]

    def stats(self, member: Member, params: dict, rid: int) -> dict:
        relay = self.relay
        return {**relay.daemon_info(), "counters": dict(relay.counters), "refused_by_code": dict(relay.refusals),
                "scrollback_bytes": sum(s.scrollback.size for s in relay.registry),
                "inflight_rpcs": relay.rpc.inflight_count()}

    def info(self, member: Member, params: dict, rid: int) -> dict:
        relay = self.relay
        if params.get("session") is None:
            sess = member.session
            if sess is None:
                return relay.daemon_info()
        else:
            sess = self.session_param(params)
        return {**sess.info(), "daemon": relay.daemon_info(), "sandbox": sess.backend not in ("local",),
                **({"warning": "local backend: the agent is a host process, NOT a sandbox"}
                   if sess.backend == "local" else {})}

    def register(self, member: Member, params: dict, rid: int) -> dict:
        registry = self.relay.registry
        name = self.name_param(params)
        sess = registry.get(name)
        if sess is None:
            sess = registry.create(name, "external", token=new_token())
        elif sess.anonymous:
            raise CallFailed("session_exists", f"{name!r} is the anonymous session")
        elif sess.token is None:
            sess.token = new_token()
        if sess.state in (State.STOPPED, State.FAILED):
            registry.set_state(sess, State.WAITING_AGENT, "registered; waiting for an agent")
        return {"session": sess.name, "token": sess.token}

    def channel(self, member: Member, params: dict, rid: int) -> object:
        """Open a channel to the session's agent for this client (a copy):
        ``{"session", "method": "agent.tar" | "agent.untar", "params": {...}}``;
        the answer is the agent's (with ``channel`` and ``window``)."""
        sess = self.session_param(params) if params.get("session") is not None else member.session
        if sess is None:
            raise CallFailed("session_required", "vhub.channel needs a session")
        method, inner = params.get("method"), params.get("params") or {}
        if method not in CHANNEL_METHODS:
            raise CallFailed("bad_params", f"method must be one of {', '.join(CHANNEL_METHODS)}")
        if not isinstance(inner, dict):
            raise CallFailed("bad_params", "params must be an object")
        end = ClientEnd(member)

        def answered(result: Any, err: tuple[str, str] | None) -> None:
            if not rid or member.port.closed:
                return
            if err is not None:
                member.port.send(rpc_error(rid, err[0], err[1]))
            else:
                member.port.send(rpc_result(rid, {**result, "channel": end.channel.id if end.channel else 0}))

        end.channel = self.relay.channels.open(sess, method, inner, end, answered)
        return DEFERRED

    def takeover(self, member: Member, params: dict, rid: int) -> dict:
        return self.relay.terminals.take_over(member, params.get("execution_id"))

    # ---------------------------------------------------------------- answered later
    def boot(self, member: Member, params: dict, rid: int) -> object:
        boots = self._boots("vhub.boot")
        fut = boots.boot(self.name_param(params), params)
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "boot_failed"))
        return DEFERRED

    def stop(self, member: Member, params: dict, rid: int) -> object:
        boots = self._boots("vhub.stop")
        fut = boots.stop(self.name_param(params))
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "stop_failed"))
        return DEFERRED

    def standby(self, member: Member, params: dict, rid: int) -> object:
        sess = self.session_param(params)
        fut = self._boots("vhub.standby").standby(sess.name)
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "standby_failed"))
        return DEFERRED

    def wake(self, member: Member, params: dict, rid: int) -> object:
        sess = self.session_param(params)
        fut = self._boots("vhub.wake").wake(sess.name)
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "wake_failed"))
        return DEFERRED

    def snapshot(self, member: Member, params: dict, rid: int) -> object:
        """Save the session's sandbox as snapshot ``name``; ``stop``: stop it after."""
        sess = self.session_param(params)
        stop = params.get("stop", False)
        if not isinstance(stop, bool):
            raise CallFailed("bad_params", "stop must be true or false")
        fut = self._boots("vhub.snapshot").snapshots.take(sess.name, params.get("name"), stop=stop)
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "snapshot_failed"))
        return DEFERRED

    def snapshots(self, member: Member, params: dict, rid: int) -> object:
        sess = self.session_param(params)
        return self._boots("vhub.snapshots").snapshots.list(sess.name)

    def restore(self, member: Member, params: dict, rid: int) -> object:
        """Bring the session back as it was at snapshot ``name`` (stopping what runs)."""
        sess = self.session_param(params)
        fut = self._boots("vhub.restore").snapshots.restore(sess.name, params.get("name"))
        fut.add_done_callback(lambda f: self._answer(member, rid, f, "restore_failed"))
        return DEFERRED

    def remove_snapshot(self, member: Member, params: dict, rid: int) -> object:
        sess = self.session_param(params)
        return self._boots("vhub.remove_snapshot").snapshots.remove(sess.name, params.get("name"))

    def remove(self, member: Member, params: dict, rid: int) -> object:
        """Stop the session if it runs, disconnect whoever is in it, forget it."""
        sess = self.session_param(params)
        if sess.anonymous:
            raise CallFailed("session_exists", f"{sess.name!r} is the anonymous session; it cannot be removed "
                                               "(serve --no-anonymous turns it off)")
        name = sess.name
        if self.relay.boots is None or sess.state in (State.STOPPED, State.FAILED, State.WAITING_AGENT) \
                and sess.agent is None:
            if self.relay.boots is not None:
                self.relay.boots.forget(name)
            return self._removed(sess)
        boots = self.relay.boots
        fut = boots.stop(name)

        def stopped(f: Any) -> None:
            if not f.cancelled() and f.exception() is None and self.relay.registry.get(name) is sess:
                boots.forget(name)
                result: Any = self._removed(sess)
                if rid and not member.port.closed:
                    member.port.send(rpc_result(rid, result))
            else:
                self._answer(member, rid, f, "stop_failed")

        fut.add_done_callback(stopped)
        return DEFERRED

    def _removed(self, sess: Session) -> dict:
        self.relay.exposures.session_ended(sess)
        for m in (*sess.guests, *sess.clients):
            m.port.close("session_removed", f"session {sess.name!r} was removed")
        self.relay.registry.remove(sess.name)
        return {"session": sess.name, "removed": True}

    def _boots(self, method: str) -> Any:
        if self.relay.boots is None:
            raise CallFailed("not_supported", f"{method}: this daemon has no session backends")
        return self.relay.boots

    @staticmethod
    def _answer(member: Member, rid: int, fut: Any, code: str) -> None:
        if member.port.closed or not rid:
            return
        if fut.cancelled():
            what = {"boot_failed": "boot", "snapshot_failed": "snapshot", "restore_failed": "restore"}.get(code, "stop")
            member.port.send(rpc_error(rid, code, f"{what} cancelled (session stopping)"))
            return
        exc = fut.exception()
        if isinstance(exc, CallFailed):
            member.port.send(rpc_error(rid, exc.code, exc.message))
        elif exc is not None:
            member.port.send(rpc_error(rid, code, str(exc)))
        else:
            member.port.send(rpc_result(rid, fut.result()))

    # ---------------------------------------------------------------- params
    @staticmethod
    def name_param(params: dict) -> str:
        try:
            return validate_name(params.get("session"))
        except InvalidName as exc:
            raise CallFailed(exc.code, str(exc)) from None

    def session_param(self, params: dict) -> Session:
        name = params.get("session")
        sess = self.relay.registry.get(name) if isinstance(name, str) else None
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        return sess
