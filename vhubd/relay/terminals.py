"""Input toward a session's agent, and the writer seat of terminals.

A client's StreamData and TtyResize go to its session's agent. For a terminal
execution (``agent.run`` with ``tty``) only one client writes: the one that
started it, or whoever took the seat over (``vhub.takeover``); a seat whose
writer left goes to the next client that types. Input from anyone else is
dropped and counted (``tty_input_dropped``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import frames
from ..errors import CallFailed
from ..protocol import Frame, StreamRun
from ..sessions import Session
from .members import Member

if TYPE_CHECKING:
    from .core import Relay

RPC_RESPONSE = int(frames.MsgType.RPC_RESPONSE)


class Terminals:
    def __init__(self, relay: Relay):
        self.relay = relay
        # (session, execution id) -> the one client whose input reaches the agent (None: the seat is free)
        self.writers: dict[tuple[str, int], Member | None] = {}

    def to_agent(self, member: Member, ev: Frame | StreamRun) -> None:
        sess = member.session
        if sess is None or sess.agent is None:
            return
        agent = sess.agent.port
        if not self.writers:
            agent.write(ev.data)
        elif type(ev) is Frame:
            if self.may_write(member, sess, ev.request_id):
                agent.write(ev.data)
        elif type(ev) is StreamRun:
            for f in ev.frames():
                if self.may_write(member, sess, f.request_id):
                    agent.write(f.data)
        self.relay.streams.note_write(member, sess.agent)

    def may_write(self, member: Member, sess: Session, rid: int) -> bool:
        """Input for a terminal reaches the agent only from its writer; a free seat
        (the writer left) goes to the first client that types. Other stream ids pass."""
        key = (sess.name, rid)
        writer = self.writers.get(key, member)
        if writer is member:
            return True
        if writer is None or writer.port.closed:
            self.writers[key] = member
            return True
        self.relay.counters["tty_input_dropped"] += 1
        return False

    def maybe_started(self, guest: Member, origin: Member, ev: Frame) -> None:
        """An agent answered ``{"execution_id": N, "tty": true}``: the client that
        started terminal N is its writer."""
        if ev.msg_type != RPC_RESPONSE or len(ev.data) >= 512 or b'"tty"' not in bytes(ev.payload):
            return
        try:
            res = ev.json()
        except Exception:
            return
        if isinstance(res, dict) and res.get("tty") is True and type(res.get("execution_id")) is int \
                and guest.session is not None:
            self.writers[(guest.session.name, res["execution_id"])] = origin

    def ended(self, sess: Session, execution_id: int) -> None:
        if self.writers:
            self.writers.pop((sess.name, execution_id), None)

    def released(self, member: Member) -> None:
        """A client left: the seats it held are free."""
        for key, writer in self.writers.items():
            if writer is member:
                self.writers[key] = None

    def take_over(self, member: Member, execution_id: object) -> dict:
        sess = member.session
        if sess is None or type(execution_id) is not int or (sess.name, execution_id) not in self.writers:
            raise CallFailed("no_such_terminal",
                             f"no terminal execution {execution_id!r} in this client's session")
        self.writers[(sess.name, execution_id)] = member
        return {"session": sess.name, "execution_id": execution_id, "writer": True}
