"""The one boundary between routing and I/O.

The relay never touches a socket, a transport or a ``protocol.Connection``.
What it may do to a connection is the ``Port`` protocol below, which the I/O
layer implements (``server.Peer``, for sockets and for the VM vsock device's
guest connections alike; the in-process tests implement it with a fake).

Handshakes are decided by value: the relay answers a peer's handshake with
``Accept``, ``Refuse`` or ``Defer`` and the I/O layer carries it out (answers
the handshake, or sends the Error and closes). A deferred handshake (a client
waiting for its session to boot) is settled later with ``Port.complete``.

Every per-peer bound (bytes queued toward the peer, in-flight RPCs) is the
port's: ``Limits`` travels with it, so one change bounds every path.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class Limits(NamedTuple):
    """Per-peer bounds, enforced behind the port."""

    high_water: int = 1 << 20  # sources pause (and a peer that does not read its answers is not read)
    max_output: int = 32 << 20  # hard bound on bytes queued toward the peer: slow_consumer above it
    lossy_limit: int = 4 << 20  # lossy subscribers: slow_consumer above this
    max_inflight: int = 1024  # RPCs a peer may have in flight (too_many_requests above it)


class Listener(Protocol):
    """What the relay needs to know of the listener a peer came through."""

    name: str
    role: str  # "guest" | "client"
    token_required: bool
    fixed_session: str | None  # the transport names the session (a VM's device, a per-session socket)


class Port(Protocol):
    """A connection as the relay sees it."""

    label: str  # for logs: listener and peer address or credentials
    closed: bool  # closed or closing: nothing more is written to it
    limits: Limits

    def write(self, data: Any) -> None:
        """Whole frames forwarded from another peer (a slice of its receive buffer)."""

    def send(self, frame: Any) -> None:
        """A frame for this peer that answers what it sent (bytes the daemon made,
        or an answer forwarded from another peer): a reply, an event, an ack."""

    def write_part(self, data: Any, last: bool) -> None:
        """Bytes of a cut-through frame; every other write waits until ``last``."""

    def pause_reading(self, reason: str = "backpressure") -> None:
        """Stop reading from the peer; reading resumes once every reason is lifted."""

    def resume_reading(self, reason: str = "backpressure") -> None: ...

    def buffered(self) -> int:
        """Bytes queued toward the peer and not yet taken by the kernel."""

    def direct_fd(self) -> int:
        """The socket that the stream pump may write whole frames to right
        now, past this port (nothing is queued for it anywhere, so they come
        in order), or -1."""

    def close(self, code: str | None = None, message: str = "") -> None:
        """Close; with ``code``, an ``Error`` frame goes first (never inside a
        cut-through frame's payload)."""

    def complete(self, decision: Accept | Refuse) -> None:
        """Settle a deferred handshake."""


class Accept(NamedTuple):
    """Answer the handshake with ``payload``; the peer is ``member`` from now on."""

    member: Any
    payload: bytes


class Refuse(NamedTuple):
    """Send ``Error{code, message}`` and close."""

    code: str
    message: str


class Defer(NamedTuple):
    """No answer yet: ``Port.complete`` settles it (the session is booting)."""

    member: Any


Decision = Accept | Refuse | Defer
