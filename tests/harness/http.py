"""The HTTP API of a test daemon, through aiohttp's client: its base URL, its
token, and WebSocket attach frames decoded (``[channel, seq u64 BE, payload]``)."""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp


class HttpApi:
    def __init__(self, daemon, token: str | None = None):
        self.daemon = daemon
        self.base = f"http://{daemon.listeners['http']}"
        state = os.path.join(daemon.dir, "state")
        if token is None:
            with open(os.path.join(state, "http-token")) as f:
                token = f.read().strip()
        self.token = token
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpApi:
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.session is not None
        await self.session.close()

    async def req(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                  headers: dict | None = None) -> tuple[int, Any]:
        assert self.session is not None
        kw: dict = {"headers": headers or {}}
        if raw is not None:
            kw["data"] = raw
        elif body is not None:
            kw["json"] = body
        async with self.session.request(method, self.base + path, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.req(method, path, body)
        assert status == 200, (status, data)
        return data

    def ws(self, path: str, **kw):
        assert self.session is not None
        return self.session.ws_connect(self.base + path, **kw)


async def read_attach(ws, *, until: bytes | None = None, timeout: float = 20.0, seq: bool = True):
    """Frames from an attach until ``until`` shows in the output, or the exit/close:
    returns (chunks [(channel, seq, payload)], texts [dict])."""
    chunks: list = []
    texts: list = []
    out = b""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            data = msg.data
            if seq:
                chunks.append((data[0], int.from_bytes(data[1:9], "big"), data[9:]))
                out += data[9:]
            else:
                chunks.append((data[0], None, data[1:]))
                out += data[1:]
            if until is not None and until in out:
                return chunks, texts
        elif msg.type == aiohttp.WSMsgType.TEXT:
            texts.append(json.loads(msg.data))
            if texts[-1].get("type") == "exit":
                continue
        else:
            return chunks, texts


def joined(chunks) -> bytes:
    return b"".join(c[2] for c in chunks)
