"""Stream fan-out through a real daemon (DESIGN §3 subscriber flow, §4, §6):
identical bytes at every subscriber, scrollback replay, lossy subscribers
dropped with slow_consumer, lossless subscribers pacing the guest, and a
daemon whose memory stays bounded throughout."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading

from harness import AsyncPeer, RawClient, RawGuest, T, client, error_of, frame, run, wait_for, wait_until

MiB = 1 << 20


def stream_frames(total: int, seed: int = 1, max_chunk: int = 64 * 1024) -> list[bytes]:
    """Stdout/Stderr frames of random sizes and contents, ``total`` payload bytes."""
    rnd = random.Random(seed)
    out, left, i = [], total, 0
    while left:
        n = min(left, rnd.randint(1, max_chunk))
        kind = T.STDERR if rnd.random() < 0.3 else T.STDOUT
        out.append(frame(kind, i % 5, rnd.randbytes(n)))
        left -= n
        i += 1
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fan_out_identical_bytes_to_20_subscribers(make_daemon):
    """20 subscribers (raw lossless, one on '*', two through the client
    library, one stderr-only) see exactly the guest's frames, in order."""
    d = make_daemon("--heartbeat", "0")
    frames = stream_frames(3 * MiB)
    wire = b"".join(frames)
    stdout_only = b"".join(f for f in frames if f[5] == T.STDOUT)
    stderr_payloads = [f[20:] for f in frames if f[5] == T.STDERR]

    async def body():
        raws = [await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
                for _ in range(15)]
        raws.append(await RawClient.open(d.control, session="*", subscribe=["stdout", "stderr"]))
        raws.append(await RawClient.open(d.control, session="default", subscribe=["stdout"]))
        lib = await client(d, session="default", subscribe=["stdout", "stderr"])
        lib_err = await client(d, session="default", subscribe=["stderr"])
        lib_lossy = await client(d, session="default", subscribe=["stdout", "stderr"], flow="lossy")
        g = await AsyncPeer.guest(d.socket)

        async def collect(c, n):
            items = []
            while len(items) < n:
                item = await c.next(30)
                assert item is not None, c.closed_reason
                items.append(item)
            return items

        wants = [wire] * 16 + [stdout_only]
        results = await asyncio.gather(
            g.send_frames(frames, 16), *(r.sha_of(len(w)) for r, w in zip(raws, wants, strict=True)),
            collect(lib, len(frames)), collect(lib_err, len(stderr_payloads)), collect(lib_lossy, len(frames)))
        shas = results[1:1 + len(raws)]
        assert shas == [sha(w) for w in wants]
        for items in (results[-3], results[-1]):
            assert [(o.kind, o.request_id, o.data) for o in items] == [
                ("stdout" if f[5] == T.STDOUT else "stderr", int.from_bytes(f[12:20], "little"), f[20:])
                for f in frames]
        assert [o.data for o in results[-2]] == stderr_payloads

    run(body(), 60)


def test_scrollback_replay(daemon):
    """A client with replay gets earlier output, then live output; one without
    gets live output only."""

    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        early = [frame(T.STDOUT, 1, b"one\n"), frame(T.STDERR, 1, b"two\n"), frame(T.STDOUT, 2, b"three\n")]
        g.send_raw(b"".join(early))
        assert (await g.call("vhub.ping", rid=9)).msg_type == T.RPC_RESPONSE  # output processed
        replayer = await RawClient.open(daemon.control, session="default", subscribe=["stdout", "stderr"],
                                        replay=True)
        live_only = await RawClient.open(daemon.control, session="default", subscribe=["stdout", "stderr"])
        out_only = await client(daemon, session="default", subscribe=["stdout"], replay=True)
        live = frame(T.STDOUT, 3, b"four\n")
        g.send_raw(live)
        assert await replayer.read_exactly(len(b"".join(early) + live)) == b"".join(early) + live
        assert await live_only.read_exactly(len(live)) == live
        got = [(await out_only.next(10)).data for _ in range(3)]
        assert got == [b"one\n", b"three\n", b"four\n"]

    run(body())


