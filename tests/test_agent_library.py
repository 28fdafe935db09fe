"""The blink_agent library (blocking ``connect`` and asyncio ``aconnect``) against a
scripted host peer running in a thread."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import pytest
from test_agent_peer import HostPeer, PeerConn, short_socket_path

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
import blink_agent
from blink_agent import CallTimeout, ConnectionLost, HandshakeRejected, RpcError
from blink_agent.wire import MsgType


class ScriptedHost:
    """Accepts agent connections in a thread and answers guest->host calls:
    ``echo`` -> params, ``fail`` -> RpcError, ``fail_with`` -> RpcError with the code
    given as params, ``slow`` -> never, ``drop`` -> closes.
    Every other frame lands in ``frames`` (a queue) for the test to inspect."""

    def __init__(self, path: str, hello: bool = True, reject: dict | None = None) -> None:
        self.peer = HostPeer(path)
        self.hello = hello
        self.reject = reject
        self.frames: queue.Queue = queue.Queue()
        self.handshakes: list = []
        self.conn: PeerConn | None = None
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.accept_more = threading.Event()
        self.accept_more.set()
        self.errors: list = []
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> str:
        return self.peer.addr

    def _main(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.accept_more.wait(0.05):
                    continue
                try:
                    conn = self.peer.accept(timeout=0.1)
                except TimeoutError:
                    continue
                if self.reject:
                    conn.recv()
                    conn.send_json(MsgType.Error, 0, self.reject)
                    conn.close()
                    continue
                first = conn.recv()
                assert first.msg_type == MsgType.Handshake and first.request_id == 1
                self.handshakes.append(json.loads(first.payload or b"null"))  # before the reply: no race
                conn.send(MsgType.Handshake, 1, b"blink-vhub-ready")
                if self.hello:
                    conn.hello()
                self.conn = conn
                self.connected.set()
                self._serve(conn)
        except Exception as exc:  # surfaced by close()
            self.errors.append(exc)

    def _serve(self, conn: PeerConn) -> None:
        while not self.stop.is_set():
            try:
                frame = conn.recv(timeout=0.1)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            if frame.msg_type == MsgType.RpcRequest and frame.request_id:
                body = json.loads(frame.payload)
                method, params = body.get("method"), body.get("params")
                if method == "echo":
                    conn.send_json(MsgType.RpcResponse, frame.request_id, params)
                    continue
                if method == "fail":
                    conn.send_json(
                        MsgType.RpcError, frame.request_id, {"code": "denied", "message": "not allowed"}
                    )
                    continue
                if method == "fail_with":  # answer with the code given as params
                    conn.send_json(MsgType.RpcError, frame.request_id, {"code": params, "message": "m"})
                    continue
                if method == "slow":
                    continue
                if method == "drop":
                    self.connected.clear()
                    conn.close()
                    return
            if frame.msg_type in (MsgType.Stdout, MsgType.Stderr):
                conn.ack()
            self.frames.put(frame)

    def next_frame(self, predicate=lambda f: True, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frames.get(timeout=max(0.001, deadline - time.monotonic()))
            if predicate(frame):
                return frame

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.peer.close()
        assert not self.errors, self.errors


@pytest.fixture
def host(tmp_path):
    h = ScriptedHost(short_socket_path(tmp_path))
    yield h
    h.close()


def test_blocking_calls(host):
    with blink_agent.connect(host.addr, session="lib", token="tk", timeout=5) as hub:
        assert host.handshakes[0]["session"] == "lib" and host.handshakes[0]["ack"] is True
        assert hub.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert hub.call("echo") is None
        with pytest.raises(RpcError) as info:
            hub.call("fail", {})
        assert (info.value.code, info.value.message) == ("denied", "not allowed")
        started = time.monotonic()
        with pytest.raises(CallTimeout) as tinfo:
            hub.call("slow", timeout=0.3)
        assert isinstance(tinfo.value, TimeoutError)
        assert 0.25 < time.monotonic() - started < 3
        assert hub.call("echo", 5) == 5  # still usable after a timeout
        hub.notify("note.this", {"n": 1})
        frame = host.next_frame(lambda f: f.msg_type == MsgType.RpcRequest)
        assert frame.request_id == 0 and json.loads(frame.payload) == {
            "method": "note.this",
            "params": {"n": 1},
        }
        hub.stdout(b"out-bytes")
        hub.stderr("err-text")
        f1 = host.next_frame(lambda f: f.msg_type in (MsgType.Stdout, MsgType.Stderr))
        f2 = host.next_frame(lambda f: f.msg_type in (MsgType.Stdout, MsgType.Stderr))
        assert [(f1.msg_type, f1.request_id, f1.payload), (f2.msg_type, f2.request_id, f2.payload)] == [
            (MsgType.Stdout, 0, b"out-bytes"),
            (MsgType.Stderr, 0, b"err-text"),
        ]
        assert hub.flush(5)
    with pytest.raises(ConnectionLost):
        hub.call("echo", 1)


def test_old_error_codes_reach_callers_canonical(host):
    """A host (or peer) still sending the old spellings: callers see one code per meaning."""
    with blink_agent.connect(host.addr, timeout=5) as hub:
        for sent, seen in [
            ("no_such_method", "no_handler"),
            ("handler_error", "handler_failed"),
            ("no_handler", "no_handler"),
            ("handler_failed", "handler_failed"),
            ("denied", "denied"),
        ]:
            with pytest.raises(RpcError) as info:
                hub.call("fail_with", sent)
            assert (info.value.code, info.value.message) == (seen, "m")


def test_blocking_serve_handlers(host):
    hub = blink_agent.connect(host.addr, timeout=5)
    try:
        hub.serve("guest.add", lambda p: {"sum": p["a"] + p["b"]})
        hub.serve("guest.nested", lambda p: hub.call("echo", {"inner": p}))  # calls back from a worker

        def refuse(params):
            raise RpcError("refused", "no way")

        hub.serve("guest.refuse", refuse)
        hub.serve("guest.crash", lambda p: 1 / 0)
        host.connected.wait(5)
        conn = host.conn
        for rid, method, params in [
            (21, "guest.add", {"a": 2, "b": 3}),
            (22, "guest.nested", 7),
            (23, "guest.refuse", None),
            (24, "guest.crash", None),
            (25, "guest.none", None),
        ]:
            conn.request(rid, method, params)
        replies = {}
        while len(replies) < 5:
            f = host.next_frame(lambda f: f.msg_type in (MsgType.RpcResponse, MsgType.RpcError))
            replies[f.request_id] = (f.msg_type, json.loads(f.payload))
        assert replies[21] == (MsgType.RpcResponse, {"sum": 5})
        assert replies[22] == (MsgType.RpcResponse, {"inner": 7})
        assert replies[23] == (MsgType.RpcError, {"code": "refused", "message": "no way"})
        assert replies[24][0] == MsgType.RpcError and replies[24][1]["code"] == "handler_failed"
        assert "ZeroDivisionError" in replies[24][1]["message"]
        assert replies[25] == (
            MsgType.RpcError,
            {"code": "no_handler", "message": "no handler for 'guest.none'"},
        )
    finally:
        hub.close()


def test_connection_loss_fails_inflight_calls_then_reconnects(host):
    with blink_agent.connect(host.addr, session="lib", timeout=5) as hub:
        results: queue.Queue = queue.Queue()

        def slow_call():
            try:
                hub.call("slow", timeout=20)
            except Exception as exc:
                results.put(exc)

        t = threading.Thread(target=slow_call)
        t.start()
        time.sleep(0.2)
        host.accept_more.clear()
        started = time.monotonic()
        with pytest.raises(ConnectionLost) as info:
            hub.call("drop", timeout=20)
        assert "lost before the reply to 'drop'" in str(info.value)
        exc = results.get(timeout=5)
        t.join(5)
        assert isinstance(exc, ConnectionLost) and "'slow'" in str(exc)
        assert time.monotonic() - started < 3
        # Output produced while disconnected is kept and flushed on reconnect.
        hub.stdout(b"while-down")
        host.accept_more.set()
        assert hub.call("echo", "back", timeout=10) == "back"
        frame = host.next_frame(lambda f: f.msg_type == MsgType.Stdout)
        assert frame.payload == b"while-down"
        assert len(host.handshakes) == 2


def test_no_reconnect_mode(host):
    hub = blink_agent.connect(host.addr, timeout=5, reconnect=False)
    try:
        host.accept_more.clear()
        with pytest.raises(ConnectionLost):
            hub.call("drop", timeout=5)
        with pytest.raises(ConnectionLost) as info:
            hub.call("echo", 1, timeout=5)
        assert "not connected to" in str(info.value)
    finally:
        hub.close()


def test_connect_failures(tmp_path):
    with pytest.raises(ConnectionLost) as info:
        blink_agent.connect("unix:" + str(tmp_path / "none.sock"), timeout=2)
    assert "cannot connect to unix:" in str(info.value)
    with pytest.raises(blink_agent.AddressError):
        blink_agent.connect("nope://x")
    h = ScriptedHost(
        short_socket_path(tmp_path, "rej.sock"), reject={"code": "session_busy", "message": "taken"}
    )
    try:
        with pytest.raises(HandshakeRejected) as rinfo:
            blink_agent.connect(h.addr, session="s", timeout=5)
        assert (rinfo.value.code, rinfo.value.message) == ("session_busy", "taken")
    finally:
        h.close()


def test_async_flavour(host):
    async def main():
        hub = await blink_agent.aconnect(host.addr, session="alib", token="t", timeout=5)
        async with hub:
            assert await hub.call("echo", {"x": 1}) == {"x": 1}
            with pytest.raises(RpcError) as info:
                await hub.call("fail")
            assert info.value.code == "denied"
            with pytest.raises(CallTimeout):
                await hub.call("slow", timeout=0.2)
            results = await asyncio.gather(*(hub.call("echo", i) for i in range(50)))
            assert results == list(range(50))
            await hub.stdout(b"a" * 200_000)  # several 64 KiB frames
            await hub.notify("n", None)

            async def handler(params):
                await asyncio.sleep(0.01)
                return {"got": params}

            hub.serve("guest.async", handler)
            await asyncio.get_running_loop().run_in_executor(None, host.conn.request, 31, "guest.async", [1])
            got = b""
            loop = asyncio.get_running_loop()
            while True:
                f = await loop.run_in_executor(None, host.next_frame)
                if f.msg_type == MsgType.Stdout:
                    got += f.payload
                    assert len(f.payload) <= 64 * 1024
                elif f.msg_type == MsgType.RpcResponse and f.request_id == 31:
                    assert json.loads(f.payload) == {"got": [1]}
                    break
            assert got == b"a" * 200_000
        assert hub.closed

    asyncio.run(main())


def test_a_missing_vsock_device_is_polled_not_backed_off():
    """ENODEV on connect: the daemon unplugged the VM's vsock device for a
    snapshot; the agent tries every DEVICE_POLL instead of backing off, so the
    link is back as soon as the new device is (other errors still back off)."""
    import errno
    import os

    from blink_agent import link

    def lost(err: int) -> ConnectionLost:
        try:
            raise ConnectionLost("cannot connect to vsock://2:10000") from OSError(err, os.strerror(err))
        except ConnectionLost as exc:
            return exc

    assert link.no_device(lost(errno.ENODEV))
    assert link.no_device(OSError(errno.ENODEV, "No such device"))
    assert not link.no_device(lost(errno.ECONNREFUSED))
    assert not link.no_device(ConnectionLost("connection closed"))
    assert 0 < link.DEVICE_POLL <= 0.1
