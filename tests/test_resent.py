"""Output an agent sends again after its link dropped (a snapshot unplugs the
vsock device, a reset) is not delivered twice: the agent's ``output_seqs``
names its outbox and numbers the frame that comes next; the daemon drops, counts
and acknowledges the frames of that outbox it took on an earlier connection.

Through a real daemon on real sockets, both codecs, pump on and off; the
relay's rules on hostile or odd notifications in process."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from harness import AsyncPeer, RawClient, T, client, run, wait_until
from harness import frame as wire_frame
from harness.inproc import World, frame, handshake_answer

from vhubd import codec, frames

BIG = b"B" * (300 * 1024)  # goes cut through (> 256 KiB)


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

    sub = None

    async def through(g, numbers, per_write, expect):
        """Frames ``numbers`` sent while the subscriber reads (it is lossless: it
        would stop the guest otherwise): it gets ``expect``."""
        got, _ = await asyncio.gather(sub.read_exactly(len(expect)), g.send_frames([out[n] for n in numbers],
                                                                                    per_write))
        assert got == expect

    async def body():
        nonlocal sub
        admin = await client(d)
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"], lossy=False)
        g = await guest_when_free(d, {"ack": True})
        g.send_raw(seqs("o1", 1))
        await through(g, range(1, 61), 4, span(1, 60))
        await g.close()  # before any ack was read: the agent holds 1..60 still

        g = await guest_when_free(d, {"ack": True})
        g.send_raw(seqs("o1", 25, {"4": 24}))
        await through(g, range(25, 91), 6, span(61, 90))
        await acked(g, 66)  # 36 resent, 30 new: all acknowledged
        counters = (await admin.stats())["counters"]
        assert counters["stream_resent_dropped"] == 36, counters
        await g.close()

        g = await guest_when_free(d, {"ack": True})  # another agent process: its own numbers
        g.send_raw(seqs("o2", 1))
        await through(g, range(1, 3), 1, span(1, 2))
        await g.close()

        g = await guest_when_free(d, {"ack": True})  # o1 again, past what was taken: nothing dropped
        g.send_raw(seqs("o1", 91))
        await through(g, range(91, 121), 3, span(91, 120))
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


def took(w: World, outbox: str, n: int) -> None:
    """A first connection of ``outbox`` whose frames 1..n were taken, then dropped."""
    a = agent(w, outbox)
    a.feed(b"".join(out(i) for i in range(1, n + 1)))
    w.lose(a, "reset")


def outputs(sub) -> list[bytes]:
    return [bytes(f.data) for f in sub.frames() if f.msg_type == T.STDOUT]


def test_what_is_dropped_and_what_is_not():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    took(w, "x", 5)
    assert w.registry.get("default").outboxes == {"a:x": (1, 5)}
    # the resend mixes the outbox's frames with a channel's (never the outbox's, never dropped)
    b = agent(w, "x", 3)
    b.feed(out(3) + frame(T.STREAM_DATA, frames.CHANNEL_BASE + 1, b"c") + out(4) + out(5) + out(6))
    assert outputs(sub) == [out(n) for n in range(1, 7)]
    assert w.relay.counters["stream_resent_dropped"] == 3
    w.lose(b, "reset")
    assert w.registry.get("default").outboxes == {"a:x": (3, 6)}


def test_a_hostile_or_late_seqs_notification_changes_nothing():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    took(w, "x", 3)
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


def agent_and_token(w: World):
    a = w.guest({"ack": True})
    handshake_answer(a)
    hello = [j for (_, _, j) in a.json_frames(T.RPC_REQUEST) if j.get("method") == "vhub.hello"]
    return a, hello[0]["params"]["attach_token"]


def program(w: World, token: str, outbox: str, following: int = 1):
    p = w.guest({"ack": True, "attach": True, "session": "default", "token": token})
    handshake_answer(p)
    p.feed(seqs(outbox, following))
    return p


def payloads(sub, rid: int | None = None) -> list[bytes]:
    return [bytes(f.payload) for f in sub.frames()
            if f.msg_type == T.STDOUT and (rid is None or f.request_id == rid)]


def acks(port) -> list[int]:
    return [j["params"]["frames"] for (_, _, j) in port.json_frames(T.RPC_REQUEST) if j.get("method") == "vhub.ack"]


def test_a_frame_cut_through_when_the_link_dropped_is_delivered_when_sent_again():
    """Not taken whole (the subscribers were closed in its middle, the
    scrollback kept nothing), not acknowledged: its resend is delivered."""
    w = World()
    a = agent(w, "x")
    a.json_frames()
    big = frame(T.STDOUT, 1, BIG)
    a.feed(frame(T.STDOUT, 1, b"one") + big[:100 * 1024])
    w.clock.advance(0.1)
    assert acks(a) == [1]  # "one" only: not the frame in its middle
    w.lose(a, "reset")
    assert w.registry.get("default").outboxes == {"a:x": (1, 1)}
    sub = w.client("default", subscribe=["stdout"])
    b = agent(w, "x", 2)
    b.json_frames()
    b.feed(big + frame(T.STDOUT, 1, b"three"))
    assert payloads(sub) == [BIG, b"three"]
    w.clock.advance(0.1)
    assert acks(b) == [2]
    assert w.relay.counters["stream_resent_dropped"] == 0


def test_a_resent_frame_cut_through_is_dropped_whole():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a = agent(w, "x")
    big = frame(T.STDOUT, 1, BIG)
    a.feed(frame(T.STDOUT, 1, b"one") + big + frame(T.STDOUT, 1, b"three"))
    w.lose(a, "reset")
    b = agent(w, "x", 2)
    b.json_frames()
    b.feed(big[:5000])
    b.feed(big[5000:] + frame(T.STDOUT, 1, b"three") + frame(T.STDOUT, 1, b"four"))
    assert payloads(sub) == [b"one", BIG, b"three", b"four"]
    assert w.relay.counters["stream_resent_dropped"] == 2
    w.clock.advance(0.1)
    assert acks(b)[-1] == 3


def test_frames_held_behind_another_guests_frame_count_when_they_go_out():
    """A program's frames wait behind the agent's cut-through frame and its
    link drops meanwhile: they are taken when they go out, and count."""
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a, tok = agent_and_token(w)
    big = frame(T.STDOUT, 1, BIG)
    a.feed(big[:1000])
    p = program(w, tok, "p")
    p.feed(frame(T.STDOUT, 9, b"p1") + frame(T.STDOUT, 9, b"p2"))  # held behind it
    w.lose(p, "reset")
    a.feed(big[1000:])
    assert w.registry.get("default").outboxes == {"p:p": (1, 2)}
    p2 = program(w, tok, "p")
    p2.feed(frame(T.STDOUT, 9, b"p1") + frame(T.STDOUT, 9, b"p2") + frame(T.STDOUT, 9, b"p3"))
    assert payloads(sub, 9) == [b"p1", b"p2", b"p3"]


def test_a_program_cannot_speak_for_the_agent_nor_push_its_memory_out():
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a, tok = agent_and_token(w)
    a.feed(seqs("A", 1) + frame(T.STDOUT, 1, b"a1"))
    p = program(w, tok, "A", (1 << 62) - 1)  # the agent's name, a number far ahead
    p.feed(frame(T.STDOUT, 9, b"p"))
    w.lose(p, "closed")
    w.lose(a, "reset")
    for i in range(12):  # more programs than a session remembers, ending after the agent's link dropped
        q = program(w, tok, f"q{i}")
        q.feed(frame(T.STDOUT, 9, b"q"))
        w.lose(q, "reset")
    assert len(w.registry.get("default").outboxes) == 8 and "a:A" in w.registry.get("default").outboxes
    a2 = agent(w, "A", 1)
    a2.feed(frame(T.STDOUT, 1, b"a1") + frame(T.STDOUT, 1, b"a2") + frame(T.STDOUT, 1, b"a3"))
    assert [x for x in payloads(sub, 1)] == [b"a1", b"a2", b"a3"]


def test_numbers_from_before_the_last_connection_began_are_new_output():
    """An agent whose numbers went back past the start of its last connection
    was restored from an older state (by someone else than this daemon): what
    it sends is new, delivered; and from there on it is followed anew."""
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    took(w, "A", 5)
    b = agent(w, "A", 4)  # 4 and 5 again
    b.feed(b"".join(out(n) for n in range(4, 9)))
    w.lose(b, "reset")
    assert w.registry.get("default").outboxes == {"a:A": (4, 8)}
    c = agent(w, "A", 2)  # back before 4: another timeline
    c.feed(frame(T.STDOUT, 1, b"other 2") + frame(T.STDOUT, 1, b"other 3"))
    w.lose(c, "reset")
    d = agent(w, "A", 3)  # its link dropped after "other 2" was acknowledged
    d.feed(frame(T.STDOUT, 1, b"other 3") + frame(T.STDOUT, 1, b"other 4"))
    got = outputs(sub)
    assert got == [out(n) for n in range(1, 9)] + [frame(T.STDOUT, 1, b"other 2"), frame(T.STDOUT, 1, b"other 3"),
                                                    frame(T.STDOUT, 1, b"other 4")], got


def test_connections_from_before_a_boot_do_not_count():
    """A boot (or a restore) starts a new generation: a connection of the old
    VM that ends after it, or is still there, says nothing about the new one's
    frames (its agent's numbers start over, or go back to the snapshot's)."""
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a, tok = agent_and_token(w)
    p = program(w, tok, "P")
    p.feed(b"".join(frame(T.STDOUT, 9, b"old%d" % n) for n in range(1, 6)))
    sess = w.registry.get("default")
    sess.outboxes.clear()  # what BootManager.boot does, before the old VM's connections are gone
    sess.generation += 1
    p2 = program(w, tok, "P", 3)  # the restored program: back at the snapshot, new output
    w.lose(p, "the vsock device is gone")
    p2.feed(b"".join(frame(T.STDOUT, 9, b"new%d" % n) for n in range(3, 8)))
    assert [x for x in payloads(sub, 9) if x.startswith(b"new")] == [b"new%d" % n for n in range(3, 8)]
    assert sess.outboxes == {}
    w.lose(p2, "reset")
    assert sess.outboxes == {"p:P": (3, 7)}


def test_the_http_api_numbers_what_follows_a_resend_right(make_daemon):
    """The HTTP API numbers an execution's frames from ``output_seqs``: after
    frames sent again were dropped, what it is told counts them in, and the
    attach stream has every line once, numbered 1..5."""
    pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")
    from harness.http import HttpApi, read_attach

    d = make_daemon("--backend", "external", "--http", "127.0.0.1:0", "--heartbeat", "0")
    token = d.call("vhub.register", {"session": "h"})["token"]

    async def body():
        g = await AsyncPeer.guest(d.socket, {"session": "h", "token": token, "ack": True})
        g.send_raw(seqs("o", 1))
        async with HttpApi(d) as api:
            spawn = asyncio.ensure_future(api.ok("POST", "/api/sessions/h/spawn", {"command": "x"}))
            req = await g.next_frame(10, lambda f: f.msg_type == T.RPC_REQUEST
                                     and json.loads(bytes(f.payload)).get("method") == "agent.run")
            g.send(T.RPC_RESPONSE, req.request_id, {"execution_id": 5, "pid": 1})
            r = await spawn
            for i in (1, 2, 3):
                g.send(T.STDOUT, 5, b"line%d\n" % i)
            await g.drain()

            async def head(n):
                return (await api.ok("GET", "/api/sessions/h/executions"))["executions"][0]["head_seq"] == n

            await wait_until(lambda: head(3), 20, what="3 frames")
            await g.close()  # the link drops before the agent read an ack: it holds line1..3
            await wait_until(lambda: _state(api, "h", "agent_lost"), 10, what="the agent gone")
            g = await AsyncPeer.guest(d.socket, {"session": "h", "token": token, "ack": True})
            g.send_raw(seqs("o", 1, {"5": 0}))
            for i in (1, 2, 3, 4, 5):  # 1..3 again, then new ones
                g.send(T.STDOUT, 5, b"line%d\n" % i)
            await g.drain()
            await wait_until(lambda: head(5), 20, what="5 frames")
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                chunks, _ = await read_attach(ws, until=b"line5\n")
            assert [c[2] for c in chunks] == [b"line%d\n" % i for i in range(1, 6)], chunks
            assert [c[1] for c in chunks] == [1, 2, 3, 4, 5], chunks

    run(body(), 60)


async def _state(api, name: str, state: str) -> bool:
    return [s["state"] for s in (await api.ok("GET", "/api/sessions"))["sessions"] if s["name"] == name] == [state]


def test_a_gone_guests_frame_cut_by_its_leaving_is_not_started_for_it():
    """A program's read held behind the agent's cut-through frame ends with the
    start of its own large frame, and its link drops: when the agent's frame
    ends, its whole frames go out, not the start of one whose rest will never
    come (the session would wait for it for good); the agent goes on."""
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    a, tok = agent_and_token(w)
    big = frame(T.STDOUT, 1, BIG)
    a.feed(big[:1000])
    p = program(w, tok, "p")
    p.feed(frame(T.STDOUT, 9, b"p1") + frame(T.STDOUT, 9, BIG)[:2000])
    w.lose(p, "reset")
    a.feed(big[1000:])
    sess = w.registry.get("default")
    assert sess.cut_through is None and sess.outboxes == {"p:p": (1, 1)}
    a.feed(frame(T.STDOUT, 1, b"after"))
    assert payloads(sub) == [BIG, b"p1", b"after"] and not sub.closed


def test_a_held_seqs_notification_is_bounded_and_only_the_first_counts():
    """What waits to be published is bounded whatever a guest lists; after a
    malformed one, a well-formed second one changes nothing."""
    w = World()
    sub = w.client("default", subscribe=["stdout"])
    took(w, "x", 3)
    b = agent(w, "x", 1)
    b.feed(seqs("x", 1))  # a second one: nothing
    b.feed(wire_frame(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", "outbox": "x", "next": 1, "executions": {
        str(i): i for i in range(100_000)}}).encode()))
    held = w.relay.resends  # the member's notification waits for the 3 frames taken before
    member = next(g for g in w.registry.get("default").guests)
    assert member.skip == 3 and len(member.seqs_held[0]["executions"]) == 0
    w.lose(b, "reset")
    c = w.guest({"ack": True})
    handshake_answer(c)
    c.feed(wire_frame(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", "outbox": "x", "next": 1, "executions": {
        str(i): i for i in range(100_000)}}).encode()))
    member = next(g for g in w.registry.get("default").guests)
    assert member.skip == 3 and len(member.seqs_held[0]["executions"]) == 1024, held
    w.lose(c, "reset")
    d = w.guest({"ack": True})
    handshake_answer(d)
    d.feed(wire_frame(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", "outbox": 5, "next": 1}).encode()))
    d.feed(seqs("x", 1) + out(1) + out(2))  # after a malformed one: not skipped
    assert outputs(sub) == [out(1), out(2), out(3), out(1), out(2)]


AGENT = r"""
import json, os, socket, struct, sys, time
H = struct.Struct("<IBBHIQ")
def frame(t, rid, payload):
    return H.pack(0x424C494E, 1, t, 0, len(payload), rid) + payload
