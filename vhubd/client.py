"""Async host client for the daemon's control socket (the CLI uses it).

    async with await Client.connect(session="demo", subscribe=["stdout", "stderr"]) as c:
        result = await c.call("agent.run", {"argv": ["echo", "hi"]})
        async for item in c:          # Output(kind, request_id, data) or Event(dict)
            ...

``serve={"method": handler}`` answers guest→host RPCs (handler may be async);
a handler that raises ``RemoteError(code, message)`` answers an RpcError.

Terminals (``agent.run`` with ``tty``), for a web terminal or a control plane:

    term = await open_terminal("demo", ["sh"], rows=24, cols=80)
    await term.write(b"echo hi\r")
    await term.resize(40, 120)
    async for chunk in term:      # raw terminal output until the program ends
        ...
    code = await term.wait()      # its exit status (-N: killed by signal N)

About 420 lines, on purpose: the read loop, calls, served methods and the
routing of terminal output all work on the one connection's state.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .channel import ClientChannel, params_of
from .errors import ConnectionClosed, InvalidState, RemoteError
from .frames import CHANNEL_BASE, CHANNEL_WINDOW, HEADER, HEADER_SIZE, MAGIC, SESSIONS_PAGE, VERSION, MsgType
from .paths import default_control_path
from .protocol import (
    Connection,
    Frame,
    Handshake,
    RemoteErrorEvent,
    Side,
    State,
    StreamRun,
    Violation,
    parse_error_payload,
    rpc_error,
    rpc_result,
)
from .remote_terminal import Terminal

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

_RQ = int(MsgType.RPC_REQUEST)
_REQUESTS = frozenset({_RQ})
_unpack_header = HEADER.unpack_from


def _method_of(req: Any) -> str | None:
    """The method a decoded RpcRequest payload names (``event`` is its old
    spelling); None when the payload is not an object naming one."""
    method = (req.get("method") or req.get("event")) if type(req) is dict else None
    return method if type(method) is str else None


_PLAIN = frozenset({dict, list, str, int, float, bool, type(None), bytes})  # results never awaitable


def _result_frame(rid: int, result: Any) -> bytes:
    try:
        return rpc_result(rid, result)
    except Exception as exc:  # not encodable: the caller gets an error, not silence
        return _error_frame(rid, exc)


def _error_frame(rid: int, exc: BaseException) -> bytes:
    if isinstance(exc, RemoteError):
        return rpc_error(rid, exc.code, exc.message)
    # a handler bug answers an error, never hangs the guest
    return rpc_error(rid, "handler_failed", f"{type(exc).__name__}: {exc}")


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
        self.session = "*"
        self.subscribed: tuple = ()
        self._terminals: dict[int, Terminal] = {}
        self._opening = 0  # terminals whose agent.run is in flight: their early output waits here
        self._early: list = []
        self._route_only = False  # a client made by open_terminal: nobody reads its queue
        self._channels: dict[int, ClientChannel] = {}
        self._channel_early: dict[int, list] = {}  # channel frames that came before vhub.channel's answer

    @classmethod
    async def connect(cls, path: str | None = None, *, session: str = "*", subscribe=(), serve=None,
                      boot: bool = False, replay: bool = False, flow: str = "lossless",
                      timeout: float = 10.0, queue_size: int = 4096, extra: dict | None = None,
                      sock: Any = None) -> Client:
        """``sock``: an already connected socket to use instead of ``path`` (the
        daemon's own HTTP API connects to itself through a socketpair)."""
        path = path or default_control_path()
        try:
            if sock is not None:
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
            else:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), timeout)
        except (TimeoutError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or "timed out"
            raise ConnectionClosed(f"cannot connect to the daemon at {path}: {reason} "
                                   "(is `blink serve` running?)", "unreachable") from None
        self = cls(reader, writer, queue_size)
        self._handlers = dict(serve or {})
        if self._handlers:
            self._conn.set_fast_lane(_REQUESTS, self._request_lane)
        self.session = session
        self.subscribed = tuple(subscribe)
        hs = {"role": "client", "session": session, "subscribe": list(subscribe),
              "serve": list(self._handlers), "boot": boot, "replay": replay, "flow": flow, **(extra or {})}
        self._conn.send_handshake(_encode(hs))
        self._flush()
        self._task = asyncio.ensure_future(self._read_loop())
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(self._handshake), None if boot else timeout)
        except TimeoutError:
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
                        for f in ev.frames():
                            if f.request_id >= CHANNEL_BASE and f.msg_type == MsgType.STREAM_DATA:
                                self._channel_data(f.request_id, bytes(f.payload))
                                continue
                            await self._put(Output(KINDS[f.msg_type], f.request_id, bytes(f.payload)))
                    elif t is Frame:
                        item = self._frame(ev)
                        if item is not None:
                            await self._put(item)
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
            for term in list(self._terminals.values()):
                term._fail(reason)
            for ch in list(self._channels.values()):
                ch._lost(reason)
            try:
                self._queue.put_nowait(_END)
            except asyncio.QueueFull:
                pass

    async def _put(self, item) -> None:
        """Deliver an Output or Event: to its terminal if it has one, else to the queue."""
        if (self._terminals or self._opening) and self._to_terminal(item, early_ok=True):
            term = self._terminals.get(item.request_id) if type(item) is Output else None
            if term is not None:
                await term._wait_room()  # lossless: stop reading while its reader is behind
            return
        if not self._route_only:
            await self._queue.put(item)

    def _to_terminal(self, item, early_ok: bool) -> bool:
        if type(item) is Output:
            term = self._terminals.get(item.request_id) if item.kind == "stream" else None
            if term is not None:
                term._feed(item.data)
                return True
            if item.kind == "stream" and self._opening and early_ok:
                self._early.append(item)
                return True
            return False
        ev = item.data
        kind = ev.get("type")
        if kind == "execution_result":
            term = self._terminals.get(ev.get("execution_id"))  # type: ignore[arg-type]
            if term is not None:
                term._finish(ev)
                return True
            if self._opening and early_ok:
                self._early.append(item)
                return True
        elif kind == "state" and ev.get("state") in ("agent_lost", "stopped", "failed"):
            why = ConnectionClosed(f"session {ev.get('session')} is {ev.get('state')}: {ev.get('reason') or ''}",
                                   str(ev.get("state")))
            for term in list(self._terminals.values()):
                term._fail(why)
        return False

    def _release_early(self) -> None:
        """A terminal open ended: its early output goes to it, the rest where it belongs."""
        if self._opening:
            keep = [item for item in self._early if not self._to_terminal(item, early_ok=False)]
            self._early = keep
            return
        early, self._early = self._early, []
        for item in early:
            if not self._to_terminal(item, early_ok=False) and not self._route_only:
                try:
                    self._queue.put_nowait(item)
                except asyncio.QueueFull:
                    pass

    def _frame(self, ev: Frame) -> Event | None:
        """Handle one frame; an Event for the queue, if it is one (the read
        loop awaits room for it: no coroutine per frame)."""
        mt = ev.msg_type
        if mt == MsgType.RPC_RESPONSE or mt == MsgType.RPC_ERROR:
            fut = self._pending.pop(ev.request_id, None)
            if fut is not None and not fut.done():
                if mt == MsgType.RPC_RESPONSE:
                    fut.set_result(_decode(bytes(ev.payload)) if len(ev.payload) else None)
                else:
                    fut.set_exception(RemoteError(*parse_error_payload(ev.payload)))
        elif mt == MsgType.RPC_REQUEST:
            try:
                req = _decode(ev.payload)
            except msgspec.DecodeError:
                req = None
            method = _method_of(req)
            if method is None:
                self._bad_request(ev.request_id, "RpcRequest needs a method (or event)" if type(req) is dict
                                  else "RpcRequest payload must be a JSON object")
                return None
            if method == "vhub.event" and ev.request_id == 0:
                return Event(req.get("params") or {})
            if method.startswith("chan.") and ev.request_id == 0:
                params = params_of(req)
                cid = params.get("channel")
                ch = self._channels.get(cid) if type(cid) is int else None
                if ch is not None:
                    ch._note(method, params)
                elif type(cid) is int and cid >= CHANNEL_BASE:
                    self._early_note(cid, (method, params))
                return None
            self._serve(ev.request_id, method, req.get("params"))
        return None

    def _request_lane(self, buf: bytearray, start: int, end: int, limit: int) -> tuple[int, int]:
        """The Connection's fast lane for a read batch that starts with
        requests: each complete, well-formed RpcRequest with an id is served
        straight from the receive buffer (no Frame, no payload copy), exactly
        as ``_frame`` would serve it. It stops at the first frame that is
        anything else (another type, a notification, a bad header, a payload
        that is not a JSON object) and leaves the rest to the scanner, which
        checks and reports it as usual."""
        pos, count = start, 0
        view = memoryview(buf)
        try:
            while end - pos >= HEADER_SIZE:
                magic, version, mtype, _, length, rid = _unpack_header(buf, pos)
                stop = pos + HEADER_SIZE + length
                if (mtype != _RQ or not rid or magic != MAGIC or version != VERSION or length > limit
                        or stop > end):
                    break
                try:
                    req = _decode(view[pos + HEADER_SIZE:stop])
                except msgspec.DecodeError:
                    break
                method = _method_of(req)
                if method is None:
                    break
                pos = stop
                count += 1
                self._serve(rid, method, req.get("params"))
        finally:
            view.release()  # the receive buffer must not stay pinned
        return pos, count

    def _bad_request(self, rid: int, message: str) -> None:
        """A request the library cannot read: its caller gets an error (a
        notification, nothing), and the connection goes on."""
        self._answer(rid, rpc_error(rid, "bad_request", message))

    def _handler(self, method: str) -> Callable[[Any], Any] | None:
        fn = self._handlers.get(method)
        if fn is None:
            for pattern, f in self._handlers.items():
                if pattern.endswith("*") and method.startswith(pattern[:-1]):
                    return f
        return fn

    def _serve(self, rid: int, method: str, params: Any) -> None:
        """Answer a request: a plain function's answer is queued at once (the
        read loop writes every answer of a read batch in one go); a coroutine's
        gets a task."""
        try:
            fn = self._handler(method)
            if fn is None:
                raise RemoteError("no_handler", f"this client does not serve {method!r}")
            result = fn(params)
        except Exception as exc:
            self._answer(rid, _error_frame(rid, exc))
            return
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            task = asyncio.ensure_future(self._serve_later(rid, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._answer(rid, _result_frame(rid, result))

    async def _serve_later(self, rid: int, pending: Awaitable[Any]) -> None:
        try:
            frame = _result_frame(rid, await pending)
        except Exception as exc:
            frame = _error_frame(rid, exc)
        self._answer(rid, frame)
        self._flush()

    def _answer(self, rid: int, frame: bytes) -> None:
        """Queue an answer; none for a notification, none once the connection
        has failed or closed (a request read in the same batch as a protocol
        violation: the Error frame already went out, nothing follows it)."""
        if rid and self._conn.state is not State.CLOSED and not self._writer.is_closing():
            self._conn.send_frame(frame)

    # -- public API --
    async def call(self, method: str, params: Any = None, *, session: str | None = None,
                   timeout: float | None = 60.0) -> Any:
        if self.closed_reason is not None:
            raise self.closed_reason
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if session is not None:
            self._conn.request(rid, method, params, session=session)
        else:
            self._conn.request(rid, method, params)
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: Any = None) -> None:
        self._conn.request(0, method, params)
        self._flush()
        await self._writer.drain()

    async def send_stream(self, request_id: int, data: bytes) -> None:
        self._conn.send(MsgType.STREAM_DATA, request_id, data)
        self._flush()
        await self._writer.drain()

    async def resize(self, request_id: int, rows: int, cols: int) -> None:
        self._conn.send(MsgType.TTY_RESIZE, request_id, _encode({"rows": rows, "cols": cols}))
        self._flush()
        await self._writer.drain()

    async def open_terminal(self, argv: list[str], rows: int = 24, cols: int = 80, *, term: str | None = None,
                            env: dict | None = None, cwd: str | None = None,
                            timeout: float | None = 60.0) -> Terminal:
        """Start ``argv`` on a pseudo-terminal in this client's session; this client
        is its writer. Needs a client attached to one session and subscribed to
        ``stream`` and ``events``. Raises RemoteError (``spawn_failed``...)."""
        if self.session == "*" or not {"stream", "events"} <= set(self.subscribed):
            raise InvalidState("open_terminal needs a client of one session subscribed to stream and events")
        params: dict = {"argv": list(argv), "tty": True, "rows": rows, "cols": cols}
        if term:
            params["term"] = term
        if env:
            params["env"] = env
        if cwd:
            params["cwd"] = cwd
        self._opening += 1
        try:
            res = await self.call("agent.run", params, timeout=timeout)
            if not isinstance(res, dict) or type(res.get("execution_id")) is not int:
                raise RemoteError("bad_result", f"agent.run answered {res!r}")
            terminal = Terminal(self, res["execution_id"], res.get("pid"))
            self._terminals[terminal.execution_id] = terminal
        finally:
            self._opening -= 1
            self._release_early()
        return terminal

    def watch_terminal(self, execution_id: int) -> Terminal:
        """Follow a terminal someone else started (output from now on; with
        ``replay`` the scrollback came first). Its writes are dropped by the
        daemon unless :meth:`Terminal.take_over` made this client the writer.
        Its output already queued here (e.g. the scrollback replay) comes first."""
        terminal = Terminal(self, execution_id, None)
        self._terminals[execution_id] = terminal
        queued = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        for item in queued:
            if type(item) is not Output or not self._to_terminal(item, early_ok=False):
                self._queue.put_nowait(item)
        return terminal

    # -- channels (blink cp)
    def _channel_data(self, cid: int, data: bytes) -> None:
        ch = self._channels.get(cid)
        if ch is not None:
            ch._feed(data)
        else:
            self._early_note(cid, data)

    def _early_note(self, cid: int, item: Any) -> None:
        early = self._channel_early.setdefault(cid, [])
        if len(early) < 4096:  # the agent keeps to its window: more is not a channel of ours
            early.append(item)
        if len(self._channel_early) > 64:
            self._channel_early.pop(next(iter(self._channel_early)))

    async def open_channel(self, session: str, method: str, params: dict, *,
                           timeout: float | None = 60.0) -> ClientChannel:
        """Open a channel to ``session``'s agent with ``method`` (``agent.tar`` /
        ``agent.untar``); raises RemoteError with the agent's refusal."""
        res = await self.call("vhub.channel", {"session": session, "method": method, "params": params},
                              timeout=timeout)
        if not isinstance(res, dict) or type(res.get("channel")) is not int:
            raise RemoteError("bad_result", f"vhub.channel answered {res!r}")
        window = res.get("window")
        ch = ClientChannel(self, res["channel"], window if type(window) is int else CHANNEL_WINDOW, res)
        self._channels[ch.id] = ch
        for item in self._channel_early.pop(ch.id, []):
            if isinstance(item, bytes):
                ch._feed(item)
            else:
                ch._note(*item)
        if self.closed_reason is not None:
            ch._lost(self.closed_reason)
        return ch

    async def sessions(self, *, prefix: str = "", state: str | None = None) -> list:
        """Every session (page by page: the daemon answers at most SESSIONS_PAGE at a time)."""
        out: list = []
        params: dict = {"prefix": prefix, **({"state": state} if state else {})}
        while True:
            page = await self.call("vhub.sessions", {**params, "after": out[-1]["name"] if out else ""})
            out += page
            if len(page) < SESSIONS_PAGE:
                return out

    async def remove(self, session: str) -> dict:
        return await self.call("vhub.remove", {"session": session})

    async def info(self, session: str | None = None) -> dict:
        return await self.call("vhub.info", {"session": session} if session else {})

    async def stats(self) -> dict:
        return await self.call("vhub.stats")

    async def register(self, session: str) -> dict:
        return await self.call("vhub.register", {"session": session})

    async def boot(self, session: str, timeout: float | None = None, **params: Any) -> dict:
        return await self.call("vhub.boot", {"session": session, **params}, timeout=timeout)

    async def standby(self, session: str) -> dict:
        return await self.call("vhub.standby", {"session": session})

    async def wake(self, session: str) -> dict:
        return await self.call("vhub.wake", {"session": session})

    async def stop(self, session: str) -> dict:
        return await self.call("vhub.stop", {"session": session})

    async def snapshot(self, session: str, name: str, *, stop: bool = False, timeout: float | None = 600.0) -> dict:
        return await self.call("vhub.snapshot", {"session": session, "name": name, "stop": stop}, timeout=timeout)

    async def snapshots(self, session: str) -> list:
        return await self.call("vhub.snapshots", {"session": session})

    async def restore(self, session: str, name: str, timeout: float | None = 600.0) -> dict:
        return await self.call("vhub.restore", {"session": session, "name": name}, timeout=timeout)

    async def remove_snapshot(self, session: str, name: str) -> dict:
        return await self.call("vhub.remove_snapshot", {"session": session, "name": name})

    async def next(self, timeout: float | None = None):
        """The next Output or Event; None once the connection is closed."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        return item

    def drain(self) -> list:
        """The Outputs and Events queued now, without waiting."""
        out = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is _END:
                self._queue.put_nowait(_END)
                break
            out.append(item)
        return out

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


async def open_terminal(session: str, argv: list[str], rows: int = 24, cols: int = 80, *,
                        path: str | None = None, term: str | None = None, env: dict | None = None,
                        cwd: str | None = None, boot: bool = True, timeout: float | None = 60.0) -> Terminal:
    """Connect a client of its own to ``session`` (booting it on demand) and start
    ``argv`` there on a pseudo-terminal; closing the Terminal closes that client."""
    client = await Client.connect(path, session=session, subscribe=["stream", "events"], boot=boot,
                                  timeout=timeout or 10.0)
    client._route_only = True
    try:
        terminal = await client.open_terminal(argv, rows, cols, term=term, env=env, cwd=cwd, timeout=timeout)
    except BaseException:
        await client.close()
        raise
    terminal._owns = True
    return terminal


async def subscribe(path: str | None, session: str, streams=("stdout", "stderr"), replay: bool = True,
                    **kw: Any) -> Client:
    return await Client.connect(path, session=session, subscribe=streams, replay=replay, **kw)


async def serve(path: str | None, session: str, handlers: dict[str, Callable[[Any], Awaitable[Any] | Any]],
                **kw: Any) -> Client:
    return await Client.connect(path, session=session, serve=handlers, **kw)
