"""A QEMU Machine Protocol client for the qemu backend, to the VM's
``qmp.sock``: ``execute`` runs one command on its own connection (``stop``,
``cont``); ``Monitor`` keeps one open for a sequence that waits for QEMU's
events or hands QEMU a file descriptor (``getfd``): snapshots and restores.

QMP is JSON lines: a greeting, ``qmp_capabilities``, then each command's
``return`` or ``error``; asynchronous ``event`` lines may come in between
and are skipped. Every read is bounded (line length and time): the socket is
QEMU's, but a wedged QEMU must not hang a daemon call.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

from .base import BackendError

MAX_LINE = 1 << 20


async def execute(path: str, command: str, arguments: dict | None = None, timeout: float = 5.0) -> object:
    """Run one QMP ``command`` on a connection of its own; its ``return``
    value, or BackendError with QEMU's words."""
    try:
        async with asyncio.timeout(timeout):
            async with Monitor(path, timeout) as mon:
                return await mon.execute(command, arguments)
    except TimeoutError:
        raise BackendError(f"QMP {command}: no answer from QEMU within {timeout:g} s") from None
    except BackendError as exc:
        if command in str(exc):
            raise
        raise BackendError(f"QMP {command}: {str(exc).removeprefix('QMP: ')}") from None


class Monitor:
    """One QMP connection: ``await execute(...)``, ``await event(name)``,
    ``await send_fd(name, fd)``. Events that arrive while a command waits are
    kept (at most ``MAX_EVENTS``) for a later ``event``."""

    MAX_EVENTS = 256

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.events: list[dict] = []

    async def __aenter__(self) -> Monitor:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                await loop.sock_connect(sock, self.path)
                self.sock = sock
                while "QMP" not in await self._message():
                    pass
        except TimeoutError:
            sock.close()
            raise BackendError(f"QMP: no greeting from QEMU within {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:
            sock.close()
            raise BackendError(f"QMP: {exc}") from None
        await self.execute("qmp_capabilities")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None) -> object:
        """``command``'s ``return``; BackendError with QEMU's words on an error."""
        return await self._send(command, arguments, None, timeout)

    async def send_fd(self, name: str, fd: int) -> None:
        """``getfd``: QEMU keeps a copy of ``fd`` under ``name`` (``fd:name`` in a URI)."""
        await self._send("getfd", {"fdname": name}, fd, None)

    async def event(self, name: str, timeout: float, match: dict | None = None) -> dict:
        """The next event called ``name`` (whose data has ``match``'s items)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and all((ev.get("data") or {}).get(k) == v
                                                   for k, v in (match or {}).items()):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"QMP: no {name} event from QEMU within {timeout:g} s")
            try:
                async with asyncio.timeout(left):
                    self._keep(await self._message())
            except TimeoutError:
                continue
            except (OSError, ValueError) as exc:
                raise BackendError(f"QMP: {exc}") from None

    async def _send(self, command: str, arguments: dict | None, fd: int | None, timeout: float | None) -> object:
        assert self.sock is not None
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                if fd is None:
                    await loop.sock_sendall(self.sock, data)
                else:  # one small message with its fd: the socket takes it at once
                    socket.send_fds(self.sock, [data], [fd])
                while True:
                    reply = await self._message()
                    if "event" in reply:
                        self._keep(reply)
                        continue
                    if "error" in reply:
                        err = reply["error"] if isinstance(reply["error"], dict) else {}
                        raise BackendError(f"QMP {command}: {str(err.get('desc', err))[:300]}")
                    if "return" in reply:
                        return reply["return"]
        except TimeoutError:
            raise BackendError(f"QMP {command}: no answer from QEMU within {timeout or self.timeout:g} s") from None
        except (OSError, ValueError) as exc:
            raise BackendError(f"QMP {command}: {exc}") from None

    def _keep(self, msg: dict) -> None:
        if "event" in msg and len(self.events) < self.MAX_EVENTS:
            self.events.append(msg)

    async def _message(self) -> dict:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ValueError("a QMP line longer than 1 MiB")
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise ConnectionError("QEMU closed its QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("a QMP message that is not an object")
        return msg
