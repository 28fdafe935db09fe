"""Routing, in-process: a real Relay and real Connections against fake ports
(tests/harness/inproc.py). No process, no socket; each test takes milliseconds."""

from __future__ import annotations

import asyncio

import pytest
from harness.inproc import CONTROL, TCP, Listener, T, World, frame, handshake_answer, rpc

from vhubd import frames
from vhubd.relay import Accept, Defer, Refuse
from vhubd.sessions import State

READY = frames.READY_PAYLOAD


def agent(world: World, session: str | None = None, **extra):
    payload = {"session": session, **extra} if session else b""
    port = world.guest(payload)
    assert type(port.decision) is Accept, port.decision
    ans = handshake_answer(port)
    assert bytes(ans.payload) == READY
    return port


# ---------------------------------------------------------------- admission

def test_anonymous_agent_lands_in_default_and_a_second_is_busy():
    w = World()
    a = agent(w)
    sess = w.registry.get("default")
    assert sess.agent is a.member and sess.state is State.READY
    b = w.guest(b"")
    assert b.decision == Refuse("session_busy", "session 'default' already has an agent connected")
    assert w.relay.counters["refused"] == 1


@pytest.mark.parametrize("payload,code", [
    (b"[1, 2]", "bad_handshake"),
    (b"{not json", "bad_handshake"),
    ({"role": "client"}, "wrong_role"),
    ({"session": "Bad Name"}, "bad_session_name"),
    ({"session": "ghost"}, "unknown_session"),
])
def test_guest_refusals(payload, code):
    w = World()
    p = w.guest(payload)
    assert type(p.decision) is Refuse and p.decision.code == code
    assert p.member is None and not w.relay.guests


def test_tokens_on_registered_sessions_and_token_listeners():
    w = World()
    c = w.client()
    c.feed(rpc(5, "vhub.register", {"session": "box"}))
    [(_, rid, reg)] = c.json_frames(T.RPC_RESPONSE)
    assert rid == 5 and reg["session"] == "box"
    assert w.guest({"session": "box", "token": "nope"}).decision.code == "bad_token"
    assert w.guest({"session": "box"}).decision.code == "bad_token"
    assert w.guest(b"", listener=TCP).decision.code == "token_required"
    ok = w.guest({"session": "box", "token": reg["token"]}, listener=TCP)
    assert type(ok.decision) is Accept and w.registry.get("box").state is State.READY


def test_fixed_session_ignores_what_the_payload_claims():
    w = World()
    w.registry.create("vm1", "qemu")
    p = w.guest({"session": "someone-else", "token": "", "agent": "t"}, listener=Listener("qemu-vm1",
                                                                                        fixed_session="vm1"))
    assert type(p.decision) is Accept
    sess = w.registry.get("vm1")
    assert sess.agent is p.member and sess.agent_info["agent"] == "t"
    assert w.registry.get("someone-else") is None


def test_attached_guest_is_not_the_agent_and_needs_a_session():
    w = World()
    a = agent(w)
    assert w.guest({"attach": True}).decision.code == "session_required"
    tok = w.registry.get("default").attach_token
    assert w.guest({"session": "default", "attach": True}).decision.code == "bad_token"
    att = w.guest({"session": "default", "attach": True, "token": tok})
    assert type(att.decision) is Accept and w.registry.get("default").agent is a.member


@pytest.mark.parametrize("hs,code", [
    ({"role": "guest"}, "wrong_role"),
    ({"role": "client", "subscribe": ["nope"]}, "bad_handshake"),
    ({"role": "client", "serve": [1]}, "bad_handshake"),
    ({"role": "client", "flow": "fast"}, "bad_handshake"),
    ({"role": "client", "session": "Bad!"}, "bad_session_name"),
])
def test_client_refusals(hs, code):
    w = World()
    p = w.port("client")
    p.listener = CONTROL
    p.feed(frame(T.HANDSHAKE, 1, hs))
    assert type(p.decision) is Refuse and p.decision.code == code


def test_client_answer_carries_the_session():
    w = World()
    w.register("demo")
    c = w.client("demo", subscribe=["stdout"])
    ans = handshake_answer(c)
    import json
    body = json.loads(bytes(ans.payload))
    assert body["ok"] is True and body["session"]["name"] == "demo" and body["session"]["state"] == "waiting_agent"
    assert "token" not in body["session"]  # a session's token is never in what it shows


# ---------------------------------------------------------------- fan-out