def test_scrollback_small_keeps_newest_whole_frames(make_daemon):
    """--scrollback 1000 with 320-byte frames: the replay holds the newest
    three whole frames, oldest dropped."""
    d = make_daemon("--scrollback", "1000")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        frames = [frame(T.STDOUT, i, bytes([65 + i]) * 300) for i in range(10)]
        for i, f in enumerate(frames):  # one frame per read: one ring entry each
            g.send_raw(f)
            assert (await g.call("vhub.ping", rid=100 + i)).msg_type == T.RPC_RESPONSE
        r = await RawClient.open(d.control, session="default", subscribe=["stdout"], replay=True)
        g.send_raw(frame(T.STDOUT, 99, b"end"))
        want = b"".join(frames[-3:]) + frame(T.STDOUT, 99, b"end")
        assert await r.read_exactly(len(want)) == want
        c = await client(d, session="default")
        assert (await c.info())["scrollback_bytes"] <= 1000

    run(body())


def test_scrollback_small_batch_larger_than_ring(make_daemon):
    """Frames that reach the daemon in one read (1800 bytes, under its first
    receive buffer), together larger than the ring: the replay still holds
    the newest whole frames that fit."""
    d = make_daemon("--scrollback", "1000")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        watch = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        frames = [frame(T.STDOUT, i, bytes([65 + i]) * 100) for i in range(15)]  # 120 bytes each
        g.send_raw(b"".join(frames))
        assert await watch.read_exactly(1800) == b"".join(frames)  # processed (a ping could share the read)
        r = await RawClient.open(d.control, session="default", subscribe=["stdout"], replay=True)
        end = frame(T.STDOUT, 99, b"end")
        g.send_raw(end)
        assert await r.reader.readuntil(end) == b"".join(frames[-8:]) + end

    run(body())


def test_scrollback_evicts_oldest_frames_not_whole_batches(make_daemon):
    d = make_daemon("--scrollback", "1000")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        watch = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        frames = [frame(T.STDOUT, i, bytes([65 + i]) * 100) for i in range(9)]  # 120 bytes each
        g.send_raw(b"".join(frames[:8]))  # 960 bytes: one read, one ring entry
        assert await watch.read_exactly(960) == b"".join(frames[:8])
        g.send_raw(frames[8])  # 120 more: only the oldest frame has to go
        assert await watch.read_exactly(120) == frames[8]
        r = await RawClient.open(d.control, session="default", subscribe=["stdout"], replay=True)
        end = frame(T.STDOUT, 99, b"end")
        g.send_raw(end)
        assert await r.reader.readuntil(end) == b"".join(frames[1:]) + end

    run(body())


def _stats(d, key):
    async def get():
        c = await client(d)
        try:
            return (await c.stats())["counters"][key]
        finally:
            await c.close()
    return get


def test_lossy_slow_consumer_dropped_others_unaffected(make_daemon):
    """A lossy subscriber that never reads gets Error slow_consumer and is
    disconnected; a fast subscriber and the guest keep going with every byte;
    the daemon's memory stays bounded."""
    d = make_daemon("--lossy-limit", "256k", "--heartbeat", "0")
    frames = stream_frames(48 * MiB, seed=3)
    wire = b"".join(frames)

    async def body():
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(10)
        slow.connect(d.control)
        slow.sendall(frame(T.HANDSHAKE, 1, {"role": "client", "session": "default", "subscribe": ["stdout", "stderr"],
                                            "flow": "lossy"}))
        try:
            fast = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
            g = await AsyncPeer.guest(d.socket)
            rss_before = d.rss_kib()

            sender = asyncio.ensure_future(g.send_frames(frames, 32))
            await wait_until(_stats(d, "slow_consumers"), 30, interval=0.05, what="slow consumer dropped")
            raw = await asyncio.to_thread(_read_to_eof, slow)
            assert error_of(raw)[0] == "slow_consumer"
            assert await fast.sha_of(len(wire), 60) == sha(wire)
            await asyncio.wait_for(sender, 30)
            assert (await g.call("vhub.ping", rid=5)).msg_type == T.RPC_RESPONSE
            assert d.rss_kib() - rss_before < 40 * 1024  # 48 MiB went through
        finally:
            slow.close()

    run(body(), 90)


