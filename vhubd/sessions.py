"""Sessions as plain logic: names, tokens, the state machine and scrollback.

Everything that decides a session's state lives here; transitions are a
table. No I/O: the relay calls in, listeners get state-change callbacks.
"""

from __future__ import annotations

import collections
import enum
import hmac
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import codec
from .errors import InvalidName

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class State(str, enum.Enum):
    STOPPED = "stopped"
    BOOTING = "booting"
    WAITING_AGENT = "waiting_agent"
    READY = "ready"
    AGENT_LOST = "agent_lost"
    STOPPING = "stopping"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.BOOTING, S.WAITING_AGENT, S.READY}),
    S.BOOTING: frozenset({S.WAITING_AGENT, S.READY, S.FAILED, S.STOPPING}),
    S.WAITING_AGENT: frozenset({S.READY, S.FAILED, S.STOPPING, S.STOPPED, S.BOOTING}),
    S.READY: frozenset({S.AGENT_LOST, S.STOPPING}),
    S.AGENT_LOST: frozenset({S.READY, S.STOPPING, S.BOOTING, S.FAILED, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.BOOTING, S.STOPPED, S.READY, S.WAITING_AGENT, S.STOPPING}),
}


def newest_frames(data: memoryview, limit: int) -> memoryview:
    """The longest tail of whole frames of ``data`` (complete BLIN frames)
    that fits in ``limit`` bytes (the boundary is found by the codec)."""
    if len(data) <= limit:
        return data
    return data[codec.frame_boundary(data, len(data) - limit):]


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid session name {name!r}: must match [a-z0-9][a-z0-9_.-]{{0,62}}")
    return name


def new_token() -> str:
    """192 random bits as hex: no '-' that a command line could take for a flag."""
    return secrets.token_hex(24)


class Scrollback:
    """Last ``capacity`` bytes of a session's stream frames, whole frames only,
    oldest dropped first. Stored once per session: replay writes these same
    bytes objects to each client that asks."""

    __slots__ = ("capacity", "chunks", "size", "dropped")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.dropped = 0

    def append(self, data) -> None:
        """Append complete frames (a buffer; copied once). When the ring
        overflows, the oldest *frames* go, never a part of one; a batch larger
        than the ring keeps its newest whole frames."""
        n = len(data)
        if not n or self.capacity <= 0:
            self.dropped += n
            return
        if n > self.capacity:
            kept = newest_frames(memoryview(data), self.capacity)
            self.dropped += n - len(kept)
            data, n = kept, len(kept)
            if not n:
                return
        self.chunks.append(bytes(data))
        self.size += n
        if self.size <= self.capacity:
            return
        # big rings trim to 7/8 of their capacity: one trim (a copy of part of
        # the oldest chunk) per eighth of the ring, not one per append; small
        # rings keep exactly as much as fits
        low = self.capacity - (self.capacity >> 3) if self.capacity >= 65536 else self.capacity
        while self.size > low:
            old = self.chunks[0]
            excess = self.size - low
            if len(old) <= excess:
                self.chunks.popleft()
                self.size -= len(old)
                self.dropped += len(old)
            else:
                rest = bytes(newest_frames(memoryview(old), len(old) - excess))
                self.chunks[0] = rest
                self.size -= len(old) - len(rest)
                self.dropped += len(old) - len(rest)

    def replay(self) -> list[bytes]:
        return list(self.chunks)


class Session:
    """One named sandbox plus its agent connection (the relay owns peers)."""

    def __init__(self, name: str, backend: str, token: str | None, scrollback: int, *,
                 anonymous: bool = False):
        self.name = name
        self.backend = backend
        self.token = token
        self.anonymous = anonymous
        self.state = State.STOPPED
        self.reason = ""
        self.created = time.time()
        self.changed = self.created
        self.agent: Any = None  # the guest member bound to this session
        self.agent_info: dict = {}
        self.clients: set = set()  # client members attached to this session
        self.guests: set = set()  # its guest members (the agent and attached programs): what backpressure pauses
        self.scrollback = Scrollback(scrollback)
        self.last_result: dict | None = None
        self.last_activity = time.monotonic()
        self.stats: collections.Counter[str] = collections.Counter()
        self.boot_params: dict = {}
        self.cut_through: Any = None  # relay.streams.CutThrough while a large frame is in flight

    def check_token(self, token: object) -> bool:
        if self.token is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token.encode())

    def info(self) -> dict:
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "backend": self.backend,
            "agent_connected": self.agent is not None,
            "agent": self.agent_info,
            "clients": len(self.clients),
            "anonymous": self.anonymous,
            "scrollback_bytes": self.scrollback.size,
            "last_result": self.last_result,
            "stats": dict(self.stats),
            "since": self.changed,
        }


class SessionRegistry:
    """All sessions of a daemon; state changes go to ``on_change``."""

    def __init__(self, scrollback: int = 1 << 20, on_change: Callable[[Session, State], None] | None = None):
        self.sessions: dict[str, Session] = {}
        self.scrollback = scrollback
        self.watchers: list[Callable[[Session, State], None]] = [on_change] if on_change else []

    def watch(self, fn: Callable[[Session, State], None]) -> None:
        """Call ``fn(session, old_state)`` after every state change."""
        self.watchers.append(fn)

    def get(self, name: str) -> Session | None:
        return self.sessions.get(name)

    def create(self, name: str, backend: str, *, token: str | None = None,
               anonymous: bool = False) -> Session:
        validate_name(name)
        sess = self.sessions.get(name)
        if sess is None:
            sess = Session(name, backend, token, self.scrollback, anonymous=anonymous)
            self.sessions[name] = sess
        return sess

    def set_state(self, sess: Session, state: State, reason: str = "") -> None:
        if state is sess.state:
            sess.reason = reason or sess.reason
            return
        if state not in TRANSITIONS[sess.state]:
            raise ValueError(f"session {sess.name}: no transition {sess.state.value} -> {state.value}")
        old = sess.state
        sess.state = state
        sess.reason = reason
        sess.changed = time.time()
        for fn in self.watchers:
            fn(sess, old)

    def remove(self, name: str) -> None:
        self.sessions.pop(name, None)

    def __iter__(self):
        return iter(list(self.sessions.values()))

    def __len__(self) -> int:
        return len(self.sessions)
