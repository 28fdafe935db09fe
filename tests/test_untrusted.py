"""A guest is untrusted, end to end against a real daemon: the attacks of the
issue "a guest is untrusted", each bounded, each beside a healthy client that
must keep being served. (Routing decisions are tested in-process in
tests/test_relay_untrusted.py; here the bounds that live in the I/O layer.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from harness import ROOT, AsyncPeer, Daemon, T, client, frame, run, wait_for, wait_until

from vhubd.frames import DEFAULT_MAX_PAYLOAD
from vhubd.protocol import RemoteErrorEvent

MIB = 1 << 20
PY = sys.executable


async def flood(target, data: bytes, seconds: float = 3.0, handshake: bytes | None = None) -> socket.socket:
    """Send ``data`` over and over without ever reading, until the daemon stops
    taking it (the kernel buffers are full) or ``seconds`` pass. The socket is
    returned open: the attacker is still there."""
    loop = asyncio.get_running_loop()
    fam = socket.AF_INET if isinstance(target, tuple) else socket.AF_UNIX
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    await loop.sock_connect(s, target)
    if handshake is not None:
        await loop.sock_sendall(s, handshake)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            await asyncio.wait_for(loop.sock_sendall(s, data), 0.5)
        except TimeoutError:
            break  # the daemon stopped reading us
        except OSError:
            break
    return s


async def ping_ms(c) -> float:
    t0 = time.perf_counter()
    await c.call("vhub.ping", timeout=5)
    return (time.perf_counter() - t0) * 1000


async def sessions_ms(d) -> float:
    t0 = time.perf_counter()
    r = await asyncio.create_subprocess_exec(PY, "-m", "vhubd", "sessions", "--control", d.control, cwd=ROOT,
                                             stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await r.communicate()
    assert r.returncode == 0, err
    return (time.perf_counter() - t0) * 1000


def hs(body) -> bytes:
    return frame(T.HANDSHAKE, 1, body)


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("flag,value", [
    ("--max-payload", "0"), ("--heartbeat", "-1"), ("--max-connections", "0"), ("--scrollback", "-1"),
    ("--socket-mode", "7777"), ("--max-clients", "0"), ("--max-inflight", "0"), ("--max-output", "1"),
    ("--anonymous-session", "Bad Name"), ("--guest-dir", "/nonexistent/dir"),
])
def test_nonsense_settings_are_refused_at_start(tmp_path, flag, value):
    r = subprocess.run([PY, "-m", "vhubd", "serve", "--socket", str(tmp_path / "g.sock"), "--control",
                        str(tmp_path / "c.sock"), flag, value], capture_output=True, timeout=30, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and flag in err, err
    assert not os.path.exists(tmp_path / "g.sock")


# ---------------------------------------------------------------- hijack

def test_the_hijack_of_the_issue_fails(make_daemon, tmp_path):
    """A client names a session, an impostor on the guest socket claims it: the
    client's command is an error that creates nothing, and once the session is
    booted its token keeps the impostor out; the owner's run is the real one."""
    d = make_daemon("--backend", "local", "--state-dir", str(tmp_path / "state"))
    r = d.cli("tail", "-f", "demo", timeout=20)  # used to create a tokenless session and hang
    assert r.returncode == 1 and b"unknown_session" in r.stderr
    assert b"demo" not in d.cli("sessions").stdout

    async def body():
        impostor = await AsyncPeer.open(d.socket)
        assert (await impostor.handshake({"session": "demo"}))[:2] == ("error", "unknown_session")
        run_ = await asyncio.create_subprocess_exec(PY, "-m", "vhubd", "run", "--control", d.control, "demo", "--",
                                                    "sh", "-c", "echo real; exit 3", cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(run_.communicate(), 30)
        assert (run_.returncode, out) == (3, b"real\n")
        for payload in ({"session": "demo"}, {"session": "demo", "token": ""}, {"session": "demo", "attach": True}):
            p = await AsyncPeer.open(d.socket)
            assert (await p.handshake(payload))[:2] == ("error", "bad_token"), payload
        info = json.loads(d.cli("info", "demo", "--json").stdout)
        assert info["agent"]["agent"] == "blink-agent" and "token" not in info

    run(body())


# ---------------------------------------------------------------- memory

FLOODS = {
    # a guest that sends RPCs with a 60 KB unknown method name and never reads the errors
    "unknown_methods": lambda: frame(T.RPC_REQUEST, 7, {"method": "m" * 60_000, "params": {}}),
    # a guest that floods pings and never reads the pongs
    "pings": lambda: frame(T.HEARTBEAT, 3) * 2000,
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_a_guest_that_never_reads_its_answers_is_paused_then_closed(make_daemon, kind):
    d = make_daemon("--stall-timeout", "2", "--heartbeat", "0")

    async def body():
        admin = await client(d)
        token = (await admin.register("att"))["token"]
        rss0 = d.rss_kib()
        s = await flood(d.socket, FLOODS[kind](), 4.0, hs({"session": "att", "token": token}))
        peak = d.rss_kib()
        assert (peak - rss0) < 32 * 1024, f"RSS grew by {(peak - rss0) // 1024} MiB"
        assert await ping_ms(admin) < 1000  # the operator is served meanwhile
        # paused, then dropped after the stall timeout (and the close grace: it never reads)
        await wait_until(lambda: admin.stats(), 1)
        await wait_until(lambda: _connections(admin, 1), 15, what="the flooding guest dropped")
        assert (await admin.stats())["counters"]["slow_consumers"] >= 1
        s.close()
        await wait_until(lambda: d.rss_kib() - rss0 < 8 * 1024, 10, interval=0.5, what="RSS back within 8 MiB")

    run(body(), timeout=60)


async def _connections(c, want: int) -> bool:
    return (await c.stats())["connections"] <= want


def test_a_lossy_events_subscriber_that_stops_reading_is_dropped(make_daemon):
    d = make_daemon("--lossy-limit", "256k", "--heartbeat", "0")

    async def body():
        admin = await client(d)
        g = await AsyncPeer.guest(d.socket)
        s = await flood(d.control, b"", 0.1, hs({"role": "client", "session": "default", "subscribe": ["events"],
                                                 "flow": "lossy"}))
        rss0 = d.rss_kib()
        note = frame(T.RPC_REQUEST, 0, {"method": "progress", "params": {"pad": "x" * 4000}})  # published as events
        for _ in range(400):
            g.send_raw(note * 10)
            await g.drain()
        await wait_until(lambda: _stat(admin, "slow_consumers", 1), 10, what="slow_consumer")
        assert d.rss_kib() - rss0 < 32 * 1024
        s.close()

    run(body())


async def _stat(c, key: str, at_least: int) -> bool:
    return (await c.stats())["counters"][key] >= at_least


def test_a_star_client_writing_to_an_agent_that_does_not_read_is_paused(make_daemon):
    d = make_daemon("--heartbeat", "0", "--max-output", "8m")

    async def body():
        admin = await client(d)
        agent = await flood(d.socket, b"", 0.1, hs(b""))  # the agent of default, which never reads
        rss0 = d.rss_kib()
        big = frame(T.RPC_REQUEST, 0, {"method": "agent.x", "params": {"pad": "y" * 60_000}, "session": "default"})
        star = await flood(d.control, big, 4.0, hs({"role": "client", "session": "*"}))
        grown = d.rss_kib() - rss0
        assert grown < 24 * 1024, f"the daemon grew by {grown // 1024} MiB"
        assert await ping_ms(admin) < 1000
        star.close()
        agent.close()

    run(body())


def test_a_peer_that_reads_its_answers_is_never_dropped_whatever_one_batch_queued(make_daemon):
    """Answers to one read batch are written at its end, in one go; when they
    crossed the high-water mark but the kernel took them at once, the peer
    must not stay paused (and be dropped after the stall timeout)."""
    d = make_daemon("--heartbeat", "0", "--stall-timeout", "1")

    async def body():
        admin = await client(d)
        for i in range(200):
            await admin.register(f"s{i:03d}-" + "n" * 50)
        c = await AsyncPeer.open(d.control)
        assert (await c.handshake({"role": "client", "session": "*"}))[0] == "ok"
        one = len((await c.call("vhub.sessions", {}, rid=1)).payload)
        first = (1 << 20) // one  # the batch whose answers first cross the mark...
        for k in range(max(1, first - 2), first + (400 << 10) // one):  # ...to well past it
            c.send_raw(frame(T.RPC_REQUEST, 1, {"method": "vhub.sessions", "params": {}}) * k)
            for _ in range(k):
                f = await c.next_frame(10)
                assert getattr(f, "msg_type", None) == T.RPC_RESPONSE, (k, f)
            await asyncio.sleep(1.3)  # past the stall timeout: a peer still paused would be closed now
            pong = await c.call("vhub.ping", {}, rid=2, timeout=5)
            assert getattr(pong, "msg_type", None) == T.RPC_RESPONSE, (k, pong)
        await c.close()

    run(body(), timeout=120)


def test_unread_daemon_call_answers_stop_the_caller(make_daemon):
    d = make_daemon("--heartbeat", "0", "--stall-timeout", "2")

    async def body():
        admin = await client(d)
        for i in range(300):
            await admin.register(f"s{i}")
        rss0 = d.rss_kib()
        ask = frame(T.RPC_REQUEST, 1, {"method": "vhub.sessions", "params": {}})
        s = await flood(d.control, ask * 20, 4.0, hs({"role": "client", "session": "*"}))
        grown = d.rss_kib() - rss0
        assert grown < 24 * 1024, f"unread answers grew the daemon by {grown // 1024} MiB"
        assert await ping_ms(admin) < 1000
        await wait_until(lambda: _connections(admin, 1), 15, what="the caller that never reads dropped")
        s.close()

    run(body(), timeout=60)


# ---------------------------------------------------------------- lockout, limits

def test_guests_cannot_lock_the_operator_out(make_daemon):
    d = make_daemon("--max-connections", "20", "--heartbeat", "0")

    async def body():
        admin = await client(d)
        tok = (await admin.register("x"))["token"]
        held = [await AsyncPeer.guest(d.socket, {"session": "x", "token": tok, "attach": True}) for _ in range(20)]
        late = await AsyncPeer.open(d.socket)
        # refused at accept, before any handshake: read the Error (a handshake written now could meet
        # the closed socket, and a failed write makes asyncio drop what was received)
        ev = await late.next_event()
        assert isinstance(ev, RemoteErrorEvent) and ev.code == "too_many_connections", ev
        assert await sessions_ms(d) < 5000  # blink sessions still works: the control socket counts apart
        assert (await admin.stats())["refused_by_code"]["too_many_connections"] == 1
        assert len(held) == 20

    run(body())


def test_silent_attached_connections_are_closed_by_the_heartbeat(make_daemon):
    d = make_daemon("--heartbeat", "1")

    async def body():
        admin = await client(d)
        tok = (await admin.register("x"))["token"]
        t0 = time.monotonic()
        s = await flood(d.socket, b"", 0.1, hs({"session": "x", "token": tok, "attach": True}))
        loop = asyncio.get_running_loop()
        got = b""
        while time.monotonic() - t0 < 10:  # it reads (pings arrive) but never answers them
            try:
                d_ = await asyncio.wait_for(loop.sock_recv(s, 65536), 10)
            except (TimeoutError, ConnectionResetError):
                break
            if not d_:
                break
            got += d_
        assert b"heartbeat_timeout" in got and time.monotonic() - t0 < 8
        s.close()

    run(body())


def test_a_huge_handshake_is_refused_from_its_header_and_nothing_is_echoed_whole(make_daemon):
    d = make_daemon("--heartbeat", "0")

    async def body():
        p = await AsyncPeer.open(d.socket)
        p.send_raw(frame(T.HANDSHAKE, 1, b"x" * 100)[:8] + (DEFAULT_MAX_PAYLOAD).to_bytes(4, "little")
                   + (1).to_bytes(8, "little"))
        code, message = await p.error_and_close()
        assert code == "frame_too_large" and "handshake" in message
        size0 = os.path.getsize(d.logpath)
        for _ in range(20):  # a 60 KB bad name, twenty times
            p = await AsyncPeer.open(d.socket)
            res = await p.handshake({"session": "N" * 60_000})
            assert res[1] == "bad_session_name" and len(res[2]) < 400
        await asyncio.sleep(0.2)
        assert os.path.getsize(d.logpath) - size0 < 20 * 1024  # not 20 x 60 KB of log

    run(body())


def test_sessions_are_capped_and_listing_them_stays_cheap(make_daemon):
    d = make_daemon("--max-sessions", "2000", "--heartbeat", "0")

    async def body():
        admin = await client(d)
        for i in range(1999):  # and the anonymous one
            await admin.register(f"s{i:04d}")
        with pytest.raises(Exception) as exc:
            await admin.register("one-too-many")
        assert "too_many_sessions" in str(exc.value)
        assert len(await admin.sessions()) == 2000  # two pages
        other = await client(d)
        lister = asyncio.ensure_future(asyncio.gather(*(admin.sessions() for _ in range(5))))
        pings = []
        while not lister.done():
            pings.append(await ping_ms(other))
        await lister
        assert max(pings) < 500, pings
        r = d.cli("rm", "s0001")
        assert r.returncode == 0 and b"s0001" not in d.cli("sessions").stdout
        assert (await admin.register("one-more"))["session"] == "one-more"

    run(body(), timeout=60)


def test_unknown_sessions_in_client_commands_are_errors(make_daemon):
    d = make_daemon("--backend", "external")
    for args in (["tail", "nosuch"], ["tail", "-f", "nosuch"], ["stop", "nosuch"], ["info", "nosuch"],
                 ["call", "nosuch", "agent.ping"], ["rm", "nosuch"], ["attach", "nosuch", "1"]):
        r = d.cli(*args, timeout=20)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and "nosuch" in err, (args, err)
    assert b"nosuch" not in d.cli("sessions").stdout


# ---------------------------------------------------------------- per-session sockets

def test_per_session_guest_sockets(make_daemon, tmp_path):
    gdir = tmp_path / "guests"
    gdir.mkdir()
    d = make_daemon("--backend", "local", "--state-dir", str(tmp_path / "state"), "--guest-dir", str(gdir))
    r = subprocess.run([PY, "-m", "vhubd", "run", "--control", d.control, "vm1", "--", "sh", "-c",
                        "echo $VHUB_ADDR"], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"unix:{gdir}/vm1.sock", r.stderr
    assert os.path.exists(gdir / "vm1.sock")
    assert d.cli("stop", "vm1").returncode == 0
    wait_for(lambda: not os.path.exists(gdir / "vm1.sock"), 5, what="socket removed at stop")

    async def body():
        admin = await client(d)
        await admin.register("ext")  # an external VM: its VMM maps vsock port 10000 to ext.sock
        path = str(gdir / "ext.sock")
        await wait_until(lambda: os.path.exists(path), 5)
        g = await AsyncPeer.guest(path, {"session": "someone-else", "agent": "vmm-agent"})  # no token needed
        info = await admin.info("ext")
        assert info["agent_connected"] and info["agent"]["agent"] == "vmm-agent"
        assert (await g.call("vhub.ping"))  # it is in ext, whatever it claimed
        await admin.remove("ext")
        await wait_until(lambda: not os.path.exists(path), 5, what="socket removed with the session")

    run(body())


# ---------------------------------------------------------------- nothing lost

AGENT_WRITER = """
import sys, time, blink_agent
hub = blink_agent.connect()
for i in range({n}):
    hub.stdout(b"line %d\\n" % i)
    if {pause}:
        time.sleep({pause})
hub.flush(60)
hub.close(30)
"""


@pytest.mark.parametrize("session", ["anonymous", "named"])
def test_agent_output_survives_a_daemon_sigkill(tmp_path, session):
    """An agent streams numbered lines; the daemon is SIGKILLed in the middle
    and started again on the same sockets. Nothing is lost: every line reaches
    a subscriber, the old daemon's or the new one's; the new daemon's stream
    has no duplicate."""
    n = 60_000
    d = Daemon(tmp_path / "d", "--heartbeat", "0", "--scrollback", "32m").start()
    env = dict(os.environ, VHUB_ADDR=f"unix:{d.socket}", PYTHONPATH=os.path.join(ROOT, "guest-agent"))
    if session == "named":
        env.update(VHUB_SESSION="named", VHUB_TOKEN=d.call("vhub.register", {"session": "named"})["token"])
    name = "default" if session == "anonymous" else "named"
    seen_old: list[bytes] = []
    d2 = None
    sub = subprocess.Popen([PY, "-m", "vhubd", "tail", "-f", "--control", d.control, name],
                           stdout=subprocess.PIPE, cwd=ROOT)
    agent = subprocess.Popen([PY, "-c", AGENT_WRITER.format(n=n, pause=0)], env=env, cwd=ROOT)
    try:
        wait_for(lambda: d.call("vhub.stats")["counters"]["stream_frames"] > n // 10, 30, what="output flowing")
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(10)
        seen_old = sub.stdout.read().splitlines()
        sub.wait(10)
        d.stop()
        d2 = Daemon(tmp_path / "d", "--heartbeat", "0", "--scrollback", "32m").start()  # the same sockets and state dir
        assert agent.wait(60) == 0
        sub2 = subprocess.run([PY, "-m", "vhubd", "tail", "--control", d2.control, name],
                              capture_output=True, timeout=30, cwd=ROOT)
        seen_new = sub2.stdout.splitlines()
    finally:
        for p in (agent, sub):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        sub.stdout.close()
        d.stop()
        if d2 is not None:
            d2.stop()
    want = [b"line %d" % i for i in range(n)]
    assert len(seen_old) > 20 and len(seen_new) > 20, (len(seen_old), len(seen_new))
    assert len(set(seen_new)) == len(seen_new), "a line twice in the new daemon's stream"
    assert set(seen_old) | set(seen_new) == set(want), sorted(set(want) - set(seen_old) - set(seen_new))[:5]
    assert seen_new == sorted(seen_new, key=lambda line: int(line.split()[1]))
