"""Benchmark worker process: a BLIN guest (stream sender or RPC caller) or an
RPC handler, driven by the benchmark over stdin/stdout, one JSON object a line.

It deliberately does not import vhubd for its data path (only struct/socket),
so the same code talks to vhubd, to socat and to a direct socket pair, and the
numbers compare transports, not client libraries. (``serve_client`` is the
exception: it runs the real ``vhubd.client`` handler for comparison.)

Commands (each answered by one JSON line):
  {"cmd": "build", "payload": P, "count": N}   pre-build N Stdout frames -> {"nbytes", "crc"}
  {"cmd": "connect", "path": S, "handshake": bool}                         -> {"ok"} / {"ok": false, ...}
  {"cmd": "connect_many", "path": S, "n": N}   N plain connections (the fan-out "tee" reference:
                                               "send" then writes every batch to each of them)
  {"cmd": "send"}          sendall the pre-built frames, then close        -> {"ok", "seconds"}
  {"cmd": "rpc", "n": N, "conc": C}   N RpcRequests, C outstanding, then close
                                                             -> {"ok", "seconds", "lat_ns": [...]}
  {"cmd": "serve", "path": S, "mode": "vhubd"|"connect"|"listen"}  handler: -> {"ok"} once ready,
                                     then {"done": answered} when the peer closes or on "stop"
  {"cmd": "serve_client", "path": S}   the same handler through vhubd.client (asyncio/uvloop)
  {"cmd": "stop"}   stop a running handler
  {"cmd": "exit"}
"""

from __future__ import annotations

import json
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
import zlib

HEADER = struct.Struct("<IBBHIQ")
HS = HEADER.size
MAGIC = 0x424C494E
T_HANDSHAKE, T_HEARTBEAT, T_ERROR = 0x01, 0x02, 0x03
T_REQ, T_RESP, T_RPCERR = 0x10, 0x11, 0x12
T_STDOUT = 0x30
BATCH = 1 << 20

try:
    import msgspec

    _dumps = msgspec.json.encode
    _loads = msgspec.json.decode
except ImportError:  # pragma: no cover
    def _dumps(o):
        return json.dumps(o, separators=(",", ":")).encode()

    _loads = json.loads


def frame(mtype: int, rid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, 1, mtype, 0, len(payload), rid) + payload


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        d = sock.recv(n - len(out))
        if not d:
            raise ConnectionError(f"peer closed after {len(out)} of {n} bytes")
        out += d
    return bytes(out)


def read_frame(sock: socket.socket):
    magic, ver, mtype, flags, length, rid = HEADER.unpack(recv_exact(sock, HS))
    if magic != MAGIC or ver != 1:
        raise ConnectionError(f"bad frame header from peer (magic {magic:#x}, version {ver})")
    return mtype, rid, recv_exact(sock, length) if length else b""


def blin_handshake(sock: socket.socket, payload: bytes = b""):
    """Send a Handshake, return the peer's answer payload (raises on Error)."""
    sock.sendall(frame(T_HANDSHAKE, 1, payload))
    mtype, _, body = read_frame(sock)
    if mtype != T_HANDSHAKE:
        raise ConnectionError(f"handshake refused: type {mtype:#x} {body[:200]!r}")
    return body


def build_stream(payload: int, count: int) -> bytes:
    """``count`` Stdout frames, request_id = frame index, payloads cut from a
    random pool at frame-dependent offsets: every frame differs, so loss,
    duplication or reordering changes the checksum."""
    pool_size = 1 << 20
    pool = random.Random(payload * 1_000_003 + count).randbytes(pool_size + payload)
    pack = HEADER.pack
    parts = []
    for i in range(count):
        off = (i * 4099) % pool_size
        parts.append(pack(MAGIC, 1, T_STDOUT, 0, payload, i))
        parts.append(pool[off:off + payload])
    return b"".join(parts)


