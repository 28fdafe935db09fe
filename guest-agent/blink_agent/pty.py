"""Executions on a pseudo-terminal: ``agent.run`` with ``"tty": true``.

This module owns the terminal side of such an execution: opening the PTY pair at
the requested window size, starting the command with the slave as its controlling
terminal in a session (and process group) of its own, relaying what the master
reads as StreamData frames tagged with the execution id, writing the host's
StreamData to the master as keyboard input, and applying TtyResize (the kernel
then sends SIGWINCH to the terminal's foreground process group).

Bytes are never decoded, split into lines or translated here: whatever line
discipline applies is the guest kernel's, set by the program on the terminal
(``stty raw`` gives a transparent byte pipe both ways).

The end: once the command has exited, output is read until every holder of the
slave has closed it (EIO on the master), or until nothing more came for
:data:`LINGER` seconds (a background job still holding the terminal), but never
longer than :data:`LINGER_MAX`; closing the master then hangs the terminal up.
The result is reported as ``execution_result`` with ``"tty": true``.

Starting the execution, its id, its timeout and reporting its result are
:mod:`blink_agent.runner`'s, which calls down into this module and passes it what it
needs (how to send output, how to spawn a tracked task); this module knows nothing of
the runner.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import signal as _signal
import struct
import termios
from typing import Any, Awaitable, Callable, Coroutine

from .errors import RpcError
from .execution import Execution
from .wire import MsgType

__all__ = [
    "PtyMaster",
    "TtyExecution",
    "spawn_on_terminal",
    "run_terminal",
    "deliver",
    "parse_params",
    "set_winsize",
    "DEFAULT_TERM",
]

#: Sends output: ``send(msg_type, execution_id, data)`` (``AsyncHub.send_stream``).
SendOutput = Callable[[int, int, bytes], Awaitable[Any]]
#: Runs a coroutine as a task its caller tracks (and cancels at shutdown).
SpawnTask = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]

log = logging.getLogger("blink_agent")

READ_CHUNK = 64 * 1024
DEFAULT_ROWS = 24
DEFAULT_COLS = 80
DEFAULT_TERM = "xterm"
#: After the command exits: stop reading once the terminal is quiet this long...
LINGER = 0.2
#: ...and in any case this long after the exit.
LINGER_MAX = 5.0
#: Keyboard input queued while the terminal's input queue is full; beyond, input is dropped.
MAX_PENDING_INPUT = 1 << 20
_MAX_DIM = 0xFFFF


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size (on a master: the kernel signals SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def _take_controlling_terminal() -> None:  # pragma: no cover - runs in the child
    # Runs between fork and exec, after setsid(): fd 0 is the slave.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _dimension(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_DIM:
        raise RpcError("bad_params", f"{key} must be an integer in 1..{_MAX_DIM}")
    return value


def parse_params(params: dict[str, Any]) -> tuple[int, int, str]:
    """``rows``, ``cols`` and ``term`` of an ``agent.run`` with ``tty``."""
    rows = _dimension(params, "rows", DEFAULT_ROWS)
    cols = _dimension(params, "cols", DEFAULT_COLS)
    term = params.get("term")
    if term is None:
        term = DEFAULT_TERM
    if not isinstance(term, str) or not term or "\0" in term:
        raise RpcError("bad_params", "term must be a non-empty string such as 'xterm-256color'")
    return rows, cols, term


class PtyMaster:
    """The master end of one PTY, non-blocking, driven by the running loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.hung_up = False  # the command exited: reads stop at the first quiet spell
        self.input_bytes = 0
        self.dropped_input = 0
        self._pending = bytearray()
        self._wake: asyncio.Future[bool] | None = None

    # -- keyboard input -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue keyboard input; written as the terminal's input queue takes it."""
        if self.closed or not data:
            return
        if self._pending:
            if len(self._pending) + len(data) > MAX_PENDING_INPUT:
                self._drop(len(data))
                return
            self._pending += data
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            log.debug("pty input dropped: %s", exc)
            return
        self.input_bytes += n
        if n < len(data):
            self._pending += data[n:]
            self.loop.add_writer(self.fd, self._write_pending)

    def _drop(self, n: int) -> None:
        if not self.dropped_input:
            log.warning("pty input queue full (%d bytes): dropping keyboard input", MAX_PENDING_INPUT)
        self.dropped_input += n

    def _write_pending(self) -> None:
        try:
            n = os.write(self.fd, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("pty input dropped: %s", exc)
            n = len(self._pending)
        self.input_bytes += n
        del self._pending[:n]
        if not self._pending:
            self.loop.remove_writer(self.fd)

    def resize(self, rows: int, cols: int) -> None:
        if not self.closed:
            set_winsize(self.fd, rows, cols)

    # -- output -------------------------------------------------------------------------

    async def read(self, size: int = READ_CHUNK) -> bytes:
        """The next bytes the program wrote; ``b""`` once the terminal is done."""
        while not self.closed:
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                if not await self._readable():
                    return b""
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # Linux: no process holds the slave any more
                    return b""
                raise
            return data
        return b""

    async def _readable(self) -> bool:
        fut: asyncio.Future[bool] = self.loop.create_future()
        self._wake = fut
        self.loop.add_reader(self.fd, _resolve, fut, True)
        try:
            if self.hung_up:
                try:
                    return await asyncio.wait_for(fut, LINGER)
                except asyncio.TimeoutError:
                    return False
            return await fut
        finally:
            self._wake = None
            if not self.closed:
                self.loop.remove_reader(self.fd)

    def process_exited(self) -> None:
        """From now on a quiet terminal counts as finished."""
        self.hung_up = True
        if self._wake is not None:
            _resolve(self._wake, True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        if self._wake is not None:
            _resolve(self._wake, False)
        os.close(self.fd)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class TtyExecution(Execution):
    """An execution whose stdin, stdout and stderr are one terminal."""

    def __init__(
        self, execution_id: int, argv: list[str], proc: asyncio.subprocess.Process, terminal: PtyMaster
    ) -> None:
        super().__init__(execution_id, argv, proc, True)
        self.terminal = terminal


async def spawn_on_terminal(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    rows: int,
    cols: int,
    term: str,
) -> tuple[asyncio.subprocess.Process, PtyMaster]:
    """Spawn ``argv`` on a new PTY of ``rows`` x ``cols`` with ``TERM=term``, as the
    leader of a new session whose controlling terminal it is; returns the process and
    the master. Raises ``RpcError("spawn_failed")``."""
    master, slave = os.openpty()
    try:
        set_winsize(slave, rows, cols)
        env = dict(env, TERM=term)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_take_controlling_terminal,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            os.close(master)
            raise RpcError("spawn_failed", str(exc)) from None
    finally:
        os.close(slave)  # the child holds it now: EIO on the master means every holder is gone
    return proc, PtyMaster(master)


async def _pump(execution: TtyExecution, send: SendOutput) -> None:
    """Terminal output -> StreamData frames, at the connection's pace."""
    terminal: PtyMaster = execution.terminal
    while True:
        data = await terminal.read(READ_CHUNK)
        if not data:
            return
        execution.stdout_bytes += len(data)
        await send(MsgType.StreamData, execution.id, data)


async def run_terminal(execution: TtyExecution, send: SendOutput, spawn: SpawnTask) -> int:
    """Relay the terminal's output with ``send`` (in a task made by ``spawn``) until
    the command has exited and the terminal is done (see the module docstring), then
    close the terminal; returns the exit code. Cancelled, it kills the command."""
    proc = execution.proc
    terminal: PtyMaster = execution.terminal
    pump = spawn(_pump(execution, send))
    try:
        code = await proc.wait()
        terminal.process_exited()
        try:
            await asyncio.wait_for(asyncio.shield(pump), LINGER_MAX)
        except asyncio.TimeoutError:
            log.info("execution %d: terminal still busy %g s after the exit; hanging up", execution.id, LINGER_MAX)
    except asyncio.CancelledError:
        execution.send_signal(_signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        if not pump.done():
            pump.cancel()
        terminal.close()
    return code


def deliver(execution: Execution | None, msg_type: int, request_id: int, payload: bytes) -> None:
    """Host StreamData / TtyResize for execution ``request_id`` (``execution``, if it
    is still running)."""
    terminal = getattr(execution, "terminal", None)
    if terminal is None:
        log.debug("%s for %d ignored: no terminal execution", MsgType(msg_type).name, request_id)
        return
    if msg_type == MsgType.StreamData:
        terminal.write(payload)
        return
    try:
        size = json.loads(payload.decode("utf-8"))
        rows, cols = size["rows"], size["cols"]
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_DIM for v in (rows, cols)):
            raise ValueError("rows and cols must be integers in 1..65535")
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        log.warning("execution %d: bad TtyResize %r ignored: %s", request_id, payload[:64], exc)
        return
    terminal.resize(rows, cols)
