"""The stream pump (csrc/pump.c and its twin in vhubd/_codec_py.py), on both
backends, on real sockets: what a read returns, where its prefix of plain
stream frames stops and why, what each target socket is offered and takes;
and the two backends agree on all of it, byte for byte."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import socket
import struct

import pytest
from harness import AsyncPeer, RawClient, T, client, header, run
from harness import frame as wire_frame

from vhubd import codec, frames
from vhubd.frames import TYPE_BIT, MsgType

H = struct.Struct("<IBBHIQ")
OUT, ERR = TYPE_BIT[MsgType.STDOUT], TYPE_BIT[MsgType.STDERR]
FAST = OUT | ERR
MAX = 1 << 20


def frame(t, payload=b"", rid=1, magic=0x424C494E):
    return H.pack(magic, 1, int(t), 0, len(payload), rid) + payload


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def read_all(sock) -> bytes:
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


@pytest.fixture
def guest():
    ours, theirs = pair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_nothing_to_read_and_eof(codec_impl, guest):
    ours, theirs = guest
    pump = codec_impl.Pump()
    buf = bytearray(64)
    assert pump.read(ours.fileno(), buf, 0, 0, MAX, FAST) == (-errno.EAGAIN, 0, 0, 0, 0)
    theirs.close()
    assert pump.read(ours.fileno(), buf, 0, 0, MAX, FAST) == (0, 0, 0, 0, 0)


def test_the_prefix_stops_at_the_first_frame_it_does_not_forward(codec_impl, guest):
    ours, theirs = guest
    pump = codec_impl.Pump()
    head = frame(MsgType.STDOUT, b"a" * 10) + frame(MsgType.STDERR, b"bb") + frame(MsgType.STDOUT)
    rpc = frame(MsgType.RPC_REQUEST, b"{}", rid=7)
    theirs.sendall(head + rpc + frame(MsgType.STDOUT, b"after"))
    buf = bytearray(4096)
    n = len(head) + len(rpc) + 25
    assert pump.read(ours.fileno(), buf, 0, 0, MAX, FAST) == (n, len(head), 3, OUT | ERR, 0)
    # a channel's StreamData is not in the mask: it stops there too
    theirs.sendall(frame(MsgType.STDOUT, b"x") + frame(MsgType.STREAM_DATA, b"y"))
    assert pump.read(ours.fileno(), buf, n, n, MAX, FAST) == (42, n + 21, 1, OUT, 0)
    # fast_mask 0 (the connection is not at a frame boundary it may skip): a read only
    theirs.sendall(frame(MsgType.STDOUT, b"z"))
    assert pump.read(ours.fileno(), buf, 0, n + 42, MAX, 0) == (21, 0, 0, 0, 0)


def test_a_frame_cut_by_the_read_is_reported_with_its_size(codec_impl, guest):
    ours, theirs = guest
    pump = codec_impl.Pump()
    whole = frame(MsgType.STDOUT, b"w" * 100)
    cut = frame(MsgType.STDERR, b"c" * 1000)
    theirs.sendall(whole + cut[:300])
    buf = bytearray(4096)
    assert pump.read(ours.fileno(), buf, 0, 0, MAX, FAST) == (420, 120, 1, OUT, 1020)
    # the rest arrives: the carried bytes (from start) complete the frame
    theirs.sendall(cut[300:])
    assert pump.read(ours.fileno(), buf, 120, 420, MAX, FAST) == (720, 1140, 1, ERR, 0)
    assert bytes(buf[120:1140]) == cut
    # a bare header prefix: nothing to report but that it stopped
    theirs.sendall(whole[:11])
    assert pump.read(ours.fileno(), buf, 1140, 1140, MAX, FAST) == (11, 1140, 0, 0, 0)


@pytest.mark.parametrize("bad", [
    frame(MsgType.STDOUT, b"x", magic=0x424C494F),  # bad magic
    H.pack(0x424C494E, 2, 0x30, 0, 0, 1),  # bad version
    H.pack(0x424C494E, 1, 0x04, 0, 0, 1),  # unknown type
    H.pack(0x424C494E, 1, 0x30, 0, MAX + 1, 1),  # larger than the limit
])
def test_a_bad_header_is_left_to_the_connection(codec_impl, guest, bad):
    ours, theirs = guest
    pump = codec_impl.Pump()
    good = frame(MsgType.STDOUT, b"ok")
    theirs.sendall(good + bad)
    buf = bytearray(4096)
    assert pump.read(ours.fileno(), buf, 0, 0, MAX, FAST) == (len(good) + len(bad), len(good), 1, OUT, 0)


def test_send_offers_the_prefix_to_who_takes_its_types(codec_impl):
    pump = codec_impl.Pump(capacity=4)
    subs = [pair() for _ in range(3)]
    try:
        data = frame(MsgType.STDOUT, b"o" * 50) + frame(MsgType.STDERR, b"e" * 5)
        fds = [s[0].fileno() for s in subs]
        assert pump.send(data, OUT | ERR, fds, [FAST, OUT, FAST | TYPE_BIT[MsgType.HEARTBEAT]]) == [
            len(data), -1, len(data)]
        assert read_all(subs[0][1]) == data and read_all(subs[1][1]) == b"" and read_all(subs[2][1]) == data
        with pytest.raises(ValueError):
            pump.send(data, OUT, fds, [FAST, FAST])
        with pytest.raises(ValueError):
            pump.send(data, OUT, fds * 2, [FAST] * 6)  # past its capacity
    finally:
        for a, b in subs:
            a.close()
            b.close()


def test_a_full_socket_takes_part_and_a_closed_one_nothing(codec_impl):
    pump = codec_impl.Pump()
    full_ours, full_theirs = pair()
    full_ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    gone_ours, gone_theirs = pair()
    gone_theirs.close()
    try:
        data = frame(MsgType.STDOUT, os.urandom(1 << 20))
        took = pump.send(data, OUT, [full_ours.fileno(), gone_ours.fileno()], [FAST, FAST])
        assert 0 < took[0] < len(data), took  # short: the rest is the caller's to queue
        assert took[1] == 0  # EPIPE: no exception, no SIGPIPE; the transport meets the error itself
        assert pump.send(data, OUT, [full_ours.fileno()], [FAST]) == [0]  # still full: nothing
        assert read_all(full_theirs) == data[:took[0]]
    finally:
        for s in (full_ours, full_theirs, gone_ours):
            s.close()


def test_bad_arguments(codec_impl, guest):
    ours, _ = guest
    pump = codec_impl.Pump()
    with pytest.raises(ValueError):
        pump.read(ours.fileno(), bytearray(10), 5, 4, MAX, FAST)
    with pytest.raises(ValueError):
        pump.read(ours.fileno(), bytearray(10), 0, 11, MAX, FAST)
    with pytest.raises(ValueError):
        codec_impl.Pump(0)


def test_the_backends_agree_byte_for_byte():
    """Random frames of every kind, valid and not, read in random sizes and
    offered to targets with random subscriptions: each backend's results and
    what each target received are the same."""
    backends = codec.backends()
    if "c" not in backends:
        pytest.skip("the C codec is not built here (VHUBD_BUILD_EXTENSION=no): one backend only")
    rng = random.Random(1515)
    types = [MsgType.STDOUT, MsgType.STDERR, MsgType.STREAM_DATA, MsgType.RPC_REQUEST, MsgType.HEARTBEAT]
    for _ in range(60):
        blob = b""
        for _ in range(rng.randrange(1, 12)):
            blob += frame(rng.choice(types), rng.randbytes(rng.choice([0, 1, 7, 100, 3000])), rid=rng.randrange(99))
        if rng.random() < 0.2:
            cut = rng.randrange(len(blob))
            blob = blob[:cut] + bytes([rng.randrange(256)]) + blob[cut + 1:]
        split = rng.randrange(len(blob) + 1)
        mask = rng.choice([FAST, OUT, 0])
        wants = [rng.choice([FAST, OUT, ERR]) for _ in range(rng.randrange(1, 4))]
        results = {}
        for name, impl in backends.items():
            ours, theirs = pair()
            subs = [pair() for _ in wants]
            try:
                theirs.sendall(blob[:split])
                buf = bytearray(len(blob) + 64)
                first = impl.Pump().read(ours.fileno(), buf, 0, 0, MAX, mask) if split else None
                start, end = (first[1], first[0]) if first and first[0] > 0 else (0, 0)
                theirs.sendall(blob[split:])
                second = impl.Pump().read(ours.fileno(), buf, start, end, MAX, mask)
                took = impl.Pump().send(memoryview(buf)[start:second[1]], second[3],
                                        [s[0].fileno() for s in subs], wants) if second[2] else []
                results[name] = (first, second, took, [read_all(s[1]) for s in subs], bytes(buf))
            finally:
                for s in (ours, theirs, *(x for p in subs for x in p)):
                    s.close()
        assert results["c"] == results["python"], blob


def test_the_daemon_pumps_guest_output_only():
    # the daemon forwards Stdout and Stderr itself; StreamData (channels) goes point to point
    from vhubd.server import PUMP_TYPES

    assert PUMP_TYPES == FAST and not PUMP_TYPES & TYPE_BIT[MsgType.STREAM_DATA]
    assert frames.STREAM_MASK & ~PUMP_TYPES == TYPE_BIT[MsgType.STREAM_DATA]


# ---------------------------------------------------------------- through a real daemon

def _daemon(make_daemon, codec_name: str, pump: str = "1"):
    if codec_name not in codec.backends():
        pytest.skip("the C codec is not built here (VHUBD_BUILD_EXTENSION=no)")
    return make_daemon("--heartbeat", "0", env={"BLINK_CODEC": codec_name, "BLINK_PUMP": pump})


def _output(total: int, seed: int) -> list[bytes]:
    """Stdout/Stderr frames of random sizes up to 64 KiB, ``total`` payload bytes."""
    rnd = random.Random(seed)
    out, left, i = [], total, 0
    while left:
        n = min(left, rnd.randint(1, 64 * 1024))
        out.append(wire_frame(T.STDERR if rnd.random() < 0.3 else T.STDOUT, i % 7, rnd.randbytes(n)))
        left -= n
        i += 1
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _counters(admin) -> dict:
    return (await admin.stats())["counters"]


@pytest.mark.parametrize("pump", ["1", "0"])
@pytest.mark.parametrize("codec_name", ["c", "python"])
def test_bulk_output_with_calls_between_reaches_every_subscriber_whole(make_daemon, codec_name, pump):
    """~4 MiB of Stdout/Stderr in bursts, a call to the daemon after every few
    bursts: a subscriber of both, a Stdout-only one and one that reads slowly
    (its socket fills: the pump's writes to it come up short, the rest is
    queued) each get exactly their frames, in order; every call is answered.
    With the pump, most of the output went through it; with BLINK_PUMP=0, none."""
    d = _daemon(make_daemon, codec_name, pump)
    frames_ = _output(4 << 20, seed=15)
    wire = b"".join(frames_)
    stdout_only = b"".join(f for f in frames_ if f[5] == T.STDOUT)

    async def body():
        admin = await client(d)
        full = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        outonly = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        slow = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        slow.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        g = await AsyncPeer.guest(d.socket)

        async def send():
            for i in range(0, len(frames_), 16):
                g.writer.write(b"".join(frames_[i:i + 16]))
                await g.writer.drain()
                if i % 48 == 0:
                    answer = await g.call("vhub.ping", rid=1000 + i)
                    assert answer.msg_type == T.RPC_RESPONSE and b"pong" in bytes(answer.payload)

        async def read_slowly() -> str:
            h = hashlib.sha256()
            left = len(wire)
            while left:
                chunk = await asyncio.wait_for(slow.reader.read(min(left, 8192)), 30)
                assert chunk, "the slow subscriber was closed"
                h.update(chunk)
                left -= len(chunk)
                await asyncio.sleep(0.0005)
            return h.hexdigest()

        _, a, b, c = await asyncio.gather(send(), full.sha_of(len(wire), 60), outonly.sha_of(len(stdout_only), 60),
                                          read_slowly())
        assert (a, b, c) == (_sha(wire), _sha(stdout_only), _sha(wire))
        counters = await _counters(admin)
        assert counters["stream_bytes"] == len(wire) and counters["stream_frames"] == len(frames_)
        if pump == "1":  # most of it read by the pump, and written straight to the subscribers' sockets
            assert counters["stream_pumped"] > len(wire) // 2, counters
            assert counters["stream_direct"] > len(wire), counters
        else:
            assert counters["stream_pumped"] == counters["stream_direct"] == 0, counters

    run(body(), 120)


def test_a_guest_goes_back_to_the_usual_path_after_small_reads(make_daemon):
    """Bulk output hands a guest to the pump; PUMP_IDLE_READS small reads in a
    row (calls, one at a time) hand it back: small output after that is not
    pumped (and arrives); bulk output again is; and 2 s of silence hand it
    back too (its dup of the socket is closed: the daemon's open files go back
    to what they were)."""
    from vhubd.server import PUMP_IDLE_READS

    d = make_daemon("--heartbeat", "0")
    bulk = [wire_frame(T.STDOUT, 1, bytes([i]) * 60000) for i in range(24)]

    async def body():
        admin = await client(d)
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        g = await AsyncPeer.guest(d.socket)
        await g.send_frames(bulk, 12)
        assert await sub.sha_of(len(b"".join(bulk))) == _sha(b"".join(bulk))
        first = await _counters(admin)
        assert first["stream_pumped"] > 0, first
        for i in range(PUMP_IDLE_READS + 4):
            assert (await g.call("vhub.ping", rid=10 + i)).msg_type == T.RPC_RESPONSE
        before = await _counters(admin)
        small = [wire_frame(T.STDOUT, 2, b"tick %d" % i) for i in range(5)]
        for i, f in enumerate(small):
            g.send_raw(f)
            assert (await g.call("vhub.ping", rid=500 + i)).msg_type == T.RPC_RESPONSE
        assert await sub.read_exactly(len(b"".join(small))) == b"".join(small)
        after = await _counters(admin)
        assert after["stream_pumped"] == before["stream_pumped"], (before, after)
        assert after["stream_bytes"] - before["stream_bytes"] == len(b"".join(small))
        fds = len(os.listdir(f"/proc/{d.pid}/fd"))
        await g.send_frames(bulk, 12)
        assert await sub.sha_of(len(b"".join(bulk))) == _sha(b"".join(bulk))
        again = await _counters(admin)
        assert again["stream_pumped"] > after["stream_pumped"]
        assert len(os.listdir(f"/proc/{d.pid}/fd")) == fds + 1  # the pump's dup of the guest's socket
        await asyncio.sleep(3.5)  # idle past 2 s, seen by the once-a-second tick
        assert len(os.listdir(f"/proc/{d.pid}/fd")) == fds
        g.send_raw(small[0])
        assert (await g.call("vhub.ping", rid=900)).msg_type == T.RPC_RESPONSE
        assert await sub.read_exactly(len(small[0])) == small[0]
        assert (await _counters(admin))["stream_pumped"] == again["stream_pumped"]

    run(body(), 60)


@pytest.mark.parametrize("codec_name", ["c", "python"])
def test_bad_bytes_and_a_cut_frame_after_bulk_output(make_daemon, codec_name):
    """While the pump reads a guest: bytes that are not a frame get it an
    Error (bad_magic) after every whole frame before them reached the
    subscriber; a second guest that leaves in the middle of a frame leaves the
    subscriber its whole frames only; the daemon goes on serving."""
    d = _daemon(make_daemon, codec_name)
    bulk = _output(1 << 20, seed=7)
    whole = b"".join(bulk)

    async def body():
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        g = await AsyncPeer.guest(d.socket)
        await g.send_frames(bulk[:-4], 8)
        g.send_raw(b"".join(bulk[-4:]) + b"XXXX" + bytes(16))
        ev = await g.next_frame(20)
        assert getattr(ev, "code", None) == "bad_magic", ev
        assert await sub.sha_of(len(whole)) == _sha(whole)
        await g.close()

        g2 = None
        for _ in range(200):  # the first guest may still be leaving the session
            g2 = await AsyncPeer.open(d.socket)
            res = await g2.handshake()
            if res[0] == "ok":
                break
            await g2.close()
            await asyncio.sleep(0.02)
        assert res[0] == "ok", res
        cut = wire_frame(T.STDOUT, 3, b"c" * 100_000)
        await g2.send_frames(bulk, 8)
        g2.send_raw(cut[:50_000])
        await g2.drain()
        assert await sub.sha_of(len(whole)) == _sha(whole)
        await g2.close()
        with pytest.raises(asyncio.TimeoutError):  # none of the cut frame, ever
            await sub.read_exactly(1, timeout=0.5)
        g3 = await AsyncPeer.open(d.socket)
        for _ in range(200):
            if (await g3.handshake())[0] == "ok":
                break
            await g3.close()
            await asyncio.sleep(0.02)
            g3 = await AsyncPeer.open(d.socket)
        await g3.send_frames(bulk, 8)
        assert await sub.sha_of(len(whole)) == _sha(whole)

    run(body(), 90)


@pytest.mark.parametrize("pump", ["1", "0"])
@pytest.mark.parametrize("codec_name", ["c", "python"])
def test_output_before_a_call_reaches_a_subscribed_handler_first(make_daemon, codec_name, pump):
    """A client that serves x.* and follows stdout; the guest, pumped after
    bulk output, writes [Stdout][RpcRequest x.go] in one write, five times:
    the client gets the Stdout frame before the request each time (the RPC
    fast lane does not run behind pumped frames: review of the pump)."""
    d = _daemon(make_daemon, codec_name, pump)

    async def body():
        c = await RawClient.open(d.control, session="default", subscribe=["stdout"], serve=["x.*"])
        g = await AsyncPeer.guest(d.socket)
        bulk = wire_frame(T.STDOUT, 1, b"b" * 60000)
        g.send_raw(bulk)
        await g.drain()
        assert await c.read_exactly(len(bulk)) == bulk
        order = []
        for i in range(5):
            out = wire_frame(T.STDOUT, 1, b"before the call %d" % i)
            g.send_raw(out + wire_frame(T.RPC_REQUEST, 100 + i, {"method": "x.go", "params": {}}))
            await g.drain()
            for _ in range(2):
                head = await c.read_exactly(20)
                await c.read_exactly(int.from_bytes(head[8:12], "little"))
                order.append(head[5])
        assert order == [T.STDOUT, T.RPC_REQUEST] * 5, order
        if pump == "1":  # the bulk frame made the pump read this guest: the small ones went through it
            assert (await _counters(await client(d)))["stream_pumped"] > 0

    run(body(), 60)


@pytest.mark.parametrize("pump", ["1", "0"])
def test_a_guest_closed_in_the_middle_of_a_batch_stalls_nobody(make_daemon, pump):
    """One read: [RpcRequest vhub.ping][Stdout][Heartbeat][a channel's StreamData
    header larger than cut-through]. The relay closes the guest in the middle of
    the batch (frame_too_large) and the batch then has a pong for it: written to
    a closed transport it raised, and the subscriber's share of the batch was
    never written, nor anything after it (review of the pump; older than it)."""
    d = make_daemon("--heartbeat", "0", env={"BLINK_PUMP": pump})

    async def guest():
        for _ in range(200):  # the previous guest may still be leaving the session
            g = await AsyncPeer.open(d.socket)
            res = await g.handshake()
            if res[0] == "ok":
                return g
            await g.close()
            await asyncio.sleep(0.02)
        raise AssertionError(res)

    async def body():
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        g = await guest()
        bulk = wire_frame(T.STDOUT, 1, b"x" * 60000)
        g.send_raw(bulk)  # with the pump: it reads this guest from now on
        await g.drain()
        assert await sub.read_exactly(len(bulk)) == bulk
        one = wire_frame(T.STDOUT, 1, b"one")
        g.send_raw(wire_frame(T.RPC_REQUEST, 7, {"method": "vhub.ping", "params": {}}) + one
                   + wire_frame(T.HEARTBEAT, 5) + header(T.STREAM_DATA, 300_000, frames.CHANNEL_BASE + 1)
                   + b"y" * 100)
        await g.drain()
        assert await sub.read_exactly(len(one), 10) == one
        ev = await g.next_frame(10, lambda f: False)
        assert getattr(ev, "code", None) == "frame_too_large", ev
        await g.close()
        g2 = await guest()
        two = wire_frame(T.STDOUT, 1, b"two")
        g2.send_raw(two)
        await g2.drain()
        assert await sub.read_exactly(len(two), 10) == two

    run(body(), 60)


def _numbered(tag: bytes, seed: int, n: int) -> list[bytes]:
    """``n`` Stdout/Stderr frames tagged and numbered in their payload, mostly
    small, some above the cut-through size (256 KiB)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        size = rnd.choice([10, 3000, 70000]) if rnd.random() < 0.85 else rnd.choice([300_000, 600_000])
        payload = struct.pack("<4sI", tag, i) + bytes([i & 255]) * size
        out.append(wire_frame(T.STDERR if rnd.random() < 0.3 else T.STDOUT, 1, payload))
    return out


