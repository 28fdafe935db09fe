"""Channels: byte streams between the host and the agent, one per TCP connection
of an exposed port (``blink expose``) or per copy (``blink cp``).

The daemon opens a channel with a call that names it (``"channel"``: an id of
2**62 and above, so it never meets an execution id) and says how many bytes it
may have in flight toward us (``"window"``):

- ``agent.connect`` ``{"port"}``: connect to 127.0.0.1:port in the guest and
  carry that TCP connection (``RpcError connect_failed`` with the OS's words);
- ``agent.tar`` ``{"path"}``: stream ``path`` as a tar archive to the host;
- ``agent.untar`` ``{"dest", "top"?}``: extract the tar the host streams under ``dest``;
- ``agent.probe_port`` ``{"port"}`` (no channel): does 127.0.0.1:port accept?

Data travels as StreamData frames whose request_id is the channel id; an empty
one is that direction's EOF (a TCP half-close). Each side sends at most the
other's window beyond what the other reported consumed with the notification
``chan.ack`` ``{"channel", "consumed"}`` (total bytes), so a slow channel slows
only itself. ``chan.reset`` ``{"channel", "reason"}`` aborts a channel either
way (a TCP reset). A copy ends with ``chan.done`` ``{"channel", "ok", "sha256",
"bytes", "entries", "error"?}`` from the agent, before its EOF. The wire rules
are in docs/protocol.md. A channel lives on the connection it was opened on:
when that connection goes, its channels are reset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
from typing import Any, Callable

from .errors import ChannelReset, ConnectionLost, RpcError
from .wire import MsgType

__all__ = ["CHANNEL_BASE", "WINDOW", "ChannelManager"]

log = logging.getLogger("blink_agent")

#: Channel ids are at least this (execution ids stay far below).
CHANNEL_BASE = 1 << 62
#: Bytes the host may have in flight toward one channel of ours.
WINDOW = 1 << 20
#: Largest StreamData payload we send on a channel (the daemon may ask for less: ``max_frame``).
CHUNK = 128 * 1024
#: Open channels at most (the daemon has its own bound); past it, opens fail.
MAX_CHANNELS = 4096


class Channel:
    """One channel's two directions and their windows."""

    def __init__(self, manager: ChannelManager, cid: int, window: int, max_frame: int = CHUNK) -> None:
        self.manager = manager
        self.hub = manager.hub
        self.link = manager.hub._link
        self.id = cid
        self.window = window  # the host's window: what we may have unacknowledged toward it
        self.sent = 0
        self.acked = 0
        self.inbox: collections.deque[bytes] = collections.deque()
        self.inbox_bytes = 0
        self.eof_in = False
        self.consumed = 0
        self.reported = 0
        self.reset_reason: str | None = None
        self.eof_out = False
        self.chunk = max_frame

    def _gone(self) -> bool:
        return self.reset_reason is not None or self.hub._link is not self.link

    def _check(self) -> None:
        if self.reset_reason is not None:
            raise ChannelReset(self.reset_reason)
        if self.hub._link is not self.link:
            raise ChannelReset("the connection to the daemon was lost")

    # -- toward the host
    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self.chunk):
            chunk = bytes(view[start:start + self.chunk])
            n = len(chunk)
            await self.hub._wait_until(lambda: self._gone() or self.sent - self.acked + n <= self.window, None)  # noqa: B023
            self._check()
            self.sent += len(chunk)
            try:
                await self.hub.send_side(self.link, self.id, chunk)
            except ConnectionLost:
                raise ChannelReset("the connection to the daemon was lost") from None

    async def send_eof(self) -> None:
        if self.eof_out or self._gone():
            return
        self.eof_out = True
        try:
            await self.hub.send_side(self.link, self.id, b"")
        except ConnectionLost:
            pass
        self.manager.maybe_done(self)

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        if self.hub._link is not self.link:
            return
        try:
            await self.hub.notify(method, dict(params, channel=self.id))
        except ConnectionLost:
            pass

    async def reset(self, reason: str) -> None:
        """Abort: tell the host (unless it told us) and forget the channel."""
        if self.reset_reason is None:
            self.reset_reason = reason
            await self.notify("chan.reset", {"reason": reason[:200]})
        self.manager.forget(self)

    # -- from the host
    def put(self, data: bytes) -> None:
        if self.eof_in or self.reset_reason is not None:
            return
        if not data:
            self.eof_in = True
        elif self.inbox_bytes + len(data) > self.window_in:
            # the host ignored our window: nothing more is held for it
            self.reset_reason = "the host sent past the channel's window"
            self.manager.spawn(self.notify("chan.reset", {"reason": self.reset_reason}))
        else:
            self.inbox.append(bytes(data))
            self.inbox_bytes += len(data)
        self.hub._broadcast()

    window_in = WINDOW

    async def recv(self) -> bytes:
        """The bytes from the host that came (all of them); ``b""`` at its EOF.
        Raises :class:`ChannelReset`."""
        await self.hub._wait_until(lambda: bool(self.inbox) or self.eof_in or self._gone(), None)
        if self.inbox:
            data = self.inbox.popleft() if len(self.inbox) == 1 else b"".join(self.inbox)
            self.inbox.clear()
            self.inbox_bytes = 0
            return data
        self._check()
        return b""

    async def took(self, n: int) -> None:
        """``n`` bytes from the host are consumed: report them now and then."""
        self.consumed += n
        if not self.inbox or self.consumed - self.reported >= WINDOW // 4:
            self.reported = self.consumed
            await self.notify("chan.ack", {"consumed": self.consumed})