class Worker:
    def __init__(self):
        self.stream = b""
        self.sock: socket.socket | None = None
        self.socks: list = []
        self.handler_thread: threading.Thread | None = None
        self.handler_sock: socket.socket | None = None
        self.client_stop = None

    # -- guest side --
    def build(self, payload: int, count: int):
        self.stream = build_stream(payload, count)
        return {"ok": True, "nbytes": len(self.stream), "crc": zlib.crc32(self.stream)}

    def connect(self, path: str, handshake: bool):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        if handshake:
            body = blin_handshake(sock)
            if body != b"blink-vhub-ready":
                sock.close()
                return {"ok": False, "error": body.decode("utf-8", "replace")}
        self.sock = sock
        return {"ok": True}

    def connect_many(self, path: str, n: int):
        socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socks.append(s)
        self.socks = socks
        return {"ok": True}

    def send(self):
        if self.socks:
            return self._tee()
        sock, self.sock = self.sock, None
        mv = memoryview(self.stream)
        t0 = time.perf_counter()
        for i in range(0, len(mv), BATCH):
            sock.sendall(mv[i:i + BATCH])
        dt = time.perf_counter() - t0
        sock.close()
        return {"ok": True, "seconds": dt}

    def _tee(self):
        """The whole stream to every socket, each at its own pace (non-blocking,
        one selector), as a relay with zero cost of its own would."""
        socks, self.socks = self.socks, []
        mv = memoryview(self.stream)
        total = len(mv)
        sel = selectors.DefaultSelector()
        pos = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_WRITE)
            pos[s] = 0
        left = len(socks)
        t0 = time.perf_counter()
        while left:
            for key, _ in sel.select():
                s = key.fileobj
                p = pos[s]
                try:
                    p += s.send(mv[p:p + BATCH])
                except BlockingIOError:
                    continue
                pos[s] = p
                if p >= total:
                    sel.unregister(s)
                    left -= 1
        dt = time.perf_counter() - t0
        sel.close()
        for s in socks:
            s.close()
        return {"ok": True, "seconds": dt}

    def rpc(self, n: int, conc: int):
        sock, self.sock = self.sock, None
        pack = HEADER.pack
        unpack_from = HEADER.unpack_from
        now = time.perf_counter_ns
        sent_at: dict[int, int] = {}
        lat = []
        append = lat.append

        def request(i: int) -> bytes:
            body = b'{"method":"bench.echo","params":{"seq":%d}}' % i
            return pack(MAGIC, 1, T_REQ, 0, len(body), i) + body

        next_id = 1
        first = min(conc, n)
        batch = []
        t = now()
        for _ in range(first):
            batch.append(request(next_id))
            sent_at[next_id] = t
            next_id += 1
        t0 = time.perf_counter()
        sock.sendall(b"".join(batch))
        done = 0
        buf = b""
        bad = 0
        while done < n:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"peer closed after {done} of {n} answers")
            buf = buf + data if buf else data
            pos = 0
            end = len(buf)
            answered = 0
            out = []
            while end - pos >= HS:
                magic, ver, mtype, flags, length, rid = unpack_from(buf, pos)
                if end - pos < HS + length:
                    break
                body = buf[pos + HS:pos + HS + length]
                pos += HS + length
                if mtype == T_RESP:
                    t = now()
                    append(t - sent_at.pop(rid))
                    if body != b'{"seq":%d}' % rid:
                        bad += 1
                    answered += 1
                elif mtype == T_HEARTBEAT:
                    if body != b"pong":
                        out.append(frame(T_HEARTBEAT, rid, b"pong"))
                else:
                    raise ConnectionError(f"unexpected frame type {mtype:#x} id {rid}: {body[:200]!r}")
            buf = buf[pos:]
            done += answered
            more = min(answered, n - (next_id - 1))
            if more > 0:
                t = now()
                for _ in range(more):
                    out.append(request(next_id))
                    sent_at[next_id] = t
                    next_id += 1
            if out:
                sock.sendall(b"".join(out))
        dt = time.perf_counter() - t0
        sock.close()
        return {"ok": bad == 0 and not sent_at, "bad": bad, "seconds": dt, "lat_ns": lat}

    # -- handler side --
    def serve(self, path: str, mode: str):
        if mode == "listen":
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ls.bind(path)
            ls.listen(1)
            reply({"ok": True, "listening": path})
            ls.settimeout(30)
            sock, _ = ls.accept()
            ls.close()
            sock.settimeout(None)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            if mode == "vhubd":
                hs = _dumps({"role": "client", "session": "default", "serve": ["bench.echo"]})
                body = blin_handshake(sock, hs)
                if not _loads(body).get("ok"):
                    raise ConnectionError(f"handler handshake refused: {body!r}")
            reply({"ok": True})
        self.handler_sock = sock
        self.handler_thread = threading.Thread(target=self._serve_loop, args=(sock,), daemon=True)
        self.handler_thread.start()
        return None

    def _serve_loop(self, sock: socket.socket):
        unpack_from = HEADER.unpack_from
        pack = HEADER.pack
        answered = 0
        buf = b""
        err = None
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                buf = buf + data if buf else data
                pos = 0
                end = len(buf)
                out = []
                while end - pos >= HS:
                    magic, ver, mtype, flags, length, rid = unpack_from(buf, pos)
                    if end - pos < HS + length:
                        break
                    body = buf[pos + HS:pos + HS + length]
                    pos += HS + length
                    if mtype == T_REQ:
                        res = _dumps(_loads(body)["params"])
                        out.append(pack(MAGIC, 1, T_RESP, 0, len(res), rid) + res)
                        answered += 1
                    elif mtype == T_HEARTBEAT:
                        if body != b"pong":
                            out.append(frame(T_HEARTBEAT, rid, b"pong"))
                    else:
                        raise ConnectionError(f"handler got frame type {mtype:#x}: {body[:200]!r}")
                buf = buf[pos:]
                if out:
                    sock.sendall(b"".join(out) if len(out) > 1 else out[0])
        except OSError as exc:
            err = str(exc)
        finally:
            sock.close()
            reply({"done": answered, "error": err})

    def serve_client(self, path: str):
        import asyncio

        import uvloop

        from vhubd.client import Client

        ready = threading.Event()
        state = {}

        async def main():
            c = await Client.connect(path, session="default", serve={"bench.echo": lambda p: p})
            loop = asyncio.get_running_loop()
            stop = loop.create_future()
            state["stop"] = lambda: loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
            ready.set()
            await stop
            await c.close()

        def run():
            try:
                uvloop.run(main())
                reply({"done": -1, "error": None})
            except Exception as exc:  # noqa: BLE001
                ready.set()
                reply({"done": -1, "error": repr(exc)})

        self.handler_thread = threading.Thread(target=run, daemon=True)
        self.handler_thread.start()
        ready.wait(15)
        self.client_stop = state.get("stop")
        reply({"ok": self.client_stop is not None})
        return None

    def stop(self):
        if self.client_stop is not None:
            self.client_stop()
            self.client_stop = None
        elif self.handler_sock is not None:
            try:
                self.handler_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.handler_sock = None
        if self.handler_thread is not None:
            self.handler_thread.join(15)
            self.handler_thread = None
        return None  # the serve loop itself reports {"done": ...}


def main() -> None:
    w = Worker()
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "exit":
            break
        try:
            out = getattr(w, cmd)(**msg)
        except Exception as exc:  # noqa: BLE001
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if out is not None:
            reply(out)


if __name__ == "__main__":
    main()
