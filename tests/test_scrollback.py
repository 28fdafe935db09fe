"""The scrollback keeps bulk output by reference to the guest's receive
buffers (no copy per byte) and cut-through frames as their pieces (no join):
what it replays is exactly what the guest sent, however the buffers were
reused meanwhile, and what it pins stays within twice what it holds."""

from __future__ import annotations

import asyncio
import random

import pytest
from harness import AsyncPeer, RawClient, T, run
from harness.inproc import World, frame, handshake_answer

from vhubd.frames import READY_PAYLOAD
from vhubd.protocol import Connection, Handshake, Side, StreamChunk, StreamRun, StreamStart
from vhubd.protocol import buffer as rxbuffer
from vhubd.sessions import REFERENCE_AT, Pieces, Scrollback, keep

KiB = 1024
MiB = 1 << 20


def frames_of(sizes: list[int], rnd: random.Random) -> list[bytes]:
    return [frame(T.STDERR if rnd.random() < 0.2 else T.STDOUT, i, rnd.randbytes(n)) for i, n in enumerate(sizes)]


def pinned(ring: Scrollback) -> int:
    """Bytes the ring keeps alive: whole receive buffers for its slices, once each."""
    seen: dict[int, int] = {}
    for c in ring.chunks:
        for part in (c.parts if type(c) is Pieces else [c]):
            if type(part) is memoryview:
                seen[id(part.obj)] = len(part.obj)
            else:
                seen[id(part)] = len(part)
    return sum(seen.values())


def is_frame_suffix(got: bytes, wire: list[bytes]) -> bool:
    """``got`` is the concatenation of the newest whole frames of ``wire``."""
    size, i = 0, len(wire)
    while size < len(got) and i:
        i -= 1
        size += len(wire[i])
    return size == len(got) and b"".join(wire[i:]) == got


# ---------------------------------------------------------------- the ring alone

def test_bulk_slices_are_kept_by_reference_small_ones_copied():
    buf = bytearray(256 * KiB)
    big = memoryview(buf)[:200 * KiB]
    assert keep(big) is big and keep(big).obj is buf
    small = memoryview(buf)[:KiB]
    assert type(keep(small)) is bytes  # a small slice would pin a whole buffer
    quarter = memoryview(buf)[:64 * KiB]
    assert quarter.nbytes >= REFERENCE_AT and type(keep(quarter)) is bytes  # under half of its buffer
    assert type(keep(bytes(100 * KiB))) is bytes


def test_a_referenced_chunk_trimmed_to_a_small_tail_is_copied():
    ring = Scrollback(100 * KiB)
    rnd = random.Random(3)
    wire = frames_of([12 * KiB] * 8, rnd)  # 96 KiB + headers in one buffer
    buf = bytearray(b"".join(wire))
    ring.append(memoryview(buf))
    assert type(ring.chunks[0]) is memoryview
    more = frames_of([30 * KiB, 30 * KiB, 30 * KiB], rnd)
    for f in more:
        ring.append(f)
    assert b"".join(ring.replay()) == b"".join((wire + more)[-len(ring.replay()) - 3:])[-ring.size:]
    assert is_frame_suffix(b"".join(ring.replay()), wire + more)
    assert ring.size <= ring.capacity
    assert pinned(ring) <= 2 * ring.size


def test_a_big_ring_drops_whole_batches_and_keeps_three_quarters_or_more():
    """Read batches of 64 B frames, each the most of its receive buffer: the
    ring drops the oldest batches whole (no batch cut, walked or copied) and
    keeps between 3/4 and all of its capacity."""
    ring = Scrollback(1 * MiB)
    rnd = random.Random(5)
    wire: list = []
    for _ in range(40):
        batch = frames_of([64] * rnd.randint(2000, 2400), rnd)
        wire += batch
        buf = bytearray(256 * KiB)
        data = b"".join(batch)
        buf[:len(data)] = data
        ring.append(memoryview(buf)[:len(data)])
        assert 3 * MiB // 4 <= ring.size <= MiB or sum(map(len, wire)) < 3 * MiB // 4
        assert all(type(c) is memoryview and len(c) >= 160 * KiB for c in ring.chunks)  # whole batches only
        assert is_frame_suffix(b"".join(ring.replay()), wire)


def test_a_frame_in_pieces_is_kept_and_dropped_whole():
    ring = Scrollback(1 * MiB)
    rnd = random.Random(4)
    a, b = frames_of([600 * KiB, 600 * KiB], rnd)
    for f in (a, b):
        ring.append(Pieces([f[:20], memoryview(bytearray(f[20:]))]))
    assert len(ring.chunks) == 1 and ring.size == len(b)  # the older frame went whole
    assert b"".join(ring.replay()) == b


# ---------------------------------------------------------------- receive buffers under the ring

