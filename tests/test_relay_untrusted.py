"""A guest is untrusted (issue "a guest is untrusted"), in-process: who may be a
session's agent or attach to it, what a client may name, the bounds on calls,
sessions and attached connections, what a peer can make the daemon echo, and
replay without a gap during a cut-through frame."""

from __future__ import annotations

import json
import logging

import pytest
from harness.inproc import TCP, Listener, T, World, frame, handshake_answer, rpc

from vhubd.relay import Accept, Limits, Refuse
from vhubd.sessions import State


def hello_of(port) -> dict:
    [(_, _, body)] = [f for f in port.json_frames() if f[2].get("method") == "vhub.hello"]
    return body["params"]


# ---------------------------------------------------------------- hijack

def test_a_client_naming_an_unknown_session_creates_nothing():
    w = World()
    c = w.client("ghost", subscribe=["stdout"])  # blink tail -f ghost / blink call ghost ...
    assert c.decision == Refuse("unknown_session", "no session named 'ghost' (boot it, or register it first)")
    assert w.registry.get("ghost") is None and len(w.registry) == 1  # the anonymous session only


def test_every_named_session_has_a_token_from_its_creation():
    w = World()
    tok = w.register("box")
    sess = w.registry.get("box")
    assert sess.token == tok and len(tok) == 48
    # the impostor of the issue: a tokenless handshake naming the session is refused
    for payload in ({"session": "box"}, {"session": "box", "token": ""}, {"session": "box", "token": "x" * 48}):
        p = w.guest(payload)
        assert p.decision.code == "bad_token", payload
    assert sess.agent is None and sess.state is State.WAITING_AGENT
    ok = w.guest({"session": "box", "token": tok})
    assert type(ok.decision) is Accept and sess.agent is ok.member


def test_attach_needs_a_credential_the_daemon_gave_the_agent():
    w = World()
    tok = w.register("box")
    agent = w.guest({"session": "box", "token": tok, "ack": True})
    handshake_answer(agent)
    params = hello_of(agent)
    sess = w.registry.get("box")
    assert params == {"ack": True, "session": "box", "attach_token": sess.attach_token}
    assert w.guest({"session": "box", "attach": True}).decision.code == "bad_token"
    assert w.guest({"session": "box", "attach": True, "token": "guess"}).decision.code == "bad_token"
    for cred in (tok, params["attach_token"]):
        att = w.guest({"session": "box", "attach": True, "token": cred})
        assert type(att.decision) is Accept and att.member.attached and sess.agent is agent.member


def test_the_anonymous_session_first_agent_holds_the_seat_and_attach_needs_its_token():
    w = World()
    first = w.guest({"ack": True, "agent": "blink-agent"})  # our agent without a session: anonymous, acked
    handshake_answer(first)
    params = hello_of(first)
    assert params["session"] == "default" and first.member.ack
    assert w.guest(b"").decision.code == "session_busy"
    assert w.guest({"session": "default", "attach": True}).decision.code == "bad_token"
    att = w.guest({"session": "default", "attach": True, "token": params["attach_token"]})
    assert type(att.decision) is Accept
    assert w.guest(b"", listener=TCP).decision.code == "token_required"


def test_no_anonymous_session_when_turned_off():
    w = World(anonymous_session=None)
    assert w.guest(b"").decision.code == "session_required"
    assert w.guest({"ack": True}).decision.code == "session_required"


def test_a_device_names_the_session_even_for_attach():
    w = World()
    w.register("vm1")
    dev = Listener("qemu-vm1", fixed_session="vm1")
    a = w.guest({"session": "other", "token": "nope"}, listener=dev)
    att = w.guest({"attach": True}, listener=dev)
    assert type(a.decision) is Accept and type(att.decision) is Accept
    assert att.member.session is w.registry.get("vm1") is a.member.session


def test_attach_connections_per_session_are_capped():
    w = World(max_attached=3)
    agent_port = w.guest(b"")
    tok = w.registry.get("default").attach_token
    got = [w.guest({"session": "default", "attach": True, "token": tok}).decision for _ in range(5)]
    assert [type(d) for d in got] == [Accept] * 3 + [Refuse] * 2 and got[-1].code == "too_many_attached"
    assert type(agent_port.decision) is Accept