def test_stream_batch_reaches_every_subscriber_as_one_slice():
    w = World()
    a = agent(w)
    s1 = w.client("default", subscribe=["stdout", "stderr"])
    s2 = w.client("*", subscribe=["stdout", "stderr"])
    for s in (s1, s2):
        handshake_answer(s)
        s.writes.clear()
    batch = frame(T.STDOUT, 1, b"a" * 100) + frame(T.STDERR, 1, b"b" * 50) + frame(T.STDOUT, 2, b"c")
    a.feed(batch)
    # zero copy: each subscriber got the very same slice of the guest's receive buffer, once
    assert len(s1.writes) == 1 and len(s2.writes) == 1
    assert isinstance(s1.writes[0], memoryview) and s1.writes[0].obj is s2.writes[0].obj
    assert bytes(s1.out) == batch == bytes(s2.out)
    assert w.relay.counters["stream_frames"] == 3 and w.relay.counters["stream_bytes"] == len(batch)


def test_partial_subscription_gets_only_its_kinds():
    w = World()
    a = agent(w)
    errs = w.client("default", subscribe=["stderr"])
    handshake_answer(errs)
    a.feed(frame(T.STDOUT, 1, b"out") + frame(T.STDERR, 1, b"err") + frame(T.STDOUT, 1, b"out2"))
    assert [(f.msg_type, bytes(f.payload)) for f in errs.frames()] == [(T.STDERR, b"err")]


def test_replay_then_live_without_gap():
    w = World(scrollback=1 << 16)
    a = agent(w)
    a.feed(frame(T.STDOUT, 1, b"one") + frame(T.STDOUT, 1, b"two"))
    late = w.client("default", subscribe=["stdout"], replay=True)
    handshake_answer(late)
    a.feed(frame(T.STDOUT, 1, b"three"))
    assert [bytes(f.payload) for f in late.frames()] == [b"one", b"two", b"three"]


def test_cut_through_frame_and_a_client_joining_mid_frame():
    w = World(cut_through=1024)
    a = agent(w)
    early = w.client("default", subscribe=["stdout"])
    handshake_answer(early)
    big = frame(T.STDOUT, 9, bytes(range(256)) * 16)  # 4 KiB payload, above the 1 KiB cut-through size
    a.feed(big[:1500])
    assert early.parts_open
    late = w.client("default", subscribe=["stdout"])
    handshake_answer(late)
    a.feed(big[1500:] + frame(T.STDOUT, 1, b"after"))
    assert not early.parts_open
    assert [bytes(f.payload) for f in early.frames()] == [big[20:], b"after"]
    assert [bytes(f.payload) for f in late.frames()] == [b"after"]  # never half a frame
    assert b"".join(w.registry.get("default").scrollback.replay()) == big + frame(T.STDOUT, 1, b"after")


def test_a_cut_through_frame_larger_than_the_scrollback_keeps_its_tail_as_one_frame():
    w = World(cut_through=1024, scrollback=1000)
    a = agent(w)
    sub = w.client("default", subscribe=["stdout"])
    handshake_answer(sub)
    payload = bytes(range(256)) * 16
    big = frame(T.STDOUT, 9, payload)
    for part in (big[:1100], big[1100:2500], big[2500:]):  # arrives in three reads
        a.feed(part)
    assert [bytes(f.payload) for f in sub.frames()] == [payload]
    (kept,) = w.registry.get("default").scrollback.replay()
    assert kept == frame(T.STDOUT, 9, payload[-(1000 - 20):])  # the newest bytes, its length in its header


def test_other_guests_wait_behind_a_cut_through_frame():
    w = World(cut_through=1024)
    a = agent(w, None)
    sub = w.client("default", subscribe=["stdout"])
    handshake_answer(sub)
    att = w.guest({"session": "default", "attach": True, "token": w.registry.get("default").attach_token})
    assert type(att.decision) is Accept
    handshake_answer(att)
    big = frame(T.STDOUT, 1, b"x" * 4096)
    a.feed(big[:2000])
    att.feed(frame(T.STDOUT, 2, b"from the attached guest"))
    assert att.paused  # held until the frame ends
    a.feed(big[2000:])
    assert not att.paused
    assert [(f.request_id, len(f.payload)) for f in sub.frames()] == [(1, 4096), (2, 23)]


# ---------------------------------------------------------------- backpressure

def test_a_full_lossless_subscriber_pauses_the_sessions_guests():
    w = World()
    a = agent(w)
    slow = w.client("default", subscribe=["stdout"])
    lossy = w.client("default", subscribe=["stdout"], flow="lossy")
    w.fill(lossy)
    assert not a.paused  # a lossy subscriber never slows the guest
    w.fill(slow)
    assert a.paused
    late = w.guest({"session": "default", "attach": True,  # a guest arriving meanwhile waits too
                    "token": w.registry.get("default").attach_token})
    assert late.paused
    w.drain(slow)
    assert not a.paused and not late.paused