def serve(impl, cut_through: int = 256 * KiB) -> Connection:
    c = Connection(Side.SERVER, cut_through=cut_through, codec_impl=impl)
    (hs,) = c.receive_data(frame(T.HANDSHAKE, 1, b""))
    assert type(hs) is Handshake
    c.accept(READY_PAYLOAD, hs.request_id)
    c.data_to_send()
    return c


def feed(c: Connection, data: bytes, rnd: random.Random, on_events) -> None:
    """As the daemon reads: into the buffer the connection offers, random read sizes."""
    mv = memoryview(data)
    while mv:
        dst = c.get_buffer()
        n = min(len(dst), len(mv), rnd.choice([len(dst), rnd.randint(1, 200 * KiB)]))
        dst[:n] = mv[:n]
        del dst
        mv = mv[n:]
        on_events(c.buffer_updated(n))


@pytest.mark.parametrize("seed", range(4))
def test_what_the_ring_replays_is_what_the_guest_sent(codec_impl, seed):
    """Random frames (up to 1 MiB: some cut-through) read as the daemon reads
    them: the ring's bytes are always the newest whole frames sent, unchanged
    by the reads that reuse buffers after it; it pins at most twice what it
    holds; the connection keeps few free buffers."""
    rnd = random.Random(seed)
    ring = Scrollback(1 * MiB)
    c = serve(codec_impl)
    parts: list = []
    sizes = [rnd.choice([rnd.randint(1, 200), rnd.randint(1, 64 * KiB), rnd.randint(200 * KiB, 1 * MiB)])
             for _ in range(60)]
    wire = frames_of(sizes, rnd)

    def on_events(events):
        for ev in events:
            if type(ev) is StreamRun:
                ring.append(ev.data)
            elif type(ev) is StreamStart:
                parts[:] = [keep(ev.data)]
            elif type(ev) is StreamChunk:
                parts.append(keep(ev.data))
                if not ev.remaining:
                    ring.append(Pieces(list(parts)))
                    parts.clear()

    for i in range(0, len(wire), 5):
        feed(c, b"".join(wire[i:i + 5]), rnd, on_events)
        got = b"".join(ring.replay())
        assert is_frame_suffix(got, wire[:i + 5]), f"the ring's bytes changed or lost a frame at {i}"
        assert ring.size <= ring.capacity and pinned(ring) <= 2 * ring.size + 64 * KiB
        assert len(c.rx._spare) <= rxbuffer.SPARES
    c.rx.shrink()
    assert c.rx._spare == []


def test_a_buffer_change_keeps_at_most_two_free_spares():
    """Buffers the ring let go of are reused; past two, they are given back
    at the next read."""
    rx = rxbuffer.ReceiveBuffer(4096, 256 * KiB)
    rx.target = 256 * KiB
    held = [memoryview(bytearray(256 * KiB)) for _ in range(5)]  # slices a ring keeps
    rx._spare = [v.obj for v in held]
    free_ids = {id(v.obj) for v in held[1:]}
    del held[1:]  # the ring dropped four of them: free now
    rx.get_buffer()  # a buffer change: a free spare reused, not a fresh one
    assert len(rx.buf) == 256 * KiB and id(rx.buf) in free_ids
    free = [b for b in rx._spare if b is not held[0].obj]
    assert held[0].obj in rx._spare and len(free) <= rxbuffer.FREE_SPARES


def test_free_buffers_go_back_while_small_output_follows():
    """The ring lets go of the slices it kept; the guest goes on with small
    output (copied, no buffer change): the next reads give the free buffers
    back, all but two."""
    rnd = random.Random(9)
    ring = Scrollback(8 * MiB)
    c = serve(None)

    def read(data: bytes) -> None:  # whole reads, as a fast guest fills them
        for ev in c.receive_data(data):
            if type(ev) is StreamRun:
                ring.append(ev.data)

    for _ in range(40):  # ~1 MiB of 16 KiB frames a time: read batches kept by reference
        read(b"".join(frames_of([16 * KiB] * 64, rnd)))
    assert any(type(ch) is memoryview for ch in ring.chunks)
    assert len(c.rx._spare) > rxbuffer.FREE_SPARES
    ring.chunks.clear()  # trimmed away (the session's other guests went on, or it was removed)
    for _ in range(3):
        read(frame(T.STDOUT, 1, b"tick\n"))
    free = [b for b in c.rx._spare if b is not c.rx.buf]
    assert len(free) <= rxbuffer.FREE_SPARES


# ---------------------------------------------------------------- through the relay

