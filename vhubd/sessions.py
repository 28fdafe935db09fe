"""Sessions as plain logic: names, tokens, the state machine and scrollback.

Everything that decides a session's state lives here; transitions are a
table. No I/O: the relay calls in, listeners get state-change callbacks.

Every named session has a token from the moment it exists (only the control
socket can learn it, with ``vhub.register``), and every session an attach
token that the daemon hands to its agent (``vhub.hello``) for the programs
it starts. The registry is bounded (``max_sessions``) and pages its listing.
"""

from __future__ import annotations

import bisect
import collections
import enum
import hmac
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import codec
from .errors import CallFailed, InvalidName, clip

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class State(str, enum.Enum):
    STOPPED = "stopped"
    BOOTING = "booting"
    WAITING_AGENT = "waiting_agent"
    READY = "ready"
    STANDBY = "standby"  # booted, paused (its memory kept); anything that needs it wakes it
    SAVING = "saving"  # a snapshot is being written: its agent's link is down meanwhile and comes back
    AGENT_LOST = "agent_lost"
    STOPPING = "stopping"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.BOOTING, S.WAITING_AGENT, S.READY}),
    S.BOOTING: frozenset({S.WAITING_AGENT, S.READY, S.FAILED, S.STOPPING}),
    S.WAITING_AGENT: frozenset({S.READY, S.FAILED, S.STOPPING, S.STOPPED, S.BOOTING}),
    S.READY: frozenset({S.AGENT_LOST, S.STOPPING, S.STANDBY, S.SAVING}),
    S.SAVING: frozenset({S.READY, S.AGENT_LOST, S.STOPPING, S.FAILED}),
    S.STANDBY: frozenset({S.READY, S.AGENT_LOST, S.STOPPING, S.FAILED}),
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
        raise InvalidName(f"invalid session name {clip(name)}: must match [a-z0-9][a-z0-9_.-]{{0,62}}")
    return name


def new_token() -> str:
    """192 random bits as hex: no '-' that a command line could take for a flag."""
    return secrets.token_hex(24)


REFERENCE_AT = 32 * 1024  # a chunk at least this large may be kept by reference (see ``keep``)


def keep(data) -> Any:
    """What a ring keeps of ``data``: a large slice that covers at least half of
    the receive buffer it lives in is kept as that slice (the buffer is never
    written again while a slice of it lives: protocol.buffer), anything else is
    copied. So the ring copies no bulk output, and pins at most twice the
    bytes it holds (a buffer holds at most two such halves)."""
    if type(data) is memoryview and data.nbytes >= REFERENCE_AT and 2 * data.nbytes >= len(data.obj):  # type: ignore[arg-type]
        return data
    return bytes(data)


class Pieces:
    """One whole frame kept as the pieces it arrived in (a cut-through frame's
    header and slices of the guest's receive buffers): never joined."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size


class Scrollback:
    """Last ``capacity`` bytes of a session's stream frames, whole frames only,
    oldest dropped first. Stored once per session: replay writes these same
    buffers to each client that asks. Bulk output is kept by reference to the
    guest's receive buffer (``keep``), small chunks as copies."""

    __slots__ = ("capacity", "chunks", "size", "dropped")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chunks: collections.deque = collections.deque()
        self.size = 0
        self.dropped = 0

    def append(self, data) -> None:
        """Append complete frames (a buffer). When the ring overflows, the
        oldest *frames* go, never a part of one; a batch larger than the ring
        keeps its newest whole frames."""
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
        self.chunks.append(data if type(data) is Pieces else keep(data))
        self.size += n
        if self.size <= self.capacity:
            return
        # big rings keep between 3/4 and all of their capacity: the oldest
        # chunks go whole while that leaves at least 3/4 (no walk through a
        # chunk's frames, no copy of its rest), and a chunk is cut only when
        # it is larger than that margin; small rings keep exactly as much as fits
        low = self.capacity - (self.capacity >> 2) if self.capacity >= 65536 else self.capacity
        while self.size > self.capacity:
            old = self.chunks[0]
            if self.size - len(old) >= low or type(old) is Pieces:  # a Pieces frame: all or nothing
                self.chunks.popleft()
                self.size -= len(old)
                self.dropped += len(old)
            else:
                excess = self.size - low
                rest = keep(newest_frames(memoryview(old), len(old) - excess))
                self.chunks[0] = rest
                self.size -= len(old) - len(rest)
                self.dropped += len(old) - len(rest)

    def replay(self) -> list:
        """The ring's chunks, each whole frames in one buffer (a ``Pieces`` frame
        joined: a replay writes each frame at once, so that a queue limit
        reached mid-replay never puts its Error inside a payload)."""
        return [b"".join(c.parts) if type(c) is Pieces else c for c in self.chunks]


