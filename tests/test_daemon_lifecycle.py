"""Daemon lifecycle under load, end to end: a SIGTERM drain that delivers what
was accepted, and hundreds of guests and clients at once (DESIGN §6, §11)."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest
from harness import AsyncPeer, RawClient, T, client, frame, json_of, run, wait_until

from vhubd.errors import ConnectionClosed


def test_sigterm_drains_and_exits(make_daemon):
    """SIGTERM with guests and clients connected: every peer gets Error
    shutting_down after the data accepted before it, the process exits 0,
    its socket files are gone."""
    d = make_daemon("--heartbeat", "0")
    rnd = random.Random(2)
    frames = [frame(T.STDOUT if i % 2 else T.STDERR, i, rnd.randbytes(rnd.randint(1, 16384))) for i in range(64)]
    wire = b"".join(frames)

    async def body():
        sub = await RawClient.open(d.control, session="default", subscribe=["stdout", "stderr"])
        caller = await client(d, session="default")
        star = await client(d, subscribe=["events"])
        g = await AsyncPeer.guest(d.socket)
        other = await AsyncPeer.open(d.socket)  # connected, not yet handshaken
        g.send_raw(wire)
        assert (await g.call("vhub.ping", rid=1)).msg_type == T.RPC_RESPONSE  # all of it accepted
        pending = asyncio.ensure_future(caller.call("agent.wait", timeout=20))
        assert json_of(await g.next_frame(10))["method"] == "agent.wait"  # in flight at the agent
        os.kill(d.pid, signal.SIGTERM)
        # the subscriber has not read a byte yet: it gets everything, then the Error
        got = await sub.read_exactly(len(wire))
        assert got == wire
        tail = await asyncio.wait_for(sub.reader.read(), 10)
        assert tail[5] == T.ERROR and b'"shutting_down"' in tail, tail
        assert (await g.error_and_close())[0] == "shutting_down"
        assert (await other.error_and_close())[0] == "shutting_down"
        with pytest.raises(ConnectionClosed) as exc:
            await pending
        assert exc.value.code == "shutting_down"
        await wait_until(lambda: star.closed_reason is not None, what="star client closed")
        assert star.closed_reason.code == "shutting_down"

    run(body())
    assert d.proc.wait(15) == 0
    assert not os.path.exists(d.socket) and not os.path.exists(d.control)
    assert "Traceback" not in d.log()


def test_sigterm_with_nothing_connected(make_daemon):
    d = make_daemon("--tcp", "127.0.0.1:0")
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not os.path.exists(d.socket) and not os.path.exists(d.control)


N = 200


def test_200_guests_and_200_clients(make_daemon):
    """200 registered sessions, each with its agent and a client: every client
    calls its agent, every agent calls a host handler and the daemon; the
    daemon stays healthy and lets go of every connection afterwards."""
    d = make_daemon()

    async def body():
        admin = await client(d)
        fds_before = d.fd_count()
        names = [f"s{i:03d}" for i in range(N)]
        tokens = [(await admin.register(n))["token"] for n in names]
        await client(d, session="*", serve={"host.echo": lambda p: {"host": p}})
        guests = await asyncio.gather(*(AsyncPeer.guest(d.socket, {"session": n, "token": t})
                                        for n, t in zip(names, tokens, strict=True)))
        clients = await asyncio.gather(*(client(d, session=n) for n in names))

        async def agent(i, g):
            # answer the client's call, then call the host and the daemon
            f = await g.next_frame(20, lambda f: f.msg_type == T.RPC_REQUEST)
            g.send(T.RPC_RESPONSE, f.request_id, {"agent": i, "params": json_of(f)["params"]})
            r = await g.call("host.echo", {"i": i}, rid=1000 + i, timeout=20)
            assert json_of(r) == {"host": {"i": i}}
            r = await g.call("vhub.ping", rid=7, timeout=20)
            assert json_of(r)["session"] == names[i]

        async def caller(i, c):
            assert await c.call("agent.echo", {"i": i}, timeout=20) == {"agent": i, "params": {"i": i}}

        await asyncio.gather(*(agent(i, g) for i, g in enumerate(guests)),
                             *(caller(i, c) for i, c in enumerate(clients)))
        stats = await admin.stats()
        assert stats["guests"] == N and stats["clients"] == N + 2
        sessions = {s["name"]: s for s in await admin.sessions()}
        assert all(sessions[n]["agent_connected"] and sessions[n]["clients"] == 1 for n in names)
        for x in list(guests) + list(clients):
            await x.close()

        async def all_gone():
            s = await admin.stats()
            return s["guests"] == 0 and s["clients"] == 2

        await wait_until(all_gone, 20, what="every connection released")
        await wait_until(lambda: d.fd_count() <= fds_before + 2, 20, what="fds released")
        assert (await admin.call("vhub.ping"))["pong"]

    run(body(), 60)
    assert d.proc.poll() is None


def test_200_blink_agents_on_the_anonymous_session(make_daemon):
    d = make_daemon("--multiple-agents")

    async def body():
        guests = await asyncio.gather(*(AsyncPeer.guest(d.socket, b"", i + 1) for i in range(N)))
        results = await asyncio.gather(*(g.call("vhub.ping", rid=i + 1) for i, g in enumerate(guests)))
        assert all(r.msg_type == T.RPC_RESPONSE and r.request_id == i + 1 for i, r in enumerate(results))
        admin = await client(d)
        assert (await admin.stats())["guests"] == N

    run(body(), 60)
