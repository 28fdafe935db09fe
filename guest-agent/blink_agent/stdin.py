"""Streamed stdin of a pipe execution: ``agent.run`` with ``"stdin_stream": true``.

The host sends the bytes as StreamData frames tagged with the execution id, and an
empty StreamData for EOF. This module owns that input: it writes the bytes to the
command's stdin as the pipe takes them, closes the pipe at EOF, and reports what the
command consumed with ``agent.stdin`` notifications
(``{"execution_id", "consumed", "closed"}``; ``closed``: the command closed its
stdin, nothing more will be taken). The host keeps at most :data:`WINDOW` bytes
sent and not yet reported consumed, so a command that reads slowly slows the host,
never the connection.

What the agent holds is bounded: past :data:`MAX_PENDING` bytes waiting for the
pipe (a host that ignores the window), input is dropped, counted and logged once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Awaitable, Callable

from .errors import ConnectionLost

__all__ = ["StdinFeed", "WINDOW", "MAX_PENDING"]

log = logging.getLogger("blink_agent")

#: Bytes the host may have in flight (sent, not yet reported consumed); agent.run's answer says it.
WINDOW = 256 * 1024
#: Bytes held for a pipe that does not take them; beyond, input is dropped.
MAX_PENDING = 1 << 20

Notify = Callable[[str, Any], Awaitable[Any]]


class StdinFeed:
    """The stdin pipe of one execution, fed from the host's StreamData."""

    def __init__(self, execution_id: int, pipe: asyncio.StreamWriter, notify: Notify) -> None:
        self.id = execution_id
        self.pipe = pipe
        self.notify = notify
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.consumed = 0
        self.reported = 0
        self.dropped = 0
        self.eof = False
        self.closed = False  # the command closed its stdin (or the execution ended)
        self._wake = asyncio.Event()

    def put(self, data: bytes) -> None:
        """Host input: bytes for the pipe, or ``b""`` for EOF."""
        if self.closed or self.eof:
            return
        if not data:
            self.eof = True
            self._wake.set()
            return
        if self.pending_bytes + len(data) > MAX_PENDING:
            if not self.dropped:
                log.warning("execution %d: stdin input past %d pending bytes dropped (the host ignores the "
                            "window)", self.id, MAX_PENDING)
            self.dropped += len(data)
            return
        self.pending.append(bytes(data))
        self.pending_bytes += len(data)
        self._wake.set()

    async def run(self) -> None:
        """Write what comes until EOF (then close the pipe) or until the command
        closes its stdin; cancelled when the execution ends."""
        try:
            while True:
                while not self.pending and not self.eof:
                    self._wake.clear()
                    await self._wake.wait()
                if not self.pending:
                    break  # EOF and everything written
                data = self.pending.popleft()
                self.pending_bytes -= len(data)
                self.pipe.write(data)
                await self.pipe.drain()
                self.consumed += len(data)
                if not self.pending or self.consumed - self.reported >= WINDOW // 4:
                    await self._report()
        except (BrokenPipeError, ConnectionResetError):
            log.info("execution %d: stdin closed by the command after %d bytes", self.id, self.consumed)
            self.closed = True
            self.pending.clear()
            self.pending_bytes = 0
            await self._report()
        finally:
            self.closed = True
            try:
                self.pipe.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def _report(self) -> None:
        self.reported = self.consumed
        try:
            await self.notify("agent.stdin", {"execution_id": self.id, "consumed": self.consumed,
                                              "closed": self.closed})
        except ConnectionLost:
            pass  # the host reconnects to a fresh window; nothing to keep
