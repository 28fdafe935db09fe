"""The output half of a hub: the current link, change notification and the flow of
stream frames through the bounded :class:`~blink_agent.outbox.Outbox`.

:class:`HubOutput` is the base of :class:`~blink_agent.async_hub.AsyncHub` (as
asyncpg's ``CoreProtocol`` is the base of its ``Protocol``): it holds the state every
part of the hub waits on (the live :class:`~blink_agent.link.Link` or none, closed or
not) with one wake-everyone notification, and everything on the way out for output:
producers wait for room while connected (flow control, nothing dropped), the pump
writes buffered frames on the live link, the ack probe decides whether the daemon
acknowledges on this connection, and ``vhub.ack`` releases frames. Connecting,
reconnecting and RPC are the subclass's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

from .errors import ConnectionLost
from .link import Link
from .outbox import Outbox
from .wire import MsgType

__all__ = ["HubOutput", "STREAM_CHUNK"]

log = logging.getLogger("blink_agent")

#: Largest payload of one outgoing stream frame.
STREAM_CHUNK = 64 * 1024
#: Channel bytes queued for the link at most (each channel also keeps to its window).
SIDE_LIMIT = 1 << 20


class HubOutput:
    """The live link (or none), change notification and the output flow of a hub."""

    def __init__(self, buffer_bytes: int) -> None:
        self.outbox = Outbox(buffer_bytes)
        self._link: Link | None = None
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []
        # channel frames (blink_agent.channels): written by the pump beside the
        # outbox, never kept for a resend (a channel dies with its connection)
        self.side: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self.side_bytes = 0

    @property
    def connected(self) -> bool:
        """True while a connection is up and past its handshake."""
        return self._link is not None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- waiting ----------------------------------------------------------------------

    def _broadcast(self) -> None:
        """Something changed (buffer, connection): wake every waiter to re-check."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` holds, re-checked on every :meth:`_broadcast`;
        returns its last value (False once ``timeout`` passed without it)."""
        if predicate():
            return True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            fut = loop.create_future()
            self._waiters.append(fut)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return predicate()
            try:
                await asyncio.wait_for(fut, remaining) if remaining is not None else await fut
            except asyncio.TimeoutError:
                return predicate()
        return True

    # -- producers ---------------------------------------------------------------------

    async def stdout(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> int:
        """Send output as Stdout frames (request_id = ``execution_id``, 0 = the agent)."""
        return await self.send_stream(MsgType.Stdout, execution_id, data)

    async def stderr(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> int:
        """Send output as Stderr frames."""
        return await self.send_stream(MsgType.Stderr, execution_id, data)

    async def send_stream(
        self, msg_type: int, request_id: int, data: bytes | bytearray | memoryview | str
    ) -> int:
        """Queue output in the bounded buffer, in chunks of at most :data:`STREAM_CHUNK`.

        While connected this waits for room (flow control: nothing is dropped); while
        disconnected it never waits and the oldest output is dropped on overflow.
        Returns the sequence number of the last frame queued (see :meth:`wait_written`).
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        view = memoryview(data).cast("B")
        seq = self.outbox.last_seq
        if self._closed:
            raise ConnectionLost("hub closed")
        for start in range(0, len(view), STREAM_CHUNK):
            chunk = bytes(view[start : start + STREAM_CHUNK])
            await self._wait_room(len(chunk))
            seq = self.outbox.push(msg_type, request_id, chunk)
            self._broadcast()
        return seq

    async def send_side(self, link: Link, request_id: int, payload: bytes) -> None:
        """A channel's StreamData frame on ``link``, not kept for a resend: waits
        while :data:`SIDE_LIMIT` bytes are queued; raises :class:`ConnectionLost`
        once ``link`` is not the live one."""
        await self._wait_until(lambda: self._link is not link or self.side_bytes < SIDE_LIMIT, None)
        if self._link is not link:
            raise ConnectionLost("the connection this channel was opened on is gone")
        self.side.append((MsgType.StreamData, request_id, payload))
        self.side_bytes += len(payload)
        self._broadcast()

    async def _wait_room(self, size: int) -> None:
        """Flow control: while connected, wait until ``size`` more bytes fit."""
        await self._wait_until(lambda: self._link is None or self._closed or self.outbox.has_room(size), None)

    async def wait_written(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until stream frames up to ``seq`` are written on the current
        connection (so what is sent next arrives after them)."""
        return await self._wait_until(
            lambda: self._closed or self._given_up() or self.outbox.written_through(seq), timeout
        )

    def _given_up(self) -> bool:
        """True once no connection will ever come again (the subclass knows when)."""
        return False

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every buffered stream frame has been written (and acknowledged,
        when the daemon acks), across a reconnection if one is under way. Returns
        False on timeout, or once no connection will come again."""

        def drained() -> bool:
            ob = self.outbox
            if self._closed or self._given_up():
                return True
            if self._link is None:
                return len(ob) == 0  # disconnected: what is buffered goes out after the reconnection
            if ob.ack_mode is None or ob.unsent_frames or ob.pending_dropped_bytes:
                return False
            return not ob.ack_mode or len(ob) == 0

        ok = await self._wait_until(drained, timeout)
        link = self._link
        if ok and link is not None:
            try:
                await asyncio.wait_for(link.writer.drain(), timeout=timeout)
            except (OSError, asyncio.TimeoutError):
                return False
        return ok and link is not None

    # -- the live link -------------------------------------------------------------------

    def _output_connected(self, link: Link, probe_id: int | None, wait: float) -> None:
        """``link`` is up: acks count from 0 again. With ``probe_id`` find out whether
        the daemon acks (it says ``vhub.hello`` right after its handshake reply, before
        it answers anything of ours: a pong to this ping coming first means no acks;
        so does silence for ``wait`` seconds). Without, acks are off."""
        self.outbox.connection_made()
        if probe_id is not None:
            link.probe_acks(probe_id, wait, lambda: self._decide_acks(link, False, "no vhub.hello in time"))
        else:
            self.outbox.set_ack_mode(False)

    def _decide_acks(self, link: Link, enabled: bool, why: str) -> None:
        link.cancel_ack_timer()
        if self._link is not link:
            return
        if self.outbox.ack_mode is None:
            self.outbox.set_ack_mode(enabled)
            log.info("output acknowledgements %s (%s)", "on" if enabled else "off", why)
        elif enabled and not self.outbox.ack_mode:
            self.outbox.set_ack_mode(True)
            log.warning("late vhub.hello: output acknowledgements on from now")
        self._broadcast()

    def _acked(self, frames: int) -> None:
        """``vhub.ack``: the daemon has ``frames`` stream frames of this connection."""
        released, sane = self.outbox.ack(frames)
        if not sane:
            log.warning("vhub.ack for %d frames is more than were sent on this connection", frames)
        if released:
            self._broadcast()

    async def _pump(self, link: Link) -> str:
        """Write buffered stream frames, waiting on the socket (drain) between batches."""
        outbox = self.outbox
        writer = link.writer
        while True:
            await self._wait_until(lambda: outbox.has_unsent() or self.side or self._link is not link, None)
            if self._link is not link:
                return "connection replaced"
            if self.side:
                side, self.side, self.side_bytes = list(self.side), collections.deque(), 0
                link.write_frames(side)
            if outbox.has_unsent():
                link.write_frames(outbox.take())
            self._broadcast()
            try:
                await writer.drain()
            except OSError as exc:
                return "write failed: %s" % (exc.strerror or exc)
