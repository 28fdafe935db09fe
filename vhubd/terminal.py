"""The local end of ``blink run -t``: a person's terminal relayed to a terminal
execution (``agent.run`` with ``tty``) in a session.

This module owns the local terminal while the remote program runs: raw mode, and
its restoration on every way out (the program's end, the detach escape, a lost
daemon, a signal, an exception); keystrokes as StreamData (Ctrl-C is just a byte:
it reaches the remote program, not ``blink``); the window size at start and on
every SIGWINCH; the output, byte for byte, to stdout; and the exit status.

Detach: the escape character (default ``Ctrl-]``, ``--escape none`` disables it)
restores the terminal and leaves the remote program running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import termios
import tty

from .client import Client, Terminal
from .errors import ConnectionClosed, RemoteError

DEFAULT_ESCAPE = "^]"
EXIT_FAIL = 1
EXIT_USAGE = 2
_HANGUP_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def parse_escape(text: str) -> int | None:
    """``^]`` / ``^X`` (a control character), one character, or ``none``."""
    if text.lower() == "none":
        return None
    if len(text) == 2 and text[0] == "^" and 0x3F <= ord(text[1].upper()) <= 0x5F:
        return ord(text[1].upper()) ^ 0x40
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError(f"escape must be ^X, one ASCII character or none, not {text!r}")


def escape_name(byte: int | None) -> str:
    if byte is None:
        return "none"
    return "^" + chr(byte ^ 0x40) if byte < 0x20 or byte == 0x7F else chr(byte)


def window_size(*fds: int) -> tuple[int, int]:
    """(rows, cols) of the first of ``fds`` that is a terminal; else $LINES x
    $COLUMNS, else 24x80."""
    for fd in fds:
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    try:
        return int(os.environ.get("LINES", "24")), int(os.environ.get("COLUMNS", "80"))
    except ValueError:
        return 24, 80


class RawMode:
    """The local terminal in raw mode; :meth:`restore` puts back exactly the
    settings found (idempotent, safe to call from any exit path)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.saved: list | None = None

    def enter(self) -> None:
        if self.saved is None:
            self.saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass  # the terminal is gone (hangup): nothing left to restore
            self.saved = None


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            loop.add_writer(fd, _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            continue
        view = view[n:]


async def run_tty(control: str | None, session: str, argv: list[str], *, env: dict | None = None,
                  cwd: str | None = None, escape: int | None = 0x1D, timeout: float | None = None) -> int:
    """``blink run -t``: returns the exit status for ``sys.exit`` (128+N for signal N)."""
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    rows, cols = window_size(fd_out, fd_in)
    client = await Client.connect(control, session=session, subscribe=["stream", "events"], boot=True,
                                  timeout=timeout or 10.0)
    try:
        term = await client.open_terminal(argv, rows, cols, term=os.environ.get("TERM") or None, env=env,
                                          cwd=cwd, timeout=timeout or 60.0)
        return await relay_terminal(client, term, session, escape)
    finally:
        await client.close()


async def relay_terminal(client: Client, term: Terminal, session: str, escape: int | None,
                         name: str = "blink run") -> int:
    """This terminal <-> ``term`` until the program ends, the detach key, a
    signal or a lost daemon; the exit status (``blink run -t``, ``blink attach``)."""
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    raw = RawMode(fd_in) if os.isatty(fd_in) else None
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    reading = False
    try:
        if raw is not None:
            raw.enter()
        outcome: asyncio.Future = loop.create_future()
        inputs: asyncio.Queue = asyncio.Queue()

        def finish(kind: str, value=None) -> None:
            if not outcome.done():
                outcome.set_result((kind, value))

        sent_size: list = [None]  # the window size last queued

        def on_stdin() -> None:
            nonlocal reading
            try:
                data = os.read(fd_in, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data and window_size(fd_out, fd_in) != sent_size[0]:
                # resized, and the SIGWINCH handler has not run yet (asyncio runs it on the
                # next turn of the loop): the new size goes before what was typed after it
                on_winch()
            if not data:  # stdin closed: stop reading, the program runs on
                loop.remove_reader(fd_in)
                reading = False
                return
            if escape is not None and escape in data:
                before = data[:data.index(escape)]
                if before:
                    inputs.put_nowait(before)
                inputs.put_nowait(None)  # detach once what came before is sent
                loop.remove_reader(fd_in)
                reading = False
                return
            inputs.put_nowait(data)

        def on_winch() -> None:
            sent_size[0] = window_size(fd_out, fd_in)
            inputs.put_nowait(sent_size[0])

        def on_cont() -> None:  # stopped and continued: a shell may have reset the terminal
            if raw is not None and raw.saved is not None:
                raw.enter()
            on_winch()

        async def send_inputs() -> None:
            while True:
                item = await inputs.get()
                if item is None:
                    finish("detach")
                    return
                if isinstance(item, tuple):
                    await term.resize(*item)
                else:
                    await term.write(item)

        async def show_output() -> None:
            async for chunk in term:
                await _write_all(fd_out, chunk)
            finish("exit", term.result)

        for sig in _HANGUP_SIGNALS:
            loop.add_signal_handler(sig, finish, "signal", sig)
            installed.append(sig)
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        installed.append(signal.SIGWINCH)
        loop.add_signal_handler(signal.SIGCONT, on_cont)
        installed.append(signal.SIGCONT)
        loop.add_reader(fd_in, on_stdin)
        reading = True
        on_winch()  # the size may have changed while the session booted
        tasks = [asyncio.ensure_future(send_inputs()), asyncio.ensure_future(show_output())]
        def failed(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is not None:
                finish("error", task.exception())

        for task in tasks:
            task.add_done_callback(failed)
        try:
            kind, value = await outcome
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return await _conclude(term, session, kind, value, raw, name)
    finally:
        if reading:
            loop.remove_reader(fd_in)
        for sig in installed:
            loop.remove_signal_handler(sig)
        if raw is not None:
            raw.restore()


async def _conclude(term: Terminal, session: str, kind: str, value, raw: RawMode | None, name: str) -> int:
    """After the relay ends: restore the terminal first, then say what happened."""
    if raw is not None:
        raw.restore()
    eid = term.execution_id
    if kind == "exit":
        code = value.get("exit_code") if isinstance(value, dict) else None
        if not isinstance(code, int):
            return EXIT_FAIL
        return code if code >= 0 else 128 - code
    if kind == "detach":
        sys.stderr.write(f"\r\nblink: detached; execution {eid} keeps running in session {session} "
                         f"(back: blink attach {session} {eid}; stop it: blink call {session} agent.kill "
                         f"'{{\"execution_id\": {eid}}}')\n")
        return 0
    if kind == "signal":
        try:  # our terminal went away or we were told to stop: hang up the remote one too
            await asyncio.wait_for(term.kill("SIGHUP"), 2.0)
        except (TimeoutError, RemoteError, ConnectionClosed):
            pass
        return 128 + int(value)
    reason = value.message if isinstance(value, ConnectionClosed) else f"{type(value).__name__}: {value}"
    sys.stderr.write(f"\r\n{name}: the terminal connection ended before the program did: {reason}\n")
    return EXIT_FAIL
