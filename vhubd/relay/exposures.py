"""Exposed ports: ``vhub.expose`` / ``vhub.unexpose`` / ``vhub.exposed``.

An exposure is a TCP listener on the host (the I/O layer's, through the
``Opener`` the daemon plugs in: ``vhubd.portserver``) whose every accepted
connection becomes a channel (``relay.channels``) to the session's agent,
which connects to 127.0.0.1:GUEST_PORT inside the guest. A connection the
guest refuses (nobody listens there), or that finds no agent, is reset and the
refusal is counted, kept as ``last_refusal`` and logged at a bounded rate.
Exposures last while the session lives: stopping or removing it closes them
and resets their connections; the session store keeps them across a daemon
restart (the same listen address is bound again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CallFailed, clip
from ..protocol import rpc_error, rpc_result
from ..sessions import Session
from .members import Member
from .rpc import DEFERRED

if TYPE_CHECKING:
    from .channels import Channel
    from .core import Relay

log = logging.getLogger("vhubd")
MAX_EXPOSURES = 64  # per session


class Opener(Protocol):
    """The I/O side of exposures."""

    def listen(self, host: str, port: int, exposure: Exposure) -> Any:
        """A future: the bound ``(host, port)``, or OSError."""

    def close(self, exposure: Exposure) -> None:
        """Stop listening and reset the exposure's connections."""


