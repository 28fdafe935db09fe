"""Bad input of every kind of DESIGN §2, on every listener (guest Unix
socket, loopback TCP, control socket), against a real daemon: each gets the
right Error and a close, while a healthy guest keeps streaming to a healthy
subscriber without losing a byte. Plus the handshake and mid-frame timeouts."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from harness import AsyncPeer, RawClient, T, client, frame, header, run

LISTENERS = ["guest-unix", "guest-tcp", "control"]

# (name, bytes sent, expected code): checked before and after the handshake
BAD_HEADERS = [
    ("bad_magic", header(T.HANDSHAKE, 0, 1, magic=0x4E494C42), "bad_magic"),
    ("bad_version", header(T.HANDSHAKE, 0, 1, version=2), "bad_version"),
    ("unknown_type", header(0x7F, 0, 1), "unknown_type"),
    ("frame_too_large", header(T.STDOUT, 0xFFFF_FFFF, 1), "frame_too_large"),  # 4 GiB, no payload follows
    ("magic_before_length", header(T.STDOUT, 0xFFFF_FFFF, 1, magic=0), "bad_magic"),
    ("version_before_type", header(0x7F, 0, 1, version=0), "bad_version"),
    ("type_before_length", header(0x7F, 0xFFFF_FFFF, 1), "unknown_type"),
    ("too_large_by_one", header(T.RPC_REQUEST, 16 * 1024 * 1024 + 1, 1), "frame_too_large"),
]
BEFORE_HANDSHAKE_ONLY = [
    ("rpc_first", frame(T.RPC_REQUEST, 1, {"method": "vhub.ping"}), "handshake_required"),
    ("stdout_first", frame(T.STDOUT, 0, b"hi"), "handshake_required"),
    ("heartbeat_first", frame(T.HEARTBEAT, 1), "handshake_required"),
]


class Bench:
    """A daemon with a registered session per bad peer, and a healthy guest
    streaming to a healthy subscriber the whole time."""

    def __init__(self, d):
        self.d = d
        self.tcp = d.tcp
        self.n = 0

    async def setup(self):
        self.admin = await client(self.d)
        self.healthy_token = (await self.admin.register("healthy"))["token"]
        self.sub = await RawClient.open(self.d.control, session="healthy", subscribe=["stdout", "stderr"])
        self.guest = await AsyncPeer.guest(self.d.socket, {"session": "healthy", "token": self.healthy_token})
        self.sent = hashlib.sha256()
        self.sent_n = 0
        self.stop = asyncio.Event()
        self.flow = asyncio.ensure_future(self._stream())

    async def _stream(self):
        i = 0
        while not self.stop.is_set():
            f = frame(T.STDOUT if i % 3 else T.STDERR, i, bytes([i % 251]) * (1 + i * 37 % 4000))
            self.guest.send_raw(f)
            self.sent.update(f)
            self.sent_n += len(f)
            await self.guest.drain()
            i += 1
            if i % 20 == 0:  # the guest's RPC keeps working too
                r = await self.guest.call("vhub.ping", rid=i)
                assert r.msg_type == T.RPC_RESPONSE
            await asyncio.sleep(0)

    async def finish(self):
        self.stop.set()
        await asyncio.wait_for(self.flow, 20)
        assert await self.sub.sha_of(self.sent_n) == self.sent.hexdigest()
        assert self.sent_n > 0

    async def peer(self, listener: str, handshaken: bool) -> AsyncPeer:
        target = {"guest-unix": self.d.socket, "guest-tcp": self.tcp, "control": self.d.control}[listener]
        p = await AsyncPeer.open(target)
        if handshaken:
            if listener == "control":
                res = await p.handshake({"role": "client", "session": "healthy"})
            else:
                self.n += 1
                name = f"bad-{self.n}"
                token = (await self.admin.register(name))["token"]
                res = await p.handshake({"session": name, "token": token})
            assert res[0] == "ok", res
        return p


@pytest.mark.parametrize("listener", LISTENERS)
def test_every_bad_header_gets_its_error_and_a_close(make_daemon, listener):
    d = make_daemon("--tcp", "127.0.0.1:0", "--heartbeat", "0")

    async def body():
        bench = Bench(d)
        await bench.setup()
        checked = 0
        cases = [(name, data, code, False) for name, data, code in BAD_HEADERS + BEFORE_HANDSHAKE_ONLY]
        cases += [(name, data, code, True) for name, data, code in BAD_HEADERS]
        for name, data, code, handshaken in cases:
            p = await bench.peer(listener, handshaken)
            p.send_raw(data)  # a header alone: nothing else is sent, ever
            got, message = await p.error_and_close()
            assert got == code, (name, handshaken, got, message)
            assert message, name
            await p.close()
            checked += 1
        await bench.finish()
        stats = await bench.admin.stats()
        assert stats["counters"]["violations"] == checked
        # the listener still accepts good peers
        if listener == "control":
            c = await client(d, session="healthy")
            assert (await c.call("vhub.ping"))["pong"]
        else:
            p = await bench.peer(listener, True)
            assert (await p.call("vhub.ping", rid=1)).msg_type == T.RPC_RESPONSE

    run(body(), 60)


@pytest.mark.parametrize("listener", LISTENERS)
def test_frame_too_large_message_names_the_length(make_daemon, listener):
    d = make_daemon("--tcp", "127.0.0.1:0", "--max-payload", "1k")

    async def body():
        bench = Bench(d)
        bench.admin = await client(d)
        p = await bench.peer(listener, listener != "control")
        p.send_raw(header(T.STDOUT, 1025, 1))
        code, message = await p.error_and_close()
        assert code == "frame_too_large" and "1025" in message and "1024" in message

    run(body())


def test_handshake_timeout_and_mid_frame_stall(make_daemon):
    """On every listener at once: silent and half-header peers get
    handshake_timeout; a peer stuck in the middle of a frame gets stalled; a
    peer idle between frames stays."""
    d = make_daemon("--tcp", "127.0.0.1:0", "--handshake-timeout", "1", "--stall-timeout", "1",
                    "--heartbeat", "0")

    async def body():
        bench = Bench(d)
        bench.admin = await client(d)
        await bench.admin.register("healthy")
        doomed, idle = [], []
        for listener in LISTENERS:
            silent = await bench.peer(listener, False)
            half_header = await bench.peer(listener, False)
            half_header.send_raw(frame(T.HANDSHAKE, 1)[:7])
            half_frame = await bench.peer(listener, True)
            half_frame.send_raw(frame(T.RPC_REQUEST, 5, {"method": "vhub.ping", "params": {}})[:30])
            half_header_after = await bench.peer(listener, True)
            half_header_after.send_raw(frame(T.STDOUT, 1, b"x")[:10])
            doomed += [(listener, silent, "handshake_timeout"), (listener, half_header, "handshake_timeout"),
                       (listener, half_frame, "stalled"), (listener, half_header_after, "stalled")]
            idle.append(await bench.peer(listener, True))
        results = await asyncio.gather(*(p.error_and_close() for _, p, _ in doomed))
        assert [(listener, code) for (listener, _, _), (code, _) in zip(doomed, results, strict=True)] == [
            (listener, want) for listener, _, want in doomed]
        # idle as long as the others, but between frames: still served
        for i, p in enumerate(idle):
            assert (await p.call("vhub.ping", rid=7 + i)).msg_type == T.RPC_RESPONSE

    run(body())
