"""The HTTP API's executions: per session, one in-process control connection
(through the relay, like any client: lossless, so output is never dropped on the
way) that spawns executions and feeds their ``Record``s; the table of records
with its bounds, its linger after exit, and its file across a daemon restart.

A record exists from the spawn on, so output is kept whether or not anyone is
attached; detaching never stops an execution. The watcher of a session lives
while the session has executions that have not ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..client import Client, Event, Output
from ..errors import ConnectionClosed, RemoteError, clip
from .records import STDERR, STDOUT, Record

log = logging.getLogger("vhubd")

CHANNEL = {"stdout": STDOUT, "stream": STDOUT, "stderr": STDERR}
EARLY_LIMIT = 4 << 20  # output of an execution whose spawn answer has not come yet
STDIN_CHUNK = 64 << 10


def exit_status(code: Any) -> int | None:
    """The agent's code (-N: killed by signal N) as a shell's (128+N)."""
    if type(code) is not int:
        return None
    return 128 - code if code < 0 else code


class Watcher:
    """One session's connection for the HTTP API."""

    def __init__(self, table: ExecTable, session: str):
        self.table = table
        self.session = session
        self.client: Client | None = None
        self.task: asyncio.Task | None = None
        self.spawning = 0
        self.early: list[Output] = []
        self.early_bytes = 0
        self.early_results: dict[int, Any] = {}  # execution_id -> exit code, for a spawn not answered yet
        self.released = False
        self.ready = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        try:
            sock = await self.table.connect()
            self.client = await Client.connect(sock=sock, session=self.session,
                                               subscribe=["stdout", "stderr", "stream", "events"],
                                               queue_size=16)
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
                self.ready.exception()  # retrieved: whoever waits gets it raised
            raise
        self.task = asyncio.ensure_future(self._consume())
        self.ready.set_result(None)

    async def _consume(self) -> None:
        assert self.client is not None
        reason = "the session's connection closed"
        try:
            async for item in self.client:
                try:
                    if type(item) is Output:
                        self._output(item)
                    elif type(item) is Event:
                        self._event(item.data)
                except Exception:  # a guest's odd event must not end the session's watcher
                    log.exception("http: watcher of session=%s: cannot handle %s", self.session, clip(repr(item)))
            if self.client.closed_reason is not None:
                reason = str(self.client.closed_reason)
        finally:
            self.table.watcher_gone(self, reason)

    def _output(self, item: Output) -> None:
        rec = self.table.records.get((self.session, item.request_id))
        if rec is not None and not rec.exited:
            rec.add(CHANNEL[item.kind], item.data)
            self.table.changed()
        elif self.spawning and self.early_bytes < EARLY_LIMIT:
            self.early.append(item)
            self.early_bytes += len(item.data)

    def _event(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "execution_result":
            eid = ev.get("execution_id")
            rec = self.table.records.get((self.session, eid)) if type(eid) is int else None
            if rec is not None:
                rec.finish(exit_status(ev.get("exit_code")), time.time())
                self.table.changed()
                self.table.maybe_release(self)
            elif self.spawning and type(eid) is int and len(self.early_results) < 64:
                self.early_results[eid] = ev.get("exit_code")  # it ended before its spawn was answered
        elif kind == "notification" and ev.get("method") == "agent.stdin":
            params = ev.get("params") or {}
            eid = params.get("execution_id") if isinstance(params, dict) else None
            rec = self.table.records.get((self.session, eid)) if type(eid) is int else None
            if rec is not None:
                consumed = params.get("consumed")
                if type(consumed) is int and consumed > rec.stdin_consumed:
                    rec.stdin_consumed = consumed
                if params.get("closed") is True:
                    rec.stdin_closed = True
                self.table.changed()
        elif kind == "notification" and ev.get("method") == "output_seqs":
            execs = (ev.get("params") or {}).get("executions")
            if isinstance(execs, dict):
                for key, base in list(execs.items())[:1024]:
                    eid = int(key) if key.isascii() and key.isdigit() and len(key) < 20 else -1
                    rec = self.table.records.get((self.session, eid))
                    if rec is not None and type(base) is int and base >= 0:
                        rec.rebase(base)
                self.table.changed()
        elif kind == "state" and ev.get("state") in ("stopped", "failed", "stopping"):
            self.table.end_session(self.session, f"the session {ev.get('state')}: {ev.get('reason') or ''}")

    def adopt_early(self, rec: Record) -> None:
        """The spawn answered: output of it that came first goes to its record."""
        keep = []
        for item in self.early:
            if item.request_id == rec.execution_id:
                rec.add(CHANNEL[item.kind], item.data)
            else:
                keep.append(item)
        self.early = keep if self.spawning else []
        self.early_bytes = sum(len(i.data) for i in self.early)
        if rec.execution_id in self.early_results:
            rec.finish(exit_status(self.early_results.pop(rec.execution_id)), time.time())
        if not self.spawning:
            self.early_results.clear()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.task is not None:
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass


class ExecTable:
    """Every record the HTTP API keeps, bounded in number (``max_executions``) and
    bytes (``buffer`` each); ended ones go ``linger`` seconds after their end."""

    def __init__(self, connect: Callable[[], Awaitable[Any]], *, buffer: int, linger: float,
                 max_executions: int, path: str | None):
        self.connect = connect
        self.buffer = buffer
        self.linger = linger
        self.max_executions = max_executions
        self.path = path
        self.records: dict[tuple[str, int], Record] = {}
        self.watchers: dict[str, Watcher] = {}
        self.waiters: list[asyncio.Future] = []
        self.closing = False
        self.closing_tasks: set[asyncio.Task] = set()
        self.dirty = False  # records changed since the last save

    # -- change notification for attach loops ----------------------------------------
    def changed(self) -> None:
        self.dirty = True
        waiters, self.waiters = self.waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def wait_change(self, timeout: float | None = None) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass

    # -- watchers -----------------------------------------------------------------------
    async def watcher(self, session: str) -> Watcher:
        w = self.watchers.get(session)
        if w is None:
            w = self.watchers[session] = Watcher(self, session)
            try:
                await w.start()
            except BaseException:
                if self.watchers.get(session) is w:
                    del self.watchers[session]
                raise
        else:
            await asyncio.shield(w.ready)
        return w

    def watcher_gone(self, w: Watcher, reason: str) -> None:
        if self.watchers.get(w.session) is w:
            del self.watchers[w.session]
        if not self.closing and not w.released:  # a released one had nothing running (a new one may)
            self.end_session(w.session, reason)

    def maybe_release(self, w: Watcher) -> None:
        """No execution of the session runs any more: its connection can go."""
        if w.spawning or any(not r.exited for (s, _), r in self.records.items() if s == w.session):
            return
        if self.watchers.get(w.session) is w:
            del self.watchers[w.session]
        w.released = True
        task = asyncio.ensure_future(w.close())
        self.closing_tasks.add(task)
        task.add_done_callback(self.closing_tasks.discard)

    def end_session(self, session: str, reason: str) -> None:
        now = time.time()
        for (s, _), rec in self.records.items():
            if s == session and not rec.exited:
                rec.finish(None, now, reason[:300])
        self.changed()

    # -- records ------------------------------------------------------------------------
    def room(self) -> bool:
        """Whether one more execution may be kept (ended ones past linger go first)."""
        self.expire()
        if len(self.records) < self.max_executions:
            return True
        ended = sorted((r.ended_at or 0.0, k) for k, r in self.records.items() if r.exited)
        if ended:
            del self.records[ended[0][1]]  # the oldest ended one makes room
            return True
        return False

    def expire(self) -> None:
        now = time.time()
        for key, rec in list(self.records.items()):
            if rec.exited and rec.ended_at is not None and now - rec.ended_at > self.linger:
                del self.records[key]

    async def spawn(self, session: str, params: dict, *, tty: bool, command: str) -> Record:
        w = await self.watcher(session)
        assert w.client is not None
        w.spawning += 1
        try:
            result = await w.client.call("agent.run", params)
        finally:
            w.spawning -= 1
        eid = result.get("execution_id") if isinstance(result, dict) else None
        if type(eid) is not int:
            raise RemoteError("bad_answer", "the agent's answer to agent.run has no execution_id")
        rec = Record(session, eid, tty=tty, limit=self.buffer, command=command)
        window = result.get("stdin_window")
        rec.stdin_window = window if type(window) is int and window > 0 else 0
        self.records[(session, eid)] = rec
        w.adopt_early(rec)
        self.changed()
        self.maybe_release(w)
        return rec

    async def control(self, rec: Record, what: str, *args: Any) -> None:
        """Input and control for a running execution, through its session's watcher."""
        w = self.watchers.get(rec.session)
        if w is None or w.client is None or rec.exited:
            raise ConnectionClosed("the execution has ended", "ended")
        c = w.client
        if what == "stdin":
            data = args[0]
            for i in range(0, len(data), STDIN_CHUNK):
                while not rec.stdin_room():  # the command's pace: at most a window in flight
                    await self.wait_change(5.0)
                    if rec.exited or self.watchers.get(rec.session) is not w:
                        raise ConnectionClosed("the execution has ended", "ended")
                if rec.stdin_closed:
                    return  # the command closed its stdin: the rest would be dropped anyway
                part = data[i:i + STDIN_CHUNK]
                rec.stdin_sent += len(part)
                await c.send_stream(rec.execution_id, part)
        elif what == "eof":
            await c.send_stream(rec.execution_id, b"")
        elif what == "resize":
            await c.resize(rec.execution_id, args[0], args[1])
        elif what == "signal":
            await c.call("agent.kill", {"execution_id": rec.execution_id, "signal": args[0]}, timeout=10)

    # -- across a restart ---------------------------------------------------------------
    def save(self, with_output: bool = True) -> None:
        """The records for the next daemon: whole at a graceful stop; every few
        seconds without their output (so that after a crash the seqs still hold and
        what was lost shows as a gap)."""
        if not self.path:
            return
        self.expire()
        self.dirty = False
        data = [r.dump(with_output) for r in self.records.values()]
        if not data and not with_output:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "saved": time.time(), "output": with_output, "records": data}, f)
        os.replace(tmp, self.path)
        if with_output:
            log.info("http: kept %d executions' output for the next daemon in %s", len(data), self.path)

    def load(self, known: Callable[[str], bool]) -> list[str]:
        """Records a previous daemon saved, for sessions this one knows; returns the
        sessions with executions still running (their watchers must connect before
        any agent can: an agent resends output at once)."""
        if not self.path or not os.path.exists(self.path):
            return []
        try:
            with open(self.path) as f:
                doc = json.load(f)
            items = doc["records"]
            for d in items[: self.max_executions]:
                rec = Record.load(d, self.buffer)
                if not doc.get("output", True):
                    # saved by a daemon that then crashed: its output is gone, and where the agent
                    # stands is unknown until it says (output_seqs): everything it resends is kept
                    rec.head, rec.next_seq = 0, 1
                if known(rec.session):
                    self.records[(rec.session, rec.execution_id)] = rec
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("http: ignoring %s: %s", self.path, str(exc)[:200])
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.expire()
        return sorted({r.session for r in self.records.values() if not r.exited})

    async def close(self) -> None:
        self.closing = True
        for w in list(self.watchers.values()):
            await w.close()
        self.watchers.clear()
        self.changed()
