"""Peers on real sockets, for the end-to-end tests.

- ``AsyncPeer``: raw BLIN over a Unix or loopback TCP socket, byte for byte what
  a VMM would deliver from a guest (or a hand-rolled host client would send).
- ``RawClient``: a host client whose handshake is parsed, then raw bytes.
- ``RawGuest``: the same as ``AsyncPeer`` on a blocking socket.
- ``client``: a ``vhubd.client.Client`` on a daemon's control socket.
- ``run`` drives one async test body under a hard timeout and closes every
  peer and client the body opened, so no socket outlives its test.

Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import socket
import time

from vhubd.client import Client
from vhubd.frames import HEADER_SIZE, MsgType
from vhubd.protocol import Connection, Frame, Handshake, RemoteErrorEvent, Side, StreamRun, encode_frame

from .wire import READY, T, frame

_opened: contextvars.ContextVar[list] = contextvars.ContextVar("opened")


def run(coro, timeout: float = 30.0):
    """Run one async test body with a hard timeout; close what it opened."""

    async def main():
        opened: list = []
        _opened.set(opened)
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            for thing in reversed(opened):
                try:
                    await asyncio.wait_for(thing.close(), 5)
                except Exception:
                    pass

    return asyncio.run(main())


def _track(thing):
    opened = _opened.get(None)
    if opened is not None:
        opened.append(thing)
    return thing


class AsyncPeer:
    """A BLIN peer on a real socket: raw bytes out, parsed frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
        self.pending: list = []
        self.eof = False

    @classmethod
    async def open(cls, target, timeout: float = 10.0) -> AsyncPeer:
        if isinstance(target, tuple):
            r, w = await asyncio.wait_for(asyncio.open_connection(*target, limit=1 << 20), timeout)
        else:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(target, limit=1 << 20), timeout)
        return _track(cls(r, w))

    @classmethod
    async def guest(cls, target, payload=b"", rid: int = 1) -> AsyncPeer:
        """A guest whose handshake was accepted."""
        g = await cls.open(target)
        res = await g.handshake(payload, rid)
        assert res == ("ok", READY, rid), res
        return g

    async def handshake(self, payload=b"", rid: int = 1):
        """('ok', payload, request_id) or ('error', code, message) or ('closed',)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.conn.send_handshake(payload, rid)
        self.flush()
        ev = await self.next_event()
        if isinstance(ev, Handshake):
            return ("ok", bytes(ev.payload), ev.request_id)
        if isinstance(ev, RemoteErrorEvent):
            return ("error", ev.code, ev.message)
        return ("closed",) if ev is None else ("other", ev)

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.writelines(out)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, msg_type: int, rid: int, payload=b"") -> None:
        self.writer.write(frame(msg_type, rid, payload))

    async def drain(self) -> None:
        await self.writer.drain()

    async def send_frames(self, frames: list[bytes], per_write: int = 1) -> None:
        """``frames`` in writes of ``per_write`` frames, waiting for each to drain
        (a lossless subscriber that stops reading stops this too)."""
        for i in range(0, len(frames), per_write):
            self.writer.write(b"".join(frames[i:i + per_write]))
            await self.writer.drain()

    async def call(self, method: str, params=None, rid: int = 1, timeout: float = 10.0) -> Frame:
        """Send an RpcRequest; the RpcResponse/RpcError with our id."""
        self.send(T.RPC_REQUEST, rid, {"method": method, "params": params if params is not None else {}})
        return await self.next_frame(timeout, lambda f: f.msg_type in (T.RPC_RESPONSE, T.RPC_ERROR)
                                     and f.request_id == rid)

    async def _fill(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.reader.read(1 << 18), timeout)
        if not data:
            self.eof = True
            return
        for ev in self.conn.receive_data(data):
            if isinstance(ev, StreamRun):
                for f in ev.frames():
                    self.pending.append(Frame(f.msg_type, f.flags, f.request_id, memoryview(bytes(f.data))))
            elif isinstance(ev, Frame):
                self.pending.append(Frame(ev.msg_type, ev.flags, ev.request_id, memoryview(bytes(ev.data))))
            else:
                self.pending.append(ev)
        self.flush()  # pongs

    async def next_event(self, timeout: float = 10.0):
        """The next event (Frame, Handshake, RemoteErrorEvent...) or None at EOF."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.pending:
            if self.eof:
                return None
            await self._fill(max(0.001, deadline - loop.time()))
        return self.pending.pop(0)

    async def next_frame(self, timeout: float = 10.0, match=None):
        """The next Frame (heartbeats skipped) that ``match`` accepts, leaving
        the others queued; a RemoteErrorEvent, or None at EOF, ends the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, ev in enumerate(self.pending):
                if isinstance(ev, RemoteErrorEvent):
                    return self.pending.pop(i)
                if isinstance(ev, Frame) and ev.msg_type != T.HEARTBEAT and (match is None or match(ev)):
                    return self.pending.pop(i)
            if self.eof:
                return None
            await self._fill(max(0.001, deadline - loop.time()))

    async def read_all(self, timeout: float = 10.0) -> bytes:
        """Raw bytes until EOF (what is left after parsed events is not included)."""
        chunks = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                d = await asyncio.wait_for(self.reader.read(1 << 18), max(0.001, deadline - loop.time()))
            except (ConnectionResetError, BrokenPipeError):
                break
            if not d:
                break
            chunks.append(d)
        self.eof = True
        return b"".join(chunks)

    async def error_and_close(self, timeout: float = 10.0):
        """Wait for an Error frame then EOF; (code, message)."""
        ev = await self.next_frame(timeout)
        assert isinstance(ev, RemoteErrorEvent), ev
        rest = await self.read_all(timeout)
        assert rest == b"", rest
        return ev.code, ev.message

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass


class RawClient:
    """A host client as raw bytes: handshake parsed, then the byte stream as is."""

    def __init__(self, reader, writer, hello: dict):
        self.reader = reader
        self.writer = writer
        self.hello = hello

    @classmethod
    async def open(cls, path: str, **hs) -> RawClient:
        r, w = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), 10)
        body = json.dumps({"role": "client", **hs}).encode()
        w.write(frame(T.HANDSHAKE, 1, body))
        head = await asyncio.wait_for(r.readexactly(HEADER_SIZE), 10)
        n = int.from_bytes(head[8:12], "little")
        payload = await asyncio.wait_for(r.readexactly(n), 10)
        assert head[5] == T.HANDSHAKE, (head, payload)
        return _track(cls(r, w, json.loads(payload)))

    async def read_exactly(self, n: int, timeout: float = 20.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def sha_of(self, n: int, timeout: float = 30.0) -> str:
        """sha256 of the next ``n`` bytes, read in chunks."""
        h = hashlib.sha256()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = n
        while left:
            d = await asyncio.wait_for(self.reader.read(min(left, 1 << 18)), max(0.001, deadline - loop.time()))
            assert d, f"EOF with {left} of {n} bytes still to come"
            h.update(d)
            left -= len(d)
        return h.hexdigest()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass


async def client(daemon, **kw) -> Client:
    """A vhubd.client.Client on this daemon's control socket, closed by run()."""
    return _track(await Client.connect(daemon.control, **kw))


