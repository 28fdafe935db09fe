"""The agent's connection to the daemon, kept up for as long as the hub lives (asyncio).

:class:`AsyncHub` owns what outlives any one connection: dialing and redialing with
capped exponential backoff and jitter (:func:`backoff_delays`), serving each
:class:`~blink_agent.link.Link` and deciding what its events mean for the hub
(:meth:`AsyncHub._dispatch`), the calls in flight and the methods served (kept by
:mod:`blink_agent.rpc`), and the lifecycle (start, flush, close). The output flow
through the bounded buffer (producers, pump, acks) is its base class :class:`~blink_agent.output.HubOutput`.

The blocking flavour is :mod:`blink_agent.blocking`; :mod:`blink_agent.hub` is the
public face of both.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable

from . import protocol as P
from .address import Address, parse_address
from .errors import CallTimeout, ConnectionLost, HandshakeRejected, ProtocolError, RpcError
from .link import DEVICE_POLL, Link, backoff_delays, no_device, open_link
from .outbox import DEFAULT_BUFFER_BYTES, parse_size
from .output import STREAM_CHUNK, HubOutput
from .rpc import Handler, Handlers, PendingCalls
from .wire import DEFAULT_MAX_PAYLOAD, MsgType

__all__ = ["AsyncHub", "backoff_delays", "STREAM_CHUNK"]

log = logging.getLogger("blink_agent")


class AsyncHub(HubOutput):
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
        # commands started by agent.run inherit VHUB_ATTACH=1: they attach to
        # the session beside the resident agent instead of replacing it, with
        # the attach token the daemon gave that agent (VHUB_ATTACH_TOKEN)
        self.attach = attach if attach is not None else os.environ.get("VHUB_ATTACH") == "1"
        if token is None:
            token = (self.attach and os.environ.get("VHUB_ATTACH_TOKEN")) or os.environ.get("VHUB_TOKEN", "")
        self.token = token
        # what the daemon said in vhub.hello: the environment for the programs this agent starts
        self.attach_env: dict[str, str] = {}
        if buffer_bytes is None:
            env = os.environ.get("VHUB_BUFFER_BYTES")
            buffer_bytes = parse_size(env) if env else DEFAULT_BUFFER_BYTES
        super().__init__(buffer_bytes)
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.reconnect = reconnect
        self.want_acks = bool(ack)
        self.max_payload = max_payload
        self._backoff = (backoff_first, backoff_cap)
        self._handlers = Handlers()
        self.on_stream: Callable[[int, int, bytes], None] | None = None
        self._pending = PendingCalls()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None
        self.connections = 0
        self.fatal: BaseException | None = None

    def serve(self, method: str, fn: Handler) -> None:
        """Answer host->guest calls of ``method`` with ``fn(params)``.

        ``fn`` may return a value or an awaitable; raise :class:`RpcError` to answer
        with a chosen code. Any other exception answers ``handler_failed``.
        """
        self._handlers.serve(method, fn)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, wait: bool = True) -> AsyncHub:
        """Begin connecting. With ``wait`` the first connection must succeed: its
        failure raises (:class:`ConnectionLost`, :class:`HandshakeRejected`,
        :class:`ProtocolError`). Without, failures are logged and retried."""
        self._loop = asyncio.get_running_loop()
        first: Link | None = None
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
        if flush_timeout > 0 and (self._link is not None or not self._given_up()):
            await self.flush(flush_timeout)  # across a reconnection under way, too
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
        self._pending.fail(None, self.address, "hub closed")
        self._broadcast()

    aclose = close

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a connection is up; False on timeout or once closed."""
        await self._wait_until(lambda: self._link is not None or self._closed, timeout)
        return self._link is not None

    # -- guest -> host ------------------------------------------------------------------

    async def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        """Call a host method; returns its JSON result.

        Raises :class:`RpcError` (the host's answer; its ``code`` in its one canonical
        spelling), :class:`CallTimeout` (no reply within ``timeout``; if disconnected,
        the call waits for the reconnection within that time) or
        :class:`ConnectionLost` (the connection died or never came back).
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

    # -- internals: waiting and requests ----------------------------------------------------

    def _given_up(self) -> bool:
        """True once no connection will ever come again (reconnect off, link lost)."""
        runner = self._runner
        return runner is not None and runner.done() and self._link is None

    def _require_link(self) -> Link:
        link = self._link
        if link is None or self._closed:
            if self._closed:
                raise ConnectionLost("hub closed")
            detail = (": " + self.last_error) if self.last_error else ""
            raise ConnectionLost(f"not connected to {self.address}{detail}")
        return link

    async def _request(
        self, timeout: float, label: str, send: Callable[[P.AgentConnection, int], None]
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        runner = self._runner
        if self._link is None and not self._closed and runner is not None and not runner.done():
            await self._wait_until(lambda: self._link is not None or self._closed, timeout)
        link = self._require_link()
        rid = self._pending.alloc_id()
        fut = self._pending.add(rid, link, label)
        try:
            send(link.proto, rid)
            link.flush()
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                raise CallTimeout(f"no reply to {label!r} (request id {rid}) within {timeout:.3g} s")
            return fut.result()
        finally:
            self._pending.discard(rid)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- internals: connecting ----------------------------------------------------------

    async def _run(self, first: Link | None) -> None:
        link = first
        delays = backoff_delays(*self._backoff)
        polling = False  # trying a device that is not there (ENODEV) every DEVICE_POLL
        while not self._closed:
            if link is None:
                try:
                    link = await self._open()
                    polling = False
                    if self._closed:
                        await link.close()
                        break
                except asyncio.CancelledError:
                    raise
                except (ConnectionLost, HandshakeRejected, ProtocolError, OSError) as exc:
                    self.last_error = str(exc)
                    if not self.reconnect:
                        self.fatal = exc
                        log.error("%s; not reconnecting", exc)
                        break
                    if no_device(exc):  # unplugged for a snapshot: back within seconds, so poll it, quietly
                        if not polling:
                            log.warning("%s; trying every %.2f s until the device is back", exc, DEVICE_POLL)
                            polling = True
                        await self._wait_until(lambda: self._closed, DEVICE_POLL)
                        continue
                    polling = False
                    delay = next(delays)
                    log.warning("%s; retrying in %.2f s", exc, delay)
                    await self._wait_until(lambda: self._closed, delay)
                    continue
            reason = await self._serve_link(link)
            lived = 2.0 if link.restart else link.age  # told to connect again: at once
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

    async def _open(self) -> Link:
        """Dial and handshake; returns a link whose handshake succeeded."""
        return await open_link(
            self.address,
            P.handshake_payload(self.session, self.token, ack=self.want_acks, attach=self.attach),
            max_payload=self.max_payload,
            connect_timeout=self.connect_timeout,
            handshake_timeout=self.handshake_timeout,
        )

    # -- internals: a live connection -------------------------------------------------------

    async def _serve_link(self, link: Link) -> str:
        self.connections += 1
        self._link = link
        self.last_error = None
        probe_id = self._pending.alloc_id() if self.want_acks else None
        self._output_connected(link, probe_id, min(5.0, self.idle_timeout))
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
        try:
            reason = await link.run(
                lambda event: self._dispatch(link, event),
                self._pump(link),
                self.heartbeat_interval,
                self.idle_timeout,
                self._pending.alloc_id,
            )
        finally:
            self._link = None
            self.outbox.connection_lost()
            self.side.clear()
            self.side_bytes = 0
            self._pending.fail(link, self.address, link.end_reason)
            self._broadcast()
            await link.close()
        return reason

    def _dispatch(self, link: Link, event: Any) -> str | None:
        """Act on one protocol event; returns a reason when the link must close."""
        if isinstance(event, P.Request):
            if link.ack_probe_id is not None and self.outbox.ack_mode is None:
                self._decide_acks(link, False, "request before vhub.hello")
            self._spawn(self._handlers.handle(link, event))
        elif isinstance(event, P.Response):
            self._pending.resolve(event.request_id, result=event.result)
        elif isinstance(event, P.ErrorReply):
            self._pending.resolve(event.request_id, error=RpcError(event.code, event.message))
        elif isinstance(event, P.Hello):
            params = event.params if isinstance(event.params, dict) else {}
            if isinstance(params.get("session"), str) and isinstance(params.get("attach_token"), str):
                self.attach_env = {"VHUB_SESSION": params["session"], "VHUB_ATTACH_TOKEN": params["attach_token"]}
            self._decide_acks(link, True, "daemon said vhub.hello")
        elif isinstance(event, P.Ack):
            self._acked(event.frames)
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
            if event.code == "shutting_down":  # a restart: the next daemon is already waiting for us
                link.restart = True
                log.warning("the daemon is restarting: connecting again")
            else:
                log.error("daemon sent Error %s: %s", event.code, event.message)
            return f"daemon sent Error {event.code}: {event.message}"
        elif isinstance(event, P.Violation):
            log.error("protocol error from %s: %s: %s", self.address, event.code, event.message)
            return f"protocol error {event.code}: {event.message}"
        elif isinstance(event, P.Ignored):
            log.debug("ignored: %s", event.reason)
        return None

