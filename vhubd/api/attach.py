"""The WebSocket attach of the HTTP API (Blink's ``docs/PTY.md`` frames, and
``docs/REATTACH.md``'s ``after``/``seq``): one sender per socket reading the
execution's ring from its cursor (a slow client costs its socket's buffer and is
told what the ring dropped), one receiver turning binary frames into stdin and
text frames into resize / signal / stdin_eof."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from ..errors import ConnectionClosed, HttpError, RemoteError
from .access import cut
from .records import Record

if TYPE_CHECKING:
    from .app import Api

MAX_ATTACH = 64  # WebSocket attaches open on one execution


class Attacher:
    def __init__(self, api: Api):
        self.api = api
        self.table = api.table
        self.cfg = api.cfg

    async def attach(self, request: web.Request) -> web.StreamResponse:
        name = self.api.name(request)
        raw = request.match_info["id"]
        self.table.expire()
        known = raw.isascii() and raw.isdigit() and len(raw) < 20
        rec = self.table.records.get((name, int(raw))) if known else None
        if rec is None:
            raise HttpError(404, f"no execution {cut(raw, 40)} in session {name!r} (it ended more than "
                                 f"{self.cfg.http_linger:g} s ago, or was never spawned here)")
        after_text = request.query.get("after")
        after = None
        if after_text is not None:
            if not (after_text.isascii() and after_text.isdigit()) or len(after_text) > 19:
                raise HttpError(400, "after must be a seq number (a non-negative integer)")
            after = int(after_text)
        with_seq = after is not None or request.query.get("seq") in ("1", "true")
        attached = sum(1 for ws in self.api.sockets if getattr(ws, "vhub_record", None) is rec)
        if attached >= MAX_ATTACH:
            raise HttpError(429, f"at most {MAX_ATTACH} attaches per execution")
        ws = web.WebSocketResponse(max_msg_size=self.cfg.http_max_body, heartbeat=30.0)
        await ws.prepare(request)
        ws.vhub_record = rec  # type: ignore[attr-defined]
        self.api.sockets.add(ws)
        sender = asyncio.ensure_future(self._send_output(ws, rec, after or 0, with_seq, after is not None))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._input(ws, rec, "stdin", msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self._text(ws, rec, msg.data)
                if sender.done():
                    break
        finally:
            self.api.sockets.discard(ws)
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            if not ws.closed:
                await ws.close()
        return ws

    async def _send_output(self, ws: web.WebSocketResponse, rec: Record, cursor: int, with_seq: bool,
                           resumed: bool) -> None:
        table = self.table
        while not ws.closed:
            version = rec.version
            missing = rec.missing_after(cursor) if cursor < rec.head else None
            if missing is not None:
                if resumed or missing[0] > 1:
                    await ws.send_str(json.dumps({"type": "error", "message":
                                                  f"output {missing[0]}..{missing[1]} is no longer buffered"}))
                cursor = missing[1]
            for c in rec.after(cursor):
                head = bytes((c.channel,)) + (c.seq.to_bytes(8, "big") if with_seq else b"")
                await ws.send_bytes(head + c.data)
                cursor = c.seq
            if rec.exited and cursor >= rec.head:
                if rec.exit_code is not None:
                    await ws.send_str(json.dumps({"type": "exit", "exit_code": rec.exit_code}))
                else:
                    await ws.send_str(json.dumps({"type": "error", "message": rec.end_reason or "ended"}))
                await ws.close()
                return
            if rec.version == version:
                await table.wait_change(30.0)

    async def _text(self, ws: web.WebSocketResponse, rec: Record, data: str) -> None:
        try:
            msg = json.loads(data)
            kind = msg.get("type") if isinstance(msg, dict) else None
        except ValueError:
            kind, msg = None, {}
        if kind == "resize":
            rows, cols = msg.get("rows"), msg.get("cols")
            if type(rows) is not int or type(cols) is not int or not (1 <= rows <= 1000 and 1 <= cols <= 1000):
                return await _ws_error(ws, "resize needs rows and cols from 1 to 1000")
            if not rec.tty:
                return await _ws_error(ws, "resize: this execution has no terminal")
            await self._input(ws, rec, "resize", rows, cols)
        elif kind == "signal":
            sig = msg.get("signal")
            if type(sig) is not int or not 1 <= sig <= 64:
                return await _ws_error(ws, "signal needs a signal number from 1 to 64")
            await self._input(ws, rec, "signal", sig)
        elif kind == "stdin_eof":
            await self._input(ws, rec, "eof")
        else:
            await _ws_error(ws, 'unknown control message: expected {"type": "resize"|"signal"|"stdin_eof", ...}')

    async def _input(self, ws: web.WebSocketResponse, rec: Record, what: str, *args: Any) -> None:
        try:
            await self.table.control(rec, what, *args)
        except (RemoteError, ConnectionClosed, TimeoutError) as exc:
            await _ws_error(ws, f"{what}: {cut(str(exc), 200)}")


async def _ws_error(ws: web.WebSocketResponse, message: str) -> None:
    if not ws.closed:
        await ws.send_str(json.dumps({"type": "error", "message": message}))


