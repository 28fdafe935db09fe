"""A QEMU Machine Protocol client for the qemu backend: one connection per
command (``stop``, ``cont``, ``query-status``), to the VM's ``qmp.sock``.

QMP is JSON lines: a greeting, ``qmp_capabilities``, then each command's
``return`` or ``error``; asynchronous ``event`` lines may come in between
and are skipped. Every read is bounded (line length and time): the socket is
QEMU's, but a wedged QEMU must not hang a daemon call.
"""

from __future__ import annotations

import asyncio
import json

from .base import BackendError

MAX_LINE = 1 << 20


async def execute(path: str, command: str, arguments: dict | None = None, timeout: float = 5.0) -> object:
    """Run one QMP ``command``; its ``return`` value, or BackendError with QEMU's words."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
            try:
                await _reply(reader, greeting=True)
                for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                    msg: dict = {"execute": cmd}
                    if args:
                        msg["arguments"] = args
                    writer.write(json.dumps(msg).encode() + b"\n")
                    await writer.drain()
                    result = await _reply(reader)
                return result
            finally:
                writer.close()
    except TimeoutError:
        raise BackendError(f"QMP {command}: no answer from QEMU within {timeout:g} s") from None
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise BackendError(f"QMP {command}: {exc}") from None


async def _reply(reader: asyncio.StreamReader, greeting: bool = False) -> object:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("QEMU closed its QMP socket")
        msg = json.loads(line)
        if not isinstance(msg, dict) or "event" in msg:
            continue
        if greeting:
            if "QMP" in msg:
                return msg
            continue
        if "error" in msg:
            err = msg["error"] if isinstance(msg["error"], dict) else {}
            raise ValueError(f"{err.get('class', 'error')}: {str(err.get('desc', ''))[:300]}")
        if "return" in msg:
            return msg["return"]
