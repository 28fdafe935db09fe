"""``blink run`` on pipes, and ``blink attach`` of a pipe execution.

This module owns a pipe execution seen from the host: the command's stdout and
stderr to ours, live and byte for byte; our stdin to its stdin as a stream
(``agent.run`` with ``"stdin_stream": true``: StreamData tagged with the
execution id, an empty one for EOF, never more than the agent's window
unacknowledged, see docs/protocol.md); Ctrl-C as ``agent.kill`` SIGINT; its exit
code as ours (128+N for signal N; 127 / 126 like a shell when the program is not
found / cannot be executed).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import stat
import sys
import threading

from .client import Client, Event, Output
from .errors import ConnectionClosed, RemoteError

EXIT_FAIL = 1
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
READ_CHUNK = 64 * 1024
QUEUED = 4  # chunks read from our stdin and not yet sent


def spawn_failure(message: str, program: str) -> tuple[int, str]:
    """The exit code and one line for an agent's ``spawn_failed``, as a shell says it."""
    m = re.match(r"\[Errno (\d+)\]", message)
    code = int(m.group(1)) if m else None
    about_program = repr(program) in message or f"'{program}'" in message
    if code == errno.ENOENT and about_program:
        return EXIT_NOT_FOUND, f"{program}: command not found"
    if code in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM) and about_program:
        reason = os.strerror(code).lower() if code is not None else "cannot execute"
        return EXIT_CANNOT_EXECUTE, f"{program}: cannot execute: {reason}"
    return EXIT_FAIL, f"cannot start {program}: {message}"


def exit_status(code: object) -> int:
    """An execution_result's exit_code as a process exit status."""
    if not isinstance(code, int) or isinstance(code, bool):
        return EXIT_FAIL
    return code if code >= 0 else 128 - code


def stdin_is_null(fd: int = 0) -> bool:
    try:
        st, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return True  # closed
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


class StdinPump:
    """Our stdin to execution ``eid``'s stdin. A daemon thread reads it (files,
    pipes and terminals alike; it never blocks the loop, nor our exit while the
    command is done but stdin is not); at most ``window`` bytes are sent and not
    yet reported consumed by the agent."""

    def __init__(self, client: Client, eid: int, window: int, fd: int = 0):
        self.client = client
        self.eid = eid
        self.window = max(READ_CHUNK, window)
        self.fd = fd
        self.sent = 0
        self.consumed = 0
        self.closed = False  # the command closed its stdin: stop reading ours
        self._room = asyncio.Event()
        # The thread hands chunks to the loop with call_soon_threadsafe (no
        # coroutine is made off the loop: one the loop never ran would warn at
        # exit); at most QUEUED of them wait, counted by a thread semaphore.
        self._queue: asyncio.Queue = asyncio.Queue()
        self._slots = threading.BoundedSemaphore(QUEUED)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), name="blink-stdin", daemon=True).start()
        self._task = asyncio.ensure_future(self._send())

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except InterruptedError:
                continue
            except OSError:
                data = b""  # a closed or unreadable stdin is an empty one
            while not self._slots.acquire(timeout=0.5):
                if self.closed or loop.is_closed():
                    return
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, data)
            except RuntimeError:  # the loop is closed: we are exiting
                return
            if not data or self.closed:
                return

    async def _send(self) -> None:
        try:
            while not self.closed:
                data = await self._queue.get()
                self._slots.release()
                if not data:
                    await self.client.send_stream(self.eid, b"")  # EOF
                    return
                while self.sent - self.consumed + len(data) > self.window and not self.closed:
                    self._room.clear()
                    await self._room.wait()
                if self.closed:
                    return
                await self.client.send_stream(self.eid, data)
                self.sent += len(data)
        except (ConnectionClosed, OSError):
            return

    def acked(self, params: dict) -> None:
        consumed = params.get("consumed")
        if isinstance(consumed, int) and not isinstance(consumed, bool) and consumed > self.consumed:
            self.consumed = min(consumed, self.sent)
        if params.get("closed") is True:
            self.closed = True
        self._room.set()

    def stop(self) -> None:
        self.closed = True
        self._room.set()
        if self._task is not None:
            self._task.cancel()


