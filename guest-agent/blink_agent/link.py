"""One live connection to the daemon: its socket streams and its protocol state.

A :class:`Link` is made by :func:`open_link` (dial, then handshake within a deadline)
and ends with :meth:`Link.close`. It owns what is bound to that one connection and
dies with it: the asyncio streams, the :class:`~blink_agent.protocol.AgentConnection`
state machine, writes and flushes, the read loop that turns received bytes into
protocol events, the heartbeat / idle watchdog and the ack-probe timer.

It decides nothing beyond that one connection: reconnecting, pending calls, served
methods and the output buffer belong to :class:`~blink_agent.async_hub.AsyncHub`,
which hands each event to its own dispatcher. With :mod:`blink_agent.address` (which
dials) this is the only module that touches sockets; what frames mean is decided by
:mod:`blink_agent.protocol`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import threading
from typing import Any, Callable, Coroutine, Iterable, Iterator, Optional

from . import protocol as P
from .address import Address
from .errors import ConnectionLost, HandshakeRejected, ProtocolError

__all__ = ["Link", "open_link", "dial", "READ_SIZE"]

log = logging.getLogger("blink_agent")

#: Bytes asked of the socket per read (and the stream reader's buffer limit).
READ_SIZE = 256 * 1024

#: Acts on one protocol event; returns a reason when the link must close.
Dispatch = Callable[[Any], Optional[str]]



def backoff_delays(
    first: float = 0.05, cap: float = 2.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Reconnect delays: ``first`` doubling up to ``cap``, each scaled by a random
    factor in [0.5, 1.0] so that many agents do not reconnect in lockstep."""
    rng = rng or random.Random()
    delay = first
    while True:
        yield delay * rng.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


DEVICE_POLL = 0.05  # seconds between connects while the vsock device is gone (a connect then costs one syscall)


def no_device(exc: BaseException) -> bool:
    """Whether a connect failed for want of a vsock device (ENODEV): the daemon
    unplugged it to snapshot the VM, and plugs a new one in within seconds."""
    cause = exc.__cause__ if isinstance(exc, ConnectionLost) else exc
    return isinstance(cause, OSError) and cause.errno == errno.ENODEV