class Exposure:
    __slots__ = ("session", "guest_port", "host", "port", "listener", "ends", "accepted", "refused",
                 "last_refusal", "bytes_in", "bytes_out", "ready")

    def __init__(self, sess: Session, guest_port: int, host: str, port: int):
        self.session = sess
        self.guest_port = guest_port
        self.host = host
        self.port = port
        self.listener: Any = None  # the I/O layer's
        self.ends: set = set()  # its live connections (the I/O layer's ends)
        self.accepted = self.refused = 0
        self.last_refusal = ""
        self.bytes_in = self.bytes_out = 0  # host -> guest, guest -> host
        self.ready = False

    @property
    def listen_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def info(self) -> dict:
        return {"guest_port": self.guest_port, "listen": self.listen_address,
                "url": f"http://{self.listen_address}/", "connections": len(self.ends),
                "accepted": self.accepted, "refused": self.refused, "last_refusal": self.last_refusal,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


def parse_listen(value: Any) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"PORT"``, an int, or None (127.0.0.1, a free port)."""
    if value is None:
        return "127.0.0.1", 0
    if type(value) is int:
        host, text = "127.0.0.1", str(value)
    elif isinstance(value, str) and len(value) <= 300:
        host, sep, text = value.rpartition(":")
        if not sep:
            host, text = "127.0.0.1", value
        host = host.strip("[]") or "127.0.0.1"
    else:
        raise CallFailed("bad_params", "listen must be \"HOST:PORT\" or a port number")
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise CallFailed("bad_params", f"listen: bad port in {clip(str(value), 80)!r}")
    return host, int(text)


def guest_port(params: dict) -> int:
    port = params.get("port")
    if type(port) is not int or not 1 <= port <= 65535:
        raise CallFailed("bad_params", "port (the guest's) must be an integer from 1 to 65535")
    return port


class Exposures:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.opener: Opener | None = None
        self.changed: Callable[[Session], None] = lambda sess: None  # the session store saves exposures
        for k in ("expose_accepted", "expose_refused"):
            relay.counters.setdefault(k, 0)

    # ---------------------------------------------------------------- daemon calls
    def expose(self, member: Member, params: dict, rid: int) -> Any:
        if self.opener is None:
            raise CallFailed("not_supported", "this daemon does not expose ports")
        sess = self.relay.calls.session_param(params)
        gp = guest_port(params)
        host, port = parse_listen(params.get("listen"))
        have = sess.exposed.get(gp)
        if have is not None:
            if params.get("listen") is None or (have.host, have.port) == (host, port):
                if have.ready:
                    return {"session": sess.name, **have.info()}
            raise CallFailed("exposed_already", f"guest port {gp} of {sess.name!r} is exposed at "
                                                f"{have.listen_address} already (vhub.unexpose it first)")
        if len(sess.exposed) >= MAX_EXPOSURES:
            raise CallFailed("too_many_exposures", f"session {sess.name!r} has {MAX_EXPOSURES} exposed ports")
        def answer(exp: Exposure, error: str | None) -> None:
            if not rid or member.port.closed:
                return
            if error is not None:
                member.port.send(rpc_error(rid, "listen_failed", error))
            else:
                member.port.send(rpc_result(rid, {"session": sess.name, **exp.info()}))

        self.open(sess, gp, host, port, answer)
        return DEFERRED

    def open(self, sess: Session, gp: int, host: str, port: int,
             done: Callable[[Exposure, str | None], None] | None = None) -> Exposure:
        """Listen on ``host:port`` for guest port ``gp``; ``done(exposure, error)`` once bound or not."""
        assert self.opener is not None
        exp = Exposure(sess, gp, host, port)
        sess.exposed[gp] = exp
        fut = self.opener.listen(host, port, exp)

        def bound(f: Any) -> None:
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or exc is not None or sess.exposed.get(gp) is not exp:
                if sess.exposed.get(gp) is exp:
                    del sess.exposed[gp]
                if exc is None and not f.cancelled() and self.opener is not None:
                    self.opener.close(exp)  # the session went while binding
                why = getattr(exc, "strerror", None) or str(exc or "the session ended")
                log.warning("expose failed session=%s guest_port=%d listen=%s: %s", sess.name, gp,
                            exp.listen_address, clip(why))
                if done is not None:
                    done(exp, f"cannot listen on {exp.listen_address}: {why[:200]}")
                return
            exp.ready = True
            log.info("exposed session=%s guest_port=%d listen=%s", sess.name, gp, exp.listen_address)
            self.changed(sess)
            if done is not None:
                done(exp, None)

        fut.add_done_callback(bound)
        return exp

    def unexpose(self, member: Member, params: dict, rid: int) -> dict:
        sess = self.relay.calls.session_param(params)
        gp = guest_port(params)
        exp = sess.exposed.pop(gp, None)
        if exp is None:
            raise CallFailed("not_exposed", f"guest port {gp} of {sess.name!r} is not exposed")
        self._close(exp)
        self.changed(sess)
        return {"session": sess.name, "guest_port": gp, "removed": True}

    def exposed(self, member: Member, params: dict, rid: int) -> list:
        if params.get("session") is not None:
            sessions = [self.relay.calls.session_param(params)]
        elif member.session is not None:
            sessions = [member.session]
        else:
            sessions = [s for s in self.relay.registry if s.exposed]
        return [{"session": s.name, **e.info()} for s in sessions for _, e in sorted(s.exposed.items())]

    # ---------------------------------------------------------------- lifecycle
    def session_ended(self, sess: Session) -> None:
        exposed, sess.exposed = sess.exposed, {}
        for exp in exposed.values():
            self._close(exp)
        if exposed:
            self.changed(sess)

    def _close(self, exp: Exposure) -> None:
        log.info("unexposed session=%s guest_port=%d listen=%s", exp.session.name, exp.guest_port,
                 exp.listen_address)
        if self.opener is not None:
            self.opener.close(exp)

    # ---------------------------------------------------------------- connections (from the I/O layer)
    def accepted(self, exp: Exposure, end: Any) -> Channel | None:
        """A host connection to ``exp``: its channel, or None (the end is reset)."""
        sess = exp.session
        exp.accepted += 1
        self.relay.counters["expose_accepted"] += 1

        def answered(result: Any, err: tuple[str, str] | None) -> None:
            if err is None:
                end.opened()
                return
            if err[0] != "channel_reset":  # not the host's client leaving while it opened
                self._refused(exp, f"{err[0]}: {err[1]}")
            end.reset(err[1])

        if sess.exposed.get(exp.guest_port) is not exp:
            self._refused(exp, "the exposure was removed")
            end.reset("the exposure was removed")
            return None
        try:
            return self.relay.channels.open(sess, "agent.connect", {"port": exp.guest_port}, end, answered)
        except CallFailed as exc:
            self._refused(exp, f"{exc.code}: {exc.message}")
            end.reset(exc.message)
            return None

    def _refused(self, exp: Exposure, why: str) -> None:
        exp.refused += 1
        exp.last_refusal = why[:300]
        self.relay.counters["expose_refused"] += 1
        self.relay.refusal_log.warning("expose refused session=%s guest_port=%d listen=%s: %s (the host's "
                                       "client got a reset)", exp.session.name, exp.guest_port,
                                       exp.listen_address, clip(why))