class Session:
    """One named sandbox plus its agent connection (the relay owns peers)."""

    def __init__(self, name: str, backend: str, token: str | None, scrollback: int, *,
                 anonymous: bool = False):
        self.name = name
        self.backend = backend
        self.token = token  # None only for the anonymous session
        self.attach_token = new_token()  # for programs its agent starts (vhub.hello hands it over)
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
        self.standby_since = 0.0  # when it last went to standby (monotonic)
        self.stats: collections.Counter[str] = collections.Counter()
        self.boot_params: dict = {}
        self.cut_through: Any = None  # relay.streams.CutThrough while a large frame is in flight
        self.channels: set = set()  # relay.channels.Channel: its agent's open channels
        self.exposed: dict = {}  # guest port -> relay.exposures.Exposure
        self.route_id = 0  # its number in the relay's RPC hot loop (relay.rpc), once it has one
        # an agent's outbox -> (first frame of its last connection, last frame taken) once a
        # connection ended (relay.resent): what it sends again is dropped. Each boot
        # starts a new generation and forgets them (a restored VM's agent went back in time)
        self.outboxes: dict[str, tuple[int, int]] = {}
        self.generation = 0

    def check_token(self, token: object) -> bool:
        if self.token is None:
            return True
        return _same(token, self.token)

    def check_attach(self, token: object) -> bool:
        """An attached program proves itself with the session token or the attach token."""
        return (self.token is not None and _same(token, self.token)) or _same(token, self.attach_token)

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
            "exposed": [e.info() for _, e in sorted(self.exposed.items())],
            "channels": len(self.channels),
        }


def _same(given: object, token: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())


class SessionRegistry:
    """All sessions of a daemon; state changes go to the watchers."""

    def __init__(self, scrollback: int = 1 << 20, on_change: Callable[[Session, State], None] | None = None,
                 max_sessions: int = 10_000):
        self.sessions: dict[str, Session] = {}
        self.scrollback = scrollback
        self.max_sessions = max_sessions
        self.watchers: list[Callable[[Session, State], None]] = [on_change] if on_change else []
        self.creation_watchers: list[Callable[[Session], None]] = []
        self.removal_watchers: list[Callable[[Session], None]] = []
        self._sorted: list[str] | None = None  # names in order, for paging; None: stale

    def watch(self, fn: Callable[[Session, State], None]) -> None:
        """Call ``fn(session, old_state)`` after every state change."""
        self.watchers.append(fn)

    def get(self, name: str) -> Session | None:
        return self.sessions.get(name)

    def create(self, name: str, backend: str, *, token: str | None = None,
               anonymous: bool = False) -> Session:
        """The session ``name``, created if needed (with a token unless anonymous);
        ``CallFailed("too_many_sessions")`` at the cap."""
        validate_name(name)
        sess = self.sessions.get(name)
        if sess is None:
            if len(self.sessions) >= self.max_sessions:
                raise CallFailed("too_many_sessions", f"the daemon holds at most {self.max_sessions} sessions; "
                                                      "remove some (blink rm)")
            if token is None and not anonymous:
                token = new_token()
            sess = Session(name, backend, token, self.scrollback, anonymous=anonymous)
            self.sessions[name] = sess
            self._sorted = None
            for fn in self.creation_watchers:
                fn(sess)
        return sess

    def page(self, after: str = "", limit: int = 1000, prefix: str = "", state: str | None = None) -> list[Session]:
        """Up to ``limit`` sessions whose names sort after ``after`` (and start
        with ``prefix``, in ``state``): a listing in pages costs the loop little."""
        if self._sorted is None:
            self._sorted = sorted(self.sessions)
        names = self._sorted
        i = bisect.bisect_right(names, after) if after else 0
        if prefix:
            i = max(i, bisect.bisect_left(names, prefix))
        out: list[Session] = []
        while i < len(names) and len(out) < limit:
            name = names[i]
            i += 1
            if prefix and not name.startswith(prefix):
                break
            sess = self.sessions.get(name)
            if sess is not None and (state is None or sess.state.value == state):
                out.append(sess)
        return out

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
        sess = self.sessions.pop(name, None)
        if sess is not None:
            self._sorted = None
            for fn in self.removal_watchers:
                fn(sess)

    def __iter__(self):
        return iter(list(self.sessions.values()))

    def __len__(self) -> int:
        return len(self.sessions)
