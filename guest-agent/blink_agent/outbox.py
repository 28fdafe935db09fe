"""The bounded buffer of outgoing stream frames, with ack tracking (sans-I/O).

Every Stdout / Stderr / StreamData frame the agent produces goes through one
:class:`Outbox`. A frame stays in it until it is safe to forget:

- with an ack-capable daemon (it said ``vhub.hello`` on this connection) until a
  ``vhub.ack`` whose cumulative ``frames`` count covers it;
- otherwise as soon as it has been written to the socket.

On reconnect every frame still held is sent again, in order, before newer output
(acks count from 0 on each connection). The buffer holds at most ``limit`` payload
bytes (unsent + unacked). The I/O layer makes producers wait for room while
connected; while disconnected a push that overflows drops the OLDEST frames, and the
next transmission starts with a notification ``{"event":"output_dropped","bytes":N}``
standing in their place. The newest frame is always kept, even alone over the limit.

Output seq numbers: the outbox counts the frames it was given per execution
(request_id), so the n-th frame of execution X is its seq n, whichever
connection carries it; and it numbers every frame it was given (1, 2, ...). The
first transmission of each connection starts with the notification
``{"event":"output_seqs","executions":{"X": N},"outbox":ID,"next":S}``: the next
frame of X on this connection is X's seq N+1, and the next frame of all is the
outbox's frame S (``ID``: random, one per outbox, so per agent process). A daemon
(its HTTP API's attach buffers) numbers frames with the first, so the seqs a
client saw before a daemon restart stay valid after it: resent frames it already
had are recognised, dropped ones show as a gap. With the second, a daemon that
saw this outbox's frames up to S+k on a connection that dropped before their
ack arrived drops the k+1 it gets again.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import deque
from typing import NamedTuple

from .wire import MsgType

__all__ = ["DEFAULT_BUFFER_BYTES", "Outbox", "OutFrame", "dropped_marker", "parse_size"]

DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
#: Executions whose frame counts the outbox remembers (the most recent ids).
MAX_COUNTED = 256


class OutFrame(NamedTuple):
    msg_type: int
    request_id: int
    payload: bytes


class _Entry(NamedTuple):
    seq: int
    msg_type: int
    request_id: int
    payload: bytes


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"8388608"``, ``"512K"``, ``"8M"``, ``"8MiB"`` -> bytes; ``ValueError`` otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 8388608, 512K or 8M)")
    value = int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def dropped_marker(nbytes: int) -> OutFrame:
    """The notification that stands in for ``nbytes`` of dropped output."""
    body = json.dumps({"event": "output_dropped", "bytes": nbytes}, separators=(",", ":"))
    return OutFrame(MsgType.RpcRequest, 0, body.encode())


def seqs_marker(bases: dict[int, int], outbox: str = "", following: int = 0) -> OutFrame:
    """The notification that numbers what follows: execution id -> frames before
    it, and (``outbox``, ``following``) the outbox's number of the next frame."""
    doc: dict = {"event": "output_seqs", "executions": {str(k): v for k, v in bases.items()}}
    if outbox:
        doc["outbox"] = outbox
        doc["next"] = following
    body = json.dumps(doc, separators=(",", ":"))
    return OutFrame(MsgType.RpcRequest, 0, body.encode())


