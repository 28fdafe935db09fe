"""blink_agent.protocol: the agent's connection state machine, bytes in, events out."""

from __future__ import annotations

import json
import os

import test_agent_peer  # noqa: F401  (puts guest-agent/ on sys.path)

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
import blink_agent
from blink_agent import protocol as P
from blink_agent.errors import CODE_ALIASES, canonical_code
from blink_agent.outbox import OutFrame
from blink_agent.wire import FrameDecoder, MsgType, encode_frame


def sent(conn):
    return list(FrameDecoder().feed(conn.data_to_send()))


def j(obj):
    return json.dumps(obj).encode()


def test_handshake_payloads():
    assert P.handshake_payload(None, "tok", ack=False) == b""  # nothing to say: Blink's empty handshake
    assert P.handshake_payload("", None, ack=False) == b""
    anonymous = {"agent": "blink-agent", "pid": os.getpid(), "version": blink_agent.__version__, "ack": True}
    assert json.loads(P.handshake_payload(None, "tok")) == anonymous  # no session named: the anonymous one
    body = json.loads(P.handshake_payload("demo", "s3cret"))
    assert body == {
        "session": "demo",
        "token": "s3cret",
        "agent": "blink-agent",
        "pid": os.getpid(),
        "version": blink_agent.__version__,
        "ack": True,
    }
    assert "ack" not in json.loads(P.handshake_payload("demo", "t", ack=False))


def test_handshake_frame_is_first_with_id_1():
    conn = P.AgentConnection(b"")
    frames = sent(conn)
    assert [(f.msg_type, f.request_id, f.payload) for f in frames] == [(MsgType.Handshake, 1, b"")]


def test_ready_then_events_in_order():
    conn = P.AgentConnection(b"")
    conn.data_to_send()
    data = (
        encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready")
        + encode_frame(MsgType.RpcRequest, 0, j({"method": "vhub.hello", "params": {"ack": True}}))
        + encode_frame(MsgType.RpcRequest, 0, j({"method": "vhub.ack", "params": {"frames": 3}}))
        + encode_frame(MsgType.RpcRequest, 5, j({"method": "agent.ping", "params": None}))
        + encode_frame(MsgType.RpcRequest, 6, j({"event": "agent.x", "a": 1}))
        + encode_frame(MsgType.RpcResponse, 9, b'{"r":1}')
        + encode_frame(MsgType.RpcError, 10, j({"code": "nope", "message": "no"}))
    )
    events = conn.receive_data(data)
    assert events == [
        P.Ready(b"blink-vhub-ready"),
        P.Hello({"ack": True}),
        P.Ack(3),
        P.Request(5, "agent.ping", None),
        P.Request(6, "agent.x", {"a": 1}),
        P.Response(9, {"r": 1}),
        P.ErrorReply(10, "nope", "no"),
    ]
    assert conn.state == "open"


def test_rejected_handshake():
    conn = P.AgentConnection(b"{}")
    events = conn.receive_data(
        encode_frame(MsgType.Error, 0, j({"code": "bad_token", "message": "wrong token"}))
    )
    assert events == [P.Rejected("bad_token", "wrong token")]
    assert conn.state == "closed"


def test_frame_before_handshake_is_a_violation():
    conn = P.AgentConnection(b"")
    conn.data_to_send()
    events = conn.receive_data(encode_frame(MsgType.Heartbeat, 1, b""))
    assert events[0].code == "handshake_required"
    [err] = sent(conn)
    assert err.msg_type == MsgType.Error and json.loads(err.payload)["code"] == "handshake_required"
    assert conn.receive_data(encode_frame(MsgType.Handshake, 1)) == []


def test_bad_bytes_send_error_and_close():
    for raw, code in [
        (b"GET / HTTP/1.1\r\n\r\n\r\n", "bad_magic"),
        (b"NILB\x02" + b"\x00" * 15, "bad_version"),
        (b"NILB\x01\x07" + b"\x00" * 14, "unknown_type"),
        (b"NILB\x01\x30\x00\x00\xff\xff\xff\xff" + b"\x00" * 8, "frame_too_large"),
    ]:
        conn = P.AgentConnection(b"")
        conn.data_to_send()
        conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready"))
        [event] = conn.receive_data(raw)
        assert event == P.Violation(code, event.message)
        [err] = sent(conn)
        body = json.loads(err.payload)
        assert err.msg_type == MsgType.Error and body["code"] == code and body["message"]
        assert conn.state == "closed"