def _read_to_eof(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = s.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_lossless_subscriber_paces_the_guest(make_daemon):
    """A lossless subscriber that stops reading pauses the guest (its sends
    block); once it reads again every byte arrives and the guest finishes.
    The daemon buffers a bounded amount meanwhile."""
    d = make_daemon("--heartbeat", "0", "--stall-timeout", "1")
    frames = stream_frames(64 * MiB, seed=5)
    wire = b"".join(frames)

    sub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sub.settimeout(10)
    sub.connect(d.control)
    sub.sendall(frame(T.HANDSHAKE, 1, {"role": "client", "session": "default", "subscribe": ["stdout", "stderr"]}))
    hello = _read_exact(sub, 20)
    _read_exact(sub, int.from_bytes(hello[8:12], "little"))
    g = RawGuest(d.socket, timeout=60)
    assert g.handshake()[0] == "ok"
    rss_before = d.rss_kib()
    sent = [0]
    failure: list = []

    def send():
        try:
            for f in frames:
                g.sock.sendall(f)
                sent[0] += len(f)
        except OSError as exc:
            failure.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        # the guest is blocked: no progress for 3 s (longer than --stall-timeout:
        # a guest paused by the daemon is not a stalled guest), well short of the total
        last, still = [-1], [0]

        def stalled():
            now, prev = sent[0], last[0]
            last[0] = now
            still[0] = still[0] + 1 if now == prev else 0
            return still[0] >= 6 and t.is_alive()

        wait_for(stalled, 40, interval=0.5, what="the guest to block")
        assert sent[0] < len(wire) // 4
        assert d.rss_kib() - rss_before < 32 * 1024
        # resume: every byte, in order; the guest finishes
        h = hashlib.sha256()
        got = 0
        sub.settimeout(30)
        while got < len(wire):
            data = sub.recv(min(1 << 18, len(wire) - got))
            assert data, f"EOF after {got} bytes: {d.log()[-2000:]}"
            h.update(data)
            got += len(data)
        t.join(30)
        assert not t.is_alive() and not failure, failure
        assert h.hexdigest() == sha(wire)
        assert sent[0] == len(wire)
        assert error_of(b"") is None
    finally:
        g.close()
        sub.close()
        t.join(5)


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        assert data
        buf += data
    return buf


def test_lossy_consumer_dropped_mid_large_frame_gets_no_foreign_bytes(make_daemon):
    """Frames of 1 MiB go cut-through; a lossy subscriber dropped in the middle
    of one must not get an Error frame spliced into the payload: what it gets
    is a prefix of the guest's bytes, optionally followed (at a frame
    boundary) by Error slow_consumer."""
    d = make_daemon("--lossy-limit", "64k", "--heartbeat", "0")
    rnd = random.Random(9)
    frames = [frame(T.STDOUT, i, rnd.randbytes(MiB)) for i in range(12)]
    wire = b"".join(frames)

    async def body():
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(10)
        slow.connect(d.control)
        slow.sendall(frame(T.HANDSHAKE, 1, {"role": "client", "session": "default", "subscribe": ["stdout"],
                                            "flow": "lossy"}))
        try:
            fast = await RawClient.open(d.control, session="default", subscribe=["stdout"])
            g = await AsyncPeer.guest(d.socket)

            sender = asyncio.ensure_future(g.send_frames(frames))
            await wait_until(_stats(d, "slow_consumers"), 30, interval=0.05, what="slow consumer dropped")
            raw = await asyncio.to_thread(_read_to_eof, slow)
            assert await fast.sha_of(len(wire), 60) == sha(wire)
            await asyncio.wait_for(sender, 30)
        finally:
            slow.close()
        n = 20 + int.from_bytes(raw[8:12], "little")
        got = raw[n:]  # after the handshake answer
        if wire.startswith(got):
            return  # cut mid-frame, then EOF
        boundary = 0
        while boundary < len(got) and got[boundary:boundary + 20] == wire[boundary:boundary + 20] and \
                got[boundary:boundary + 20 + MiB] == wire[boundary:boundary + 20 + MiB]:
            boundary += 20 + MiB
        assert wire.startswith(got[:boundary])
        assert error_of(got[boundary:]) is not None and error_of(got[boundary:])[0] == "slow_consumer", \
            got[boundary:boundary + 80]

    run(body(), 60)
