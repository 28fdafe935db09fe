"""Boots seen from the CLI: ``vhub.boot`` with a progress report.

``boot_with_progress`` asks the daemon for the boot on a watcher connection of
its own (session ``"*"``, ``events`` only, lossy: it never slows anyone) and
follows that session's ``{"type": "boot", "phase", "elapsed", "backend"}``
events. On a terminal, one line is redrawn with the phase and the elapsed time
until the boot ends, then erased; on a pipe, one line when the boot starts and
one when it is over. Nothing is shown when no boot happens (an agent is
connected already). ``blink boot``, ``blink run`` and ``blink call --boot`` use it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from .client import Client, Event

TICK = 0.2  # how often the terminal line is redrawn


class BootReport:
    """What the user sees of one session's boot on ``stream``."""

    def __init__(self, session: str, stream: TextIO):
        self.session = session
        self.stream = stream
        self.tty = stream.isatty()
        self.started = False
        self.phase = ""
        self.backend = ""
        self.elapsed = 0.0
        self.at = time.monotonic()  # when ``elapsed`` was true
        self.shown = False

    def event(self, ev: dict) -> None:
        if ev.get("type") != "boot" or ev.get("session") != self.session:
            return
        phase, elapsed = ev.get("phase"), ev.get("elapsed")
        self.phase = str(phase)[:120]
        self.backend = str(ev.get("backend") or "")[:40]
        self.elapsed = float(elapsed) if isinstance(elapsed, (int, float)) else self.elapsed
        self.at = time.monotonic()
        if not self.started:
            self.started = True
            if not self.tty:
                self._line(f"blink: booting session {self.session} ({self.backend})\n")
        if phase == "ready":
            self.finish(f"blink: session {self.session} booted in {self.elapsed:.1f} s ({self.backend})")
        elif phase == "failed":
            self.finish(None)  # the error itself is the last line
        else:
            self.draw()

    def draw(self) -> None:
        if self.tty and self.started and self.phase not in ("ready", "failed"):
            now = self.elapsed + (time.monotonic() - self.at)
            self._line(f"\r\x1b[Kbooting {self.session} ({self.backend}): {self.phase} … {now:.1f} s")
            self.shown = True

    def finish(self, last: str | None) -> None:
        if self.tty:
            if self.shown:
                self._line("\r\x1b[K")
                self.shown = False
        elif last and self.started:
            self._line(last + "\n")
        self.phase = "ready" if last else "failed"

    def _line(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # our stderr went away: the boot goes on


async def boot_with_progress(control: str | None, session: str, params: dict | None = None, *,
                             timeout: float | None = None, stream: TextIO | None = None) -> dict:
    """``vhub.boot`` of ``session`` (created if new) with its progress on
    ``stream`` (stderr); returns the call's result, raises as ``Client.call``."""
    report = BootReport(session, stream or sys.stderr)
    watcher = await Client.connect(control, subscribe=["events"], flow="lossy", timeout=timeout or 10.0)
    try:
        call = asyncio.ensure_future(watcher.call("vhub.boot", {"session": session, **(params or {})},
                                                  timeout=timeout))
        while not call.done():
            get = asyncio.ensure_future(watcher.next())
            done, _ = await asyncio.wait({get, call}, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                item = get.result()
                if type(item) is Event:
                    report.event(item.data)
                elif item is None:
                    break
            else:
                get.cancel()
            report.draw()
        try:
            return await call
        finally:
            for item in watcher.drain():  # events that came with the answer
                if type(item) is Event:
                    report.event(item.data)
            if report.phase not in ("ready", "failed"):
                report.finish(None)
    finally:
        await watcher.close()
