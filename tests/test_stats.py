"""``vhub.stats`` / ``blink stats``: every counter counts. One real daemon, raw
peers on real sockets; each step makes exactly the counters it should move,
move, by exactly as much (``frames_in``: every frame received after a handshake,
heartbeats included; ``stream_bytes``: stream frames on the wire, headers
included)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from harness import ROOT, AsyncPeer, T, client, run, wait_until

from vhubd.protocol import RemoteErrorEvent

COUNTERS = {"guests_accepted", "clients_accepted", "refused", "violations", "frames_in", "stream_frames",
            "stream_bytes", "stream_pumped", "stream_direct", "stream_resent_dropped",
            "rpc_forwarded", "rpc_timeouts", "slow_consumers", "tty_input_dropped",
            "too_many_requests"}
# channels (exposed ports, copies): they count in test_relay_channels.py and test_expose.py
CHANNEL_COUNTERS = {"channels_opened", "channels_refused", "channels_reset", "channel_frames_dropped",
                    "expose_accepted", "expose_refused"}


def test_every_counter_counts(make_daemon):
    d = make_daemon("--backend", "external", "--heartbeat", "0", "--rpc-timeout", "1", "--max-inflight", "2",
                    "--lossy-limit", "1024")

    async def body():
        admin = await client(d)
        last = (await admin.stats())["counters"]
        assert set(last) == COUNTERS | CHANNEL_COUNTERS

        async def moved(**want):
            """The counters moved by exactly ``want`` since last time (the stats
            request itself is one frame in)."""
            nonlocal last
            now = (await admin.stats())["counters"]
            delta = {k: now[k] - last[k] for k in now if now[k] != last[k]}
            want = {**want, "frames_in": want.get("frames_in", 0) + 1}
            last = now
            assert delta == {k: v for k, v in want.items() if v}, delta

        await moved()
        tok = (await admin.register("s"))["token"]
        await moved(frames_in=1)
        guest = await AsyncPeer.guest(d.socket, {"session": "s", "token": tok})
        await moved(guests_accepted=1)  # handshakes are not frames_in: what comes after them is
        bad = await AsyncPeer.open(d.socket)
        assert (await bad.handshake({"session": "s", "token": "wrong"}))[:2] == ("error", "bad_token")
        await moved(refused=1)

        guest.send(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", "outbox": "st", "next": 1}).encode())
        for _ in range(3):  # stream frames: 3 frames of 10 bytes, 30 bytes on the wire each
            guest.send(T.STDOUT, 1, b"0123456789")
        await guest.drain()
        sub = await client(d, session="s", subscribe=["stdout"])  # after them: no replay asked
        await moved(stream_frames=3, stream_bytes=90, frames_in=4, clients_accepted=1)

        # a client's call forwarded to the agent, answered
        call = asyncio.ensure_future(admin.call("agent.x", {}, session="s", timeout=10))
        req = await guest.next_frame(10, lambda f: f.msg_type == T.RPC_REQUEST)
        guest.send(T.RPC_RESPONSE, req.request_id, b"{}")
        assert await call == {}
        await moved(rpc_forwarded=1, frames_in=2)

        # unanswered: the RPC timeout (1 s)
        try:
            await admin.call("agent.y", {}, session="s", timeout=10)
        except Exception as exc:
            assert getattr(exc, "code", "") == "timeout", exc
        await moved(rpc_forwarded=1, rpc_timeouts=1, frames_in=1)

        # past --max-inflight (2): the third is refused at once
        caller = await client(d, session="s")
        calls = [asyncio.ensure_future(caller.call("agent.z", {}, timeout=10)) for _ in range(3)]
        done = await asyncio.gather(*calls, return_exceptions=True)
        codes = sorted(getattr(r, "code", "") for r in done)
        assert codes == ["timeout", "timeout", "too_many_requests"], done
        await moved(clients_accepted=1, rpc_forwarded=2, rpc_timeouts=2, too_many_requests=1, frames_in=3)

        # a lossy subscriber that never reads, past --lossy-limit
        lossy = await AsyncPeer.open(d.control)
        lossy.send(T.HANDSHAKE, 1, json.dumps({"role": "client", "session": "s", "subscribe": ["stdout"],
                                              "flow": "lossy"}).encode())
        await lossy.drain()
        await lossy.next_event()  # its handshake answer; then it stops reading
        lossy.writer.transport.pause_reading()
        big = b"x" * 65536
        for _ in range(64):
            guest.send(T.STDOUT, 2, big)
        await guest.drain()
        await wait_until(lambda: _counter(admin, "slow_consumers", last), 15, what="the lossy subscriber dropped")
        now = (await admin.stats())["counters"]
        assert now["slow_consumers"] - last["slow_consumers"] == 1
        assert now["stream_frames"] - last["stream_frames"] == 64
        assert now["stream_bytes"] - last["stream_bytes"] == 64 * (20 + 65536)
        last = now

        # a terminal's input from a client that is not its writer
        writer = await client(d, session="s", subscribe=["stream", "events"])
        opening = asyncio.ensure_future(writer.call("agent.run", {"argv": ["sh"], "tty": True}, timeout=10))
        req = await guest.next_frame(10, lambda f: f.msg_type == T.RPC_REQUEST and b"agent.run" in bytes(f.payload))
        guest.send(T.RPC_RESPONSE, req.request_id, json.dumps({"execution_id": 9, "pid": 1, "tty": True}).encode())
        assert (await opening)["tty"] is True
        other = await client(d, session="s")
        await other.send_stream(9, b"typed by someone else")
        await writer.send_stream(9, b"typed by the writer")
        got = await guest.next_frame(10, lambda f: f.msg_type == T.STREAM_DATA)
        assert bytes(got.payload) == b"typed by the writer"
        await wait_until(lambda: _counter(admin, "tty_input_dropped", last), 10, what="the dropped input counted")
        now = (await admin.stats())["counters"]
        assert now["tty_input_dropped"] - last["tty_input_dropped"] == 1
        last = now

        # a protocol violation from a guest after its handshake
        guest.send_raw(b"XXXX" + bytes(16))
        await guest.drain()
        ev = await guest.next_event()
        while ev is not None and not isinstance(ev, RemoteErrorEvent):
            ev = await guest.next_event()
        assert ev is not None and ev.code == "bad_magic"
        await wait_until(lambda: _counter(admin, "violations", last), 10, what="the violation counted")

        # the agent again, after its link dropped: the last of its 67 frames resent, dropped; then a new one
        await wait_until(lambda: _agent_gone(admin, "s"), 10, what="the agent gone")
        last = (await admin.stats())["counters"]
        again = await AsyncPeer.guest(d.socket, {"session": "s", "token": tok})
        again.send(T.RPC_REQUEST, 0, json.dumps({"event": "output_seqs", "outbox": "st", "next": 67}).encode())
        again.send(T.STDOUT, 2, b"resent")
        again.send(T.STDOUT, 2, b"0123456789")
        await again.drain()
        await wait_until(lambda: _counter(admin, "stream_frames", last), 10, what="the new frame taken")
        now = (await admin.stats())["counters"]
        delta = {k: now[k] - last[k] for k in ("guests_accepted", "stream_resent_dropped", "stream_frames",
                                               "stream_bytes")}
        assert delta == {"guests_accepted": 1, "stream_resent_dropped": 1, "stream_frames": 1, "stream_bytes": 30}
        del sub, bad

    run(body(), timeout=90)
    r = subprocess.run([sys.executable, "-m", "vhubd", "stats", "--control", d.control], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0
    shown = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    for name in COUNTERS:
        assert int(shown[f"counters.{name}"]) > 0, name  # every one moved, and the table shows it


async def _agent_gone(admin, name: str) -> bool:
    return [s["state"] for s in await admin.sessions() if s["name"] == name] == ["agent_lost"]


async def _counter(admin, name: str, since: dict | None = None) -> bool:
    now = (await admin.stats())["counters"]
    return now[name] > (since or {}).get(name, 0)