async def relay_execution(client: Client, eid: int, *, pump: StdinPump | None = None, early: list | None = None,
                          name: str = "blink run", detach_on_interrupt: bool = False) -> int:
    """Write execution ``eid``'s output to ours until its ``execution_result``;
    returns its exit status. SIGINT/SIGTERM are sent to it as ``agent.kill``
    SIGINT (the result still decides our exit), or with ``detach_on_interrupt``
    (``blink attach``) end the relay and leave it running. ``early``: items
    that came before the id was known."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
        installed.append(sig)
    try:
        for item in early or ():
            code = _handle(item, eid, out, err, pump, name)
            if code is not None:
                return code
        while True:
            get = asyncio.ensure_future(client.next())
            intr = asyncio.ensure_future(interrupted.wait())
            done, _ = await asyncio.wait({get, intr}, return_when=asyncio.FIRST_COMPLETED)
            if intr in done:
                interrupted.clear()
                if detach_on_interrupt:
                    get.cancel()
                    sys.stderr.write(f"{name}: detached; execution {eid} keeps running\n")
                    return 0
                try:
                    await client.call("agent.kill", {"execution_id": eid, "signal": 2}, timeout=5)
                except (RemoteError, ConnectionClosed, TimeoutError):
                    pass
                if get not in done:
                    get.cancel()
                    continue
            else:
                intr.cancel()
            item = get.result()
            if item is None:
                reason = client.closed_reason.message if client.closed_reason else "connection closed"
                sys.stderr.write(f"{name}: lost the daemon before the command finished: {reason}\n")
                return EXIT_FAIL
            code = _handle(item, eid, out, err, pump, name)
            if code is not None:
                return code
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if pump is not None:
            pump.stop()


def _handle(item, eid: int, out, err, pump: StdinPump | None, name: str) -> int | None:
    if type(item) is Output:
        if item.request_id == eid and item.kind in ("stdout", "stderr"):
            stream = err if item.kind == "stderr" else out
            stream.write(item.data)
            stream.flush()
        return None
    assert type(item) is Event
    ev = item.data
    kind = ev.get("type")
    if kind == "execution_result" and ev.get("execution_id") == eid:
        return exit_status(ev.get("exit_code"))
    if kind == "notification" and ev.get("method") == "agent.stdin" and pump is not None:
        params = ev.get("params")
        if isinstance(params, dict) and params.get("execution_id") == eid:
            pump.acked(params)
        return None
    if kind == "state" and ev.get("state") in ("agent_lost", "stopped", "failed"):
        sys.stderr.write(f"{name}: session {ev.get('session')} is {ev.get('state')}: {ev.get('reason') or ''}\n")
        return EXIT_FAIL
    return None


async def run_pipes(client: Client, params: dict, *, forward_stdin: bool, timeout: float | None) -> int:
    """``blink run`` without a terminal: start ``params`` (agent.run) on the
    session of ``client`` and relay it."""
    argv = params["argv"]
    if forward_stdin:
        params = {**params, "stdin_stream": True}
    call = asyncio.ensure_future(client.call("agent.run", params, timeout=timeout or 60.0))
    early: list = []
    while not call.done():  # output may come before the answer: keep it in order
        get = asyncio.ensure_future(client.next())
        done, _ = await asyncio.wait({get, call}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            item = get.result()
            if item is None:
                break
            early.append(item)
        else:
            get.cancel()
    try:
        res = await call
    except RemoteError as exc:
        if exc.code != "spawn_failed":
            raise
        code, line = spawn_failure(exc.message, argv[0])
        sys.stderr.write(f"blink run: {line}\n")
        return code
    eid = res["execution_id"] if isinstance(res, dict) else None
    if type(eid) is not int:
        sys.stderr.write(f"blink run: the agent answered agent.run with {str(res)[:200]}\n")
        return EXIT_FAIL
    pump = None
    if forward_stdin:
        window = res.get("stdin_window")
        if isinstance(window, int) and window > 0:
            pump = StdinPump(client, eid, window)
            pump.start()
        elif not stdin_is_null() and not sys.stdin.isatty():
            sys.stderr.write("blink run: this session's agent does not take streamed stdin; stdin is not "
                             "forwarded\n")
    return await relay_execution(client, eid, pump=pump, early=early)
