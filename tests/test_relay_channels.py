"""Channels in the relay, in-process (tests/harness/inproc.py): routing point
to point, windows held against a hostile guest, resets when an end goes, and
bounds. The end-to-end behaviour is in test_expose.py and test_cp.py."""

from __future__ import annotations

from harness.inproc import T, World, frame, handshake_answer, rpc

from vhubd import frames

BASE = frames.CHANNEL_BASE
WINDOW = frames.CHANNEL_WINDOW


def setup(**config):
    w = World(**config)
    w.register("box")
    a = w.guest({"session": "box", "token": w.registry.get("box").token, "ack": True})
    handshake_answer(a)
    a.frames()  # vhub.hello
    owner = w.client("box")
    watcher = w.client("box", subscribe=["stdout", "stderr", "stream"])
    owner.frames(), watcher.frames()
    return w, a, owner, watcher


def open_copy(w, a, owner, rid=7):
    owner.feed(rpc(rid, "vhub.channel", {"session": "box", "method": "agent.tar", "params": {"path": "/x"}}))
    [(mt, arid, req)] = a.json_frames(T.RPC_REQUEST)
    assert req["method"] == "agent.tar" and req["params"]["path"] == "/x"
    cid = req["params"]["channel"]
    assert cid > BASE and req["params"]["window"] == WINDOW and req["params"]["max_frame"] == 128 * 1024
    a.feed(frame(T.RPC_RESPONSE, arid, {"channel": cid, "window": WINDOW, "name": "x", "size": 3}))
    [(mt, rid2, res)] = owner.json_frames()
    assert (mt, rid2, res["channel"], res["name"]) == (T.RPC_RESPONSE, rid, cid, "x")
    return cid


def notes(port, method):
    return [p["params"] for mt, rid, p in port.json_frames(T.RPC_REQUEST) if p.get("method") == method]


def test_channel_data_goes_to_its_owner_only_and_is_not_kept_or_acked():
    w, a, owner, watcher = setup()
    cid = open_copy(w, a, owner)
    a.feed(frame(T.STDOUT, 1, b"out"), frame(T.STREAM_DATA, cid, b"tar bytes"), frame(T.STDOUT, 1, b"more"))
    got = owner.frames()
    assert [(f.msg_type, f.request_id, bytes(f.payload)) for f in got] == [(T.STREAM_DATA, cid, b"tar bytes")]
    seen = [(f.msg_type, bytes(f.payload)) for f in watcher.frames()]
    assert seen == [(T.STDOUT, b"out"), (T.STDOUT, b"more")]  # the subscriber sees output, not the channel
    sess = w.registry.get("box")
    assert b"tar bytes" not in b"".join(sess.scrollback.replay())
    w.clock.advance(0.1)
    assert notes(a, "vhub.ack")[-1] == {"frames": 2}  # the two Stdout frames, not the channel's
    # the owner's ack reaches the agent; an EOF each way ends the channel
    owner.feed(rpc(0, "chan.ack", {"channel": cid, "consumed": 9}))
    assert notes(a, "chan.ack") == [{"channel": cid, "consumed": 9}]
    owner.feed(frame(T.STREAM_DATA, cid, b""))
    assert [(f.request_id, bytes(f.payload)) for f in a.frames()] == [(cid, b"")]
    a.feed(frame(T.STREAM_DATA, cid, b""))
    assert cid not in w.relay.channels.by_id and not sess.channels