def test_a_frame_read_a_few_bytes_at_a_time_is_kept_as_few_objects():
    """A guest drips a cut-through frame 64 bytes a read: the ring keeps it as a
    couple of objects (not one per read) and pins no more than twice its size."""
    w = World(scrollback=1 * MiB)
    a = w.guest(b"")
    handshake_answer(a)
    big = frame(T.STDOUT, 1, random.Random(8).randbytes(300 * KiB))
    for i in range(0, len(big), 64):
        a.feed(big[i:i + 64])
    ring = w.registry.get("default").scrollback
    (kept,) = ring.chunks
    assert type(kept) is Pieces and len(kept.parts) <= 3
    assert b"".join(ring.replay()) == big and pinned(ring) <= 2 * ring.size


def test_a_late_replay_gets_cut_through_frames_from_their_pieces():
    """In-process relay: frames larger than the cut-through size are kept as
    pieces; a client asking for replay gets them whole and exact, a stderr-only
    one none of the stdout ones."""
    w = World(scrollback=2 * MiB)
    a = w.guest(b"")
    handshake_answer(a)
    rnd = random.Random(7)
    wire = [frame(T.STDOUT, 1, rnd.randbytes(700 * KiB)), frame(T.STDERR, 2, rnd.randbytes(300 * KiB)),
            frame(T.STDOUT, 3, rnd.randbytes(64 * KiB)), frame(T.STDOUT, 4, rnd.randbytes(900 * KiB))]
    a.feed(b"".join(wire))
    ring = w.registry.get("default").scrollback
    assert any(type(c) is Pieces for c in ring.chunks)
    got = b"".join(ring.replay())
    assert is_frame_suffix(got, wire) and got.endswith(wire[-1])
    late = w.client("default", subscribe=["stdout", "stderr"], replay=True)
    handshake_answer(late)
    assert bytes(late.out) == got
    err = w.client("default", subscribe=["stderr"], replay=True)
    handshake_answer(err)
    assert [f.msg_type for f in err.frames()] == ([T.STDERR] if wire[1] in got else [])


def test_a_replay_past_a_lossy_limit_ends_with_an_error_after_whole_frames(make_daemon):
    """A lossy client whose replay (frames kept in pieces) passes its limit:
    it gets whole frames, then slow_consumer as a frame of its own, never
    inside a payload."""
    d = make_daemon("--heartbeat", "0", "--scrollback", "4m", "--lossy-limit", "1m")
    rnd = random.Random(1)
    wire = [frame(T.STDOUT, i, rnd.randbytes(900 * KiB)) for i in range(4)]

    async def body():
        live = await RawClient.open(d.control, session="default", subscribe=["stdout"])
        g = await AsyncPeer.guest(d.socket)

        await asyncio.gather(g.send_frames(wire), live.read_exactly(sum(map(len, wire))))
        r = await RawClient.open(d.control, session="default", subscribe=["stdout"], replay=True, flow="lossy")
        kinds = []
        while True:
            head = await r.read_exactly(20)
            body_ = await r.read_exactly(int.from_bytes(head[8:12], "little"))
            if head[5] == T.ERROR:
                assert b"slow_consumer" in body_
                break
            assert head + body_ in wire  # whole, and one the guest sent
            kinds.append(head[5])
        assert await r.reader.read() == b""  # then the close

    run(body())


@pytest.mark.parametrize("codec", ["c", "python"])
def test_replay_through_a_daemon_is_the_newest_output_exactly(make_daemon, codec):
    """A real daemon, both codecs: ~8 MiB of random output (13 of 40 frames
    cut-through) to a live subscriber, then a replay client: the replay is
    exactly the newest whole frames, and the live subscriber got everything."""
    from conftest import BACKENDS

    if codec == "c" and "c" not in BACKENDS:
        pytest.skip("C codec not built on this host")
    d = make_daemon("--heartbeat", "0", "--scrollback", "2m", env={"BLINK_CODEC": codec})
    rnd = random.Random(11)
    sizes = [rnd.choice([rnd.randint(1, 4 * KiB), rnd.randint(32 * KiB, 64 * KiB), rnd.randint(300 * KiB, MiB)])
             for _ in range(40)]
    wire = frames_of(sizes, rnd)
    everything = b"".join(wire)

    async def body():
        live = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        g = await AsyncPeer.guest(d.socket)
        _, seen = await asyncio.gather(g.send_frames(wire, 4), live.read_exactly(len(everything)))  # lossless: it paces the guest
        assert seen == everything
        r = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"], replay=True)
        end = frame(T.STDOUT, 99, b"end of the test")
        g.send_raw(end)
        got = b""
        while not got.endswith(end):  # frame by frame, up to the marker
            head = await r.read_exactly(20)
            got += head + await r.read_exactly(int.from_bytes(head[8:12], "little"))
        assert len(got) > len(end) and is_frame_suffix(got[:-len(end)], wire)
        assert len(got) - len(end) <= 2 * MiB

    run(body())
