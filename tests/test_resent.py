"""Output an agent sends again after its link dropped (a snapshot unplugs the
vsock device, a reset) is not delivered twice: the agent's ``output_seqs``
names its outbox and numbers the frame that comes next; the daemon drops, counts
and acknowledges the frames of that outbox it took on an earlier connection.

Through a real daemon on real sockets, both codecs, pump on and off; the
relay's rules on hostile or odd notifications in process."""

from __future__ import annotations

import json
import random

import pytest
from harness import AsyncPeer, RawClient, T, client, run, wait_until
from harness import frame as wire_frame
from harness.inproc import World, frame, handshake_answer

from vhubd import codec, frames


def seqs(outbox, following, executions=None) -> bytes:
    body = {"event": "output_seqs", "executions": executions or {}, "outbox": outbox, "next": following}
    return wire_frame(T.RPC_REQUEST, 0, json.dumps(body).encode())


def numbered(n: int, rnd: random.Random) -> bytes:
    """The outbox's frame ``n``: Stdout or Stderr, its number first, random size
    (some large enough to go cut-through, above 256 KiB)."""
    size = rnd.choice([10, 900, 30000, 65000, 300000]) if n % 5 else rnd.randint(1, 200)
    head = b"#%d;" % n
    return wire_frame(T.STDERR if n % 3 == 0 else T.STDOUT, 4, head + rnd.randbytes(size))


async def guest_when_free(d, payload):
    """The default session takes one agent: wait for the last one's close."""
    last = None
    for _ in range(200):
        g = await AsyncPeer.open(d.socket)
        res = await g.handshake(payload)
        if res[0] == "ok":
            return g
        last = res
        await g.close()
        await wait_until(lambda: True, 0.05)
    raise AssertionError(f"the session stayed busy: {last}")


async def acked(g, frames: int, timeout: float = 20.0) -> None:
    while True:
        f = await g.next_frame(timeout, lambda f: f.msg_type == T.RPC_REQUEST)
        body = json.loads(bytes(f.payload))
        if body.get("method") == "vhub.ack" and body["params"]["frames"] >= frames:
            assert body["params"]["frames"] == frames, body
            return


@pytest.mark.parametrize("pump", ["1", "0"])
@pytest.mark.parametrize("codec_name", ["c", "python"])
def test_frames_taken_before_a_link_dropped_are_not_delivered_twice(make_daemon, codec_name, pump):
    """An agent's first connection carries its frames 1..60 and drops before
    their acks arrived; the second says the next frame is 25, resends 25..60
    (~5 MiB: bulk reads, pumped when on; some cut through) and goes on to 90.
    The subscriber gets 1..90 once each, in order; the resent ones are
    acknowledged (the agent may forget them) and counted. Another outbox's
    frames with the same numbers, and a frame numbered past what was taken,
    are delivered."""
    if codec_name not in codec.backends():
        pytest.skip("the C codec is not built here (VHUBD_BUILD_EXTENSION=no)")
    d = make_daemon("--heartbeat", "0", "--max-output", "64m",
                    env={"BLINK_CODEC": codec_name, "BLINK_PUMP": pump})
    rnd = random.Random(5)
    out = {n: numbered(n, rnd) for n in range(1, 121)}

    def span(a, b):
        return b"".join(out[n] for n in range(a, b + 1))

    async def body():
        admin = await client(d)
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"], lossy=False)
        g = await guest_when_free(d, {"ack": True})
        g.send_raw(seqs("o1", 1))
        await g.send_frames([out[n] for n in range(1, 61)], 4)
        assert await sub.read_exactly(len(span(1, 60))) == span(1, 60)
        await g.close()  # before any ack was read: the agent holds 1..60 still

        g = await guest_when_free(d, {"ack": True})
        g.send_raw(seqs("o1", 25, {"4": 24}))
        await g.send_frames([out[n] for n in range(25, 91)], 6)
        assert await sub.read_exactly(len(span(61, 90))) == span(61, 90)
        await acked(g, 66)  # 36 resent, 30 new: all acknowledged
        counters = (await admin.stats())["counters"]
        assert counters["stream_resent_dropped"] == 36, counters
        await g.close()

        g = await guest_when_free(d, {"ack": True})  # another agent process: its own numbers
        g.send_raw(seqs("o2", 1))
        await g.send_frames([out[1], out[2]])
        assert await sub.read_exactly(len(span(1, 2))) == span(1, 2)
        await g.close()

        g = await guest_when_free(d, {"ack": True})  # o1 again, past what was taken: nothing dropped
        g.send_raw(seqs("o1", 91))
        await g.send_frames([out[n] for n in range(91, 121)], 3)
        assert await sub.read_exactly(len(span(91, 120))) == span(91, 120)
        await acked(g, 30)
        assert (await admin.stats())["counters"]["stream_resent_dropped"] == 36
        # and nothing else reached the subscriber
        g.send_raw(out[1])
        assert await sub.read_exactly(len(out[1])) == out[1]

    run(body(), 120)


