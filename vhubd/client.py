"""Async host client for the daemon's control socket (the CLI uses it).

    async with await Client.connect(session="demo", subscribe=["stdout", "stderr"]) as c:
        result = await c.call("agent.run", {"argv": ["echo", "hi"]})
        async for item in c:          # Output(kind, request_id, data) or Event(dict)
            ...

``serve={"method": handler}`` answers guest→host RPCs (handler may be async);
a handler that raises ``RemoteError(code, message)`` answers an RpcError.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any, Awaitable, Callable

import msgspec

from .daemon import default_control_path
from .errors import ConnectionClosed, RemoteError
from .frames import HEADER_SIZE, MsgType
from .protocol import (
    Connection, Frame, Handshake, RemoteErrorEvent, Side, StreamRun, Violation, encode_frame, error_payload,
    parse_error_payload,
)

_encode = msgspec.json.encode
_decode = msgspec.json.decode
KINDS = {int(MsgType.STDOUT): "stdout", int(MsgType.STDERR): "stderr", int(MsgType.STREAM_DATA): "stream"}


class Output:
    __slots__ = ("kind", "request_id", "data")

    def __init__(self, kind: str, request_id: int, data: bytes):
        self.kind = kind
        self.request_id = request_id
        self.data = data

    def __repr__(self) -> str:
        return f"Output({self.kind}, {self.request_id}, {self.data[:40]!r})"


class Event:
    __slots__ = ("data",)

    def __init__(self, data: dict):
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.data})"


_END = object()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queue_size: int):
        self._reader = reader
        self._writer = writer
        self._conn = Connection(Side.CLIENT, cut_through=1 << 62)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._queue: asyncio.Queue = asyncio.Queue(queue_size)
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._task: asyncio.Task | None = None
        self._handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task] = set()
        self.closed_reason: ConnectionClosed | None = None
        self.hello: dict = {}

    @classmethod
    async def connect(cls, path: str | None = None, *, session: str = "*", subscribe=(), serve=None,
                      boot: bool = False, replay: bool = False, flow: str = "lossless",
                      timeout: float = 10.0, queue_size: int = 4096, extra: dict | None = None) -> Client:
        path = path or default_control_path()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or "timed out"
            raise ConnectionClosed(f"cannot connect to the daemon at {path}: {reason} "
                                   "(is `blink serve` running?)", "unreachable") from None
        self = cls(reader, writer, queue_size)
        self._handlers = dict(serve or {})
        hs = {"role": "client", "session": session, "subscribe": list(subscribe),
              "serve": list(self._handlers), "boot": boot, "replay": replay, "flow": flow, **(extra or {})}
        self._conn.send_handshake(_encode(hs))
        self._flush()
        self._task = asyncio.ensure_future(self._read_loop())
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(self._handshake), None if boot else timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise ConnectionClosed("the daemon did not answer the handshake", "timeout") from None
        except BaseException:
            await self.close()
            raise
        return self

    # -- plumbing --
    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out:
            self._writer.writelines(out)

    async def _read_loop(self) -> None:
        reason = ConnectionClosed("the daemon closed the connection", "closed")
        try:
            while True:
                data = await self._reader.read(1 << 18)
                if not data:
                    break
                for ev in self._conn.receive_data(data):
                    t = type(ev)
                    if t is StreamRun:
                        for mtype, _, rid, fdata in ev.frames():
                            await self._queue.put(Output(KINDS[mtype], rid, bytes(fdata[HEADER_SIZE:])))
                    elif t is Frame:
                        await self._frame(ev)
                    elif t is Handshake:
                        if not self._handshake.done():
                            self._handshake.set_result(_decode(bytes(ev.payload)) if len(ev.payload) else {})
                    elif t is RemoteErrorEvent:
                        reason = ConnectionClosed(f"{ev.code}: {ev.message}", ev.code)
                    elif t is Violation:
                        reason = ConnectionClosed(f"protocol error from the daemon: {ev.error}", ev.error.code)
                self._flush()
                if self._conn.state.value == "closed":
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = ConnectionClosed(f"connection to the daemon lost: {exc}", "lost")
        except asyncio.CancelledError:
            reason = ConnectionClosed("client closed", "closed")
            raise
        finally:
            self.closed_reason = reason
            if not self._handshake.done():
                self._handshake.set_exception(reason)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(reason)
            self._pending.clear()
            try:
                self._queue.put_nowait(_END)
            except asyncio.QueueFull:
                pass

    async def _frame(self, ev: Frame) -> None:
        mt = ev.msg_type
        if mt in KINDS:
            await self._queue.put(Output(KINDS[mt], ev.request_id, bytes(ev.payload)))
        elif mt == MsgType.RPC_RESPONSE or mt == MsgType.RPC_ERROR:
            fut = self._pending.pop(ev.request_id, None)
            if fut is not None and not fut.done():
                if mt == MsgType.RPC_RESPONSE:
                    fut.set_result(_decode(bytes(ev.payload)) if len(ev.payload) else None)
                else:
                    fut.set_exception(RemoteError(*parse_error_payload(ev.payload)))
        elif mt == MsgType.RPC_REQUEST:
            req = _decode(bytes(ev.payload))
            method = req.get("method") or req.get("event")
            if method == "vhub.event" and ev.request_id == 0:
                await self._queue.put(Event(req.get("params") or {}))
                return
            task = asyncio.ensure_future(self._serve_one(ev.request_id, method, req.get("params")))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, rid: int, method: str, params: Any) -> None:
        fn = self._handlers.get(method)
        if fn is None:
            for pattern, f in self._handlers.items():
                if pattern.endswith("*") and method.startswith(pattern[:-1]):
                    fn = f
                    break
        try:
            if fn is None:
                raise RemoteError("no_handler", f"this client does not serve {method!r}")
            result = fn(params)
            if inspect.isawaitable(result):
                result = await result
            frame = encode_frame(MsgType.RPC_RESPONSE, rid, _encode(result))
        except RemoteError as exc:
            frame = encode_frame(MsgType.RPC_ERROR, rid, error_payload(exc.code, exc.message))
        except Exception as exc:  # a handler bug answers an error, never hangs the guest
            frame = encode_frame(MsgType.RPC_ERROR, rid, error_payload("handler_error", f"{type(exc).__name__}: {exc}"))
        if rid and not self._writer.is_closing():
            self._writer.write(frame)

    # -- public API --
    async def call(self, method: str, params: Any = None, *, session: str | None = None,
                   timeout: float | None = 60.0) -> Any:
        if self.closed_reason is not None:
            raise self.closed_reason
        rid = next(self._ids)
        req: dict = {"method": method, "params": params if params is not None else {}}
        if session is not None:
            req["session"] = session
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(encode_frame(MsgType.RPC_REQUEST, rid, _encode(req)))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: Any = None) -> None:
        self._writer.write(encode_frame(MsgType.RPC_REQUEST, 0, _encode({"method": method, "params": params})))
        await self._writer.drain()

    async def send_stream(self, request_id: int, data: bytes) -> None:
        self._writer.write(encode_frame(MsgType.STREAM_DATA, request_id, data))
        await self._writer.drain()

    async def resize(self, request_id: int, rows: int, cols: int) -> None:
        self._writer.write(encode_frame(MsgType.TTY_RESIZE, request_id, _encode({"rows": rows, "cols": cols})))
        await self._writer.drain()

    async def sessions(self) -> list:
        return await self.call("vhub.sessions")

    async def info(self, session: str | None = None) -> dict:
        return await self.call("vhub.info", {"session": session} if session else {})

    async def stats(self) -> dict:
        return await self.call("vhub.stats")

    async def register(self, session: str) -> dict:
        return await self.call("vhub.register", {"session": session})

    async def boot(self, session: str, timeout: float | None = None, **params: Any) -> dict:
        return await self.call("vhub.boot", {"session": session, **params}, timeout=timeout)

    async def stop(self, session: str) -> dict:
        return await self.call("vhub.stop", {"session": session})

    async def next(self, timeout: float | None = None):
        """The next Output or Event; None once the connection is closed."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.next()
        if item is None:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._tasks):
            t.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def subscribe(path: str | None, session: str, streams=("stdout", "stderr"), replay: bool = True,
                    **kw: Any) -> Client:
    return await Client.connect(path, session=session, subscribe=streams, replay=replay, **kw)


async def serve(path: str | None, session: str, handlers: dict[str, Callable[[Any], Awaitable[Any] | Any]],
                **kw: Any) -> Client:
    return await Client.connect(path, session=session, serve=handlers, **kw)
