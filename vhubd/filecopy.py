"""``blink cp``: files in and out of a session as tar streams over a channel.

    blink cp PATH SESSION:/dest       # PATH (a file or a tree) into the guest
    blink cp SESSION:/path DEST       # and out
    blink cp - SESSION:/dir  <  x.tar # a tar from stdin, extracted under /dir
    blink cp SESSION:/path -  >  x.tar

Like ``cp -r``: a destination that is an existing directory receives the
source under its own name; otherwise the source lands as the destination. The
archive is made and extracted as it streams (``tarcopy``, the same file as
the agent's), through a worker thread each side: nothing is held whole. Its
sha256 is computed by both ends and compared. On a terminal, stderr shows a
progress line.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import time
from typing import IO, Any

from .channel import ChannelReset, ClientChannel
from .errors import RemoteError, UnsafeArchive
from .tarcopy import Extractor, tree_size, write_tar

REMOTE = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,62}):(.*)$")
CHUNK = 128 * 1024
BATCH = 4 * CHUNK  # bytes handed from the worker thread to the event loop at a time
EXIT_USAGE = 2  # commands.EXIT_USAGE (that module loads this one)


class CopyFailed(RemoteError):
    def __init__(self, message: str):
        super().__init__("copy_failed", message)


def split_remote(arg: str) -> tuple[str, str] | None:
    """``SESSION:/path`` -> (session, path); a local path -> None."""
    if arg.startswith(("/", "./", "../")) or arg == "-":
        return None
    m = REMOTE.match(arg)
    return (m.group(1), m.group(2)) if m else None


class Progress:
    """One line on stderr, redrawn at most 10 times a second, only on a terminal."""

    def __init__(self, label: str, total: int | None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = label if len(label) <= 60 else label[:28] + "..." + label[-29:]
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.shown = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.shown >= 0.1:
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        mib = self.done / (1 << 20)
        rate = mib / max(now - self.start, 1e-6)
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            width = 24
            filled = width * pct // 100
            bar = "#" * filled + "-" * (width - filled)
            text = f"{self.label} [{bar}] {pct:3d}% {mib:.1f}/{self.total / (1 << 20):.1f} MiB {rate:.1f} MiB/s"
        else:
            text = f"{self.label} {mib:.1f} MiB {rate:.1f} MiB/s"
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _NoTerminal:
    """Where a quiet copy's progress goes: nowhere."""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _Sender:
    """A file object for ``tarfile`` in a worker thread: writes go to the channel."""

    def __init__(self, ch: ClientChannel, loop: asyncio.AbstractEventLoop, progress: Progress):
        self.ch = ch
        self.loop = loop
        self.progress = progress
        self.buf = bytearray()
        self.sha = hashlib.sha256()
        self.total = 0

    def write(self, data: Any) -> int:
        self.buf += data
        if len(self.buf) >= BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self.sha.update(data)
            self.total += len(data)
            asyncio.run_coroutine_threadsafe(self.ch.write(data), self.loop).result()
            self.loop.call_soon_threadsafe(self.progress.add, len(data))


