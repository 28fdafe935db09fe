"""A peer as the relay knows it once its handshake was accepted.

A ``Member`` holds the peer's ``Port`` and everything routing needs about it:
its role and session, what it subscribed to and serves, its flow, the RPCs
in flight toward it and the stream acks owed to it. The relay keeps members;
the I/O layer keeps only a reference to hand back with each batch of events.
"""

from __future__ import annotations

from typing import Any

from .. import frames
from .port import Port


class Member:
    __slots__ = ("port", "role", "session", "subscribe_mask", "events", "serve_exact", "serve_prefix", "lossy",
                 "inflight", "next_id", "sessions_blocked", "all_sessions", "ack", "acked", "stream_frames",
                 "ack_pending", "joined", "attached", "replay", "request_id", "boot_params", "outstanding",
                 "blocked_writers", "replay_pending", "slot", "frame_in", "held_by", "outbox", "seq_base",
                 "skip", "dropping", "generation", "seqs_held")

    def __init__(self, port: Port, role: str):
        self.port = port
        self.role = role  # "guest" | "client"
        self.session: Any = None  # sessions.Session, or None for a "*" client
        self.subscribe_mask = 0  # frames.TYPE_BIT of the stream kinds it gets
        self.events = False  # gets vhub.event notifications
        self.serve_exact: set[str] = set()
        self.serve_prefix: tuple[str, ...] = ()
        self.lossy = False
        # RPCs forwarded to this member: our id on it -> (origin member, origin id, deadline)
        self.inflight: dict[int, tuple] = {}
        self.next_id = 1
        self.sessions_blocked: set = set()  # sessions whose guests wait for this lossless member
        self.all_sessions = False  # a "*" client
        self.ack = False  # a guest that asked for stream acks (vhub.hello / vhub.ack)
        self.acked = 0
        self.stream_frames = 0
        self.ack_pending = False
        self.joined = True  # False while a cut-through frame it missed the start of is in flight
        self.attached = False  # a guest program beside the session's agent
        self.replay = False  # a client that asked for the scrollback
        self.request_id = 0  # of its handshake
        self.boot_params: dict = {}
        self.outstanding = 0  # its RPCs forwarded and not yet answered (Limits.max_inflight)
        self.blocked_writers: set[Member] = set()  # members paused because they wrote to this full one
        self.replay_pending = False  # asked for replay while a cut-through frame was in flight
        self.slot = -1  # its slot in the RPC hot loop (relay.rpc), once it has one
        self.frame_in: Any = None  # a subscriber: the cut-through frame (streams.CutThrough) being written to it
        self.held_by: Any = None  # a guest: the cut-through frame its events wait behind
        # a guest whose agent said where its outbox stands (output_seqs): its name, the
        # outbox's number of this connection's first stream frame, and how many frames
        # still to come were taken before (resent: dropped; ``dropping`` one cut through)
        self.outbox = ""
        self.seq_base = 0
        self.skip = 0
        self.dropping = False
        self.generation = 0  # the session's boot it said so in (sessions.Session.generation)
        self.seqs_held: Any = None  # (its output_seqs params, frames dropped per execution) until published

    @property
    def label(self) -> str:
        return self.port.label

    @property
    def closed(self) -> bool:
        return self.port.closed

    def new_id(self) -> int:
        """An id for a call toward this member. Never with ROUTE_ID_BIT: those
        are the RPC hot loop's (relay.rpc), on the same member."""
        i = self.next_id
        self.next_id = i + 1 if i + 1 < frames.ROUTE_ID_BIT else 1
        return i

    def serves(self, method: str) -> bool:
        return method in self.serve_exact or any(method.startswith(p) for p in self.serve_prefix)

    def __repr__(self) -> str:
        name = self.session.name if self.session is not None else "*"
        return f"<Member {self.role} {self.label} session={name}>"
