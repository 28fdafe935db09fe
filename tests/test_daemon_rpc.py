"""RPC through a real daemon, both ways (DESIGN §4): id rewriting under
concurrency, handler patterns, notifications, daemon calls, Blink's
execution_result, and the errors a caller gets instead of waiting forever."""

from __future__ import annotations

import asyncio
import random

import pytest
from harness import AsyncPeer, T, client, header, json_of, run, session_info, wait_until

from vhubd.errors import ConnectionClosed, RemoteError


async def answer_requests(g: AsyncPeer, n: int, answer, timeout: float = 20.0) -> list:
    """Read ``n`` RpcRequests (all outstanding at once), then answer them in a
    shuffled order; returns the (request_id, request) pairs seen."""
    seen = []
    for _ in range(n):
        f = await g.next_frame(timeout, lambda f: f.msg_type == T.RPC_REQUEST)
        assert f is not None and f.msg_type == T.RPC_REQUEST, f
        seen.append((f.request_id, json_of(f)))
    order = list(seen)
    random.Random(7).shuffle(order)
    for rid, req in order:
        code, body = answer(req)
        g.send(code, rid, body)
    await g.drain()
    return seen


def test_many_clients_call_one_guest(daemon):
    """20 clients x 5 concurrent calls (client ids all start at 1): the guest
    sees 100 distinct ids outstanding at once, answers out of order, and every
    call gets its own answer."""
    n_clients, per_client = 20, 5

    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        clients = [await client(daemon, session="default") for _ in range(n_clients)]

        async def calls(i, c):
            return await asyncio.gather(*(c.call("agent.echo", {"client": i, "k": k}) for k in range(per_client)))

        callers = asyncio.gather(*(calls(i, c) for i, c in enumerate(clients)))
        seen = await answer_requests(g, n_clients * per_client,
                                     lambda req: (T.RPC_RESPONSE, {"echo": req["params"]}))
        ids = [rid for rid, _ in seen]
        assert len(set(ids)) == len(ids) and 0 not in ids
        assert all(req["method"] == "agent.echo" for _, req in seen)
        results = await callers
        for i, got in enumerate(results):
            assert got == [{"echo": {"client": i, "k": k}} for k in range(per_client)]

    run(body())


def test_guest_calls_served_by_several_handlers(daemon):
    """One guest, 3 handler clients (exact name, prefix, prefix on '*'), 60
    concurrent calls with the guest's own large ids: each reaches the right
    handler and each answer returns with the guest's id."""

    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        methods = ["fs.read", "x.a", "x.b.c", "net.get", "nobody.serves"]
        calls = [(2**63 + i, methods[i % len(methods)], {"i": i}) for i in range(60)]
        served = [c for c in calls if c[1] != "nobody.serves"]
        arrived = 0
        everyone_in = asyncio.Event()

        def handler(name):
            async def h(params):
                nonlocal arrived
                arrived += 1
                if arrived == len(served):
                    everyone_in.set()
                await asyncio.wait_for(everyone_in.wait(), 20)  # all in flight at once
                await asyncio.sleep(random.random() / 100)
                return {"by": name, "params": params}
            return h

        await client(daemon, session="default", serve={"fs.read": handler("A")})
        await client(daemon, session="default", serve={"x.*": handler("B")})
        await client(daemon, session="*", serve={"net.*": handler("C")})
        for rid, method, params in calls:
            g.send(T.RPC_REQUEST, rid, {"method": method, "params": params})
        await g.drain()
        answers = {}
        while len(answers) < len(calls):
            f = await g.next_frame(20)
            assert f is not None and f.msg_type in (T.RPC_RESPONSE, T.RPC_ERROR), f
            assert f.request_id not in answers
            answers[f.request_id] = f
        expect = {"fs.read": "A", "x.a": "B", "x.b.c": "B", "net.get": "C"}
        for rid, method, params in calls:
            f = answers[rid]
            if method == "nobody.serves":
                assert f.msg_type == T.RPC_ERROR and json_of(f)["code"] == "no_handler"
            else:
                assert f.msg_type == T.RPC_RESPONSE
                assert json_of(f) == {"by": expect[method], "params": params}

    run(body())


def test_rpc_frames_pass_verbatim(daemon):
    """Only the request_id is rewritten: payload bytes and flags cross the
    daemon unchanged, both ways."""

    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        c = await AsyncPeer.open(daemon.control)
        assert (await c.handshake({"role": "client", "session": "default"}))[0] == "ok"
        payload = b'{"method":"agent.x",  "params":{"z":[1,2,3],"s":"\\u00e9"}}'
        c.send_raw(header(T.RPC_REQUEST, len(payload), 99, flags=0xBEEF) + payload)
        f = await g.next_frame(10)
        assert f.msg_type == T.RPC_REQUEST and f.flags == 0xBEEF and bytes(f.payload) == payload
        answer = b'{"ok" : true}'
        g.send_raw(header(T.RPC_RESPONSE, len(answer), f.request_id, flags=0x0102) + answer)
        r = await c.next_frame(10)
        assert (r.msg_type, r.request_id, r.flags, bytes(r.payload)) == (T.RPC_RESPONSE, 99, 0x0102, answer)

    run(body())