# ---------------------------------------------------------------- the relay's rules, in process

def agent(w: World, outbox: str | None, following: int = 1):
    a = w.guest({"ack": True})
    handshake_answer(a)
    if outbox is not None:
        a.feed(seqs(outbox, following))
    return a


def out(n: int) -> bytes:
    return frame(T.STDOUT, 1, b"%d." % n)


def outputs(sub) -> list[bytes]:
    return [bytes(f.data) for f in sub.frames() if f.msg_type == T.STDOUT]


def test_what_is_dropped_and_what_is_not():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a = agent(w, "x")
    a.feed(b"".join(out(n) for n in range(1, 6)))
    w.lose(a, "reset")
    assert w.registry.get("default").outboxes == {"x": 5}
    # the resend mixes the outbox's frames with a channel's (never the outbox's, never dropped)
    b = agent(w, "x", 3)
    b.feed(out(3) + frame(T.STREAM_DATA, frames.CHANNEL_BASE + 1, b"c") + out(4) + out(5) + out(6))
    assert outputs(sub) == [out(n) for n in range(1, 7)]
    assert w.relay.counters["stream_resent_dropped"] == 3
    w.lose(b, "reset")
    assert w.registry.get("default").outboxes == {"x": 6}


def test_a_hostile_or_late_seqs_notification_changes_nothing():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a = agent(w, "x")
    a.feed(b"".join(out(n) for n in range(1, 4)))
    w.lose(a, "reset")
    for bad in ({"outbox": 7, "next": 1}, {"outbox": "x", "next": "1"}, {"outbox": "x", "next": 0},
                {"outbox": "x" * 65, "next": 1}, {"outbox": "", "next": 1}, {"outbox": "x", "next": 1 << 70},
                {"outbox": "x", "next": True}):
        g = w.guest({"ack": True})
        handshake_answer(g)
        g.feed(wire_frame(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", **bad}).encode()))
        g.feed(out(1))
        w.lose(g, "reset")
    # said after a stream frame, or a second time: ignored
    g = w.guest({"ack": True})
    handshake_answer(g)
    g.feed(out(1) + seqs("x", 1) + out(2))
    w.lose(g, "reset")
    g = agent(w, "y")
    g.feed(seqs("x", 1) + out(1))
    w.lose(g, "reset")
    got = outputs(sub)
    assert got == [out(1), out(2), out(3)] + [out(1)] * 7 + [out(1), out(2), out(1)], got
    assert w.relay.counters["stream_resent_dropped"] == 0
    # a session remembers a bounded number of outboxes, and another session's names are its own
    for i in range(20):
        g = agent(w, f"o{i}")
        g.feed(out(1))
        w.lose(g, "reset")
    assert len(w.registry.get("default").outboxes) == 8
    tok = w.register("two")
    other = w.guest({"session": "two", "token": tok, "ack": True})
    handshake_answer(other)
    other.feed(seqs("o19", 1) + out(1))
    assert w.relay.counters["stream_resent_dropped"] == 0
