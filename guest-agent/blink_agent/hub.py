"""The I/O layer: the connection to the daemon, kept up for as long as the hub lives.

:class:`AsyncHub` dials ``VHUB_ADDR``, performs the handshake, answers and sends
heartbeats, serves host->guest RPCs, makes guest->host calls and streams output
through the bounded :class:`~blink_agent.outbox.Outbox`; when the connection dies it
reconnects with capped exponential backoff and jitter, and resends what the daemon
had not acknowledged. :class:`Hub` is the blocking flavour: the same object running
on its own event loop in a background thread.

This is the only module that touches sockets. What frames mean is decided by
:mod:`blink_agent.protocol`; what is buffered, by :mod:`blink_agent.outbox`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import random
import socket
import threading
from typing import Any, Awaitable, Callable, Iterator

from . import protocol as P
from .address import Address, parse_address
from .errors import CallTimeout, ConnectionLost, HandshakeRejected, ProtocolError, RpcError
from .outbox import DEFAULT_BUFFER_BYTES, Outbox, parse_size
from .wire import DEFAULT_MAX_PAYLOAD, MsgType

__all__ = ["AsyncHub", "Hub", "connect", "aconnect", "backoff_delays", "STREAM_CHUNK"]

log = logging.getLogger("blink_agent")

#: Largest payload of one outgoing stream frame.
STREAM_CHUNK = 64 * 1024
_U64 = (1 << 64) - 1
_READ_SIZE = 256 * 1024

Handler = Callable[[Any], Any]


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


class _Link:
    """One live connection: the socket streams plus the protocol state machine."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: P.AgentConnection
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.opened_at = now
        self.last_rx = now
        self.last_progress = now
        self.last_ping = now
        self.tx_bytes = 0
        self.flushed = 0
        self.backlogged = False
        self.early_events: list[Any] = []
        self.stop_reason: asyncio.Future[str] = self.loop.create_future()
        self.ack_probe_id: int | None = None
        self.ack_timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes) -> None:
        if data and not self.writer.transport.is_closing():
            self.writer.write(data)
            self.tx_bytes += len(data)

    def write_many(self, chunks: list[bytes], nbytes: int) -> None:
        if not self.writer.transport.is_closing():
            self.writer.writelines(chunks)
            self.tx_bytes += nbytes

    def flush(self) -> None:
        """Write whatever the protocol queued (pongs, replies, Error frames)."""
        self.write(self.proto.data_to_send())

    def stop(self, reason: str) -> None:
        if not self.stop_reason.done():
            self.stop_reason.set_result(reason)


