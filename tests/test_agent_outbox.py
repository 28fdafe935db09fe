"""blink_agent.outbox: the bounded buffer, drop-oldest, the output_dropped marker,
ack trimming and resend order (sans-I/O)."""

from __future__ import annotations

import json

import pytest
import test_agent_peer  # noqa: F401  (puts guest-agent/ on sys.path)

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
from blink_agent.outbox import DEFAULT_BUFFER_BYTES, Outbox, OutFrame
from blink_agent.wire import MsgType

OUT, ERR = MsgType.Stdout, MsgType.Stderr


def take(ob, *args, **kw):
    """What ``ob.take`` sends, without the output_seqs marker (tested on its own below)."""
    return [f for f in ob.take(*args, **kw) if b'"output_seqs"' not in f.payload or f.msg_type != MsgType.RpcRequest]


def payloads(frames):
    return [f.payload for f in frames if f.msg_type != MsgType.RpcRequest]


def marker_bytes(frame):
    assert frame.msg_type == MsgType.RpcRequest and frame.request_id == 0
    body = json.loads(frame.payload)
    assert set(body) == {"event", "bytes"} and body["event"] == "output_dropped"
    return body["bytes"]


def test_default_limit():
    assert DEFAULT_BUFFER_BYTES == 8 * 1024 * 1024
    with pytest.raises(ValueError):
        Outbox(0)


def test_nothing_leaves_before_connection_and_ack_decision():
    ob = Outbox(100)
    ob.push(OUT, 1, b"a")
    assert take(ob) == []
    ob.connection_made()
    assert not ob.has_unsent() and take(ob) == []  # ack mode undecided
    ob.set_ack_mode(False)
    assert take(ob) == [OutFrame(OUT, 1, b"a")]


def test_without_acks_frames_leave_once_written():
    ob = Outbox(100)
    ob.connection_made()
    ob.set_ack_mode(False)
    seq = ob.push(OUT, 1, b"abc")
    assert not ob.written_through(seq)
    ob.push(ERR, 1, b"de")
    assert ob.buffered_bytes == 5
    assert take(ob) == [OutFrame(OUT, 1, b"abc"), OutFrame(ERR, 1, b"de")]
    assert ob.buffered_bytes == 0 and len(ob) == 0
    assert ob.written_through(seq)
    ob.connection_lost()
    ob.connection_made()
    ob.set_ack_mode(True)
    assert take(ob) == []  # nothing resent: it was never kept


def test_drop_oldest_while_disconnected_and_marker_in_their_place():
    ob = Outbox(10)
    for i in range(6):
        ob.push(OUT, 1, bytes([65 + i]) * 4)  # AAAA BBBB CCCC DDDD EEEE FFFF
    assert ob.buffered_bytes == 8 and len(ob) == 2
    assert ob.pending_dropped_bytes == 16 and ob.dropped_frames_total == 4
    ob.connection_made()
    ob.set_ack_mode(False)
    frames = take(ob)
    assert marker_bytes(frames[0]) == 16
    assert payloads(frames) == [b"EEEE", b"FFFF"]
    assert ob.pending_dropped_bytes == 0
    assert take(ob) == []


def test_newest_frame_kept_even_alone_over_the_limit():
    ob = Outbox(4)
    ob.push(OUT, 1, b"12")
    ob.push(OUT, 1, b"0123456789")
    assert len(ob) == 1 and ob.buffered_bytes == 10 and ob.pending_dropped_bytes == 2
    assert ob.has_room(1) is False
    assert Outbox(4).has_room(100)  # an empty buffer always takes one frame


def test_ack_trimming_and_resend_order():
    ob = Outbox(1000)
    ob.connection_made()
    ob.set_ack_mode(True)
    for i in range(5):
        ob.push(OUT if i % 2 == 0 else ERR, 7, b"f%d" % i)
    assert payloads(take(ob)) == [b"f0", b"f1", b"f2", b"f3", b"f4"]
    assert len(ob) == 5 and ob.unacked_frames == 5 and ob.unsent_frames == 0
    assert ob.ack(2) == (2, True)
    assert len(ob) == 3 and ob.buffered_bytes == 6
    assert ob.ack(1) == (0, False)  # stale acks are ignored
    ob.push(OUT, 7, b"f5")  # new output after the unacked frames
    ob.connection_lost()  # f2, f3, f4 were never acked
    assert ob.resent_frames_total == 3
    ob.connection_made()
    assert take(ob) == []
    ob.set_ack_mode(True)
    frames = take(ob)
    assert payloads(frames) == [b"f2", b"f3", b"f4", b"f5"]  # resent first, in order
    assert [f.msg_type for f in frames] == [OUT, ERR, OUT, OUT]
    # Counting restarts at 0 on the new connection.
    assert ob.ack(4) == (4, True)
    assert len(ob) == 0 and ob.buffered_bytes == 0


def test_ack_beyond_written_is_clamped():
    ob = Outbox(100)
    ob.connection_made()
    ob.set_ack_mode(True)
    ob.push(OUT, 1, b"x")
    take(ob)
    ob.push(OUT, 1, b"y")  # not written yet
    assert ob.ack(5) == (1, False)
    assert payloads(take(ob)) == [b"y"]
    assert ob.bad_acks == 1