class ChannelManager:
    """The channels of one agent: the ``agent.connect/tar/untar/probe_port``
    methods, channel StreamData, and the ``chan.*`` notifications."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.channels: dict[int, Channel] = {}
        self._tasks: set = set()

    def register(self) -> None:
        hub = self.hub
        hub.serve("agent.connect", self.rpc_connect)
        hub.serve("agent.probe_port", self.rpc_probe_port)
        hub.serve("chan.ack", self.on_ack)
        hub.serve("chan.reset", self.on_reset)
        previous = hub.on_stream

        def on_stream(msg_type: int, request_id: int, payload: bytes) -> None:
            if request_id >= CHANNEL_BASE:
                ch = self.channels.get(request_id)
                if ch is not None and msg_type == MsgType.StreamData:
                    ch.put(payload)
            elif previous is not None:
                previous(msg_type, request_id, payload)

        hub.on_stream = on_stream

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, ch: Channel) -> None:
        if self.channels.get(ch.id) is ch:
            del self.channels[ch.id]

    def maybe_done(self, ch: Channel) -> None:
        if ch.eof_out and ch.eof_in and not ch.inbox:
            self.forget(ch)

    def _open(self, params: Any, what: str) -> Channel:
        if not isinstance(params, dict):
            raise RpcError("bad_params", f"{what} takes an object of params")
        cid, window = params.get("channel"), params.get("window", WINDOW)
        max_frame = params.get("max_frame", CHUNK)
        if type(max_frame) is not int or not 1024 <= max_frame:
            raise RpcError("bad_params", "max_frame must be an integer of at least 1024")
        if type(cid) is not int or cid < CHANNEL_BASE:
            raise RpcError("bad_params", f"{what} needs a channel id (an integer >= 2**62)")
        if type(window) is not int or not 1024 <= window <= 1 << 24:
            raise RpcError("bad_params", "window must be an integer from 1024 to 16 MiB")
        if cid in self.channels:
            raise RpcError("bad_params", f"channel {cid} is open already")
        if len(self.channels) >= MAX_CHANNELS:
            raise RpcError("too_many_channels", f"this agent has {MAX_CHANNELS} channels open")
        if self.hub._link is None:
            raise RpcError("no_connection", "not connected")
        ch = Channel(self, cid, window, min(max_frame, CHUNK))
        self.channels[cid] = ch
        return ch

    # -- notifications from the host
    def on_ack(self, params: Any) -> None:
        ch = self.channels.get(params.get("channel")) if isinstance(params, dict) else None
        consumed = params.get("consumed") if isinstance(params, dict) else None
        if ch is not None and type(consumed) is int and ch.acked < consumed <= ch.sent:
            ch.acked = consumed
            self.hub._broadcast()

    def on_reset(self, params: Any) -> None:
        ch = self.channels.get(params.get("channel")) if isinstance(params, dict) else None
        if ch is not None and ch.reset_reason is None:
            reason = params.get("reason")
            ch.reset_reason = "reset by the host" + (f": {reason[:200]}" if isinstance(reason, str) else "")
            self.forget(ch)
            self.hub._broadcast()

    # -- ports
    @staticmethod
    def _port(params: Any) -> int:
        port = params.get("port") if isinstance(params, dict) else None
        if type(port) is not int or not 1 <= port <= 65535:
            raise RpcError("bad_params", "port must be an integer from 1 to 65535")
        return port

    async def rpc_probe_port(self, params: Any) -> dict[str, Any]:
        port = self._port(params)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        except (OSError, asyncio.TimeoutError) as exc:
            return {"port": port, "open": False,
                    "error": os.strerror(exc.errno) if getattr(exc, "errno", None) else "timed out"}
        writer.close()
        return {"port": port, "open": True}

    async def rpc_connect(self, params: Any) -> dict[str, Any]:
        port = self._port(params)
        ch = self._open(params, "agent.connect")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10.0)
        except (OSError, asyncio.TimeoutError) as exc:
            self.forget(ch)
            why = os.strerror(exc.errno) if getattr(exc, "errno", None) else "timed out"
            raise RpcError("connect_failed", f"nothing accepts on 127.0.0.1:{port} in the guest: {why}") from None
        if ch.reset_reason is not None:
            writer.close()
            raise RpcError("connect_failed", "reset by the host while connecting")
        sock = writer.get_extra_info("socket")

        def abort() -> None:
            if sock is not None and sock.fileno() >= 0:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()

        up = asyncio.ensure_future(self._tcp_up(ch, reader))
        down = asyncio.ensure_future(self._tcp_down(ch, writer, abort))
        self.spawn(self._tcp_end(ch, up, down, writer, abort))
        return {"channel": ch.id, "window": WINDOW}

    async def _tcp_up(self, ch: Channel, reader: asyncio.StreamReader) -> None:
        """Guest socket -> host. Raises ChannelReset / ConnectionError on an abort."""
        while True:
            data = await reader.read(CHUNK)
            if not data:
                await ch.send_eof()
                return
            await ch.send(data)

    async def _tcp_down(self, ch: Channel, writer: asyncio.StreamWriter, abort: Callable[[], None]) -> None:
        """Host -> guest socket; the host's EOF half-closes it."""
        while True:
            data = await ch.recv()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                self.maybe_done(ch)
                return
            writer.write(data)
            await writer.drain()
            await ch.took(len(data))

    async def _tcp_end(self, ch: Channel, up: asyncio.Future, down: asyncio.Future,
                       writer: asyncio.StreamWriter, abort: Callable[[], None]) -> None:
        pending = {up, down}
        failed: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is not None and failed is None:
                    failed = exc
            if failed is not None:
                break
        for fut in pending:
            fut.cancel()
        if failed is None:
            writer.close()
            self.forget(ch)
            return
        abort()
        if isinstance(failed, ChannelReset):
            self.forget(ch)
        else:
            why = getattr(failed, "strerror", None) or type(failed).__name__
            log.info("channel %d: the guest's connection failed: %s", ch.id, why)
            await ch.reset(f"the guest's connection was reset ({why})")