def test_star_subscriber_blocks_every_session():
    w = World()
    a = agent(w)
    b = agent(w, "two", token=w.register("two"))
    star = w.client("*", subscribe=["stdout"])
    w.fill(star)
    assert a.paused and b.paused
    w.drain(star)
    assert not a.paused and not b.paused


def test_acks_wait_for_lossless_subscribers():
    w = World()
    a = agent(w, None)
    a.member.ack = True  # as if the handshake had asked
    sub = w.client("default", subscribe=["stdout"])
    a.feed(frame(T.STDOUT, 1, b"x") * 3)
    sub.queued = 100  # not yet taken by the kernel
    w.clock.advance(0.05)
    assert not [f for f in a.json_frames() if f[2].get("method") == "vhub.ack"]
    sub.queued = 0
    w.clock.advance(0.05)
    acks = [f[2]["params"] for f in a.json_frames() if f[2].get("method") == "vhub.ack"]
    assert acks == [{"frames": 3}]


def test_hello_for_a_guest_that_asks_for_acks():
    w = World()
    tok = w.register("s")
    a = w.guest({"session": "s", "token": tok, "ack": True})
    handshake_answer(a)
    hello = {"ack": True, "session": "s", "attach_token": w.registry.get("s").attach_token}
    assert a.json_frames() == [(T.RPC_REQUEST, 0, {"method": "vhub.hello", "params": hello})]


# ---------------------------------------------------------------- rpc

def test_guest_call_is_routed_to_the_handler_with_ids_rewritten():
    w = World()
    a = agent(w)
    h = w.client("default", serve=["host.*"])
    handshake_answer(h)
    a.feed(rpc(77, "host.add", [1, 2]))
    [(mt, hid, req)] = h.json_frames()
    assert mt == T.RPC_REQUEST and hid != 77 and req == {"method": "host.add", "params": [1, 2]}
    h.feed(frame(T.RPC_RESPONSE, hid, {"sum": 3}))
    assert a.json_frames() == [(T.RPC_RESPONSE, 77, {"sum": 3})]
    h.feed(frame(T.RPC_RESPONSE, hid, {"sum": 4}))  # a second answer to the same id: dropped
    assert a.json_frames() == []


def test_guest_call_without_a_handler_and_builtins():
    w = World()
    a = agent(w)
    ev = w.client("default", subscribe=["events"])
    handshake_answer(ev)
    a.feed(rpc(1, "nobody.serves") + rpc(2, "vhub.ping") + frame(T.RPC_REQUEST, 3, b"[]")
           + frame(T.RPC_REQUEST, 4, {"event": "execution_result", "execution_id": 5, "exit_code": 0}))
    got = {rid: (mt, body) for mt, rid, body in a.json_frames()}
    assert got[1][1]["code"] == "no_handler" and got[2][1]["pong"] is True
    assert got[3][1]["code"] == "bad_request" and got[4] == (T.RPC_RESPONSE, {})
    events = [b["params"] for _, _, b in ev.json_frames(T.RPC_REQUEST)]
    assert any(e["type"] == "execution_result" and e["exit_code"] == 0 for e in events)
    assert w.registry.get("default").last_result["execution_id"] == 5


def test_client_call_goes_to_the_agent_and_back():
    w = World()
    a = agent(w)
    c = w.client("default")
    handshake_answer(c)
    c.feed(rpc(9, "agent.info"))
    [(_, aid, req)] = a.json_frames(T.RPC_REQUEST)
    assert req["method"] == "agent.info"
    a.feed(frame(T.RPC_ERROR, aid, {"code": "nope", "message": "m"}))
    assert c.json_frames() == [(T.RPC_ERROR, 9, {"code": "nope", "message": "m"})]


def test_calls_expire_and_handlers_that_leave_fail_their_calls():
    w = World(rpc_timeout=5.0)
    a = agent(w)
    h = w.client("default", serve=["slow.*"])
    handshake_answer(h)
    a.feed(rpc(1, "slow.one"))
    w.clock.advance(4.9)
    assert a.json_frames() == []
    w.clock.advance(0.2)
    [(mt, rid, body)] = a.json_frames()
    assert (mt, rid, body["code"]) == (T.RPC_ERROR, 1, "timeout") and w.relay.counters["rpc_timeouts"] == 1
    a.feed(rpc(2, "slow.two"))
    h.lose()
    [(mt, rid, body)] = a.json_frames()
    assert (rid, body["code"]) == (2, "handler_lost")
    assert w.relay.rpc.inflight_count() == 0


def test_agent_lost_fails_client_calls_and_changes_state():
    w = World()
    a = agent(w)
    c = w.client("default", subscribe=["events"])
    handshake_answer(c)
    c.feed(rpc(3, "agent.run"))
    a.lose("reset")
    kinds = {(mt, rid): body for mt, rid, body in c.json_frames()}
    assert kinds[(T.RPC_ERROR, 3)]["code"] == "agent_lost"
    assert w.registry.get("default").state is State.AGENT_LOST


