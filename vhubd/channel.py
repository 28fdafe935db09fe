"""A channel seen from a host client: one byte stream to a session's agent,
both ways, with its window (docs/protocol.md, "Channels"). ``blink cp`` uses
it; ``Client.open_channel`` makes one.

Reading: ``read()`` returns the agent's next bytes (``b""`` at its EOF) and
reports them consumed (``chan.ack``) a quarter window at a time, so the agent
never has more than the window in flight toward us. Writing: ``write()`` waits
while the window is full. ``done()`` waits for the agent's ``chan.done``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from .errors import ConnectionClosed, RemoteError
from .frames import CHANNEL_WINDOW

if TYPE_CHECKING:
    from .client import Client

CHUNK = 128 * 1024


class ChannelReset(RemoteError):
    """The channel was reset (by the agent, the daemon, or a lost connection)."""

    def __init__(self, message: str):
        super().__init__("channel_reset", message)


class ClientChannel:
    def __init__(self, client: Client, cid: int, window: int, opened: dict):
        self.client = client
        self.id = cid
        self.window = window  # the agent's: what we may have in flight toward it
        self.opened = opened  # the agent's answer (size, name...)
        self.sent = 0
        self.acked = 0
        self.inbox: collections.deque[bytes] = collections.deque()
        self.eof_in = False
        self.received = 0
        self.consumed = 0
        self.reported = 0
        self.reset_reason: str | None = None
        self.done_params: dict | None = None
        self._changed = asyncio.Event()

    # -- from the client's read loop
    def _feed(self, data: bytes) -> None:
        if not data:
            self.eof_in = True
        else:
            self.inbox.append(data)
            self.received += len(data)
        self._changed.set()

    def _note(self, method: str, params: dict) -> None:
        if method == "chan.ack":
            consumed = params.get("consumed")
            if type(consumed) is int and self.acked < consumed <= self.sent:
                self.acked = consumed
        elif method == "chan.reset":
            reason = params.get("reason")
            self.reset_reason = reason if isinstance(reason, str) else "reset"
        elif method == "chan.done":
            self.done_params = params
        self._changed.set()

    def _lost(self, why: ConnectionClosed) -> None:
        if self.reset_reason is None:
            self.reset_reason = why.message
        self._changed.set()

    async def _wait(self, ready) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    # -- reading
    async def read(self) -> bytes:
        """The agent's bytes that came (all of them); ``b""`` at its EOF. Raises ``ChannelReset``."""
        await self._wait(lambda: self.inbox or self.eof_in or self.reset_reason is not None)
        if self.inbox:
            data = self.inbox.popleft() if len(self.inbox) == 1 else b"".join(self.inbox)
            self.inbox.clear()
            self.consumed += len(data)
            if not self.inbox or self.consumed - self.reported >= CHANNEL_WINDOW // 4:
                self.reported = self.consumed
                await self.client.notify("chan.ack", {"channel": self.id, "consumed": self.consumed})
            return data
        if self.eof_in:
            return b""
        raise ChannelReset(self.reset_reason or "reset")

    # -- writing
    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            chunk = bytes(view[start:start + CHUNK])
            n = len(chunk)
            await self._wait(lambda: self.reset_reason is not None or self.sent - self.acked + n <= self.window)  # noqa: B023
            if self.reset_reason is not None:
                raise ChannelReset(self.reset_reason)
            self.sent += n
            await self.client.send_stream(self.id, chunk)

    async def write_eof(self) -> None:
        if self.reset_reason is None:
            await self.client.send_stream(self.id, b"")

    async def reset(self, reason: str) -> None:
        if self.reset_reason is None:
            self.reset_reason = reason
            try:
                await self.client.notify("chan.reset", {"channel": self.id, "reason": reason[:200]})
            except (ConnectionClosed, OSError):
                pass
        self.client._channels.pop(self.id, None)

    async def done(self) -> dict:
        """The agent's ``chan.done`` (``ok``, ``sha256``, ``bytes``, ``entries``, ``error``)."""
        await self._wait(lambda: self.done_params is not None or self.reset_reason is not None)
        if self.done_params is None:
            raise ChannelReset(self.reset_reason or "reset")
        return self.done_params

    def close(self) -> None:
        self.client._channels.pop(self.id, None)


def params_of(req: Any) -> dict:
    params = req.get("params") if isinstance(req, dict) else None
    return params if isinstance(params, dict) else {}
