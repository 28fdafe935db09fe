"""Copies over channels: ``agent.tar`` and ``agent.untar`` (``blink cp``).

``agent.tar`` ``{"channel", "window", "path"}`` streams ``path`` (a file, a
link or a tree) to the host as a tar archive; its answer says ``name`` (the
top-level entry) and ``size`` (bytes of regular files, for a progress bar).
``agent.untar`` ``{"channel", "window", "dest", "top"?}`` extracts the tar the
host streams under ``dest``; with ``top`` (the archive's top-level name) and a
``dest`` that is not an existing directory, that entry lands as ``dest`` (like
``cp -r``). Both end with ``chan.done`` ``{"ok", "sha256", "bytes",
"entries", "error"?}`` (the sha256 of the tar stream as this end saw it), then
the agent's EOF; a refused or failed copy is ``ok: false`` with the reason
(naming the member) and a ``chan.reset``.

``tarfile`` is synchronous: the archive is made or extracted in a worker
thread, whose file object hands 64 KiB pieces to and from the channel on the
event loop, waiting on the window: nothing is held whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any

from . import tarcopy
from .channels import CHUNK, WINDOW, Channel, ChannelManager
from .errors import ChannelReset, RpcError, UnsafeArchive

__all__ = ["CopyMethods"]

#: Bytes handed between the worker thread and the event loop at a time (each hand-over costs a wake-up).
BATCH = 4 * CHUNK

log = logging.getLogger("blink_agent")


class CopyMethods:
    """``agent.tar`` / ``agent.untar`` on the channels of ``channels``."""

    def __init__(self, channels: ChannelManager) -> None:
        self.channels = channels

    def register(self) -> None:
        self.channels.hub.serve("agent.tar", self.rpc_tar)
        self.channels.hub.serve("agent.untar", self.rpc_untar)

    def _path(self, params: Any, key: str) -> str:
        path = params.get(key) if isinstance(params, dict) else None
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise RpcError("bad_params", f"{key} must be an absolute path")
        return path

    async def rpc_tar(self, params: Any) -> dict[str, Any]:
        path = self._path(params, "path")
        try:
            os.lstat(path)
            size = tarcopy.tree_size(path)
        except OSError as exc:
            raise RpcError("not_found", f"{path}: {exc.strerror}") from None
        ch = self.channels._open(params, "agent.tar")
        name = os.path.basename(os.path.normpath(path)) or "."
        self.channels.spawn(self._tar(ch, path, name))
        return {"channel": ch.id, "window": WINDOW, "size": size, "name": name}

    async def _tar(self, ch: Channel, path: str, name: str) -> None:
        loop = asyncio.get_running_loop()
        out = _ToChannel(ch, loop)
        try:
            entries = await loop.run_in_executor(None, _write_tar, path, out, name)
        except ChannelReset:
            self.channels.forget(ch)
            return
        except (OSError, tarfile_error()) as exc:
            await ch.notify("chan.done", {"ok": False, "error": f"{path}: {exc}"[:300]})
            await ch.reset("the archive could not be made")
            return
        await ch.notify("chan.done", {"ok": True, "sha256": out.sha.hexdigest(), "bytes": out.total,
                                      "entries": entries})
        try:
            await ch.send_eof()
        except ChannelReset:
            pass
        ch.eof_in = True  # nothing comes the other way
        self.channels.maybe_done(ch)

    async def rpc_untar(self, params: Any) -> dict[str, Any]:
        dest = self._path(params, "dest")
        top = params.get("top")
        if top is not None and (not isinstance(top, str) or "/" in top or top in ("", ".", "..")):
            raise RpcError("bad_params", "top must be a plain file name")
        rename = None
        if top is not None and not os.path.isdir(dest):
            # like cp -r: DIR copied to a dest that does not exist becomes dest
            rename = (top, os.path.basename(os.path.normpath(dest)))
            dest = os.path.dirname(os.path.normpath(dest)) or "/"
            if not os.path.isdir(dest):
                raise RpcError("not_found", f"{dest}: No such directory")
        ch = self.channels._open(params, "agent.untar")
        self.channels.spawn(self._untar(ch, dest, rename))
        return {"channel": ch.id, "window": WINDOW}

    async def _untar(self, ch: Channel, dest: str, rename: Any) -> None:
        loop = asyncio.get_running_loop()
        src = _FromChannel(ch, loop)
        try:
            entries = await loop.run_in_executor(None, _extract, dest, rename, src)
            await loop.run_in_executor(None, src.drain)
        except ChannelReset:
            self.channels.forget(ch)
            return
        except (OSError, UnsafeArchive, tarfile_error()) as exc:
            text = str(exc) if isinstance(exc, UnsafeArchive) else f"{type(exc).__name__}: {exc}"
            log.warning("channel %d: extracting under %s failed: %s", ch.id, dest, text[:300])
            await ch.notify("chan.done", {"ok": False, "error": text[:300], "bytes": src.total})
            await ch.reset("the archive was refused")
            return
        await ch.notify("chan.done", {"ok": True, "sha256": src.sha.hexdigest(), "bytes": src.total,
                                      "entries": entries})
        try:
            await ch.send_eof()
        except ChannelReset:
            pass
        self.channels.maybe_done(ch)


def tarfile_error() -> type:
    import tarfile

    return tarfile.TarError


def _write_tar(path: str, out: _ToChannel, name: str) -> int:
    entries = tarcopy.write_tar(path, out, name)
    out.flush()
    return entries


def _extract(dest: str, rename: Any, src: _FromChannel) -> int:
    return tarcopy.Extractor(dest, rename, error=UnsafeArchive).extract(src)


class _ToChannel:
    """A write-only file object (for ``tarfile`` in a worker thread) that sends to a channel."""

    def __init__(self, ch: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        self.loop = loop
        self.buf = bytearray()
        self.sha = hashlib.sha256()
        self.total = 0

    def write(self, data: Any) -> int:
        self.buf += data
        if len(self.buf) >= BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self.buf:
            return
        data, self.buf = bytes(self.buf), bytearray()
        self.sha.update(data)
        self.total += len(data)
        asyncio.run_coroutine_threadsafe(self.ch.send(data), self.loop).result()


class _FromChannel:
    """A read-only file object (for ``tarfile`` in a worker thread) fed by a channel."""

    def __init__(self, ch: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        self.loop = loop
        self.buf = b""
        self.eof = False
        self.sha = hashlib.sha256()
        self.total = 0

    def _fill(self) -> None:
        async def take() -> bytes:
            data = await self.ch.recv()
            if data:
                await self.ch.took(len(data))
            return data

        data = asyncio.run_coroutine_threadsafe(take(), self.loop).result()
        if not data:
            self.eof = True
        self.sha.update(data)
        self.total += len(data)
        self.buf += data

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes: what has come (a short read), waiting only for the first."""
        while not self.eof and (n < 0 or not self.buf):
            self._fill()
        if n < 0:
            n = len(self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def drain(self) -> None:
        """Read to the host's EOF (what follows the archive counts in the checksum)."""
        while not self.eof:
            self.buf = b""
            self._fill()