class AsyncHub:
    """An agent's connection to the V-Hub daemon (asyncio flavour).

    ``addr``, ``session`` and ``token`` default to ``VHUB_ADDR``, ``VHUB_SESSION`` and
    ``VHUB_TOKEN``. Create it inside a running loop, then ``await start()``.
    """

    def __init__(
        self,
        addr: str | Address | None = None,
        session: str | None = None,
        token: str | None = None,
        *,
        buffer_bytes: int | None = None,
        heartbeat_interval: float = 10.0,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        reconnect: bool = True,
        ack: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        backoff_first: float = 0.05,
        backoff_cap: float = 2.0,
        attach: bool | None = None,
    ) -> None:
        if addr is None:
            addr = os.environ.get("VHUB_ADDR")
        self.address = addr if isinstance(addr, Address) else parse_address(addr)
        self.session = session if session is not None else (os.environ.get("VHUB_SESSION") or None)
        self.token = token if token is not None else os.environ.get("VHUB_TOKEN", "")
        if buffer_bytes is None:
            env = os.environ.get("VHUB_BUFFER_BYTES")
            buffer_bytes = parse_size(env) if env else DEFAULT_BUFFER_BYTES
        self.outbox = Outbox(buffer_bytes)
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.reconnect = reconnect
        self.want_acks = bool(ack and self.session)
        # commands started by agent.run inherit VHUB_ATTACH=1: they attach to
        # the session beside the resident agent instead of replacing it
        self.attach = attach if attach is not None else os.environ.get("VHUB_ATTACH") == "1"
        self.max_payload = max_payload
        self._backoff = (backoff_first, backoff_cap)
        self._handlers: dict[str, Handler] = {}
        self.on_stream: Callable[[int, int, bytes], None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], _Link, str]] = {}
        self._next_id = 1
        self._link: _Link | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None
        self.connections = 0
        self.fatal: BaseException | None = None

    # -- public state -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and past its handshake."""
        return self._link is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def serve(self, method: str, fn: Handler) -> None:
        """Answer host->guest calls of ``method`` with ``fn(params)``.

        ``fn`` may return a value or an awaitable; raise :class:`RpcError` to answer
        with a chosen code. Any other exception answers ``handler_failed``.
        """
        self._handlers[method] = fn

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, wait: bool = True) -> AsyncHub:
        """Begin connecting. With ``wait`` the first connection must succeed: its
        failure raises (:class:`ConnectionLost`, :class:`HandshakeRejected`,
        :class:`ProtocolError`). Without, failures are logged and retried."""
        self._loop = asyncio.get_running_loop()
        first: _Link | None = None
        if wait:
            first = await self._open()
        self._runner = self._loop.create_task(self._run(first))
        return self

    async def __aenter__(self) -> AsyncHub:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush buffered output (bounded by ``flush_timeout``), then disconnect for
        good. In-flight calls fail with :class:`ConnectionLost`."""
        if self._closed:
            return
        if self._link is not None and flush_timeout > 0:
            await self.flush(flush_timeout)
        self._closed = True
        self._broadcast()
        link = self._link
        if link is not None:
            link.stop("hub closed")
        runner = self._runner
        if runner is not None and not runner.done():
            if link is None:
                runner.cancel()  # dialing or backing off: nothing to finish
            try:
                await asyncio.wait_for(asyncio.shield(runner), timeout=5.0)
            except asyncio.TimeoutError:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            except (asyncio.CancelledError, Exception):
                if not runner.done():
                    raise
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending(None, "hub closed")
        self._broadcast()

    aclose = close

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a connection is up; False on timeout or once closed."""
        await self._wait_until(lambda: self._link is not None or self._closed, timeout)
        return self._link is not None

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every buffered stream frame has been written (and acknowledged,
        when the daemon acks). Returns False on timeout or disconnection."""

        def drained() -> bool:
            ob = self.outbox
            if self._link is None or self._closed:
                return True
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

    # -- guest -> host ------------------------------------------------------------------

    async def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        """Call a host method; returns its JSON result.

        Raises :class:`RpcError` (the host's answer), :class:`CallTimeout` (no reply
        within ``timeout``; if disconnected, the call waits for the reconnection within
        that time) or :class:`ConnectionLost` (the connection died or never came back).
        """
        return await self._request(
            timeout, method, lambda proto, rid: proto.send_request(rid, method, params)
        )

    async def call_event(self, body: dict[str, Any], timeout: float = 30.0) -> Any:
        """Send a Blink-style ``{"event": ...}`` request and wait for its reply."""
        label = str(body.get("event"))
        return await self._request(timeout, label, lambda proto, rid: proto.send_event(rid, body))

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (request_id 0). Raises :class:`ConnectionLost` when
        not connected: notifications are not buffered."""
        link = self._require_link()
        link.proto.send_request(0, method, params)
        link.flush()

    async def notify_event(self, body: dict[str, Any]) -> None:
        link = self._require_link()
        link.proto.send_event(0, body)
        link.flush()

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
        """True once no connection will ever come again (reconnect off, link lost)."""
        runner = self._runner
        return runner is not None and runner.done() and self._link is None

    async def deliver_event(self, body: dict[str, Any], after_seq: int, timeout: float = 30.0) -> Any:
        """Send an ``{"event": ...}`` request after every stream frame up to
        ``after_seq``, retrying across reconnections until it is answered.

        Raises :class:`RpcError` when the host refuses it, :class:`CallTimeout` when a
        connected daemon does not answer in ``timeout``, :class:`ConnectionLost` once
        the hub is closed.
        """
        while True:
            await self.wait_written(after_seq)
            if self._closed:
                raise ConnectionLost("hub closed before {} was delivered".format(body.get("event")))
            try:
                return await self.call_event(body, timeout=timeout)
            except ConnectionLost:
                if self._closed or not self.reconnect:
                    raise
                log.info(
                    "connection lost before %s was acknowledged; resending after reconnect", body.get("event")
                )

    # -- internals: waiting ---------------------------------------------------------------

    def _broadcast(self) -> None:
        """Something changed (buffer, connection): wake every waiter to re-check."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
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

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or self._closed:
            raise ConnectionLost(self._not_connected_message())
        return link

    def _not_connected_message(self) -> str:
        if self._closed:
            return "hub closed"
        detail = (": " + self.last_error) if self.last_error else ""
        return f"not connected to {self.address}{detail}"

    def _alloc_id(self) -> int:
        while True:
            rid = self._next_id
            self._next_id = 1 if rid >= _U64 else rid + 1
            if rid not in self._pending:
                return rid

    async def _request(
        self, timeout: float, label: str, send: Callable[[P.AgentConnection, int], None]
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        runner = self._runner
        if self._link is None and not self._closed and runner is not None and not runner.done():
            await self._wait_until(lambda: self._link is not None or self._closed, timeout)
        link = self._require_link()
        rid = self._alloc_id()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = (fut, link, label)
        try:
            send(link.proto, rid)
            link.flush()
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                raise CallTimeout(f"no reply to {label!r} (request id {rid}) within {timeout:.3g} s")
            return fut.result()
        finally:
            self._pending.pop(rid, None)

    def _fail_pending(self, link: _Link | None, reason: str) -> None:
        for rid, (fut, owner, label) in list(self._pending.items()):
            if link is None or owner is link:
                del self._pending[rid]
                if not fut.done():
                    fut.set_exception(
                        ConnectionLost(
                            f"connection to {self.address} lost before the reply to {label!r}"
                            f" (request id {rid}): {reason}"
                        )
                    )

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- internals: connecting ----------------------------------------------------------

    async def _run(self, first: _Link | None) -> None:
        link = first
        delays = backoff_delays(*self._backoff)
        while not self._closed:
            if link is None:
                try:
                    link = await self._open()
                    if self._closed:
                        await self._close_link(link)
                        break
                except asyncio.CancelledError:
                    raise
                except (ConnectionLost, HandshakeRejected, ProtocolError, OSError) as exc:
                    self.last_error = str(exc)
                    if not self.reconnect:
                        self.fatal = exc
                        log.error("%s; not reconnecting", exc)
                        break
                    delay = next(delays)
                    log.warning("%s; retrying in %.2f s", exc, delay)
                    await self._wait_until(lambda: self._closed, delay)
                    continue
            reason = await self._serve_link(link)
            lived = link.loop.time() - link.opened_at
            link = None
            self.last_error = reason
            if self._closed:
                break
            if not self.reconnect:
                log.error("connection to %s lost (%s); not reconnecting", self.address, reason)
                self.fatal = ConnectionLost(f"connection to {self.address} lost: {reason}")
                self._broadcast()
                break
            if lived > 1.0:
                # A connection that lasted: redial at once (a daemon restart costs ~0).
                delays = backoff_delays(*self._backoff)
                log.warning("connection to %s lost (%s); reconnecting", self.address, reason)
            else:
                # One that died young must not turn into a tight reconnect loop.
                delay = next(delays)
                log.warning("connection to %s lost (%s); reconnecting in %.2f s", self.address, reason, delay)
                await self._wait_until(lambda: self._closed, delay)

    async def _open(self) -> _Link:
        """Dial and handshake; returns a link whose handshake succeeded."""
        sock = await self._dial()
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_SIZE)
        except BaseException:
            sock.close()
            raise
        payload = P.handshake_payload(self.session, self.token, ack=self.want_acks, attach=self.attach)
        link = _Link(reader, writer, P.AgentConnection(payload, max_payload=self.max_payload))
        try:
            link.flush()
            ready = await asyncio.wait_for(self._handshake(link), self.handshake_timeout)
        except asyncio.TimeoutError:
            await self._close_link(link)
            raise ConnectionLost(
                f"connected to {self.address} but no handshake reply within {self.handshake_timeout:.3g} s"
            ) from None
        except BaseException:
            await self._close_link(link)
            raise
        if ready != P.READY_PAYLOAD:
            log.warning(
                "unexpected handshake reply %r from %s (expected %r)",
                ready[:64],
                self.address,
                P.READY_PAYLOAD,
            )
        return link

    async def _dial(self) -> socket.socket:
        """``Address.connect`` in a worker thread (AF_VSOCK has no asyncio dialer).
        If we are cancelled meanwhile, whichever side comes second closes the socket."""
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        state: dict[str, Any] = {"abandoned": False, "sock": None}

        def dial() -> socket.socket | None:
            sock = self.address.connect(self.connect_timeout)
            with lock:
                if state["abandoned"]:
                    sock.close()
                    return None
                state["sock"] = sock
            return sock

        fut = loop.run_in_executor(None, dial)
        try:
            sock = await asyncio.shield(fut)
        except asyncio.CancelledError:
            with lock:
                state["abandoned"] = True
                if state["sock"] is not None:
                    state["sock"].close()
            raise
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {self.address}: {exc.strerror or exc}") from exc
        assert sock is not None
        return sock

    async def _handshake(self, link: _Link) -> bytes:
        while True:
            data = await link.reader.read(_READ_SIZE)
            if not data:
                complaint = link.proto.receive_eof()
                raise ConnectionLost(
                    "{} closed the connection during the handshake{}".format(
                        self.address, (": " + complaint) if complaint else ""
                    )
                )
            link.last_rx = link.loop.time()
            events = link.proto.receive_data(data)
            link.flush()
            for i, event in enumerate(events):
                if isinstance(event, P.Ready):
                    link.early_events = events[i + 1 :]
                    return event.payload
                if isinstance(event, P.Rejected):
                    raise HandshakeRejected(event.code, event.message)
                if isinstance(event, P.Violation):
                    try:
                        await asyncio.wait_for(link.writer.drain(), 1.0)
                    except (OSError, asyncio.TimeoutError):
                        pass
                    raise ProtocolError(event.code, f"{self.address}: {event.message}")

    async def _close_link(self, link: _Link) -> None:
        link.proto.close()
        if link.ack_timer is not None:
            link.ack_timer.cancel()
        writer = link.writer
        if not writer.transport.is_closing():
            writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    # -- internals: a live connection -------------------------------------------------------

    async def _serve_link(self, link: _Link) -> str:
        self.connections += 1
        self._link = link
        self.last_error = None
        self.outbox.connection_made()
        if self.want_acks:
            # The daemon sends vhub.hello right after its handshake reply, before it
            # answers anything of ours: a pong to this ping coming first means no acks.
            link.ack_probe_id = self._alloc_id()
            link.proto.send_ping(link.ack_probe_id)
            link.flush()
            link.ack_timer = link.loop.call_later(
                min(5.0, self.idle_timeout), self._decide_acks, link, False, "no vhub.hello in time"
            )
        else:
            self.outbox.set_ack_mode(False)
        log.info(
            "connected to %s (%s, connection %d)",
            self.address,
            (f"session {self.session}") if self.session else "anonymous session",
            self.connections,
        )
        self._broadcast()
        for event in link.early_events:
            early = self._dispatch(link, event)
            if early:
                link.stop(early)
        link.early_events = []
        tasks = [
            link.loop.create_task(self._read_loop(link)),
            link.loop.create_task(self._pump(link)),
            link.loop.create_task(self._heartbeat(link)),
        ]
        reason = "hub closed"
        try:
            await asyncio.wait(tasks + [link.stop_reason], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if link.stop_reason.done():
                reason = link.stop_reason.result()
            else:
                for res in results:
                    if isinstance(res, str):
                        reason = res
                        break
                    if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                        reason = f"{type(res).__name__}: {res}" if str(res) else type(res).__name__
                        break
            self._link = None
            self.outbox.connection_lost()
            self._fail_pending(link, reason)
            self._broadcast()
            await self._close_link(link)
        return reason

    def _decide_acks(self, link: _Link, enabled: bool, why: str) -> None:
        if link.ack_timer is not None:
            link.ack_timer.cancel()
            link.ack_timer = None
        if self._link is not link:
            return
        if self.outbox.ack_mode is None:
            self.outbox.set_ack_mode(enabled)
            log.info("output acknowledgements %s (%s)", "on" if enabled else "off", why)
        elif enabled and not self.outbox.ack_mode:
            self.outbox.set_ack_mode(True)
            log.warning("late vhub.hello: output acknowledgements on from now")
        self._broadcast()

    async def _read_loop(self, link: _Link) -> str:
        reader = link.reader
        while True:
            try:
                data = await reader.read(_READ_SIZE)
            except OSError as exc:
                return "read failed: %s" % (exc.strerror or exc)
            if not data:
                complaint = link.proto.receive_eof()
                return "closed by the daemon" + ((": " + complaint) if complaint else "")
            link.last_rx = link.loop.time()
            events = link.proto.receive_data(data)
            link.flush()
            for event in events:
                reason = self._dispatch(link, event)
                if reason:
                    return reason

    async def _pump(self, link: _Link) -> str:
        """Write buffered stream frames, waiting on the socket (drain) between batches."""
        outbox = self.outbox
        writer = link.writer
        while True:
            await self._wait_until(lambda: outbox.has_unsent() or self._link is not link, None)
            if self._link is not link:
                return "connection replaced"
            chunks, nbytes = P.stream_chunks(outbox.take())
            link.write_many(chunks, nbytes)
            self._broadcast()
            try:
                await writer.drain()
            except OSError as exc:
                return "write failed: %s" % (exc.strerror or exc)

    async def _heartbeat(self, link: _Link) -> str:
        """Ping every ``heartbeat_interval``; declare the connection dead after
        ``idle_timeout`` with no byte received (a backlog of ours that keeps draining
        also counts as life: the daemon is reading, just slowly)."""
        loop = link.loop
        transport = link.writer.transport
        tick = max(0.01, min(self.heartbeat_interval, self.idle_timeout / 4.0))
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            # Output draining from a backlog proves the daemon reads; bytes that went
            # straight into an empty socket buffer prove nothing.
            backlog = transport.get_write_buffer_size()
            flushed = link.tx_bytes - backlog
            if flushed > link.flushed and link.backlogged:
                link.last_progress = now
            link.flushed = flushed
            link.backlogged = backlog > 0
            idle = now - max(link.last_rx, link.last_progress)
            if idle > self.idle_timeout:
                return f"no data from the daemon for {idle:.1f} s"
            if now - link.last_ping >= self.heartbeat_interval:
                link.proto.send_ping(self._alloc_id())
                link.flush()
                link.last_ping = now

    def _dispatch(self, link: _Link, event: Any) -> str | None:
        """Act on one protocol event; returns a reason when the link must close."""
        if isinstance(event, P.Request):
            if link.ack_probe_id is not None and self.outbox.ack_mode is None:
                self._decide_acks(link, False, "request before vhub.hello")
            self._spawn(self._handle(link, event))
        elif isinstance(event, P.Response):
            self._resolve(event.request_id, result=event.result)
        elif isinstance(event, P.ErrorReply):
            self._resolve(event.request_id, error=RpcError(event.code, event.message))
        elif isinstance(event, P.Hello):
            self._decide_acks(link, True, "daemon said vhub.hello")
        elif isinstance(event, P.Ack):
            released, sane = self.outbox.ack(event.frames)
            if not sane:
                log.warning("vhub.ack for %d frames is more than were sent on this connection", event.frames)
            if released:
                self._broadcast()
        elif isinstance(event, P.Pong):
            if event.request_id == link.ack_probe_id and self.outbox.ack_mode is None:
                self._decide_acks(link, False, "pong before vhub.hello")
        elif isinstance(event, P.StreamIn):
            if self.on_stream is not None:
                try:
                    self.on_stream(event.msg_type, event.request_id, event.payload)
                except Exception as exc:
                    log.error("stream callback failed: %s: %s", type(exc).__name__, exc)
            else:
                log.debug("ignored %s frame for stream %d", MsgType(event.msg_type).name, event.request_id)
        elif isinstance(event, P.RemoteError):
            log.error("daemon sent Error %s: %s", event.code, event.message)
            return f"daemon sent Error {event.code}: {event.message}"
        elif isinstance(event, P.Violation):
            log.error("protocol error from %s: %s: %s", self.address, event.code, event.message)
            return f"protocol error {event.code}: {event.message}"
        elif isinstance(event, P.Ignored):
            log.debug("ignored: %s", event.reason)
        return None

    def _resolve(self, rid: int, result: Any = None, error: BaseException | None = None) -> None:
        entry = self._pending.get(rid)
        if entry is None:
            log.debug("reply for unknown request id %d ignored", rid)
            return
        fut = entry[0]
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    async def _handle(self, link: _Link, req: P.Request) -> None:
        fn = self._handlers.get(req.method)
        if fn is None:
            if req.request_id:
                self._reply_error(link, req.request_id, "no_handler", f"no handler for {req.method!r}")
            else:
                log.debug("notification %r ignored: no handler", req.method)
            return
        try:
            result = fn(req.params)
            if inspect.isawaitable(result):
                result = await result
        except RpcError as exc:
            if req.request_id:
                self._reply_error(link, req.request_id, exc.code, exc.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("handler for %r failed: %s: %s", req.method, type(exc).__name__, exc)
            log.debug("handler for %r failed", req.method, exc_info=True)
            if req.request_id:
                self._reply_error(link, req.request_id, "handler_failed", f"{type(exc).__name__}: {exc}")
            return
        if req.request_id:
            if link.proto.state != "open":
                log.info("reply to %r dropped: its connection is gone", req.method)
                return
            try:
                link.proto.send_response(req.request_id, result)
            except (TypeError, ValueError) as exc:
                self._reply_error(link, req.request_id, "bad_result", f"result is not JSON: {exc}")
                return
            link.flush()

    def _reply_error(self, link: _Link, rid: int, code: str, message: str) -> None:
        if link.proto.state == "open":
            link.proto.send_error(rid, code, message)
            link.flush()


class Hub:
    """Blocking flavour of :class:`AsyncHub`: runs its own event loop in a daemon
    thread. Use :func:`connect` to make one; usable as a context manager."""

    def __init__(
        self,
        addr: str | Address | None = None,
        session: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        **options: Any,
    ) -> None:
        # Parse first so that a bad address raises here, before any thread starts.
        if addr is None:
            addr = os.environ.get("VHUB_ADDR")
        address = addr if isinstance(addr, Address) else parse_address(addr)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="blink-agent-worker"
        )
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._loop.run_forever, name="blink-agent-loop", daemon=True)
        self._thread.start()
        options.setdefault("connect_timeout", timeout)
        options.setdefault("handshake_timeout", timeout)

        async def make() -> AsyncHub:
            return AsyncHub(address, session, token, **options)

        try:
            self._hub = self._submit(make())
            self._submit(self._hub.start(wait=True))
        except BaseException:
            self._shutdown_loop()
            raise

    def _submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def address(self) -> Address:
        return self._hub.address

    @property
    def connected(self) -> bool:
        return self._hub.connected

    @property
    def outbox(self) -> Outbox:
        return self._hub.outbox

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        """Blocking :meth:`AsyncHub.call`."""
        self._check_open()
        return self._submit(self._hub.call(method, params, timeout))

    def notify(self, method: str, params: Any = None) -> None:
        self._check_open()
        self._submit(self._hub.notify(method, params))

    def stdout(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> None:
        """Queue Stdout output; blocks while connected and the buffer is full."""
        self._check_open()
        self._submit(self._hub.stdout(data, execution_id))

    def stderr(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> None:
        self._check_open()
        self._submit(self._hub.stderr(data, execution_id))

    def flush(self, timeout: float | None = None) -> bool:
        self._check_open()
        return bool(self._submit(self._hub.flush(timeout)))

    def serve(self, method: str, fn: Handler) -> None:
        """Answer host calls of ``method`` with ``fn(params)``, run in a worker thread
        (so ``fn`` may itself call ``hub.call``)."""
        loop = self._loop

        def run_in_worker(params: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(None, fn, params)

        self._hub.serve(method, run_in_worker)

    def close(self, flush_timeout: float = 5.0) -> None:
        """Flush (bounded), disconnect and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._hub.close(flush_timeout), self._loop).result()
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._closed = True
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        in_worker = threading.current_thread().name.startswith("blink-agent-worker")
        self._executor.shutdown(wait=not in_worker)
        self._loop.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("hub closed")

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(
    addr: str | Address | None = None,
    session: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> Hub:
    """Connect to the daemon and return a blocking :class:`Hub` once the handshake
    succeeded. Raises :class:`~blink_agent.errors.AddressError`,
    :class:`ConnectionLost` or :class:`HandshakeRejected`. Options are those of
    :class:`AsyncHub` (``buffer_bytes``, ``heartbeat_interval``, ``reconnect``...)."""
    return Hub(addr, session, token, timeout=timeout, **options)


async def aconnect(
    addr: str | Address | None = None,
    session: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> AsyncHub:
    """Asyncio flavour of :func:`connect`: returns a started :class:`AsyncHub`."""
    options.setdefault("connect_timeout", timeout)
    options.setdefault("handshake_timeout", timeout)
    hub = AsyncHub(addr, session, token, **options)
    await hub.start(wait=True)
    return hub
