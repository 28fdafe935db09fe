"""blink_agent.pty through the real agent: ``agent.run`` with ``"tty": true`` against the
in-test host peer (keyboard input as StreamData, TtyResize, output as StreamData, the
``execution_result`` with ``"tty": true``, parameter errors)."""

from __future__ import annotations

import json
import time

import pytest
from test_agent_peer import HostPeer, short_socket_path, start_agent

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
from blink_agent.wire import MsgType


@pytest.fixture
def conn(tmp_path):
    peer = HostPeer(short_socket_path(tmp_path))
    agent = start_agent(peer, tmp_path)
    try:
        c = peer.accept()
        c.handshake()
        yield c
    finally:
        agent.stop()
        log = agent.log()
        peer.close()
        assert "Traceback" not in log, log


def _reply(frame):
    return frame.msg_type, json.loads(frame.payload)


def _screen_until(conn, eid, needle: bytes, timeout: float = 10.0) -> bytes:
    """StreamData of execution ``eid`` until ``needle`` shows up; returns all of it."""
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        frame = conn.expect(
            lambda f: f.msg_type == MsgType.StreamData and f.request_id == eid,
            max(0.001, deadline - time.monotonic()),
        )
        seen += frame.payload
    return seen


def _result(conn, eid, timeout: float = 10.0) -> dict:
    frame = conn.expect(
        lambda f: f.msg_type == MsgType.RpcRequest
        and f.request_id != 0
        and json.loads(f.payload).get("execution_id") == eid,
        timeout,
    )
    conn.send(MsgType.RpcResponse, frame.request_id, b"{}")
    return json.loads(frame.payload)


def test_terminal_size_term_input_resize_and_result(conn):
    script = (
        "stty size; echo term=$TERM; read line; echo got:$line; "
        "read again; stty size; exit 3"
    )
    kind, body = _reply(
        conn.call(2, "agent.run", {"argv": ["sh", "-c", script], "tty": True, "rows": 30, "cols": 100,
                                   "term": "xterm-256color"})
    )
    assert kind == MsgType.RpcResponse, body
    eid = body["execution_id"]
    assert body["tty"] is True and body["pid"] > 0
    _screen_until(conn, eid, b"term=xterm-256color")
    conn.send(MsgType.StreamData, eid, b"hello\n")
    _screen_until(conn, eid, b"got:hello")
    conn.send_json(MsgType.TtyResize, eid, {"rows": 40, "cols": 120})
    conn.send(MsgType.StreamData, eid, b"go\n")
    _screen_until(conn, eid, b"40 120")
    result = _result(conn, eid)
    assert result["event"] == "execution_result" and result["tty"] is True
    assert result["exit_code"] == 3 and result["signal"] is None
    assert result["stdout_bytes"] > 0


def test_kill_and_timeout_of_a_terminal_execution(conn):
    _, body = _reply(conn.call(2, "agent.run", {"argv": ["sh", "-c", "echo up; sleep 30"], "tty": True}))
    eid = body["execution_id"]
    assert b"up" in _screen_until(conn, eid, b"up")
    # A bad TtyResize and input for an execution that has no terminal are ignored.
    conn.send(MsgType.TtyResize, eid, b"not json")
    conn.send(MsgType.StreamData, eid + 100, b"nobody\n")
    assert _reply(conn.call(3, "agent.kill", {"execution_id": eid, "signal": "SIGKILL"})) == (
        MsgType.RpcResponse,
        {"ok": True},
    )
    result = _result(conn, eid)
    assert result["exit_code"] == -9 and result["signal"] == 9 and result["tty"] is True
    # The timeout of a terminal execution kills it the same way.
    _, body = _reply(conn.call(4, "agent.run", {"argv": ["sleep", "30"], "tty": True, "timeout": 0.3}))
    result = _result(conn, body["execution_id"])
    assert result["signal"] == 9 and result["tty"] is True


def test_terminal_parameter_errors(conn):
    for rid, params in enumerate(
        [
            {"argv": ["true"], "tty": True, "rows": 0},
            {"argv": ["true"], "tty": True, "cols": True},
            {"argv": ["true"], "tty": True, "term": ""},
            {"argv": ["true"], "tty": True, "stdin": "x"},
        ],
        start=2,
    ):
        kind, body = _reply(conn.call(rid, "agent.run", params))
        assert kind == MsgType.RpcError and body["code"] == "bad_params", (params, body)
    kind, body = _reply(conn.call(9, "agent.run", {"argv": ["/nonexistent/prog"], "tty": True}))
    assert kind == MsgType.RpcError and body["code"] == "spawn_failed", body
