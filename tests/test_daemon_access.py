"""Roles, sessions and tokens at the handshake (DESIGN §3, §5), against a
real daemon: guests never reach the control plane, clients never pass as
guests, and the loopback TCP listener admits only session+token."""

from __future__ import annotations

import pytest
from harness import READY, AsyncPeer, T, client, json_of, run, session_info, wait_until


async def refused(target, payload, code: str) -> str:
    p = await AsyncPeer.open(target)
    res = await p.handshake(payload)
    assert res[:2] == ("error", code), res
    assert await p.read_all() == b""  # and closed
    await p.close()
    return res[2]


def test_client_role_refused_on_guest_socket(daemon):
    async def body():
        await refused(daemon.socket, {"role": "client", "session": "default", "subscribe": ["stdout"]}, "wrong_role")
        await AsyncPeer.guest(daemon.socket)  # the anonymous session was not taken by it

    run(body())


@pytest.mark.parametrize("payload", [b"", {"session": "default"}, {"role": "guest", "session": "default"}],
                         ids=["blink-empty", "guest-json", "explicit-guest"])
def test_guest_role_refused_on_control_socket(daemon, payload):
    async def body():
        await refused(daemon.control, payload, "wrong_role")
        c = await client(daemon)
        d = session_info(await c.sessions(), "default")
        assert d["agent_connected"] is False and d["clients"] == 0

    run(body())


def test_tokens_and_sessions(daemon):
    async def body():
        admin = await client(daemon)
        token = (await admin.register("box"))["token"]
        await refused(daemon.socket, {"session": "box", "token": "wrong"}, "bad_token")
        await refused(daemon.socket, {"session": "box", "token": token[:-1]}, "bad_token")
        await refused(daemon.socket, {"session": "box"}, "bad_token")
        await refused(daemon.socket, {"session": "ghost", "token": token}, "unknown_session")
        await refused(daemon.socket, {"session": "Bad/Name", "token": token}, "bad_session_name")
        await refused(daemon.socket, b"not json", "bad_handshake")
        first = await AsyncPeer.guest(daemon.socket, {"session": "box", "token": token, "agent": "a1"})
        await refused(daemon.socket, {"session": "box", "token": token, "agent": "a2"}, "session_busy")
        assert json_of(await first.call("vhub.ping", rid=2))["session"] == "box"  # untouched
        info = await admin.info("box")
        assert info["agent"]["agent"] == "a1" and info["state"] == "ready"
        assert (await admin.stats())["counters"]["refused"] == 7
        # once it is gone, the session takes a new agent
        await first.close()

        async def lost():
            return not session_info(await admin.sessions(), "box")["agent_connected"]

        await wait_until(lost, what="agent gone")
        assert session_info(await admin.sessions(), "box")["state"] == "agent_lost"
        await AsyncPeer.guest(daemon.socket, {"session": "box", "token": token})
        assert session_info(await admin.sessions(), "box")["state"] == "ready"

    run(body())


def test_second_anonymous_agent_is_busy(daemon):
    async def body():
        await AsyncPeer.guest(daemon.socket)
        await refused(daemon.socket, b"", "session_busy")

    run(body())


def test_multiple_agents_on_the_anonymous_session(make_daemon):
    d = make_daemon("--multiple-agents")

    async def body():
        guests = [await AsyncPeer.guest(d.socket) for _ in range(3)]
        for i, g in enumerate(guests):
            assert (await g.call("vhub.ping", rid=i + 1)).msg_type == T.RPC_RESPONSE

    run(body())


def test_tcp_listener_requires_session_and_token(make_daemon):
    d = make_daemon("--tcp", "127.0.0.1:0")
    addr = d.tcp

    async def body():
        admin = await client(d)
        await refused(addr, b"", "token_required")  # Blink's empty handshake
        reg = await admin.register("vm1")
        await refused(addr, {"session": "vm1"}, "bad_token")
        await refused(addr, {"session": "vm1", "token": "x" * len(reg["token"])}, "bad_token")
        g = await AsyncPeer.open(addr)
        assert await g.handshake({"session": "vm1", "token": reg["token"], "agent": "tcp"}) == ("ok", READY, 1)
        # and it works both ways over TCP
        c = await client(d, session="vm1", subscribe=["stdout"])
        g.send(T.STDOUT, 3, b"over tcp")
        out = await c.next(10)
        assert (out.kind, out.request_id, out.data) == ("stdout", 3, b"over tcp")

        async def agent_answers():
            f = await g.next_frame(10)
            g.send(T.RPC_RESPONSE, f.request_id, {"ok": json_of(f)["params"]})

        answer = agent_answers()
        result, _ = await __import__("asyncio").gather(c.call("agent.x", {"n": 1}), answer)
        assert result == {"ok": {"n": 1}}
        # the Unix socket still takes the anonymous agent
        await AsyncPeer.guest(d.socket)

    run(body())


@pytest.mark.parametrize("name,code", [("default", "token_required"), ("named", "bad_token")])
def test_tcp_refuses_sessions_without_a_token(make_daemon, name, code):
    """Over TCP a guest must prove a token: the anonymous session has none to
    prove, and a registered session's must be given."""
    d = make_daemon("--tcp", "127.0.0.1:0")

    async def body():
        c = await client(d)
        await c.register("named")
        await refused(d.tcp, {"session": name}, code)
        await refused(d.tcp, {"session": name, "token": ""}, code)
        assert session_info(await c.sessions(), name)["agent_connected"] is False

    run(body())


def test_no_anonymous_refuses_empty_handshakes(make_daemon):
    d = make_daemon("--no-anonymous")

    async def body():
        message = await refused(d.socket, b"", "session_required")
        assert "anonymous" in message
        admin = await client(d)
        assert [s["name"] for s in await admin.sessions()] == []
        token = (await admin.register("named"))["token"]
        await AsyncPeer.guest(d.socket, {"session": "named", "token": token})

    run(body())


def test_renamed_anonymous_session(make_daemon):
    d = make_daemon("--anonymous-session", "blink")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        assert json_of(await g.call("vhub.ping", rid=1))["session"] == "blink"

    run(body())
