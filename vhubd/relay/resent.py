"""Output an agent sends again is delivered once (sans-I/O).

A link can drop after the daemon took stream frames and before their ack
reached the agent (a live snapshot unplugs the vsock device; a reset): the
agent sends them again on its next connection. Its ``output_seqs`` names its
outbox and numbers the frame that comes next (docs/protocol.md §5); the
session remembers, per outbox, the first frame of its last connection and the
last frame taken, and the frames taken before are dropped, counted
(``stream_resent_dropped``) and acknowledged, not delivered twice.

Bounds (a guest is untrusted): a name of at most 64 characters, numbers below
2**62, 8 outboxes a session (programs' forgotten before the agent's), the
first ``output_seqs`` of a connection only, a program's names apart from the
agent's. What cannot be told apart: a VM restored by someone else than this
daemon from a state in the middle of its agent's last connection (numbers back
in time, but not before that connection began) has its new frames up to the
last one taken dropped; the HTTP API's numbering has the same limit.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from .. import frames
from ..protocol import StreamRun
from ..sessions import Session
from .members import Member

if TYPE_CHECKING:
    from .core import Relay

log = logging.getLogger("vhubd")
TYPE_BIT = frames.TYPE_BIT
SD = int(frames.MsgType.STREAM_DATA)
MAX_OUTBOXES = 8  # outboxes a session remembers (its agent, programs attached beside it)
MAX_EXECUTIONS = 1024  # of a held output_seqs (the HTTP API reads no more)


def settled(member: Member) -> int:
    """A guest's stream frames taken whole: not one it is in the middle of
    (if the link drops there, the agent must send it again)."""
    ct = member.session.cut_through
    return member.stream_frames - (ct is not None and ct.source is member)


class Resends:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.counters = relay.counters

    def seqs(self, member: Member, sess: Session, req: dict) -> bool:
        """An agent's ``output_seqs`` names its outbox and numbers the frame
        that comes next. The link of an earlier connection may have dropped
        after this daemon took frames and before their ack reached the agent
        (a snapshot unplugs the vsock device; a reset): it sends them again,
        and they are dropped here, counted and acknowledged, not delivered twice.
        Only the first one, said before the connection's first stream frame,
        counts. True when its publication waits until those are dropped (the
        HTTP API numbers frames with it: its counts then include them)."""
        if member.seq_base or member.stream_frames:
            return False
        member.seq_base = -1  # said: another one means nothing
        name, following = req.get("outbox"), req.get("next")
        if type(name) is not str or not 0 < len(name) <= 64 or type(following) is not int \
                or not 0 < following < 1 << 62:
            return False
        # a program attached beside the agent cannot speak for the agent's outbox
        member.outbox = ("p:" if member.attached else "a:") + name
        member.seq_base = following
        member.generation = sess.generation
        first, last = self._taken(sess, member.outbox)
        if following < first:  # numbers from before that connection began: the agent went back in time
            sess.outboxes.pop(member.outbox, None)  # (a VM restored by someone else): its frames are new
            return False
        member.skip = max(0, last + 1 - following)
        if not member.skip:
            return False
        log.info("guest resends session=%s peer=%s: %d frames taken before are dropped", sess.name,
                 member.label, member.skip)
        # what the HTTP API reads of it (the agent lists at most 256 executions): held bounded
        execs = req.get("executions")
        kept = dict(itertools.islice(((k, v) for k, v in execs.items() if type(v) is int), MAX_EXECUTIONS)) \
            if type(execs) is dict else {}
        member.seqs_held = ({"executions": kept, "outbox": name, "next": following}, dict.fromkeys(kept, 0))
        return True

    def _taken(self, sess: Session, name: str) -> tuple[int, int]:
        """Of outbox ``name``: the first frame of the last connection that took
        any, and the last frame this daemon took ((0, 0): none)."""
        first, last = sess.outboxes.get(name, (0, 0))
        for g in sess.guests:
            taken = settled(g) if g.outbox == name and g.generation == sess.generation else 0
            if taken:
                first, last = max(first, g.seq_base), max(last, g.seq_base + taken - 1)
        return first, last

    def outbox_gone(self, member: Member, sess: Session) -> None:
        """A guest's connection ended (or what it sent before is now taken):
        remember how far its outbox got."""
        taken = settled(member)
        if not member.outbox or not taken or member.generation != sess.generation:
            return  # nothing, or a connection from before the last boot
        outboxes = sess.outboxes
        first, last = outboxes.pop(member.outbox, (0, 0))
        outboxes[member.outbox] = (max(first, member.seq_base), max(last, member.seq_base + taken - 1))
        while len(outboxes) > MAX_OUTBOXES:  # the programs' go first: the agent's matters most
            del outboxes[next((k for k in outboxes if k[0] == "p"), next(iter(outboxes)))]

    def skip_frame(self, member: Member, request_id: int) -> None:
        member.skip -= 1
        member.stream_frames += 1  # acknowledged like any other: the agent may forget it
        self.counters["stream_resent_dropped"] += 1
        held = member.seqs_held
        if held is not None:
            key = str(request_id)
            if key in held[1]:
                held[1][key] += 1
            if not member.skip:  # the first frame it did not have comes next: numbered from here
                member.seqs_held = None
                params, dropped = held
                params["executions"] = {k: v + dropped[k] for k, v in params["executions"].items()}
                self.relay.publish(member.session, {"type": "notification", "method": "output_seqs",
                                                    "params": params})

    def skip_resent(self, member: Member, run: StreamRun) -> StreamRun | None:
        """``run`` without the frames taken before (the first ``member.skip``
        of the outbox's; a channel's frames are not the outbox's): what is
        left of it, or None."""
        data = run.data
        kept: list[list[int]] = []
        pos = count = mask = 0
        for f in run.frames():
            n = len(f.data)
            if member.skip and not (f.msg_type == SD and f.request_id >= frames.CHANNEL_BASE):
                self.skip_frame(member, f.request_id)
            else:
                if kept and kept[-1][1] == pos:
                    kept[-1][1] = pos + n
                else:
                    kept.append([pos, pos + n])
                count += 1
                mask |= TYPE_BIT[f.msg_type]
            pos += n
        if not count:
            return None
        if len(kept) == 1:
            return StreamRun(data[kept[0][0]:kept[0][1]], count, mask)
        return StreamRun(memoryview(b"".join(data[a:b] for a, b in kept)), count, mask)
