"""One regression test per defect the fuzzers and attacks of issue 8 found
(each named after what must hold; the fix is named in its docstring)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import reliability
from reliability import Raw, T, frm, hdr, parse_frames

from vhubd.frames import DEFAULT_MAX_PAYLOAD
from vhubd.protocol import Connection, Frame, Handshake, Side

_envs: list = []


def run(body, timeout=60):
    try:
        return asyncio.run(asyncio.wait_for(body, timeout))
    finally:
        while _envs:
            _envs.pop().cleanup()


async def env_of(tmp_path, *flags) -> reliability.Env:
    env = reliability.Env(tmp_path, flags)
    _envs.append(env)
    await env.start(healthy=False)
    return env


def stream_frames(raw: bytes):
    """Every frame of a daemon->client stream, failing on anything that does
    not parse (a foreign byte inside a frame shifts every header after it)."""
    c = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
    c.send_handshake()
    out = []
    for ev in c.receive_data(raw):
        if type(ev) is Handshake:
            continue
        if type(ev) is Frame:
            out.append((ev.msg_type, ev.request_id, bytes(ev.payload)))
        elif hasattr(ev, "frames"):
            out += [(f.msg_type, f.request_id, bytes(f.payload)) for f in ev.frames()]
        else:
            assert type(ev).__name__ in ("Ping", "Pong"), ev  # a Violation: the stream is corrupt
    return out


# --- memory -----------------------------------------------------------------------

def test_header_claiming_16mib_allocates_only_what_arrived(codec_impl):
    """protocol.Connection._scan reserved the whole claimed frame: 20 bytes
    claiming 16 MiB cost 16 MiB (24 such connections: +260 MiB RSS). Now the
    buffer follows the bytes received, and the frame still arrives whole."""
    c = Connection(Side.SERVER, codec_impl=codec_impl, max_payload=DEFAULT_MAX_PAYLOAD)
    c.receive_data(frm(T.HANDSHAKE, 1, b""))
    c.accept()
    c.receive_data(hdr(T.RPC_REQUEST, DEFAULT_MAX_PAYLOAD, 9) + b"{")
    assert len(c.rx.buf) <= 256 * 1024
    head, tail = b'{"method":"x","params":"', b'"}'
    body = head + b"y" * (DEFAULT_MAX_PAYLOAD - len(head) - len(tail)) + tail
    assert len(body) == DEFAULT_MAX_PAYLOAD
    events = []
    for i in range(1, len(body), 1 << 20):
        events += c.receive_data(body[i:i + (1 << 20)])
    (ev,) = events
    assert type(ev) is Frame and ev.request_id == 9 and bytes(ev.payload) == body


def test_connections_share_one_scanner(codec_impl):
    """protocol.Connection.__init__ gave every connection its own 4096-header
    scanner (160 KiB zeroed): 1,000 idle connections cost the daemon 135 MiB,
    kept after they closed. The scanner is now shared per thread."""
    a = Connection(Side.SERVER, codec_impl=codec_impl)
    b = Connection(Side.CLIENT, codec_impl=codec_impl)
    assert a._scanner is b._scanner


def test_idle_connections_are_cheap(tmp_path):
    async def body():
        env = await env_of(tmp_path)
        rss0 = env.d.rss_kib()
        peers = [await Raw.open(env.d.socket) for _ in range(1000)]
        await asyncio.sleep(1.0)
        per_conn = (env.d.rss_kib() - rss0) / len(peers)
        for p in peers:
            await p.close()
        await env.finish()
        assert per_conn < 40, f"{per_conn:.0f} KiB per idle connection"
        assert not env.failures, env.failures

    run(body())


def test_refused_peers_are_released_at_once(tmp_path):
    """server.Peer.close armed a 5 s abort timer that kept every refused or
    closed peer (about 4 KiB) alive for 5 s after it was gone: a flood of
    refused handshakes held 6 MiB per 2,000. connection_lost now cancels it."""

    async def body():
        env = await env_of(tmp_path)
        sem = asyncio.Semaphore(200)

        async def refused(i):
            async with sem:
                p = await Raw.open(env.d.socket)
                res = await p.handshake({"session": "fz-0", "token": "0" * 32}, rid=i + 1)
                await p.close()
                assert res == ("error", "bad_token"), res

        await asyncio.gather(*(refused(i) for i in range(200)))  # warm up
        rss0 = env.d.rss_kib()
        for _ in range(3):
            await asyncio.gather(*(refused(i) for i in range(2000)))
        await asyncio.sleep(0.5)
        growth_mib = (env.d.rss_kib() - rss0) / 1024
        await env.finish()
        assert growth_mib < 4, f"RSS grew {growth_mib:.1f} MiB over 6,000 refused handshakes"

    run(body())


# --- timeouts ---------------------------------------------------------------------

def test_dripping_one_byte_a_second_mid_frame_is_stalled(tmp_path):
    """server.Peer.tick only closed a peer silent for the whole stall timeout:
    one byte a second kept a frame (and its buffer) open forever. Now a peer
    mid-frame must finish it or send MIN_FRAME_RATE bytes/s over each window."""

    async def body():
        env = await env_of(tmp_path)
        p = await Raw.open(env.d.socket)
        assert (await p.handshake({"session": "fz-0", "token": env.tokens["fz-0"], "attach": True}))[0] == "ok"
        data = frm(T.RPC_REQUEST, 3, {"method": "vhub.ping", "params": {"pad": "x" * 100}})
        i = 0
        while not p.eof and i < 12:  # ~10 s of a byte every 0.8 s: never silent for 2 s
            p.send(data[i:i + 1])
            i += 1
            await p.read_some(0.8)
        code = reliability.error_code(bytes(p.got))
        await p.close()
        await env.finish()
        assert p.eof and code == "stalled", f"still open after {i} bytes dripped (code {code})"
        assert not env.failures, env.failures

    run(body())


# --- host -> guest ------------------------------------------------------------------

def test_client_stream_data_larger_than_cut_through_reaches_the_agent(tmp_path):
    """A client's StreamData above 256 KiB became StreamStart/StreamChunk
    events, which relay.client_events ignores: the input was dropped without a
    word. server.Peer now forwards client frames whole (no cut-through)."""

    async def body():
        env = await env_of(tmp_path)
        token = await env.register("big-input")
        g = await Raw.open(env.d.socket)
        assert (await g.handshake({"session": "big-input", "token": token}))[0] == "ok"
        c = await Raw.open(env.d.control)
        assert (await c.handshake({"role": "client", "session": "big-input"}))[0] == "ok"
        big = bytes(range(256)) * 1500  # 384,000 bytes
        c.send(frm(T.STREAM_DATA, 5, big) + frm(T.STREAM_DATA, 5, b"after"))
        await g.frame(lambda f: f[0] == T.STREAM_DATA and f[2] == b"after", 10)
        got = [f for f in parse_frames(bytes(g.got[g.hs_end:])) if f[0] == T.STREAM_DATA]
        for p in (g, c):
            await p.close()
        await env.finish()
        assert [(rid, len(p)) for _, rid, p in got] == [(5, len(big)), (5, 5)]
        assert got[0][2] == big

    run(body())


# --- several guests in one session, cut-through frames -----------------------------------

async def _session_with(env, name, attached=1, **sub):
    token = await env.register(name)
    s = await Raw.open(env.d.control)
    assert (await s.handshake({"role": "client", "session": name, "subscribe": ["stdout"], **sub}))[0] == "ok"
    guests = []
    for i in range(1 + attached):
        g = await Raw.open(env.d.socket)
        assert (await g.handshake({"session": name, "token": token, **({"attach": True} if i else {})}))[0] == "ok"
        guests.append(g)
    return s, guests


def test_other_guests_frames_wait_until_a_cut_through_frame_ends(tmp_path):
    """relay.guest_events let an attached guest's frames through while the
    agent's cut-through frame was half sent: a small frame landed inside its
    payload, and a large one replaced the session's frame in flight, so that
    the two payloads were mixed. Every subscriber's stream was garbage from
    there on. Another guest's frames now wait (the guest is paused) until the
    frame in flight ends, and the scrollback keeps the same order."""

    async def body():
        env = await env_of(tmp_path, "--heartbeat", "0", "--scrollback", "4m")
        sub, (agent, other) = await _session_with(env, "mixed")
        big_a = frm(T.STDOUT, 1, b"A" * (1 << 20))
        big_b = frm(T.STDOUT, 3, b"C" * (1 << 20))
        agent.send(big_a[:300_000])
        await agent.drain()
        await asyncio.sleep(0.3)
        other.send(frm(T.STDOUT, 2, b"B" * 100) + big_b[:300_000])  # no drain: it waits for the agent's frame
        await asyncio.sleep(0.3)
        agent.send(big_a[300_000:])
        await agent.drain()
        await asyncio.sleep(0.3)
        other.send(big_b[300_000:])
        await sub.frame(lambda f: f[1] == 3, 10)  # a lossless subscriber: it must read for them to go on
        await other.drain()
        frames = stream_frames(bytes(sub.got))
        replay = await Raw.open(env.d.control)
        assert (await replay.handshake({"role": "client", "session": "mixed", "subscribe": ["stdout"],
                                        "replay": True}))[0] == "ok"
        await replay.frame(lambda f: f[1] == 3, 10)
        replayed = stream_frames(bytes(replay.got))
        for p in (sub, agent, other, replay):
            await p.close()
        await env.finish()
        want = [(1, 1 << 20, b"A"), (2, 100, b"B"), (3, 1 << 20, b"C")]
        assert [(rid, len(p), p[:1]) for _, rid, p in frames] == want
        assert all(p == p[:1] * len(p) for _, _, p in frames)
        assert [(rid, len(p), p[:1]) for _, rid, p in replayed] == want

    run(body())


def test_guest_lost_mid_cut_through_frame_closes_its_subscribers(tmp_path):
    """A guest that died in the middle of a cut-through frame left its
    subscribers holding a partial frame that the next agent's frames then
    'continued' (relay.guest_lost). The subscribers that got part of the frame
    are now closed (an Error cannot go inside a payload); the scrollback never
    keeps the partial frame, and a new subscriber gets clean frames."""

    async def body():
        env = await env_of(tmp_path, "--heartbeat", "0")
        sub, (agent,) = await _session_with(env, "cut", attached=0)
        agent.send(frm(T.STDOUT, 1, b"whole") + frm(T.STDOUT, 2, b"P" * (1 << 20))[:400_000])
        await agent.drain()
        await sub.frame(lambda f: f[1] == 1, 10)
        await asyncio.sleep(0.3)
        await agent.close()  # the agent dies mid-frame
        closed = await sub.until_eof(5)
        token = env.tokens["cut"]
        agent2 = await Raw.open(env.d.socket)
        assert (await agent2.handshake({"session": "cut", "token": token}))[0] == "ok"
        late = await Raw.open(env.d.control)
        assert (await late.handshake({"role": "client", "session": "cut", "subscribe": ["stdout"],
                                      "replay": True}))[0] == "ok"
        agent2.send(frm(T.STDOUT, 3, b"next"))
        await late.frame(lambda f: f[1] == 3, 10)
        late_frames = stream_frames(bytes(late.got))
        for p in (sub, agent2, late):
            await p.close()
        await env.finish()
        assert closed
        assert [(rid, p) for _, rid, p in late_frames] == [(1, b"whole"), (3, b"next")]

    run(body())


def test_attached_guest_is_paused_by_a_lossless_subscriber(tmp_path):
    """relay.writer_paused paused only the session's agent: a guest attached
    to the session streamed on into a subscriber that did not read, and the
    daemon's memory grew with every byte (190 MiB in 8 s). Every guest of the
    session is paused now, and nothing is lost."""

    async def body():
        env = await env_of(tmp_path, "--heartbeat", "0")
        sub, (agent, attached) = await _session_with(env, "paced")
        rss0 = env.d.rss_kib()
        chunk = frm(T.STDOUT, 7, bytes(range(256)) * 256)
        sent = hashlib.sha256()
        count = 0

        async def push():
            nonlocal count
            for _ in range(2000):  # 128 MiB if nothing pauses it
                attached.send(chunk)
                sent.update(chunk)
                count += 1
                await attached.drain()

        pusher = asyncio.ensure_future(push())
        await asyncio.sleep(3)
        growth_mib = (env.d.rss_kib() - rss0) / 1024
        paused_at = count
        got = reliability.StreamHasher(kinds=(T.STDOUT,))
        got.feed(bytes(sub.got[sub.hs_end:]))
        while got.n < 2000 * len(chunk) and not sub.eof:
            d = await sub.read_some(5)
            sub.got.clear()
            got.feed(d)
        await pusher
        for p in (sub, agent, attached):
            await p.close()
        await env.finish()
        assert paused_at < 200, f"the attached guest wrote {paused_at} frames into a subscriber that did not read"
        assert growth_mib < 32, f"daemon RSS grew by {growth_mib:.0f} MiB"
        assert got.hexdigest() == sent.hexdigest()

    run(body())


@pytest.mark.parametrize("star", [False, True], ids=["session-subscriber", "star-subscriber"])
def test_nothing_is_written_inside_a_cut_through_frame(tmp_path, star):
    """While a cut-through frame was half written to a subscriber, anything
    else the daemon wrote to it (heartbeat pings, the answer to its own RPC,
    another session's output for a '*' subscriber) went straight into the
    frame's payload (server.Peer.write). It now waits for the frame's end."""

    async def body():
        env = await env_of(tmp_path, "--stall-timeout", "10")  # heartbeat 1 s: the idle subscriber gets pinged
        token = await env.register("big")
        other_token = await env.register("other")
        sub = await Raw.open(env.d.control)
        hs = {"role": "client", "session": "*" if star else "big", "subscribe": ["stdout"]}
        assert (await sub.handshake(hs))[0] == "ok"
        agent = await Raw.open(env.d.socket)
        assert (await agent.handshake({"session": "big", "token": token}))[0] == "ok"
        other = await Raw.open(env.d.socket)
        assert (await other.handshake({"session": "other", "token": other_token}))[0] == "ok"
        big = frm(T.STDOUT, 1, b"A" * (1 << 20))
        agent.send(big[:300_000])
        await agent.drain()
        await asyncio.sleep(0.2)
        sub.send(frm(T.RPC_REQUEST, 42, {"method": "vhub.ping", "params": {}}))
        other.send(frm(T.STDOUT, 2, b"other session"))
        await asyncio.sleep(2.5)  # pings come due meanwhile
        agent.send(big[300_000:])
        await agent.drain()
        await sub.frame(lambda f: f[0] == T.RPC_RESPONSE and f[1] == 42, 10)
        if star:
            await sub.frame(lambda f: f[1] == 2, 10)
        frames = stream_frames(bytes(sub.got))
        for p in (sub, agent, other):
            await p.close()
        await env.finish()
        stdout = [(rid, len(p)) for mt, rid, p in frames if mt == T.STDOUT]
        assert stdout[0] == (1, 1 << 20)
        assert (stdout == [(1, 1 << 20), (2, 13)]) if star else (stdout == [(1, 1 << 20)])
        assert any(mt == T.RPC_RESPONSE and rid == 42 for mt, rid, _ in frames)

    run(body())