def test_unacked_evicted_frames_lost_only_if_the_connection_dies():
    ob = Outbox(8)
    ob.connection_made()
    ob.set_ack_mode(True)
    ob.push(OUT, 1, b"aaaa")
    ob.push(OUT, 1, b"bbbb")
    take(ob)
    ob.push(OUT, 1, b"cccc")  # over the limit: evicts written-but-unacked aaaa
    assert len(ob) == 2 and ob.unacked_frames == 2 and ob.pending_dropped_bytes == 0
    assert ob.ack(1) == (1, True)  # covers the evicted frame: nothing lost
    assert ob.pending_dropped_bytes == 0 and len(ob) == 2
    ob.push(OUT, 1, b"dddd")  # evicts bbbb (written, unacked)
    ob.connection_lost()  # bbbb may never have arrived: it counts as dropped
    assert ob.pending_dropped_bytes == 4
    ob.connection_made()
    ob.set_ack_mode(True)
    frames = take(ob)
    assert marker_bytes(frames[0]) == 4
    assert payloads(frames) == [b"cccc", b"dddd"]


def test_late_hello_counts_written_frames_as_acked():
    ob = Outbox(100)
    ob.connection_made()
    ob.set_ack_mode(False)
    ob.push(OUT, 1, b"a")
    take(ob)
    ob.set_ack_mode(True)
    ob.push(OUT, 1, b"b")
    take(ob)
    assert ob.ack(1) == (0, True)  # the frame written before the hello
    assert ob.ack(2) == (1, True)
    assert len(ob) == 0


def test_written_through_tracks_resends():
    ob = Outbox(100)
    ob.connection_made()
    ob.set_ack_mode(True)
    s1 = ob.push(OUT, 1, b"a")
    s2 = ob.push(OUT, 1, b"b")
    take(ob, max_bytes=1)
    assert ob.written_through(s1) and not ob.written_through(s2)
    take(ob)
    assert ob.written_through(s2)
    ob.connection_lost()
    assert not ob.written_through(s1)
    ob.connection_made()
    ob.set_ack_mode(True)
    assert not ob.written_through(s1)  # it must be resent first
    take(ob)
    assert ob.written_through(s2)


def test_flow_control_room():
    ob = Outbox(10)
    ob.connection_made()
    ob.set_ack_mode(True)
    ob.push(OUT, 1, b"x" * 8)
    assert ob.has_room(2) and not ob.has_room(3)
    take(ob)
    assert not ob.has_room(3)  # written but unacked still counts
    ob.ack(1)
    assert ob.has_room(10)


def test_output_seqs_number_each_execution_across_connections():
    ob = Outbox(100)
    ob.connection_made()
    ob.set_ack_mode(True)
    for data in (b"a1", b"a2", b"a3"):
        ob.push(OUT, 7, data)
    ob.push(OUT, 0, b"agent")  # the agent itself: not an execution, not counted
    first = ob.take()
    assert [f.msg_type for f in first[1:]] == [OUT] * 4
    # every connection starts with it: nothing of execution 7 is behind; the outbox's frame 1 comes next
    assert json.loads(first[0].payload) == {"event": "output_seqs", "executions": {"7": 0}, "outbox": ob.token,
                                            "next": 1}
    assert ob.ack(2) == (2, True)  # a1, a2 acknowledged; a3 and the agent's frame not
    ob.push(ERR, 9, b"b1")
    ob.connection_lost()
    ob.push(OUT, 7, b"a4")  # while disconnected
    ob.connection_made()
    ob.set_ack_mode(True)
    again = ob.take()
    assert again[0].msg_type == MsgType.RpcRequest and again[0].request_id == 0
    body = json.loads(again[0].payload)
    # execution 7: a1, a2 are behind (acked), a3 comes next as seq 3; execution 9: b1 is seq 1
    # the outbox's frames: a1 a2 a3 agent b1 a4 are 1..6; a3 (3) is the next one written
    assert body == {"event": "output_seqs", "executions": {"7": 2, "9": 0}, "outbox": ob.token, "next": 3}
    assert [(f.request_id, f.payload) for f in again[1:]] == [(7, b"a3"), (0, b"agent"), (9, b"b1"), (7, b"a4")]


def test_output_seqs_names_the_outbox_and_the_frame_that_comes_next():
    """Each outbox has its own name; ``next`` is the outbox's number of the
    first frame written on the connection, past frames dropped while away."""
    ob, other = Outbox(10), Outbox(10)
    assert ob.token != other.token and len(ob.token) == 16
    ob.connection_made()
    ob.set_ack_mode(True)
    for data in (b"11111", b"22222"):
        ob.push(OUT, 3, data)
    assert json.loads(ob.take()[0].payload)["next"] == 1
    ob.ack(1)
    ob.connection_lost()
    for data in (b"33333", b"44444", b"55555"):  # over the limit while away: 2 and 3 are dropped
        ob.push(OUT, 3, data)
    ob.connection_made()
    ob.set_ack_mode(True)
    again = ob.take()
    body = json.loads(again[0].payload)
    assert body["outbox"] == ob.token and body["next"] == 4, body
    assert json.loads(again[1].payload)["event"] == "output_dropped"
    assert [f.payload for f in again[2:]] == [b"44444", b"55555"]