class Outbox:
    """Unsent + unacked stream frames, bounded by payload bytes.

    The first ``sent`` entries have been written on the current connection and wait
    for an ack; the rest are unsent. ``ack_mode`` is ``None`` until the I/O layer
    knows whether the daemon acks (``vhub.hello``) on this connection.
    """

    def __init__(self, limit: int = DEFAULT_BUFFER_BYTES) -> None:
        if limit <= 0:
            raise ValueError(f"buffer limit must be positive, not {limit!r}")
        self.limit = limit
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._sent = 0
        self._next_seq = 1
        # Per connection.
        self.connected = False
        self.ack_mode: bool | None = None
        self._written = 0  # stream frames written on this connection
        self._acked = 0  # highest cumulative ack seen on this connection
        # Sizes of written, not yet acked frames that were evicted to make room
        # (oldest first): lost only if the connection dies before an ack covers them.
        self._evicted_unacked: deque[int] = deque()
        # Output lost so far and not yet reported by a marker.
        self.pending_dropped_bytes = 0
        # Counters for logs and agent.info.
        self.dropped_bytes_total = 0
        self.dropped_frames_total = 0
        self.resent_frames_total = 0
        self.bad_acks = 0
        # Frames pushed per execution (request_id != 0): their output seq numbers.
        self.frame_counts: dict[int, int] = {}
        self._seqs_due = False
        #: This outbox's name in ``output_seqs`` (its frame numbers are its own).
        self.token = secrets.token_hex(8)

    # -- introspection ------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held (unsent + unacked)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def unsent_frames(self) -> int:
        return len(self._entries) - self._sent

    @property
    def unacked_frames(self) -> int:
        return self._sent + len(self._evicted_unacked)

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit without evicting anything."""
        return self._bytes + nbytes <= self.limit or not self._entries

    def has_unsent(self) -> bool:
        """Whether :meth:`take` would return something now."""
        if not self.connected or self.ack_mode is None:
            return False
        return self.pending_dropped_bytes > 0 or self._sent < len(self._entries)

    def written_through(self, seq: int) -> bool:
        """True when no frame with sequence number <= ``seq`` still waits to be written
        on the current connection (it was written, acked or dropped)."""
        if not self.connected or self.ack_mode is None:
            return False
        return self._sent >= len(self._entries) or self._entries[self._sent].seq > seq

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest frame ever pushed (0 if none)."""
        return self._next_seq - 1

    # -- producers ----------------------------------------------------------------

    def push(self, msg_type: int, request_id: int, payload: bytes) -> int:
        """Queue one stream frame; returns its sequence number. Evicts the oldest
        frames if the buffer overflows (the caller waits for room while connected)."""
        seq = self._next_seq
        self._next_seq += 1
        if request_id:
            counts = self.frame_counts
            counts[request_id] = counts.get(request_id, 0) + 1
            if len(counts) > MAX_COUNTED:
                del counts[min(counts)]
        self._entries.append(_Entry(seq, int(msg_type), request_id, bytes(payload)))
        self._bytes += len(payload)
        while self._bytes > self.limit and len(self._entries) > 1:
            self._evict_oldest()
        return seq

    def _evict_oldest(self) -> None:
        entry = self._entries.popleft()
        size = len(entry.payload)
        self._bytes -= size
        if self._sent > 0:
            # Written on this connection: the daemon may still ack it.
            self._sent -= 1
            self._evicted_unacked.append(size)
        else:
            self._record_drop(size)

    def _record_drop(self, size: int) -> None:
        self.pending_dropped_bytes += size
        self.dropped_bytes_total += size
        self.dropped_frames_total += 1

    # -- connection lifecycle -------------------------------------------------------

    def connection_made(self) -> None:
        """A new connection is up (handshake done); acks count from 0 again."""
        self.connected = True
        self.ack_mode = None
        self._written = 0
        self._acked = 0
        self._sent = 0
        self._evicted_unacked.clear()
        self._seqs_due = True

    def set_ack_mode(self, enabled: bool) -> None:
        """Record whether the daemon acks on this connection (``vhub.hello`` seen).

        Acks turned on late count every frame already written as acknowledged: those
        frames left the buffer when they were written.
        """
        if enabled and self.ack_mode is False:
            self._acked = self._written
        elif not enabled and self.ack_mode:
            while self._sent:
                entry = self._entries.popleft()
                self._bytes -= len(entry.payload)
                self._sent -= 1
            self._evicted_unacked.clear()
        self.ack_mode = bool(enabled)

    def connection_lost(self) -> None:
        """Unacked frames become unsent again (resent first on the next connection);
        evicted unacked frames are now known lost."""
        self.connected = False
        self.ack_mode = None
        self.resent_frames_total += self._sent
        self._sent = 0
        while self._evicted_unacked:
            self._record_drop(self._evicted_unacked.popleft())

    # -- transmission ---------------------------------------------------------------

    def take(self, max_bytes: int = 1 << 20) -> list[OutFrame]:
        """Frames to write now, in order (a drop marker first if output was lost).

        Without acks the frames leave the buffer here; with acks they stay until
        :meth:`ack` covers them. Returns at least one frame when :meth:`has_unsent`.
        """
        out: list[OutFrame] = []
        if not self.has_unsent():
            return out
        if self._seqs_due:
            self._seqs_due = False
            following = self._entries[0].seq if self._entries else self._next_seq
            out.append(seqs_marker(self._seq_bases(), self.token, following))
        if self.pending_dropped_bytes:
            out.append(dropped_marker(self.pending_dropped_bytes))
            self.pending_dropped_bytes = 0
        total = 0
        entries = self._entries
        while self._sent < len(entries) and (total < max_bytes or not out):
            if self.ack_mode:
                entry = entries[self._sent]
                self._sent += 1
            else:
                entry = entries.popleft()
                self._bytes -= len(entry.payload)
            out.append(OutFrame(entry.msg_type, entry.request_id, entry.payload))
            total += len(entry.payload)
            self._written += 1
        return out

    def _seq_bases(self) -> dict[int, int]:
        """Per counted execution: how many of its frames come before the first one
        still to be written on this connection (at a connection's first take,
        nothing of this connection is written yet)."""
        pending: dict[int, int] = {}
        for entry in self._entries:
            if entry.request_id in self.frame_counts:
                pending[entry.request_id] = pending.get(entry.request_id, 0) + 1
        return {rid: n - pending.get(rid, 0) for rid, n in self.frame_counts.items()}

    def ack(self, frames: int) -> tuple[int, bool]:
        """Apply a cumulative ack; returns (frames newly released, ack was sane)."""
        if frames <= self._acked:
            return 0, frames == self._acked
        sane = frames <= self._written
        if not sane:
            self.bad_acks += 1
            frames = self._written
        released = frames - self._acked
        self._acked = frames
        n = released
        while n and self._evicted_unacked:
            self._evicted_unacked.popleft()
            n -= 1
        while n and self._sent:
            entry = self._entries.popleft()
            self._bytes -= len(entry.payload)
            self._sent -= 1
            n -= 1
        return released, sane