# ---------------------------------------------------------------- bounds

def test_calls_in_flight_are_capped_per_peer():
    w = World(limits=Limits(max_inflight=4))
    a = w.guest(b"")
    handshake_answer(a)
    h = w.client("default", serve=["slow.*"])
    handshake_answer(h)
    a.feed(b"".join(rpc(i, "slow.op") for i in range(1, 8)))
    errors = {rid: body["code"] for _, rid, body in a.json_frames(T.RPC_ERROR)}
    assert errors == {5: "too_many_requests", 6: "too_many_requests", 7: "too_many_requests"}
    assert len(h.json_frames(T.RPC_REQUEST)) == 4 and a.member.outstanding == 4
    assert w.relay.counters["too_many_requests"] == 3
    h.lose()  # the calls fail, and the count goes back
    assert a.member.outstanding == 0 and w.relay.rpc.inflight_count() == 0


def test_a_client_writing_to_an_agent_that_does_not_read_is_paused():
    w = World()
    a = w.guest(b"")
    star = w.client("*")
    mine = w.client("default")
    a.queued = 2 << 20  # the agent's transport is full
    star.feed(rpc(1, "agent.run", {"argv": ["x"]}, session="default"))
    assert star.paused and not mine.paused
    mine.feed(frame(T.STREAM_DATA, 3, b"typed"))
    assert mine.paused
    w.drain(a)
    assert not star.paused and not mine.paused


def test_a_guest_flooding_a_handler_that_does_not_read_is_paused():
    w = World()
    a = w.guest(b"")
    h = w.client("default", serve=["host.*"])
    h.queued = 2 << 20
    a.feed(rpc(1, "host.x"))
    assert a.paused
    w.drain(h)
    assert not a.paused


def test_sessions_are_capped():
    w = World(max_sessions=3)  # the anonymous session and two more
    w.register("one")
    w.register("two")
    c = w.client()
    c.feed(rpc(1, "vhub.register", {"session": "three"}))
    [(_, _, err)] = c.json_frames(T.RPC_ERROR)
    assert err["code"] == "too_many_sessions" and w.registry.get("three") is None


def test_remove_a_session():
    w = World()
    tok = w.register("box")
    agent = w.guest({"session": "box", "token": tok})
    sub = w.client("box", subscribe=["stdout"])
    other = w.client("default")
    c = w.client()
    c.feed(rpc(1, "vhub.remove", {"session": "box"}) + rpc(2, "vhub.remove", {"session": "default"})
           + rpc(3, "vhub.remove", {"session": "box"}))
    got = {rid: body for _, rid, body in c.json_frames()}
    assert got[1] == {"session": "box", "removed": True}
    assert got[2]["code"] == "session_exists" and got[3]["code"] == "unknown_session"
    assert agent.error[0] == sub.error[0] == "session_removed" and not other.closed
    assert w.registry.get("box") is None
    assert w.guest({"session": "box", "token": tok}).decision.code == "unknown_session"


def test_sessions_are_listed_in_pages():
    w = World()
    for i in range(25):
        w.register(f"s{i:03d}")
    c = w.client()
    c.feed(rpc(1, "vhub.sessions", {"limit": 10}) + rpc(2, "vhub.sessions", {"limit": 10, "after": "s009"})
           + rpc(3, "vhub.sessions", {"prefix": "s02"}) + rpc(4, "vhub.sessions", {"limit": 0})
           + rpc(5, "vhub.sessions", {"state": "ready"}) + rpc(6, "vhub.sessions"))
    got = {rid: body for _, rid, body in c.json_frames()}
    assert [s["name"] for s in got[1]] == ["default"] + [f"s{i:03d}" for i in range(9)]
    assert [s["name"] for s in got[2]] == [f"s{i:03d}" for i in range(10, 20)]
    assert [s["name"] for s in got[3]] == [f"s{i:03d}" for i in range(20, 25)]
    assert got[4]["code"] == "bad_params" and got[5] == [] and len(got[6]) == 26


# ---------------------------------------------------------------- what a peer controls

