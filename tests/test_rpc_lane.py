"""The relay's RPC hot loop (csrc/route.c and its twin vhubd/_route_py.py).

Codec level, on both backends: the two agree byte for byte (payload rules,
routing, tables), and what the loop accepts is what msgspec reads the same
way. Relay level, in-process: every scenario runs with the C loop, the
pure-Python twin and the loop off, and the peers see the same bytes in all
three. The daemon's own RPC tests (test_daemon_rpc.py and others) run
through the loop on real sockets.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct

import msgspec
import pytest
from harness.inproc import T, World, frame, handshake_answer, rpc

from vhubd import codec, frames
from vhubd.frames import ROUTE_FRAME_MAX, ROUTE_ID_BIT, ROUTE_METHOD_MAX, ROUTE_METHODS_MAX
from vhubd.protocol import encode_frame
from vhubd.relay import Accept, Limits

BACKENDS = codec.backends()
MODES = ["c", "python", "off"]


def _backend(name: str):
    impl = BACKENDS.get(name)
    if impl is None:
        pytest.skip("C codec not built on this host")
    return impl


# ---------------------------------------------------------------- payload rules

ACCEPTED = [
    (b'{"method":"a"}', b"a"),
    (b' \t\r\n{ "params" : [1, -2, 3.25, 0, -0.5, true, false, null, "x\\n\\"y"], "method" : "fs.read" } \n', b"fs.read"),
    (b'{"method":"m","params":{"method":"inner","a":[{"method":1}]}}', b"m"),
    (b'{"a":{},"b":[],"c":[[]],"method":"' + b"m" * ROUTE_METHOD_MAX + b'"}', b"m" * ROUTE_METHOD_MAX),
    (b'{"method":"x","n":123456789012345,"f":1.123456789012345}', b"x"),
    (b'{"method":"x","p":' + b"[" * 31 + b"]" * 31 + b"}", b"x"),  # 32 levels, the top one included
    (b'{"k\\"ey":1,"method":"x"}', b"x"),
]
REFUSED = [
    b"", b"[]", b'"method"', b"{}", b'{"method":"x"', b'{"method":"x"} x', b'{"method":"x",}',
    b'{"method":""}', b'{"method":1}', b'{"method":null}', b'{"method":"a\\/b"}', b'{"method":"x","method":"x"}',
    b'{"event":"x"}', b'{"m\\u0065thod":"x"}', b'{"method":"x","s":"\\u0041"}', b'{"method":"\xc3\xa9"}',
    b'{"method":"x","s":"\xc3\xa9"}', b'{"method":"x","s":"\x7f"}', b'{"method":"x","s":"a\nb"}',
    b'{"method":"x","n":1e5}', b'{"method":"x","n":1E5}', b'{"method":"x","n":01}', b'{"method":"x","n":1.}',
    b'{"method":"x","n":.5}', b'{"method":"x","n":-}', b'{"method":"x","n":1234567890123456}',
    b'{"method":"x","n":0.1234567890123456}', b'{"method":"x","v":tru}', b'{"method":"x","v":nul}',
    b'{"method":"x","p":' + b"[" * 32 + b"]" * 32 + b"}", b'{"method":"' + b"m" * (ROUTE_METHOD_MAX + 1) + b'"}',
    b'{"method":"x","s":"\\x"}', b'{"method":"x",1:2}', b'{"method" "x"}', b'{"method":"x"]',
    b'{"method":"x","a":[1 2]}', b"{'method':'x'}",
]


@pytest.mark.parametrize("name", ["c", "python"])
def test_payload_rules(name):
    impl = _backend(name)
    for payload, method in ACCEPTED:
        found = impl.route_method(payload)
        assert found is not None, payload
        assert payload[found[0]:found[0] + found[1]] == method
        assert msgspec.json.decode(payload)["method"] == method.decode()
    for payload in REFUSED:
        assert impl.route_method(payload) is None, payload


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randrange(-10**rng.randrange(1, 18), 10**rng.randrange(1, 18))
    if kind == 2:
        return round(rng.uniform(-1e6, 1e6), rng.randrange(0, 8))
    if kind in (3, 4, 5):
        return "".join(rng.choice('ab/\\"\n\t é\u0001x.') for _ in range(rng.randrange(0, 8)))
    if kind in (6, 7):
        return {_key(rng): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]


def _key(rng: random.Random) -> str:
    return rng.choice(["method", "params", "a", "event", "m\u00e9thod", "k"])


def _payloads(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        obj = {_key(rng): _random_json(rng) for _ in range(rng.randrange(0, 4))}
        if rng.random() < 0.6:
            obj["method"] = rng.choice(["tool.run", "fs.read", "", "a" * 70, "x/y", "é", "a\\b"])
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
        data = bytearray(text.encode())
        for _ in range(rng.choice([0, 0, 0, 1, 2])):  # mutations: flips, cuts, inserts
            if not data:
                break
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i:]
            else:
                data[i:i] = rng.choice([b'"method":"z",', b"1e3", b"\\u00", b"[", b"}", b" ", b'"'])
        yield bytes(data)


def test_payload_rules_agree_and_msgspec_reads_the_same_method():
    py = BACKENDS["python"]
    c = BACKENDS.get("c")
    accepted = 0
    for payload in _payloads(4000, seed=15):
        found = py.route_method(payload)
        if c is not None:
            assert c.route_method(payload) == found, payload
        if found is not None:
            accepted += 1
            body = msgspec.json.decode(payload)
            assert isinstance(body, dict) and body["method"].encode() == payload[found[0]:found[0] + found[1]]
    assert accepted > 300  # the corpus is not all refusals


# ---------------------------------------------------------------- the router, both backends

def _req(rid: int, method: str, params=None) -> bytes:
    return encode_frame(T.RPC_REQUEST, rid, json.dumps({"method": method, "params": params or {}}).encode())


def _ids(data: bytes) -> list[int]:
    out, off = [], 0
    while off < len(data):
        out.append(struct.unpack_from("<Q", data, off + 12)[0])
        off += frames.HEADER_SIZE + struct.unpack_from("<I", data, off + 8)[0]
    return out


@pytest.mark.parametrize("name", ["c", "python"])
def test_router_forwards_answers_and_stops_where_python_decides(name):
    r = _backend(name).Router()
    g = r.add(True, 3, 8)
    h = r.add(False, 0, 1024)
    batch = bytearray(_req(7, "x.y", {"a": 1}) + _req(8, "x.y") + _req(9, "other") + _req(10, "x.y"))
    before = bytes(batch)
    assert r.route(g, batch, 0, len(batch), 1 << 24, 5.0, 0) == (0, 0, 0, 0, [])  # nothing learned yet
    r.learn(3, "x.y", h)
    r.learn(4, "other", h)  # another session's method
    stop, n, fwd, ans, outs = r.route(g, batch, 0, len(batch), 1 << 24, 5.0, 0)
    first_two = len(_req(7, "x.y", {"a": 1}) + _req(8, "x.y"))
    assert (stop, n, fwd, ans) == (first_two, 2, 2, 0) and [s for s, _ in outs] == [h]
    ids = _ids(outs[0][1])
    assert ids == [ROUTE_ID_BIT | 1, ROUTE_ID_BIT | 2]
    assert outs[0][1][:12] == before[:12] and outs[0][1][20:first_two // 2] == before[20:first_two // 2]
    assert bytes(batch) == before  # the receive buffer is never written
    assert r.count() == 2 and r.outstanding(g) == 2 and r.earliest() == 5.0
    answers = bytearray(encode_frame(T.RPC_ERROR, ids[1], b'{"code":"c"}') + encode_frame(T.RPC_RESPONSE, ids[0], b"1")
                        + encode_frame(T.RPC_RESPONSE, ids[0], b"late") + encode_frame(T.RPC_RESPONSE, 5, b"py"))
    stop, n, fwd, ans, outs = r.route(h, answers, 0, len(answers), 1 << 24, 0.0, 0)
    assert (n, fwd, ans) == (3, 0, 2) and stop == len(answers) - len(encode_frame(T.RPC_RESPONSE, 5, b"py"))
    assert outs == [(g, encode_frame(T.RPC_ERROR, 8, b'{"code":"c"}') + encode_frame(T.RPC_RESPONSE, 7, b"1"))]
    assert r.count() == 0 and r.outstanding(g) == 0 and r.earliest() is None


@pytest.mark.parametrize("name", ["c", "python"])
def test_router_bounds(name):
    r = _backend(name).Router()
    g = r.add(True, 1, 3)
    h = r.add(False, 0, 1024)
    r.learn(1, "m", h)
    many = bytearray(_req(1, "m") * 5)
    one = len(_req(1, "m"))
    assert r.route(g, many, 0, len(many), 1 << 24, 1.0, 1)[:3] == (2 * one, 2, 2)  # 3 in flight with extra=1
    assert r.route(g, many, 0, len(many), 1 << 24, 1.0, 0)[:3] == (one, 1, 1)
    assert r.route(g, many, 0, len(many), 1 << 24, 1.0, 0)[:3] == (0, 0, 0)
    assert r.expire(0.5) == [] and r.expire(1.0) == [(h, g, 1)] * 3 and r.outstanding(g) == 0
    # frames the loop leaves to Python: notification, too large, incomplete, bad header, over max_payload
    big = _req(2, "m", {"pad": "x" * ROUTE_FRAME_MAX})
    for data, limit in [(_req(0, "m"), 1 << 24), (big, 1 << 24), (_req(2, "m")[:-1], 1 << 24),
                        (b"NILB\x02" + _req(2, "m")[5:], 1 << 24), (_req(2, "m"), 5)]:
        buf = bytearray(data)
        assert r.route(g, buf, 0, len(buf), limit, 1.0, 0)[:2] == (0, 0), data[:30]
    with pytest.raises(ValueError):
        r.route(g, bytearray(4), 0, 5, 1 << 24, 1.0, 0)
    # the remembered methods are bounded: one more than the limit forgets them all
    r.forget()
    for i in range(ROUTE_METHODS_MAX):
        r.learn(1, f"m{i}", h)
    buf = bytearray(_req(3, "m0"))
    assert r.route(g, buf, 0, len(buf), 1 << 24, 1.0, 0)[1] == 1
    r.learn(1, "one-more", h)
    assert r.route(g, buf, 0, len(buf), 1 << 24, 1.0, 0)[1] == 0
    buf = bytearray(_req(3, "one-more"))
    assert r.route(g, buf, 0, len(buf), 1 << 24, 1.0, 0)[1] == 1
    r.learn(1, "g", g)  # a guest never serves: not remembered
    buf = bytearray(_req(3, "g"))
    assert r.route(g, buf, 0, len(buf), 1 << 24, 1.0, 0)[1] == 0


@pytest.mark.parametrize("name", ["c", "python"])
def test_router_release_ends_calls_and_forgets(name):
    r = _backend(name).Router()
    g1, g2, h = r.add(True, 1, 100), r.add(True, 2, 100), r.add(False, 0, 100)
    r.learn(1, "m", h)
    r.learn(2, "m", h)
    for g, rid in ((g1, 11), (g2, 21), (g1, 12)):
        buf = bytearray(_req(rid, "m"))
        assert r.route(g, buf, 0, len(buf), 1 << 24, 9.0, 0)[1] == 1
    assert r.take(h, ROUTE_ID_BIT | 2) == (g2, 21) and r.take(h, ROUTE_ID_BIT | 2) is None
    assert r.release(g1) == [] and r.count() == 0 or r.count() == 0  # g1's calls forgotten
    buf = bytearray(_req(22, "m"))
    assert r.route(g2, buf, 0, len(buf), 1 << 24, 9.0, 0)[1] == 0  # release forgot every method
    r.learn(2, "m", h)
    assert r.route(g2, buf, 0, len(buf), 1 << 24, 9.0, 0)[1] == 1
    assert r.release(h) == [(g2, 22)] and r.outstanding(g2) == 0
    assert r.add(False, 0, 1) == g1  # the lowest free slot again
    assert r.route(g2, buf, 0, len(buf), 1 << 24, 9.0, 0)[1] == 0


def _ops(rng: random.Random, n: int):
    methods = ["a", "b.c", "long." + "x" * 60, "é"]
    for _ in range(n):
        k = rng.randrange(10)
        if k == 0:
            yield ("add", rng.random() < 0.5, rng.randrange(3), rng.randrange(1, 6))
        elif k == 1:
            yield ("learn", rng.randrange(3), rng.choice(methods), rng.randrange(6))
        elif k == 2:
            yield ("release", rng.randrange(6))
        elif k == 3:
            yield ("expire", rng.uniform(0, 20))
        elif k == 4:
            yield ("forget",)
        else:
            parts = []
            for _ in range(rng.randrange(1, 6)):
                t = rng.random()
                if t < 0.5:
                    parts.append(_req(rng.choice([0, 1, 2, 2**64 - 1]), rng.choice(methods)))
                elif t < 0.8:
                    rid = ROUTE_ID_BIT | rng.randrange(1, 6) if rng.random() < 0.8 else rng.randrange(1, 6)
                    parts.append(encode_frame(rng.choice([T.RPC_RESPONSE, T.RPC_ERROR]), rid, b"{}"))
                else:
                    parts.append(encode_frame(T.STDOUT, 1, b"o"))
            data = b"".join(parts)
            if rng.random() < 0.2:
                data = data[:rng.randrange(len(data) + 1)]
            yield ("route", rng.randrange(6), data, rng.uniform(0, 20), rng.randrange(3))


def test_router_backends_agree_on_random_operations():
    if "c" not in BACKENDS:
        pytest.skip("C codec not built on this host")
    rng = random.Random(21)
    for _ in range(30):
        ops = list(_ops(rng, 200))
        results = []
        for impl in (BACKENDS["c"], BACKENDS["python"]):
            r, got = impl.Router(), []
            for op in ops:
                if op[0] == "add":
                    got.append(r.add(*op[1:]))
                elif op[0] == "learn":
                    got.append(r.learn(*op[1:]))
                elif op[0] == "release":
                    got.append(r.release(op[1]))
                elif op[0] == "expire":
                    got.append(r.expire(op[1]))
                elif op[0] == "forget":
                    got.append(r.forget())
                else:
                    buf = bytearray(op[2])
                    got.append(r.route(op[1], buf, 0, len(buf), 1 << 24, op[3], op[4]))
                got.append((r.count(), r.earliest(), [r.outstanding(s) for s in range(6)]))
            results.append(got)
        assert results[0] == results[1]


# ---------------------------------------------------------------- the relay, in-process

def world(mode: str, **kw) -> World:
    w = World(**kw)
    w.relay.rpc.router = None if mode == "off" else _backend(mode).Router()
    return w


def agent(w: World, payload=b""):
    port = w.guest(payload)
    assert type(port.decision) is Accept, port.decision
    handshake_answer(port)
    return port


def handler(w: World, session: str = "default", serve=("tool.*",), **hs):
    port = w.client(session, serve=list(serve), **hs)
    handshake_answer(port)
    return port


def learned(w: World, g, h, method: str = "tool.a") -> None:
    """The guest's first call of ``method``: the relay learns who serves it (the
    answer is consumed)."""
    g.feed(rpc(999, method))
    answer_all(h)
    assert [rid for _, rid, _ in g.json_frames()] == [999]


def answer_all(h, body=lambda req: {"ok": req["params"]}) -> list[int]:
    """Answer every request the handler got, in reverse order, in one batch."""
    got = [(f.request_id, f.json()) for f in h.frames() if f.msg_type == T.RPC_REQUEST]
    h.feed(*(frame(T.RPC_RESPONSE, rid, body(req)) for rid, req in reversed(got)))
    return [rid for rid, _ in got]


def same_in_every_mode(scenario) -> None:
    """``scenario(mode)`` returns what the peers saw; the loop changes none of it."""
    seen = {mode: scenario(mode) for mode in MODES if mode == "off" or mode in BACKENDS}
    first = seen["off"]
    for mode, got in seen.items():
        assert got == first, f"{mode} differs from the relay without the loop"


def test_calls_through_the_loop_are_answered_as_without_it():
    def scenario(mode):
        w = world(mode)
        g, h = agent(w), handler(w)
        g.feed(rpc(1, "tool.run", {"i": -1}))  # the relay learns who serves tool.run
        ids = answer_all(h)
        g.feed(*(rpc(100 + i, "tool.run", {"i": i}) for i in range(50)))
        ids += answer_all(h)
        assert len(set(ids)) == 51
        assert any(i & ROUTE_ID_BIT for i in ids) == (mode != "off")
        assert w.relay.counters["rpc_forwarded"] == 51 and w.relay.rpc.inflight_count() == 0
        return g.json_frames()

    same_in_every_mode(scenario)


def test_order_with_other_frames_in_the_same_batch():
    def scenario(mode):
        w = world(mode)
        g = agent(w)
        h = handler(w, subscribe=["stdout"])
        learned(w, g, h)
        g.feed(rpc(2, "tool.a"), frame(T.STDOUT, 0, b"between"), rpc(3, "tool.a"), frame(T.STDOUT, 0, b"after"))
        g.feed(frame(T.STDOUT, 0, b"first"), rpc(4, "tool.a"))
        return [(f.msg_type, f.json().get("method") if f.msg_type == T.RPC_REQUEST else bytes(f.payload))
                for f in h.frames()]

    same_in_every_mode(scenario)


def test_unanswered_calls_time_out_and_late_answers_are_dropped():
    def scenario(mode):
        w = world(mode, rpc_timeout=5.0)
        g, h = agent(w), handler(w)
        learned(w, g, h)
        g.feed(*(rpc(10 + i, "tool.a") for i in range(3)))
        got = [f.request_id for f in h.frames()]
        w.clock.advance(4.9)
        early = g.json_frames()
        w.clock.advance(0.2)
        timed_out = g.json_frames()
        h.feed(*(frame(T.RPC_RESPONSE, rid, {"late": True}) for rid in got))
        assert w.relay.counters["rpc_timeouts"] == 3 and w.relay.rpc.inflight_count() == 0
        return early, [(t, rid, body["code"]) for t, rid, body in timed_out], g.json_frames()

    same_in_every_mode(scenario)


def test_a_handler_leaving_fails_its_calls_and_the_next_one_takes_over():
    def scenario(mode):
        w = world(mode)
        g, h = agent(w), handler(w)
        learned(w, g, h)
        g.feed(rpc(2, "tool.a"), rpc(3, "tool.a"))
        h.lose()
        failed = sorted((rid, body["code"]) for _, rid, body in g.json_frames())
        g.feed(rpc(4, "tool.a"))
        none = g.json_frames()
        h2 = handler(w)
        g.feed(rpc(5, "tool.a"), rpc(6, "tool.a"))
        answer_all(h2)
        assert w.relay.rpc.inflight_count() == 0
        return failed, [(rid, body["code"]) for _, rid, body in none], g.json_frames()

    same_in_every_mode(scenario)


def test_too_many_in_flight_counts_both_ways_of_forwarding():
    def scenario(mode):
        w = world(mode, limits=Limits(max_inflight=4))
        g, h = agent(w), handler(w)
        g.feed(rpc(1, "tool.a"))  # in flight (unanswered), forwarded by Python
        g.feed(*(rpc(10 + i, "tool.a") for i in range(10)))
        forwarded = [f.json()["params"] for f in h.frames()]
        refused = [(rid, body["code"]) for _, rid, body in g.json_frames()]
        return len(forwarded), refused

    same_in_every_mode(scenario)


def test_forged_and_misdirected_answers_go_nowhere():
    def scenario(mode):
        w = world(mode)
        g, h = agent(w), handler(w)
        other = handler(w, serve=("other.*",))
        learned(w, g, h)
        g.feed(rpc(2, "tool.a"), rpc(3, "tool.a"))
        ids = [f.request_id for f in h.frames()]
        other.feed(*(frame(T.RPC_RESPONSE, rid, {"forged": True}) for rid in ids))  # not its calls
        other.feed(frame(T.RPC_RESPONSE, ROUTE_ID_BIT | 77, {"forged": True}), frame(T.RPC_ERROR, 2**64 - 1, {}))
        g.feed(frame(T.RPC_RESPONSE, ROUTE_ID_BIT | 1, {"from the guest": True}))
        nothing = g.json_frames()
        h.feed(*(frame(T.RPC_RESPONSE, rid, {"real": True}) for rid in ids))
        return nothing, g.json_frames(), other.closed

    same_in_every_mode(scenario)


def test_large_frames_and_odd_payloads_take_the_python_way_with_the_same_outcome():
    pad = "y" * (ROUTE_FRAME_MAX + 100)

    def scenario(mode):
        w = world(mode)
        g, h = agent(w), handler(w)
        learned(w, g, h)
        g.feed(rpc(2, "tool.a", {"pad": pad}), rpc(3, "tool.a"))
        answer_all(h, lambda req: {"pad": pad})  # answers larger than the loop takes
        big = [(rid, len(body["pad"])) for _, rid, body in g.json_frames()]
        g.feed(frame(T.RPC_REQUEST, 4, b'{"method":"tool.a"'), frame(T.RPC_REQUEST, 5, b'{"method":"tool.a","n":1e3}'),
               frame(T.RPC_REQUEST, 6, '{"method":"tool.a","s":"é"}'.encode()), rpc(0, "tool.a", {"note": 1}),
               frame(T.RPC_REQUEST, 7, b'{"method":"tool.a","method":"vhub.ping"}'))
        answer_all(h, lambda req: {"got": req.get("params")})
        return big, [(t, rid, {k: v for k, v in body.items() if k != "time"}) for t, rid, body in g.json_frames()]

    same_in_every_mode(scenario)


def test_methods_are_routed_per_session():
    def scenario(mode):
        w = world(mode)
        tok = w.register("two")
        g1 = agent(w)
        g2 = agent(w, {"session": "two", "token": tok})
        h = handler(w)
        learned(w, g1, h)
        g2.feed(rpc(2, "tool.a"))  # nobody serves tool.a for session "two"
        star = handler(w, "*", serve=("tool.*",))
        g2.feed(rpc(3, "tool.a"), rpc(4, "tool.a"))
        answer_all(star, lambda req: {"by": "star"})
        g1.feed(rpc(5, "tool.a"))
        answer_all(h, lambda req: {"by": "session handler"})
        return g1.json_frames(), g2.json_frames(), star.frames()

    same_in_every_mode(scenario)


def test_a_guest_held_behind_another_guests_frame_is_not_routed_around_it():
    def scenario(mode):
        w = world(mode, cut_through=1024)
        a = agent(w)
        h = handler(w, subscribe=["stdout"])
        att = w.guest({"session": "default", "attach": True, "token": w.registry.get("default").attach_token})
        handshake_answer(att)
        learned(w, att, h)
        big = frame(T.STDOUT, 1, b"x" * 4096)
        a.feed(big[:2000])
        att.feed(rpc(2, "tool.a"), rpc(3, "tool.a"))
        held = att.paused
        a.feed(big[2000:])
        seen = [(f.msg_type, len(f.payload)) for f in h.frames()]
        return held, seen

    same_in_every_mode(scenario)


# ---------------------------------------------------------------- through a real daemon

@pytest.mark.parametrize("env", [{"BLINK_CODEC": "c"}, {"BLINK_CODEC": "python"}, {"BLINK_RPC_LANE": "0"}],
                         ids=["c", "python", "off"])
def test_concurrent_calls_through_a_daemon(make_daemon, env):
    """300 calls in one write, answered out of order by a vhubd.client handler;
    answers forged by another client go nowhere; the handler leaving fails what
    it still owed. The same with the C loop, its twin and no loop."""
    from harness import AsyncPeer, client, json_of, run
    from harness import frame as wire_frame

    if env.get("BLINK_CODEC") == "c" and "c" not in BACKENDS:
        pytest.skip("C codec not built on this host")
    d = make_daemon("--heartbeat", "0", env=env)

    async def body():
        g = await AsyncPeer.guest(d.socket)
        seen = []
        never = asyncio.Event()

        async def echo(params):
            seen.append(params["i"])
            if params["i"] == 1001:
                await never.wait()  # owed when the handler goes
            return {"echo": params["i"]}

        h = await client(d, session="default", serve={"tool.*": echo})
        g.send(T.RPC_REQUEST, 1, {"method": "tool.echo", "params": {"i": -1}})  # the daemon learns who serves it
        first = await g.next_frame(10, lambda f: f.request_id == 1)
        assert json_of(first) == {"echo": -1}
        g.send_raw(b"".join(wire_frame(T.RPC_REQUEST, 1000 + i, {"method": "tool.echo", "params": {"i": i}})
                            for i in range(300)))
        await g.drain()
        got = {}
        while len(got) < 300:
            f = await g.next_frame(20)
            assert f is not None and f.msg_type == T.RPC_RESPONSE, f
            got[f.request_id] = json_of(f)
        assert got == {1000 + i: {"echo": i} for i in range(300)}
        # a raw client answering ids it was never given: dropped, nothing reaches the guest
        forger = await AsyncPeer.open(d.control)
        await forger.handshake({"role": "client", "session": "default", "serve": ["other.*"]})
        for rid in (1, ROUTE_ID_BIT | 1, ROUTE_ID_BIT | 300, 2**64 - 1):
            forger.send(T.RPC_RESPONSE, rid, {"forged": True})
        await forger.drain()
        # a call the handler still owes when it goes fails with handler_lost; the next finds nobody
        g.send(T.RPC_REQUEST, 2, {"method": "tool.echo", "params": {"i": 1001}})
        while 1001 not in seen:
            await asyncio.sleep(0.01)
        await h.close()
        f = await g.next_frame(10, lambda f: f.request_id == 2)
        assert f.msg_type == T.RPC_ERROR and json_of(f)["code"] == "handler_lost"
        g.send(T.RPC_REQUEST, 3, {"method": "tool.echo", "params": {"i": 1002}})
        f = await g.next_frame(10, lambda f: f.request_id == 3)
        assert f.msg_type == T.RPC_ERROR and json_of(f)["code"] == "no_handler"
        assert sorted(seen) == [-1, *range(300), 1001]
        # the forged answers came before these in the daemon's order: none reached the guest
        assert [ev for ev in g.pending if getattr(ev, "msg_type", None) != T.HEARTBEAT] == []

    run(body())
    assert d.call("vhub.stats")["counters"]["rpc_forwarded"] == 302