def test_notifications_get_no_reply(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        got = []
        watcher = await client(daemon, session="default", subscribe=["events"])
        await client(daemon, session="default", serve={"log.line": lambda p: got.append(p) or {"x": 1}})
        # guest -> served method: delivered, never answered
        g.send(T.RPC_REQUEST, 0, {"method": "log.line", "params": {"n": 1}})
        # guest -> nobody serves it: published to events subscribers, not answered either
        g.send(T.RPC_REQUEST, 0, {"method": "progress", "params": {"pct": 50}})
        ev = await watcher.next(10)
        while ev.data.get("type") != "notification":
            ev = await watcher.next(10)
        assert ev.data == {"type": "notification", "method": "progress", "params": {"pct": 50},
                           "session": "default"}
        await wait_until(lambda: got, what="notification at the handler")
        assert got == [{"n": 1}]
        r = await g.call("vhub.ping", rid=5)  # the next frame the guest gets answers this
        assert r.request_id == 5 and not g.pending, g.pending
        # client -> agent notification: arrives with request_id 0 and its payload
        c = await client(daemon, session="default")
        await c.notify("agent.signal", {"sig": 2})
        f = await g.next_frame(10)
        assert f.msg_type == T.RPC_REQUEST and f.request_id == 0
        assert json_of(f) == {"method": "agent.signal", "params": {"sig": 2}}
        assert await c.call("vhub.ping") and not g.pending

    run(body())


def test_daemon_calls(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket, {"agent": "test-agent", "pid": 4242, "version": "9"})
        c = await client(daemon, session="default")
        other = await client(daemon)  # attached to '*'
        sessions = await other.sessions()
        d = session_info(sessions, "default")
        assert d["state"] == "ready" and d["backend"] == "external" and d["agent_connected"] is True
        assert d["clients"] == 1 and isinstance(d["name"], str)
        info = await other.info("default")
        assert info["name"] == "default" and info["agent"]["agent"] == "test-agent" and info["agent"]["pid"] == 4242
        assert (await c.info())["name"] == "default"  # no params: the attached session
        daemon_info = await other.info()
        assert daemon_info["pid"] == daemon.pid and daemon_info["sessions"] >= 1
        stats = await other.stats()
        # two clients here, and the harness's own vhub.info call once the daemon was ready
        assert stats["counters"]["guests_accepted"] == 1 and stats["counters"]["clients_accepted"] == 3
        pong = await c.call("vhub.ping")
        assert pong["pong"] is True
        reg = await other.register("box-1")
        assert reg["session"] == "box-1" and isinstance(reg["token"], str) and len(reg["token"]) >= 16
        assert (await other.register("box-1"))["token"] == reg["token"]  # idempotent
        box = session_info(await other.sessions(), "box-1")
        assert box["state"] == "waiting_agent" and box["agent_connected"] is False and box["clients"] == 0
        for method, params, code in [("vhub.register", {"session": "default"}, "session_exists"),
                                     ("vhub.register", {"session": "Bad Name"}, "bad_session_name"),
                                     ("vhub.info", {"session": "ghost"}, "unknown_session"),
                                     ("vhub.nope", {}, "no_handler"),
                                     ("vhub.sessions", [1], "bad_params")]:
            with pytest.raises(RemoteError) as exc:
                await other.call(method, params)
            assert exc.value.code == code, (method, exc.value)
        # the guest's session is untouched by all this
        assert json_of(await g.call("vhub.ping", rid=3))["session"] == "default"

    run(body())


def test_guest_vhub_ping(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        r = await g.call("vhub.ping", rid=0xFFFF_FFFF_FFFF_FFFF)
        assert r.msg_type == T.RPC_RESPONSE and r.request_id == 0xFFFF_FFFF_FFFF_FFFF
        assert json_of(r)["pong"] is True and json_of(r)["session"] == "default"

    run(body())


def test_execution_result_recorded_and_published(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        sub = await client(daemon, session="default", subscribe=["events"])
        star = await client(daemon, subscribe=["events"])
        result = {"event": "execution_result", "execution_id": 3, "exit_code": 7, "duration_ms": 12}
        g.send(T.RPC_REQUEST, 4, result)
        r = await g.next_frame(10)
        assert (r.msg_type, r.request_id, bytes(r.payload)) == (T.RPC_RESPONSE, 4, b"{}")
        for c in (sub, star):
            ev = await c.next(10)
            while ev.data.get("type") != "execution_result":
                ev = await c.next(10)
            assert ev.data == {"type": "execution_result", "session": "default", **result}
        assert (await star.info("default"))["last_result"] == result

    run(body())


def test_no_handler(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        await client(daemon, session="default", serve={"other.*": lambda p: 1})
        r = await g.call("fs.write", {"path": "/x"}, rid=11)
        assert r.msg_type == T.RPC_ERROR and r.request_id == 11
        assert json_of(r)["code"] == "no_handler" and set(json_of(r)) == {"code", "message"}

    run(body())


def test_handler_disconnect_yields_handler_lost(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        entered = asyncio.Event()

        async def hang(params):
            entered.set()
            await asyncio.Event().wait()

        h = await client(daemon, session="default", serve={"slow.op": hang})
        g.send(T.RPC_REQUEST, 21, {"method": "slow.op", "params": {}})
        g.send(T.RPC_REQUEST, 22, {"method": "slow.op", "params": {}})
        await g.drain()
        await asyncio.wait_for(entered.wait(), 10)
        await h.close()
        codes = {}
        for _ in range(2):
            r = await g.next_frame(10)
            assert r.msg_type == T.RPC_ERROR
            codes[r.request_id] = json_of(r)["code"]
        assert codes == {21: "handler_lost", 22: "handler_lost"}
        # nobody serves it now
        assert json_of(await g.call("slow.op", rid=23))["code"] == "no_handler"

    run(body())


def test_silent_handler_times_out(make_daemon):
    d = make_daemon("--rpc-timeout", "1")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        late = asyncio.Event()

        async def too_slow(params):
            await asyncio.sleep(1.6)
            late.set()
            return {"late": True}

        await client(d, session="default", serve={"slow.op": too_slow})
        r = await g.call("slow.op", rid=31)
        assert r.msg_type == T.RPC_ERROR and r.request_id == 31 and json_of(r)["code"] == "timeout"
        await asyncio.wait_for(late.wait(), 10)
        # the late answer is dropped: the next frame the guest sees answers its ping
        r = await g.call("vhub.ping", rid=32)
        assert r.msg_type == T.RPC_RESPONSE and not g.pending, g.pending

    run(body())


def test_client_call_errors_from_the_agent_side(make_daemon):
    """timeout (silent agent), the agent's own RpcError, agent_lost, no_agent."""
    d = make_daemon("--rpc-timeout", "1")

    async def body():
        g = await AsyncPeer.guest(d.socket)
        c = await client(d, session="default")
        with pytest.raises(RemoteError) as exc:
            await c.call("agent.sleep", timeout=10)
        assert exc.value.code == "timeout"
        f = await g.next_frame(10)  # it did reach the agent
        assert json_of(f)["method"] == "agent.sleep"
        call = asyncio.ensure_future(c.call("agent.fail", timeout=10))
        f = await g.next_frame(10)
        g.send(T.RPC_ERROR, f.request_id, {"code": "boom", "message": "it broke"})
        with pytest.raises(RemoteError) as exc:
            await call
        assert (exc.value.code, exc.value.message) == ("boom", "it broke")
        call = asyncio.ensure_future(c.call("agent.hang", timeout=10))
        await g.next_frame(10)
        await g.close()
        with pytest.raises(RemoteError) as exc:
            await call
        assert exc.value.code == "agent_lost"
        with pytest.raises(RemoteError) as exc:
            await c.call("agent.x")
        assert exc.value.code == "no_agent"
        star = await client(d)
        with pytest.raises(RemoteError) as exc:
            await star.call("agent.x")
        assert exc.value.code == "session_required"
        with pytest.raises(RemoteError) as exc:
            await star.call("agent.x", session="ghost")
        assert exc.value.code == "unknown_session"

    run(body())


def test_bad_rpc_payloads_get_bad_request(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        g.send(T.RPC_REQUEST, 41, b"not json")
        g.send(T.RPC_REQUEST, 42, b"[1, 2]")
        g.send(T.RPC_REQUEST, 43, {"params": {}})
        for rid in (41, 42, 43):
            r = await g.next_frame(10)
            assert (r.msg_type, r.request_id, json_of(r)["code"]) == (T.RPC_ERROR, rid, "bad_request")
        c = await AsyncPeer.open(daemon.control)
        assert (await c.handshake({"role": "client", "session": "default"}))[0] == "ok"
        c.send(T.RPC_REQUEST, 44, b"{")
        r = await c.next_frame(10)
        assert (r.msg_type, r.request_id, json_of(r)["code"]) == (T.RPC_ERROR, 44, "bad_request")
        # both connections still work
        assert (await g.call("vhub.ping", rid=45)).msg_type == T.RPC_RESPONSE
        assert (await c.call("vhub.ping", rid=46)).msg_type == T.RPC_RESPONSE

    run(body())


def test_client_closed_while_waiting_sees_connection_closed(daemon):
    """A caller whose daemon connection drops gets ConnectionClosed, not a hang."""

    async def body():
        await AsyncPeer.guest(daemon.socket)
        c = await client(daemon, session="default")
        call = asyncio.ensure_future(c.call("agent.hang", timeout=10))
        await asyncio.sleep(0)
        daemon.proc.terminate()
        with pytest.raises(ConnectionClosed) as exc:
            await call
        assert exc.value.code == "shutting_down"

    run(body())
    assert daemon.proc.wait(10) == 0