def test_deeply_nested_json_is_a_bad_handshake_not_a_traceback(caplog):
    w = World()
    deep = b"[" * 100_000 + b"]" * 100_000
    with caplog.at_level(logging.DEBUG, logger="vhubd"):
        g = w.guest(deep)
        p = w.port("client")
        p.listener = Listener("control", "client")
        p.feed(frame(T.HANDSHAKE, 1, deep))
    assert g.decision.code == "bad_handshake" and "nested too deeply" in g.decision.message
    assert p.decision.code == "bad_handshake"
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    a = w.guest(b"")
    a.feed(frame(T.RPC_REQUEST, 9, b'{"method": ' + b"[" * 100_000))
    [(_, rid, body)] = a.json_frames(T.RPC_ERROR)
    assert rid == 9 and body["code"] == "bad_request"


@pytest.mark.parametrize("payload", [
    {"session": "Z" * 1_000_000},
    {"role": "x" * 1_000_000},
    {"session": ["x" * 1000] * 1000},
])
def test_what_an_attacker_supplies_is_cut_in_errors_and_logs(payload, caplog):
    w = World()
    with caplog.at_level(logging.WARNING, logger="vhubd"):
        g = w.guest(payload)
    assert type(g.decision) is Refuse and len(g.decision.message) < 400
    assert max(len(r.getMessage()) for r in caplog.records) < 600


def test_an_unknown_method_of_any_length_is_echoed_cut():
    w = World()
    a = w.guest(b"")
    c = w.client()
    a.feed(rpc(1, "m" * 60_000))
    c.feed(rpc(2, "vhub." + "n" * 60_000) + rpc(3, "agent.x", session="s" * 60_000))
    for port in (a, c):
        for _, _, body in port.json_frames(T.RPC_ERROR):
            assert len(body["message"]) < 400


def test_refusals_are_counted_by_code_and_logged_at_a_bounded_rate(caplog):
    w = World()
    w.register("box")
    with caplog.at_level(logging.WARNING, logger="vhubd"):
        for _ in range(500):
            w.guest({"session": "box", "token": "bad"})
        for _ in range(100):
            w.guest(b"[")
    c = w.client()
    c.feed(rpc(1, "vhub.stats"))
    stats = c.json_frames(T.RPC_RESPONSE)[0][2]
    assert stats["refused_by_code"] == {"bad_token": 500, "bad_handshake": 100}
    lines = [r for r in caplog.records if "refused peer=" in r.getMessage()]
    assert 10 <= len(lines) <= 60  # the burst, then nothing until the rate allows
    w.clock.advance(2.0)  # the scheduled summary says how many were not logged one by one
    summary = [r.getMessage() for r in caplog.records if "were not logged one by one" in r.getMessage()]
    assert summary and int(summary[0].split()[0]) == 600 - len(lines)


# ---------------------------------------------------------------- no gap, no duplicate

def test_replay_joined_during_a_cut_through_frame_has_no_gap():
    w = World(cut_through=1024, scrollback=1 << 16)
    a = w.guest(b"")
    a.feed(frame(T.STDOUT, 1, b"before"))
    big = frame(T.STDOUT, 2, bytes(range(256)) * 16)
    a.feed(big[:1000])
    late = w.client("default", subscribe=["stdout"], replay=True)
    handshake_answer(late)
    assert late.frames() == []  # nothing yet: not half a frame, not a replay missing the frame
    a.feed(big[1000:] + frame(T.STDOUT, 3, b"after"))
    got = [(f.request_id, bytes(f.payload)) for f in late.frames()]
    assert got == [(1, b"before"), (2, big[20:]), (3, b"after")]


def test_the_anonymous_agents_output_is_acknowledged_like_a_named_one():
    w = World()
    a = w.guest({"ack": True})
    handshake_answer(a)
    hello_of(a)
    w.client("default", subscribe=["stdout"])
    a.feed(frame(T.STDOUT, 0, b"x") * 5)
    w.clock.advance(0.1)
    acks = [b["params"] for _, _, b in a.json_frames() if b.get("method") == "vhub.ack"]
    assert acks == [{"frames": 5}]


def test_session_info_never_shows_a_token():
    w = World()
    w.register("box")
    c = w.client()
    c.feed(rpc(1, "vhub.sessions") + rpc(2, "vhub.info", {"session": "box"}))
    text = json.dumps([b for _, _, b in c.json_frames()])
    sess = w.registry.get("box")
    assert sess.token not in text and sess.attach_token not in text