async def _check_numbered(reader, expect: dict, label: str) -> None:
    """Whole frames, each intact, each tag's numbers in order and complete."""
    last = {tag: -1 for tag in expect}
    while any(last[tag] < n - 1 for tag, n in expect.items()):
        head = await asyncio.wait_for(reader.readexactly(20), 60)
        assert head[:4] == b"NILB", (label, "not a header", head)
        n = int.from_bytes(head[8:12], "little")
        payload = await asyncio.wait_for(reader.readexactly(n), 60)
        tag, seq = struct.unpack_from("<4sI", payload)
        assert payload[8:] == bytes([seq & 255]) * (n - 8), (label, "foreign bytes inside a frame", tag, seq)
        assert seq == last[tag] + 1, (label, "out of order or missing", tag, last[tag], seq)
        last[tag] = seq


@pytest.mark.parametrize("pump", ["1", "0"])
def test_two_sessions_cut_through_frames_to_a_star_subscriber(make_daemon, pump):
    """Two sessions' guests send output with frames above the cut-through size
    at the same time; a "*" subscriber gets every frame whole, each session's
    in order: a frame of one session waits while another session's is in
    flight to a subscriber they share (its bytes went inside the other
    frame's payload before: review of the pump, older than it). The
    sessions' own subscribers get theirs too."""
    d = make_daemon("--heartbeat", "0", env={"BLINK_PUMP": pump})
    n = 80
    fa, fb = _numbered(b"AAAA", 1, n), _numbered(b"BBBB", 2, n)

    async def body():
        admin = await client(d)
        token = (await admin.register("s2"))["token"]
        star = await RawClient.open(d.control, session="*", subscribe=["stdout", "stderr"])
        own_a = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        own_b = await RawClient.open(d.control, session="s2", subscribe=["stdout", "stderr"])
        ga = await AsyncPeer.guest(d.socket)
        gb = await AsyncPeer.guest(d.socket, payload={"session": "s2", "token": token})

        async def send(g, frames_, seed):
            rnd = random.Random(seed)
            i = 0
            while i < len(frames_):
                k = rnd.randint(1, 6)
                await g.send_frames([b"".join(frames_[i:i + k])])
                i += k

        await asyncio.gather(send(ga, fa, 3), send(gb, fb, 4),
                             _check_numbered(star.reader, {b"AAAA": n, b"BBBB": n}, "star"),
                             _check_numbered(own_a.reader, {b"AAAA": n}, "session a"),
                             _check_numbered(own_b.reader, {b"BBBB": n}, "session b"))

    run(body(), 120)