def test_client_calls_that_cannot_be_routed():
    w = World()
    star = w.client("*")
    star.feed(rpc(1, "agent.info") + rpc(2, "agent.info", session="ghost") + rpc(3, "vhub.nope")
              + rpc(4, "vhub.sessions", [1]) + frame(T.RPC_REQUEST, 5, b"{}"))
    codes = {rid: body["code"] for _, rid, body in star.json_frames(T.RPC_ERROR)}
    assert codes == {1: "session_required", 2: "unknown_session", 3: "no_handler", 4: "bad_params",
                     5: "bad_request"}
    w.register("idle")
    c = w.client("idle")
    c.feed(rpc(6, "agent.info"))
    assert c.json_frames(T.RPC_ERROR)[0][2]["code"] == "no_agent"


# ---------------------------------------------------------------- terminals

def test_the_terminal_seat():
    w = World()
    a = agent(w)
    owner = w.client("default")
    other = w.client("default")
    owner.feed(rpc(1, "agent.run", {"argv": ["sh"], "tty": True}))
    [(_, aid, _)] = a.json_frames(T.RPC_REQUEST)
    a.feed(frame(T.RPC_RESPONSE, aid, {"execution_id": 4, "tty": True}))
    other.feed(frame(T.STREAM_DATA, 4, b"intruder"))
    owner.feed(frame(T.STREAM_DATA, 4, b"owner"))
    other.feed(frame(T.STREAM_DATA, 5, b"not a terminal"))
    assert [bytes(f.payload) for f in a.frames() if f.msg_type == T.STREAM_DATA] == [b"owner", b"not a terminal"]
    assert w.relay.counters["tty_input_dropped"] == 1
    other.feed(rpc(2, "vhub.takeover", {"execution_id": 4}))
    assert other.json_frames(T.RPC_RESPONSE)[0][2]["writer"] is True
    owner.feed(frame(T.STREAM_DATA, 4, b"dropped now"))
    other.lose()
    owner.feed(frame(T.TTY_RESIZE, 4, {"rows": 1, "cols": 2}))  # the free seat goes to the next typer
    assert [f.msg_type for f in a.frames()] == [T.TTY_RESIZE]
    a.feed(frame(T.RPC_REQUEST, 0, {"event": "execution_result", "execution_id": 4, "exit_code": 0}))
    assert not w.relay.terminals.writers


# ---------------------------------------------------------------- daemon calls

def test_daemon_calls():
    w = World()
    agent(w)
    c = w.client("*")
    c.feed(rpc(1, "vhub.sessions") + rpc(2, "vhub.stats") + rpc(3, "vhub.info", {"session": "default"})
           + rpc(4, "vhub.info", {"session": "ghost"}) + rpc(5, "vhub.register", {"session": "default"})
           + rpc(6, "vhub.boot", {"session": "x"}))
    got = {rid: (mt, body) for mt, rid, body in c.json_frames()}
    assert [s["name"] for s in got[1][1]] == ["default"] and got[1][1][0]["agent_connected"] is True
    assert got[2][1]["counters"]["guests_accepted"] == 1 and got[2][1]["inflight_rpcs"] == 0
    assert got[3][1]["name"] == "default" and got[3][1]["sandbox"] is True
    assert got[4][1]["code"] == "unknown_session" and got[5][1]["code"] == "session_exists"
    assert got[6][1]["code"] == "not_supported"  # no boot manager in this world


def test_boot_waits_for_the_real_boot_manager():
    """A client handshake with boot: deferred, then settled by BootManager (the
    external backend refuses to boot: a boot_failed refusal with its words)."""
    from vhubd.backends.external import ExternalBackend
    from vhubd.boot import BootManager

    async def main(tmp):
        registry_world = World()
        boots = BootManager(registry_world.registry, ExternalBackend(), state_dir=tmp, agent_addr="unix:/nowhere")
        registry_world.relay.boots = boots
        c = registry_world.client("vm", boot=True)
        assert type(c.decision) is Defer
        for _ in range(100):
            if type(c.decision) is not Defer:
                break
            await asyncio.sleep(0.01)
        assert type(c.decision) is Refuse and c.decision.code == "boot_failed"
        assert "external backend does not boot" in c.decision.message
        assert registry_world.registry.get("vm").state is State.FAILED

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(tmp))


def test_stop_closes_the_agent_with_session_stopped():
    w = World()
    a = agent(w, "s", token=w.register("s"))
    w.registry.set_state(w.registry.get("s"), State.STOPPING, "stop requested")
    assert a.closed and a.error[0] == "session_stopped"