def test_a_guest_past_the_window_loses_the_channel():
    w, a, owner, _ = setup()
    cid = open_copy(w, a, owner)
    chunk = b"x" * 65536
    a.feed(*[frame(T.STREAM_DATA, cid, chunk) for _ in range(WINDOW // len(chunk))])  # exactly the window
    assert len(owner.frames()) == WINDOW // len(chunk)
    a.feed(frame(T.STREAM_DATA, cid, b"one more"))
    assert notes(owner, "chan.reset") == [{"channel": cid, "reason": "the guest sent past the channel's window"}]
    assert notes(a, "chan.reset")[0]["channel"] == cid
    assert w.relay.counters["channels_reset"] == 1 and cid not in w.relay.channels.by_id
    a.feed(frame(T.STREAM_DATA, cid, b"and more"))  # now a channel that is not there: dropped
    assert owner.frames() == [] and w.relay.counters["channel_frames_dropped"] == 1


def test_frames_for_channels_that_are_not_the_senders_are_dropped():
    w, a, owner, watcher = setup()
    cid = open_copy(w, a, owner)
    w.register("other")
    b = w.guest({"session": "other", "token": w.registry.get("other").token})
    handshake_answer(b)
    b.feed(frame(T.STREAM_DATA, cid, b"not yours"), frame(T.STREAM_DATA, BASE + 12345, b"nobody's"))
    assert owner.frames() == [] and watcher.frames() == []
    watcher.feed(frame(T.STREAM_DATA, cid, b"a client that does not own it"))
    assert a.frames() == []
    assert w.relay.counters["channel_frames_dropped"] == 3


def test_a_channel_frame_larger_than_the_window_closes_the_guest():
    w, a, owner, _ = setup()
    cid = open_copy(w, a, owner)
    a.feed(frame(T.STREAM_DATA, cid, b"y" * (300 * 1024)))  # past max_frame and the cut-through size
    assert a.closed and a.error[0] == "frame_too_large"
    assert notes(owner, "chan.reset")[0]["channel"] == cid


def test_done_is_passed_once_and_bounded():
    w, a, owner, _ = setup()
    cid = open_copy(w, a, owner)
    a.feed(rpc(0, "chan.done", {"channel": cid, "ok": False, "error": "e" * 100_000, "bytes": 5,
                                "extra": "x" * 1000, "sha256": 7}))
    a.feed(rpc(0, "chan.done", {"channel": cid, "ok": True}))
    [done] = notes(owner, "chan.done")
    assert done == {"channel": cid, "ok": False, "error": "e" * 300, "bytes": 5}


def test_an_end_that_goes_resets_the_other():
    w, a, owner, _ = setup()
    cid = open_copy(w, a, owner)
    w.lose(owner, "gone")
    assert notes(a, "chan.reset") == [{"channel": cid, "reason": "the host client disconnected"}]
    owner2 = w.client("box")
    owner2.frames()  # its handshake answer
    cid2 = open_copy(w, a, owner2, rid=8)
    w.lose(a, "gone")
    assert notes(owner2, "chan.reset") == [{"channel": cid2, "reason": "the agent disconnected"}]
    assert not w.relay.channels.by_id


def test_channels_per_session_are_bounded():
    w, a, owner, _ = setup(max_channels=2)
    open_copy(w, a, owner, rid=1)
    open_copy(w, a, owner, rid=2)
    owner.feed(rpc(3, "vhub.channel", {"session": "box", "method": "agent.tar", "params": {"path": "/x"}}))
    [(mt, rid, err)] = owner.json_frames()
    assert (mt, rid, err["code"]) == (T.RPC_ERROR, 3, "too_many_channels")
    assert (w.relay.counters["channels_opened"], w.relay.counters["channels_refused"]) == (2, 1)
    owner.feed(rpc(4, "vhub.channel", {"session": "box", "method": "agent.run", "params": {}}))
    [(mt, rid, err)] = owner.json_frames()
    assert err["code"] == "bad_params"


def test_the_agent_refusing_a_channel_frees_it():
    w, a, owner, _ = setup()
    owner.feed(rpc(5, "vhub.channel", {"session": "box", "method": "agent.untar", "params": {"dest": "/d"}}))
    [(_, arid, req)] = a.json_frames(T.RPC_REQUEST)
    a.feed(frame(T.RPC_ERROR, arid, {"code": "not_found", "message": "/d: No such directory"}))
    [(mt, rid, err)] = owner.json_frames()
    assert (mt, rid, err) == (T.RPC_ERROR, 5, {"code": "not_found", "message": "/d: No such directory"})
    assert not w.relay.channels.by_id and not w.registry.get("box").channels