class _Receiver:
    """A file object for ``tarfile`` in a worker thread: reads come from the channel."""

    def __init__(self, ch: ClientChannel, loop: asyncio.AbstractEventLoop, progress: Progress):
        self.ch = ch
        self.loop = loop
        self.progress = progress
        self.buf = b""
        self.eof = False
        self.sha = hashlib.sha256()
        self.total = 0

    def _fill(self) -> None:
        data = asyncio.run_coroutine_threadsafe(self.ch.read(), self.loop).result()
        if not data:
            self.eof = True
            return
        self.sha.update(data)
        self.total += len(data)
        self.buf += data
        self.loop.call_soon_threadsafe(self.progress.add, len(data))

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes: what has come (a short read), waiting only for the first."""
        while not self.eof and (n < 0 or not self.buf):
            self._fill()
        if n < 0:
            n = len(self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def drain(self, out: IO[bytes] | None = None) -> None:
        while True:
            if out is not None and self.buf:
                out.write(self.buf)
            self.buf = b""
            if self.eof:
                return
            self._fill()


def _check(done: dict, sha: str, nbytes: int, what: str) -> dict:
    if not done.get("ok"):
        raise CopyFailed(str(done.get("error") or "the agent failed the copy"))
    if done.get("sha256") != sha or done.get("bytes") != nbytes:
        raise CopyFailed(f"{what}: the checksums differ (sent {nbytes} bytes sha256 {sha[:16]}..., the other end "
                         f"{done.get('bytes')} bytes sha256 {str(done.get('sha256'))[:16]}...)")
    return done


async def upload(client: Any, session: str, src: str, dest: str, stdin: IO[bytes] | None = None,
                 quiet: bool = False) -> dict:
    """Copy local ``src`` (or a tar on ``stdin`` when ``src`` is "-") to ``session:dest``
    (``quiet``: no progress line, e.g. inside the daemon)."""
    loop = asyncio.get_running_loop()
    if src == "-":
        top, total = None, None
    else:
        try:
            os.lstat(src)
        except OSError as exc:
            raise CopyFailed(f"{src}: {exc.strerror}") from None
        top = os.path.basename(os.path.normpath(src)) or "."
        total = await loop.run_in_executor(None, tree_size, src)
    ch = await client.open_channel(session, "agent.untar", {"dest": dest, "top": top})
    progress = Progress(f"{src} -> {session}:{dest}", total, stream=_NoTerminal() if quiet else None)
    out = _Sender(ch, loop, progress)
    try:
        try:
            if src == "-":
                await loop.run_in_executor(None, _pipe, stdin or sys.stdin.buffer, out)
            else:
                await loop.run_in_executor(None, _tar_to, src, out)
            await ch.write_eof()
        except ChannelReset:
            pass  # the agent refused: its chan.done says why
        except OSError as exc:
            await ch.reset("the sender failed")
            raise CopyFailed(f"{src}: {exc}") from None
        done = await ch.done()
        return {**_check(done, out.sha.hexdigest(), out.total, "upload"), "sent": out.total}
    finally:
        progress.finish()
        ch.close()


def _tar_to(src: str, out: _Sender) -> None:
    write_tar(src, out)  # type: ignore[arg-type]
    out.flush()


def _pipe(src: IO[bytes], out: _Sender) -> None:
    read = getattr(src, "read1", src.read)  # what the pipe has now, not a whole chunk
    while True:
        data = read(CHUNK)
        if not data:
            break
        out.write(data)
        out.flush()


async def download(client: Any, session: str, path: str, dest: str, stdout: IO[bytes] | None = None) -> dict:
    """Copy ``session:path`` to local ``dest`` (or a tar to ``stdout`` when ``dest`` is "-")."""
    loop = asyncio.get_running_loop()
    rename = None
    if dest != "-":
        if os.path.isdir(dest):
            where = dest
        else:
            where = os.path.dirname(os.path.normpath(dest)) or "."
            if not os.path.isdir(where):
                raise CopyFailed(f"{where}: No such directory")
    ch = await client.open_channel(session, "agent.tar", {"path": path})
    if dest != "-" and not os.path.isdir(dest):
        rename = (str(ch.opened.get("name")), os.path.basename(os.path.normpath(dest)))
    size = ch.opened.get("size")
    progress = Progress(f"{session}:{path} -> {dest}", size if type(size) is int else None)
    src = _Receiver(ch, loop, progress)
    try:
        await ch.write_eof()  # nothing goes the other way
        try:
            if dest == "-":
                await loop.run_in_executor(None, src.drain, stdout or sys.stdout.buffer)
            else:
                await loop.run_in_executor(None, _extract, where, rename, src)
        except UnsafeArchive as exc:
            await ch.reset("the archive was refused")
            raise CopyFailed(str(exc)) from None
        except ChannelReset:
            pass
        except Exception as exc:  # tarfile.TarError, OSError: said, never a traceback
            await ch.reset("extracting failed")
            raise CopyFailed(f"{type(exc).__name__}: {exc}") from None
        done = await ch.done()
        return {**_check(done, src.sha.hexdigest(), src.total, "download"), "received": src.total}
    finally:
        progress.finish()
        ch.close()


def _extract(where: str, rename: Any, src: _Receiver) -> None:
    Extractor(where, rename, error=UnsafeArchive).extract(src)  # type: ignore[arg-type]
    src.drain()


async def cmd_cp(args) -> int:
    from .client import Client

    a, b = split_remote(args.src), split_remote(args.dest)
    if (a is None) == (b is None):
        sys.stderr.write("blink cp: error: exactly one of SRC and DEST is SESSION:/path\n")
        return EXIT_USAGE
    session, path = a if a is not None else b  # type: ignore[misc]
    if not path.startswith("/"):
        sys.stderr.write(f"blink cp: error: the path in the session must be absolute: {session}:{path}\n")
        return EXIT_USAGE
    async with await Client.connect(args.control, timeout=args.timeout or 10.0) as c:
        try:
            if b is not None:
                res = await upload(c, session, args.src, path)
            else:
                res = await download(c, session, path, args.dest)
        except RemoteError as exc:
            if exc.code == "no_handler":  # Blink's agent, or ours from before copies
                raise CopyFailed(f"the agent of session {session!r} does not do copies (agent.tar/agent.untar): "
                                 "update the guest image") from None
            raise
    if args.json:
        import json

        sys.stdout.write(json.dumps(res, sort_keys=True) + "\n")
    return 0