async def wait_until(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Await ``pred()`` (sync or async) until it is truthy; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def session_info(sessions: list, name: str) -> dict:
    by_name = {s["name"]: s for s in sessions}
    assert name in by_name, sessions
    return by_name[name]


def json_of(f: Frame):
    return json.loads(bytes(f.payload))


class RawGuest:
    """A guest (or raw client) as bytes on a blocking socket."""

    def __init__(self, path_or_addr, timeout=10.0):
        if isinstance(path_or_addr, tuple):
            self.sock = socket.create_connection(path_or_addr, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path_or_addr)
        self.conn = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
        self.pending: list = []
        self.closed = False

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg_type, rid, payload=b"") -> None:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        self.sock.sendall(encode_frame(msg_type, rid, payload))

    def handshake(self, payload=b"", rid=1):
        """Send our handshake; return ('ok', payload) or ('error', code, message)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.conn.send_handshake(payload, rid)
        self.sock.sendall(b"".join(self.conn.data_to_send()))
        ev = self.next_event()
        if isinstance(ev, Handshake):
            return ("ok", bytes(ev.payload), ev.request_id)
        if isinstance(ev, RemoteErrorEvent):
            return ("error", ev.code, ev.message)
        return ("other", ev)

    def next_event(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.closed:
                return None
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                raise TimeoutError("no frame from the daemon in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return None
            for ev in self.conn.receive_data(data):
                if isinstance(ev, StreamRun):
                    for f in ev.frames():
                        self.pending.append(Frame(f.msg_type, f.flags, f.request_id, memoryview(bytes(f.data))))
                elif isinstance(ev, Frame):
                    self.pending.append(Frame(ev.msg_type, ev.flags, ev.request_id, memoryview(bytes(ev.data))))
                else:
                    self.pending.append(ev)
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(b"".join(out))
        return self.pending.pop(0)

    def next_frame(self, timeout=10.0, skip=(MsgType.HEARTBEAT,)) -> Frame:
        while True:
            ev = self.next_event(timeout)
            if ev is None or isinstance(ev, RemoteErrorEvent):
                return ev
            if isinstance(ev, Frame) and ev.msg_type not in skip:
                return ev

    def read_until_closed(self, timeout=10.0) -> bytes:
        """Raw bytes until EOF (for checking an Error frame then close)."""
        self.sock.settimeout(timeout)
        chunks = []
        while True:
            try:
                d = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not d:
                break
            chunks.append(d)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