def test_heartbeat_ping_pong():
    conn = P.AgentConnection(b"")
    conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready"))
    conn.data_to_send()
    assert conn.receive_data(encode_frame(MsgType.Heartbeat, 42, b"")) == []
    [pong] = sent(conn)
    assert (pong.msg_type, pong.request_id, pong.payload) == (MsgType.Heartbeat, 42, b"pong")
    assert conn.receive_data(encode_frame(MsgType.Heartbeat, 43, b"pong")) == [P.Pong(43)]
    assert conn.data_to_send() == b""  # a pong is never answered


def test_bad_requests():
    conn = P.AgentConnection(b"")
    conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready"))
    conn.data_to_send()
    conn.receive_data(encode_frame(MsgType.RpcRequest, 8, b"not json"))
    conn.receive_data(encode_frame(MsgType.RpcRequest, 9, b"[1]"))
    conn.receive_data(encode_frame(MsgType.RpcRequest, 0, b"not json"))  # notification: no reply
    replies = sent(conn)
    assert [(f.msg_type, f.request_id, json.loads(f.payload)["code"]) for f in replies] == [
        (MsgType.RpcError, 8, "bad_request"),
        (MsgType.RpcError, 9, "bad_request"),
    ]
    [ev] = conn.receive_data(
        encode_frame(MsgType.RpcRequest, 0, j({"method": "vhub.ack", "params": {"frames": -1}}))
    )
    assert isinstance(ev, P.Ignored)


def test_remote_error_after_ready_and_eof_mid_frame():
    conn = P.AgentConnection(b"")
    conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready"))
    assert conn.receive_data(encode_frame(MsgType.Error, 0, b"garbage")) == [
        P.RemoteError("unknown", "garbage")
    ]
    conn = P.AgentConnection(b"")
    conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready") + b"NILB\x01")
    assert "middle of a frame" in conn.receive_eof()


def test_outgoing_shapes():
    conn = P.AgentConnection(b"")
    conn.data_to_send()
    conn.send_request(3, "m", {"x": 1})
    conn.send_event(4, {"event": "execution_result", "execution_id": 1})
    conn.send_response(5, {"ok": True})
    conn.send_error(6, "no_such_method", "nope")  # an old spelling goes out canonical
    conn.send_ping(7)
    frames = sent(conn)
    assert [(f.msg_type, f.request_id) for f in frames] == [
        (0x10, 3),
        (0x10, 4),
        (0x11, 5),
        (0x12, 6),
        (0x02, 7),
    ]
    assert json.loads(frames[0].payload) == {"method": "m", "params": {"x": 1}}
    assert json.loads(frames[3].payload) == {"code": "no_handler", "message": "nope"}
    assert frames[4].payload == b""


def test_received_error_codes_are_canonical():
    """One wire code per meaning: old spellings from older peers arrive as the new one."""
    assert CODE_ALIASES == {"handler_error": "handler_failed", "no_such_method": "no_handler"}
    assert canonical_code("no_such_method") == "no_handler"
    assert canonical_code("denied") == "denied"
    conn = P.AgentConnection(b"")
    conn.receive_data(encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready"))
    events = conn.receive_data(
        encode_frame(MsgType.RpcError, 3, j({"code": "no_such_method", "message": "m1"}))
        + encode_frame(MsgType.RpcError, 4, j({"code": "handler_error", "message": "m2"}))
        + encode_frame(MsgType.RpcError, 5, j({"code": "no_handler", "message": "m3"}))
        + encode_frame(MsgType.RpcError, 6, j({"code": "denied", "message": "m4"}))
    )
    assert events == [
        P.ErrorReply(3, "no_handler", "m1"),
        P.ErrorReply(4, "handler_failed", "m2"),
        P.ErrorReply(5, "no_handler", "m3"),
        P.ErrorReply(6, "denied", "m4"),
    ]
    conn.data_to_send()
    conn.send_error(7, "handler_error", "x")
    [frame] = sent(conn)
    assert json.loads(frame.payload)["code"] == "handler_failed"


def test_stream_header_and_chunks_are_the_frames():
    """The zero-copy path writes exactly what encode_frame would have built."""
    assert P.stream_header(MsgType.Stdout, 7, 3) + b"abc" == encode_frame(MsgType.Stdout, 7, b"abc")
    payload = b"x" * 70000
    frames = [
        OutFrame(MsgType.RpcRequest, 0, b'{"event":"output_dropped","bytes":9}'),
        OutFrame(MsgType.Stdout, 1, payload),
        OutFrame(MsgType.StreamData, 2, b""),
    ]
    chunks, nbytes = P.stream_chunks(frames)
    whole = b"".join(encode_frame(*f) for f in frames)
    assert b"".join(chunks) == whole and nbytes == len(whole)
    assert chunks[3] is payload  # not copied
    assert list(FrameDecoder().feed(b"".join(chunks)))[1].payload == payload
