"""One execution as the HTTP API keeps it (Blink's ``ExecSession`` broker), as
plain logic: the bounded output ring with per-execution seq numbers, the exit
code, and the linger deadline after exit.

Seq numbers are the agent's: the n-th output frame of an execution is seq n.
The daemon counts the frames it receives, and the agent's ``output_seqs``
notification at the start of each connection says where the count stands
(``rebase``), so seqs survive a daemon restart (the ring is saved and loaded;
after a crash only the positions, saved every few seconds, survive: the output
in between is reported as a gap, never renumbered)
and an agent's resend after a reconnect is recognised: a frame whose seq is
already in the ring is a duplicate and dropped; a jump is a gap, reported.

Channels are Blink's: 1 stdout (and a terminal's output), 2 stderr.
"""

from __future__ import annotations

import base64
import collections
from typing import Any, NamedTuple

STDOUT = 1
STDERR = 2


class Chunk(NamedTuple):
    seq: int
    channel: int
    data: bytes


class Record:
    """An execution's output ring (at most ``limit`` payload bytes, oldest evicted),
    its cursor state and its end."""

    def __init__(self, session: str, execution_id: int, *, tty: bool, limit: int, command: str = ""):
        self.session = session
        self.execution_id = execution_id
        self.tty = tty
        self.command = command[:200]
        self.limit = limit
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.bytes = 0
        self.head = 0  # the newest seq received (kept or evicted)
        self.next_seq = 1  # the seq the next frame from the agent gets
        self.evicted_through = 0  # seqs up to this one left the ring
        self.lost: list[tuple[int, int]] = []  # gaps the agent reported (first, last), bounded
        self.duplicates = 0
        self.exited = False
        self.exit_code: int | None = None
        self.end_reason = ""  # why it ended without an exit code (the session stopped...)
        self.ended_at: float | None = None
        self.version = 0  # bumped on every change: attach loops wait on it
        # streamed stdin of a pipe execution: at most ``stdin_window`` bytes sent and not yet consumed
        self.stdin_window = 0  # 0: no window (a terminal, or an agent without streamed stdin)
        self.stdin_sent = 0
        self.stdin_consumed = 0
        self.stdin_closed = False  # the command closed its stdin: nothing more is taken

    # -- from the agent ----------------------------------------------------------------
    def rebase(self, frames_before: int) -> None:
        """``output_seqs``: the next frame of this execution is seq ``frames_before + 1``."""
        if frames_before > self.head:
            self.lost.append((self.head + 1, frames_before))
            del self.lost[:-16]
            self.head = frames_before
            self.version += 1
        self.next_seq = frames_before + 1

    def add(self, channel: int, data: bytes) -> bool:
        """One output frame; False when it is a duplicate of one already had."""
        seq = self.next_seq
        self.next_seq += 1
        if seq <= self.head:
            self.duplicates += 1
            return False
        self.head = seq
        self.chunks.append(Chunk(seq, channel, data))
        self.bytes += len(data)
        while self.bytes > self.limit and len(self.chunks) > 1:
            old = self.chunks.popleft()
            self.bytes -= len(old.data)
            self.evicted_through = old.seq
        self.version += 1
        return True

    def finish(self, exit_code: int | None, now: float, reason: str = "") -> None:
        if self.exited:
            return
        self.exited = True
        self.exit_code = exit_code
        self.end_reason = reason
        self.ended_at = now
        self.version += 1

    def stdin_room(self) -> bool:
        return not self.stdin_window or self.stdin_closed or self.exited \
            or self.stdin_sent - self.stdin_consumed < self.stdin_window

    # -- for an attach -------------------------------------------------------------------
    def after(self, cursor: int) -> list[Chunk]:
        """Chunks with seq > ``cursor``, oldest first."""
        if not self.chunks or self.chunks[-1].seq <= cursor:
            return []
        if self.chunks[0].seq > cursor:
            return list(self.chunks)
        return [c for c in self.chunks if c.seq > cursor]

    def missing_after(self, cursor: int) -> tuple[int, int] | None:
        """The seqs after ``cursor`` that can no longer be delivered (evicted, or never
        received), as (first, last); None when nothing is missing."""
        first_kept = self.chunks[0].seq if self.chunks else self.head + 1
        if first_kept > cursor + 1:
            return cursor + 1, first_kept - 1
        return None

    def summary(self) -> dict:
        return {"session": self.session, "execution_id": str(self.execution_id), "tty": self.tty,
                "command": self.command, "head_seq": self.head,
                "first_seq": self.chunks[0].seq if self.chunks else self.head + 1,
                "buffered_bytes": self.bytes, "exited": self.exited, "exit_code": self.exit_code,
                "duplicates_dropped": self.duplicates, "lost": [list(g) for g in self.lost]}

    # -- saved across a daemon restart ----------------------------------------------------
    def dump(self, with_output: bool = True) -> dict:
        """As JSON; without the output, only where the seqs stand (what a crash can keep)."""
        return {"session": self.session, "execution_id": self.execution_id, "tty": self.tty,
                "command": self.command, "head": self.head, "next_seq": self.next_seq,
                "evicted_through": self.evicted_through, "exited": self.exited, "exit_code": self.exit_code,
                "end_reason": self.end_reason, "ended_at": self.ended_at,
                "chunks": [[c.seq, c.channel, base64.b64encode(c.data).decode()] for c in self.chunks]
                if with_output else []}

    @classmethod
    def load(cls, d: Any, limit: int) -> Record:
        """From ``dump`` (a file the daemon wrote; still checked: ValueError when it
        is not that)."""
        if not isinstance(d, dict):
            raise ValueError("not an object")
        rec = cls(_s(d, "session"), _i(d, "execution_id"), tty=bool(d.get("tty")), limit=limit,
                  command=str(d.get("command", "")))
        rec.head = _i(d, "head")
        rec.next_seq = _i(d, "next_seq")
        rec.evicted_through = _i(d, "evicted_through")
        rec.exited = bool(d.get("exited"))
        code = d.get("exit_code")
        rec.exit_code = code if isinstance(code, int) else None
        rec.end_reason = str(d.get("end_reason") or "")
        ended = d.get("ended_at")
        rec.ended_at = float(ended) if isinstance(ended, (int, float)) else None
        chunks = d.get("chunks")
        if not isinstance(chunks, list):
            raise ValueError("chunks is not a list")
        for item in chunks:
            seq, channel, data = item
            chunk = Chunk(int(seq), int(channel), base64.b64decode(data, validate=True))
            rec.chunks.append(chunk)
            rec.bytes += len(chunk.data)
        while rec.bytes > limit and len(rec.chunks) > 1:
            rec.bytes -= len(rec.chunks.popleft().data)
        return rec


def _s(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{key} is not a string")
    return v


def _i(d: dict, key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{key} is not a count")
    return v