class Link:
    """One live connection: the socket streams plus the protocol state machine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proto: P.AgentConnection,
        address: Address | str = "",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.proto = proto
        self.address = address
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.opened_at = now
        self.last_rx = now
        self.last_progress = now
        self.last_ping = now
        self.tx_bytes = 0
        self.flushed = 0
        self.backlogged = False
        #: Events that came in the same read as the handshake reply, not yet dispatched.
        self.early_events: list[Any] = []
        self.stop_reason: asyncio.Future[str] = self.loop.create_future()
        self.restart = False  # the daemon said shutting_down: it restarts, connect again at once
        self.ack_probe_id: int | None = None
        self.ack_timer: asyncio.TimerHandle | None = None
        #: Why the link ended, once :meth:`run` has returned (or was cancelled).
        self.end_reason = "hub closed"

    @property
    def age(self) -> float:
        """Seconds since the connection was made."""
        return self.loop.time() - self.opened_at

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and not self.writer.transport.is_closing():
            self.writer.write(data)
            self.tx_bytes += len(data)

    def write_many(self, chunks: list[bytes], nbytes: int) -> None:
        if not self.writer.transport.is_closing():
            self.writer.writelines(chunks)
            self.tx_bytes += nbytes

    def write_frames(self, frames: Iterable[tuple[int, int, bytes]]) -> None:
        """Write buffered output frames: headers from the protocol layer, payloads
        uncopied (one ``writelines``)."""
        chunks, nbytes = P.stream_chunks(frames)
        self.write_many(chunks, nbytes)

    def flush(self) -> None:
        """Write whatever the protocol queued (pongs, replies, Error frames)."""
        self.write(self.proto.data_to_send())

    def send_ping(self, request_id: int) -> None:
        self.proto.send_ping(request_id)
        self.flush()

    def stop(self, reason: str) -> None:
        """Ask whoever serves this link to end it, giving ``reason``."""
        if not self.stop_reason.done():
            self.stop_reason.set_result(reason)

    # -- the ack probe ---------------------------------------------------------------

    def probe_acks(self, request_id: int, wait: float, give_up: Callable[[], None]) -> None:
        """Ping with ``request_id`` (a pong before ``vhub.hello`` means no acks) and
        call ``give_up`` if nothing decided it within ``wait`` seconds."""
        self.ack_probe_id = request_id
        self.send_ping(request_id)
        self.ack_timer = self.loop.call_later(wait, give_up)

    def cancel_ack_timer(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    # -- reading -------------------------------------------------------------------------

    async def handshake(self) -> bytes:
        """Read until the daemon's handshake reply; returns its payload. Events after
        it in the same read are kept in :attr:`early_events`. Raises
        :class:`HandshakeRejected`, :class:`ProtocolError` or :class:`ConnectionLost`."""
        while True:
            data = await self.reader.read(READ_SIZE)
            if not data:
                complaint = self.proto.receive_eof()
                raise ConnectionLost(
                    "{} closed the connection during the handshake{}".format(
                        self.address, (": " + complaint) if complaint else ""
                    )
                )
            self.last_rx = self.loop.time()
            events = self.proto.receive_data(data)
            self.flush()
            for i, event in enumerate(events):
                if isinstance(event, P.Ready):
                    self.early_events = events[i + 1 :]
                    return event.payload
                if isinstance(event, P.Rejected):
                    raise HandshakeRejected(event.code, event.message)
                if isinstance(event, P.Violation):
                    try:
                        await asyncio.wait_for(self.writer.drain(), 1.0)
                    except (OSError, asyncio.TimeoutError):
                        pass
                    raise ProtocolError(event.code, f"{self.address}: {event.message}")

    async def read_loop(self, dispatch: Dispatch) -> str:
        """Feed received bytes to the protocol and each event to ``dispatch`` until
        the connection ends or ``dispatch`` returns a reason; returns the reason."""
        reader = self.reader
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except OSError as exc:
                return "read failed: %s" % (exc.strerror or exc)
            if not data:
                complaint = self.proto.receive_eof()
                return "closed by the daemon" + ((": " + complaint) if complaint else "")
            self.last_rx = self.loop.time()
            events = self.proto.receive_data(data)
            self.flush()
            for event in events:
                reason = dispatch(event)
                if reason:
                    return reason

    async def heartbeat(self, interval: float, idle_timeout: float, next_id: Callable[[], int]) -> str:
        """Ping every ``interval`` (ids from ``next_id``); returns once ``idle_timeout``
        passed with no byte received (a backlog of ours that keeps draining also counts
        as life: the daemon is reading, just slowly)."""
        loop = self.loop
        transport = self.writer.transport
        tick = max(0.01, min(interval, idle_timeout / 4.0))
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            # Output draining from a backlog proves the daemon reads; bytes that went
            # straight into an empty socket buffer prove nothing.
            backlog = transport.get_write_buffer_size()
            flushed = self.tx_bytes - backlog
            if flushed > self.flushed and self.backlogged:
                self.last_progress = now
            self.flushed = flushed
            self.backlogged = backlog > 0
            idle = now - max(self.last_rx, self.last_progress)
            if idle > idle_timeout:
                return f"no data from the daemon for {idle:.1f} s"
            if now - self.last_ping >= interval:
                self.send_ping(next_id())
                self.last_ping = now

    # -- the whole life ---------------------------------------------------------------------

    async def run(
        self,
        dispatch: Dispatch,
        pump: Coroutine[Any, Any, str],
        heartbeat_interval: float,
        idle_timeout: float,
        next_id: Callable[[], int],
    ) -> str:
        """Run the read loop, ``pump`` (the writer of buffered output) and the
        heartbeat until one of them ends or :meth:`stop` is called, then cancel the
        others. Returns why the link ended, also kept in :attr:`end_reason` (set even
        when this is cancelled). Does not close the link."""
        tasks = [
            self.loop.create_task(self.read_loop(dispatch)),
            self.loop.create_task(pump),
            self.loop.create_task(self.heartbeat(heartbeat_interval, idle_timeout, next_id)),
        ]
        reason = "hub closed"  # cancelled from outside: the hub is closing
        try:
            await asyncio.wait(tasks + [self.stop_reason], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if self.stop_reason.done():
                reason = self.stop_reason.result()
            else:
                for res in results:
                    if isinstance(res, str):
                        reason = res
                        break
                    if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                        reason = f"{type(res).__name__}: {res}" if str(res) else type(res).__name__
                        break
            self.end_reason = reason
        return reason

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the protocol and the socket (aborted if it does not close in 2 s)."""
        self.proto.close()
        self.cancel_ack_timer()
        writer = self.writer
        if not writer.transport.is_closing():
            writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise


async def dial(address: Address, timeout: float) -> socket.socket:
    """``Address.connect`` in a worker thread (AF_VSOCK has no asyncio dialer).
    If we are cancelled meanwhile, whichever side comes second closes the socket.
    Raises :class:`ConnectionLost` when the address cannot be reached."""
    loop = asyncio.get_running_loop()
    lock = threading.Lock()
    state: dict[str, Any] = {"abandoned": False, "sock": None}

    def connect() -> socket.socket | None:
        sock = address.connect(timeout)
        with lock:
            if state["abandoned"]:
                sock.close()
                return None
            state["sock"] = sock
        return sock

    fut = loop.run_in_executor(None, connect)
    try:
        sock = await asyncio.shield(fut)
    except asyncio.CancelledError:
        with lock:
            state["abandoned"] = True
            if state["sock"] is not None:
                state["sock"].close()
        raise
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    assert sock is not None
    return sock


async def open_link(
    address: Address,
    handshake: bytes,
    *,
    max_payload: int,
    connect_timeout: float,
    handshake_timeout: float,
) -> Link:
    """Dial ``address``, send our ``handshake`` payload and wait for the daemon's
    reply; returns a link whose handshake succeeded. Raises :class:`ConnectionLost`,
    :class:`HandshakeRejected` or :class:`ProtocolError`."""
    sock = await dial(address, connect_timeout)
    try:
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
    except BaseException:
        sock.close()
        raise
    link = Link(reader, writer, P.AgentConnection(handshake, max_payload=max_payload), address)
    try:
        link.flush()
        ready = await asyncio.wait_for(link.handshake(), handshake_timeout)
    except asyncio.TimeoutError:
        await link.close()
        raise ConnectionLost(
            f"connected to {address} but no handshake reply within {handshake_timeout:.3g} s"
        ) from None
    except BaseException:
        await link.close()
        raise
    if ready != P.READY_PAYLOAD:
        log.warning(
            "unexpected handshake reply %r from %s (expected %r)",
            ready[:64],
            address,
            P.READY_PAYLOAD,
        )
    return link
