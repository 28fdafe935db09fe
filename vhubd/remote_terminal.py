"""A terminal execution (``agent.run`` with ``"tty": true``) seen from a
host client: its output as an async iterator of raw chunks, keyboard input,
window size, exit status. ``vhubd.client`` makes these (``open_terminal``,
``Client.open_terminal``, ``Client.watch_terminal``) and feeds them."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from .errors import ConnectionClosed, InvalidState

if TYPE_CHECKING:
    from .client import Client


class Terminal:
    """One terminal execution seen from a client: output as an async iterator of
    raw byte chunks, keyboard input, window size, exit status.

    Output is buffered up to ``limit`` bytes; past that the client stops reading
    from the daemon (lossless flow: the program waits), so read what you open.
    """

    def __init__(self, client: Client, execution_id: int, pid: int | None, *, owns_client: bool = False,
                 limit: int = 1 << 20):
        self.client = client
        self.execution_id = execution_id
        self.pid = pid
        self.result: dict | None = None
        self._owns = owns_client
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._error: BaseException | None = None
        self._ended = False
        self._closed = False
        self._read_once = False

    # -- fed by the client's read loop --
    def _feed(self, data: bytes) -> None:
        if self._closed or self._ended:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self._room.clear()
        self._changed.set()

    async def _wait_room(self) -> None:
        if not self._room.is_set():
            await self._room.wait()

    def _finish(self, result: dict) -> None:
        if not self._ended:
            self.result = result
            self._ended = True
            self._changed.set()
        self.client._terminals.pop(self.execution_id, None)

    def _fail(self, exc: BaseException) -> None:
        if not self._ended:
            self._error = exc
            self._ended = True
            self._changed.set()
            self._room.set()
        self.client._terminals.pop(self.execution_id, None)

    # -- public API --
    async def write(self, data: bytes) -> None:
        """Send keyboard input (raw bytes: ``b"\\x03"`` is Ctrl-C)."""
        if self._closed:
            raise InvalidState("terminal closed")
        view = memoryview(data)
        for i in range(0, len(view), 65536):
            await self.client.send_stream(self.execution_id, bytes(view[i:i + 65536]))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size (the program gets SIGWINCH)."""
        await self.client.resize(self.execution_id, rows, cols)

    async def read(self) -> bytes:
        """The next output chunk; ``b""`` once the program ended and all was read.
        Raises ConnectionClosed if the daemon or the session went away first."""
        self._read_once = True
        while not self._chunks:
            if self._ended or self._closed:
                if self._error is not None:
                    raise self._error
                return b""
            self._changed.clear()
            await self._changed.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= self._limit:
            self._room.set()
        return data

    def __aiter__(self) -> Terminal:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the end; the exit status as ``subprocess`` reports it
        (``-N``: killed by signal N). On a terminal whose output was never read,
        the output is discarded meanwhile (so it cannot stall the end)."""
        async def ended() -> None:
            while not self._ended:
                if not self._read_once:
                    self._chunks.clear()
                    self._size = 0
                    self._room.set()
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(ended(), timeout)
        if self.result is None:
            raise self._error or ConnectionClosed("terminal closed")
        return int(self.result.get("exit_code", -1))

    async def kill(self, signal: int | str = "SIGTERM") -> None:
        """Signal the program's process group."""
        await self.client.call("agent.kill", {"execution_id": self.execution_id, "signal": signal})

    async def take_over(self) -> None:
        """Make this client the terminal's writer (the previous one's input is dropped)."""
        await self.client.call("vhub.takeover", {"execution_id": self.execution_id})

    async def close(self) -> None:
        """Stop following the terminal (the program keeps running); closes the
        client too when :func:`open_terminal` made it."""
        self._closed = True
        self._room.set()
        self._changed.set()
        self.client._terminals.pop(self.execution_id, None)
        if self._owns:
            await self.client.close()

    async def __aenter__(self) -> Terminal:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
