"""One execution: a child process run for the host, as both kinds of execution share it.

This module owns the :class:`Execution` record (the process, its id, the byte
counters, the ``exited`` / ``done`` futures, signalling its process group) and the
process-wide execution ids. It sits below :mod:`blink_agent.pty` (terminal
executions) and :mod:`blink_agent.runner` (which starts and reports both kinds), so
neither has to import the other's caller.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

__all__ = ["Execution", "next_execution_id"]

# Execution ids are process-wide and never reused while the agent lives.
_execution_ids = itertools.count(1)


def next_execution_id() -> int:
    return next(_execution_ids)


class Execution:
    """One child process and its relay state."""

    def __init__(
        self, execution_id: int, argv: list[str], proc: asyncio.subprocess.Process, group: bool
    ) -> None:
        self.id = execution_id
        self.argv = argv
        self.proc = proc
        self.pid = proc.pid
        self.group = group
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.timed_out = False
        self.result: dict[str, Any] | None = None
        #: A pipe execution's streamed stdin (``blink_agent.stdin.StdinFeed``), if it has one.
        self.stdin_feed: Any = None
        loop = asyncio.get_running_loop()
        #: Set to the result once the process has exited and its pipes are drained.
        self.exited: asyncio.Future[dict[str, Any]] = loop.create_future()
        #: Set to the result once the result was reported (delivered or given up).
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()

    def send_signal(self, sig: int) -> None:
        """Signal the process (its whole process group when it leads one)."""
        if self.proc.returncode is not None and not self.group:
            return
        try:
            if self.group:
                os.killpg(self.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