addr = os.environ["VHUB_ADDR"]
s = socket.socket(socket.AF_UNIX)
s.connect(addr[len("unix:"):])
s.sendall(frame(1, 1, json.dumps({"session": os.environ["VHUB_SESSION"], "token": os.environ["VHUB_TOKEN"],
                                  "ack": True}).encode()))
head = s.recv(20, socket.MSG_WAITALL)
s.recv(H.unpack(head)[4], socket.MSG_WAITALL)
n = open(sys.argv[1]).read().strip() if os.path.exists(sys.argv[1]) else "0"
open(sys.argv[1], "w").write(str(int(n) + 1))
for _ in range(1500):  # the test's subscriber is there when it says so
    if os.path.exists(sys.argv[1] + ".go" + n):
        break
    time.sleep(0.02)
# the same outbox name and numbers at every boot, as a VM restored from one snapshot
s.sendall(frame(16, 0, json.dumps({"event": "output_seqs", "executions": {}, "outbox": "fixed", "next": 1}).encode())
          + b"".join(frame(48, 1, b"boot %s line %d" % (n.encode(), i)) for i in range(1, 4)))
while s.recv(65536):
    pass
"""


def test_a_boot_starts_the_sessions_outboxes_over(make_daemon, tmp_path):
    """Through the daemon's boots (local backend, an agent that says the same
    outbox name and numbers each time, as a VM restored from one snapshot
    would): the second boot's frames are new output, delivered."""
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    import sys

    d = make_daemon("--backend", "local", "--heartbeat", "0",
                    "--agent-command", f"{sys.executable} {script} {tmp_path / 'boots'}")

    async def body():
        admin = await client(d)
        sub = await RawClient.open(d.control, session="b", subscribe=["stdout"], boot=True)
        for n in (0, 1):
            if n:
                await admin.boot("b", timeout=60)
            got = b"".join(wire_frame(T.STDOUT, 1, b"boot %d line %d" % (n, i)) for i in range(1, 4))
            (tmp_path / f"boots.go{n}").touch()
            assert await sub.read_exactly(len(got)) == got
            await admin.stop("b")
        assert (await admin.stats())["counters"]["stream_resent_dropped"] == 0

    run(body(), 120)
