"""The real agent process (``python -m blink_agent serve|run``) against an in-test host
peer that speaks raw BLIN bytes over a Unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_agent_peer import HostPeer, agent_env, short_socket_path, start_agent

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
from blink_agent.wire import MsgType

PY = sys.executable
MB = 1024 * 1024


@pytest.fixture
def peer(tmp_path):
    p = HostPeer(short_socket_path(tmp_path))
    yield p
    p.close()


@pytest.fixture
def agents():
    started = []
    yield started
    for agent in started:
        agent.stop()
        log = agent.log()
        assert "Traceback" not in log, log
        assert "ResourceWarning" not in log, log


def serve(peer, tmp_path, agents, *extra, env=None, name="agent"):
    agent = start_agent(peer, tmp_path, *extra, env=env, name=name)
    agents.append(agent)
    return agent


def result_of(frame):
    assert frame.msg_type == MsgType.RpcResponse, (frame, frame.payload)
    return json.loads(frame.payload)


def error_of(frame):
    assert frame.msg_type == MsgType.RpcError, (frame, frame.payload)
    body = json.loads(frame.payload)
    assert set(body) == {"code", "message"}
    return body


def run(conn, rid, params, timeout=10.0):
    return result_of(conn.call(rid, "agent.run", params, timeout))


def py(code):
    return [PY, "-c", code]


# -- handshake ---------------------------------------------------------------------


def test_anonymous_handshake_names_no_session_and_asks_for_acks(peer, tmp_path, agents):
    """Without a session the agent lands in the anonymous session (Blink's hosts
    ignore the payload) and still asks for acks: its output survives a restart."""
    agent = serve(peer, tmp_path, agents)
    conn = peer.accept()
    body = json.loads(conn.handshake())
    assert body == {"agent": "blink-agent", "pid": agent.pid, "version": "0.1.0", "ack": True}
    assert result_of(conn.call(2, "agent.ping")) == {"pong": True}


def test_session_handshake_json(peer, tmp_path, agents):
    agent = serve(peer, tmp_path, agents, env=agent_env(VHUB_SESSION="demo", VHUB_TOKEN="tok-1"))
    conn = peer.accept()
    body = json.loads(conn.handshake(hello=True))
    assert body == {
        "session": "demo",
        "token": "tok-1",
        "agent": "blink-agent",
        "pid": agent.pid,
        "version": "0.1.0",
        "ack": True,
    }
    # --session / --token on the command line win over nothing.
    agent2 = serve(peer, tmp_path, agents, "--session", "s2", "--token", "t2", name="agent2")
    conn2 = peer.accept()
    body2 = json.loads(conn2.handshake())
    assert (body2["session"], body2["token"], body2["pid"]) == ("s2", "t2", agent2.pid)


def test_rejected_handshake_is_retried_and_logged(peer, tmp_path, agents):
    agent = serve(peer, tmp_path, agents, "--session", "demo", "--token", "bad")
    conn = peer.accept()
    conn.recv()
    conn.send_json(MsgType.Error, 0, {"code": "bad_token", "message": "token does not match"})
    conn.close()
    conn2 = peer.accept(timeout=5)  # retried with backoff
    conn2.handshake()
    assert result_of(conn2.call(3, "agent.ping")) == {"pong": True}
    assert "bad_token: token does not match" in agent.log()


# -- RPC ----------------------------------------------------------------------------


def test_builtin_methods_and_errors(peer, tmp_path, agents):
    agent = serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    info = result_of(conn.call(11, "agent.info"))
    assert set(info) == {"pid", "python", "uptime", "version", "hostname", "executions"}
    assert info["pid"] == agent.pid and info["executions"] == [] and info["uptime"] >= 0
    err = error_of(conn.call(12, "no.such", {"x": 1}))
    assert err["code"] == "no_handler"
    # Notifications (id 0) are never answered, even unknown ones.
    conn.request(0, "no.such")
    conn.request(0, "agent.ping")
    conn.send_json(MsgType.RpcRequest, 13, {"event": "agent.ping"})  # Blink style
    frame = conn.recv()
    assert frame.request_id == 13 and result_of(frame) == {"pong": True}
    assert error_of(conn.call(14, "agent.run", {"argv": "ls"}))["code"] == "bad_params"
    assert error_of(conn.call(15, "agent.kill", {"execution_id": 999}))["code"] == "no_such_execution"
    err = error_of(conn.call(16, "agent.run", {"argv": ["/nonexistent/prog"]}))
    assert err["code"] == "spawn_failed" and "No such file" in err["message"]
    conn.send(MsgType.RpcRequest, 17, b"{not json")
    assert error_of(conn.expect(lambda f: f.request_id == 17))["code"] == "bad_request"


def test_heartbeats(peer, tmp_path, agents):
    serve(peer, tmp_path, agents, "--heartbeat-interval", "0.2")
    conn = peer.accept()
    conn.handshake()
    conn.send(MsgType.Heartbeat, 77, b"")
    frame = conn.recv()
    assert (frame.msg_type, frame.request_id, frame.payload) == (MsgType.Heartbeat, 77, b"pong")
    conn.send(MsgType.Heartbeat, 78, b"pong")  # a pong is never answered
    conn.send(MsgType.Heartbeat, 79, b"")
    frame = conn.recv()
    assert (frame.request_id, frame.payload) == (79, b"pong")
    deadline = time.monotonic() + 5
    while len(conn.pings_seen) < 2 and time.monotonic() < deadline:
        conn.recv_none(0.1)
    assert len(conn.pings_seen) >= 2  # the agent pings on its own (auto-ponged by the peer)


def test_idle_connection_is_dropped_and_redialed(peer, tmp_path, agents):
    serve(peer, tmp_path, agents, "--heartbeat-interval", "0.1", "--idle-timeout", "0.5")
    conn = peer.accept()
    conn.handshake()
    conn.auto_pong = False  # a daemon that went silent
    started = time.monotonic()
    conn.wait_eof(timeout=5)
    assert time.monotonic() - started < 4
    conn2 = peer.accept(timeout=5)
    conn2.handshake()
    assert result_of(conn2.call(2, "agent.ping")) == {"pong": True}


def test_protocol_error_from_host_closes_with_error(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    conn.send_raw(b"GET / HTTP/1.1\r\n\r\n\r\n")
    frame = conn.recv()
    assert frame.msg_type == MsgType.Error and json.loads(frame.payload)["code"] == "bad_magic"
    conn.wait_eof()
    peer.accept(timeout=5).handshake()  # and it comes back


def test_error_frame_from_daemon_closes(peer, tmp_path, agents):
    agent = serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    conn.send_json(MsgType.Error, 0, {"code": "shutting_down", "message": "bye"})
    conn.wait_eof()
    peer.accept(timeout=5).handshake()
    assert "shutting_down: bye" in agent.log()


# -- agent.run ------------------------------------------------------------------------


def test_run_50mb_stdout_every_byte(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    code = (
        "import hashlib,sys\n"
        "h=hashlib.sha256()\n"
        "for i in range(800):\n"
        "    b=(b'%07d' % i)*9362+b'\\n'*2\n"
        "    h.update(b); sys.stdout.buffer.write(b)\n"
        "sys.stdout.flush(); sys.stderr.write(h.hexdigest())\n"
    )
    started = time.monotonic()
    res = run(conn, 2, {"argv": py(code)})
    out = conn.collect_execution(res["execution_id"], timeout=60, keep=False)
    elapsed = time.monotonic() - started
    assert out["n_out"] == 800 * 65536 >= 50 * 1000 * 1000
    assert out["sha_out"] == out["stderr"].decode()
    r = out["result"]
    assert r == {
        "event": "execution_result",
        "execution_id": res["execution_id"],
        "exit_code": 0,
        "signal": None,
        "stdout_bytes": out["n_out"],
        "stderr_bytes": 64,
    }
    assert max(n for _, n in out["order"]) <= 64 * 1024
    print("\nagent.run 50 MiB: %.1f MB/s" % (out["n_out"] / elapsed / 1e6))


def test_run_20mb_with_acks_and_small_buffer(peer, tmp_path, agents):
    """Flow control with an acking daemon: a 256 KiB buffer, acks every 4 frames."""
    serve(peer, tmp_path, agents, "--session", "s", "--buffer-bytes", "256K")
    conn = peer.accept()
    conn.handshake(hello=True)
    code = "import sys\nfor i in range(320): sys.stdout.buffer.write(bytes([i % 251]) * 65536)\n"
    res = run(conn, 2, {"argv": py(code)})
    out = conn.collect_execution(res["execution_id"], timeout=60, ack_every=4)
    expected = b"".join(bytes([i % 251]) * 65536 for i in range(320))
    assert out["stdout"] == expected
    assert out["result"]["stdout_bytes"] == len(expected)
    assert not [f for f in out["other"] if b"output_dropped" in f.payload]


def test_interleaved_stdout_stderr_live(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    code = (
        "import sys,time\n"
        "for i in range(20):\n"
        "    sys.stdout.write('out%d\\n' % i); sys.stdout.flush()\n"
        "    sys.stderr.write('err%d\\n' % i); sys.stderr.flush()\n"
        "    time.sleep(0.005)\n"
        "sys.exit(7)\n"
    )
    res = run(conn, 5, {"argv": py(code)})
    first = conn.expect(lambda f: f.msg_type in (MsgType.Stdout, MsgType.Stderr))
    assert first.request_id == res["execution_id"]
    conn.queue.appendleft(first)
    out = conn.collect_execution(res["execution_id"])
    assert out["stdout"] == "".join(f"out{i}\n" for i in range(20)).encode()
    assert out["stderr"] == "".join(f"err{i}\n" for i in range(20)).encode()
    assert {t for t, _ in out["order"]} == {MsgType.Stdout, MsgType.Stderr}
    assert len(out["order"]) > 2  # streamed live, not in one piece at the end
    assert out["result"]["exit_code"] == 7 and out["result"]["signal"] is None


def test_run_stdin_env_cwd(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    code = "import os,sys\nd=sys.stdin.read()\nprint(d.upper(), os.environ['X_T'], os.getcwd(), 'HOME' in os.environ)\n"
    res = run(
        conn,
        2,
        {"argv": py(code), "stdin": "héllo", "env": {"X_T": "v1", "HOME": None}, "cwd": str(tmp_path)},
    )
    out = conn.collect_execution(res["execution_id"])
    assert out["stdout"].decode() == f"HÉLLO v1 {tmp_path} False\n"
    res = run(conn, 3, {"argv": ["cat"], "stdin_b64": "AAH/"})
    assert conn.collect_execution(res["execution_id"])["stdout"] == b"\x00\x01\xff"
    res = run(conn, 4, {"argv": ["cat"]})  # no stdin: /dev/null, so cat ends at once
    out = conn.collect_execution(res["execution_id"], timeout=5)
    assert out["stdout"] == b"" and out["result"]["exit_code"] == 0
    assert res["execution_id"] == 3 and res["pid"] > 0  # ids count up from 1, never reused


def test_kill_and_timeout(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    res = run(conn, 2, {"argv": ["sh", "-c", "echo started; sleep 30; echo never"]})
    eid = res["execution_id"]
    first = conn.expect(lambda f: f.msg_type == MsgType.Stdout)
    assert first.payload == b"started\n"
    assert eid in result_of(conn.call(3, "agent.info"))["executions"]
    assert result_of(conn.call(4, "agent.kill", {"execution_id": eid})) == {"ok": True}
    out = conn.collect_execution(eid, timeout=10)
    assert out["result"]["exit_code"] == -15 and out["result"]["signal"] == 15
    assert b"never" not in out["stdout"]
    assert result_of(conn.call(5, "agent.info"))["executions"] == []
    assert error_of(conn.call(6, "agent.kill", {"execution_id": eid}))["code"] == "no_such_execution"
    res = run(conn, 7, {"argv": ["sleep", "30"], "timeout": 0.3})
    out = conn.collect_execution(res["execution_id"], timeout=10)
    assert out["result"]["exit_code"] == -9 and out["result"]["signal"] == 9
    res = run(conn, 8, {"argv": ["sleep", "30"]})
    assert result_of(conn.call(9, "agent.kill", {"execution_id": res["execution_id"], "signal": "SIGINT"}))
    assert conn.collect_execution(res["execution_id"])["result"]["signal"] == 2


# -- reconnects, acks and the bounded buffer -----------------------------------------------


def test_reconnect_after_peer_closes(peer, tmp_path, agents):
    serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    times = []
    for _ in range(3):
        conn.close()
        started = time.monotonic()
        conn = peer.accept(timeout=5)
        conn.handshake()
        assert result_of(conn.call(2, "agent.ping")) == {"pong": True}
        times.append(time.monotonic() - started)
    print(
        "\nreconnect (close -> handshake -> ping answered): {} ms".format(
            ", ".join("%.0f" % (t * 1000) for t in times)
        )
    )
    assert min(times) < 2.5


def _gated_command(tmp_path):
    """Prints one, waits for gate1, prints two, waits for gate2, prints three, exits 3."""
    code = (
        "import os,sys,time\n"
        "def wait(p):\n"
        "    t=time.time()+20\n"
        "    while not os.path.exists(p) and time.time()<t: time.sleep(0.01)\n"
        "sys.stdout.write('one\\n'); sys.stdout.flush()\n"
        "wait(sys.argv[1])\n"
        "sys.stdout.write('two\\n'); sys.stdout.flush()\n"
        "wait(sys.argv[2])\n"
        "sys.stdout.write('three\\n'); sys.stdout.flush()\n"
        "sys.exit(3)\n"
    )
    return py(code) + [str(tmp_path / "gate1"), str(tmp_path / "gate2")]


def test_unacked_frames_resent_in_order_after_reconnect(peer, tmp_path, agents):
    serve(peer, tmp_path, agents, "--session", "demo")
    conn = peer.accept()
    conn.handshake(hello=True)
    res = run(conn, 2, {"argv": _gated_command(tmp_path)})
    eid = res["execution_id"]
    assert conn.expect(lambda f: f.msg_type == MsgType.Stdout).payload == b"one\n"
    conn.ack(1)  # "one" delivered
    (tmp_path / "gate1").touch()
    assert conn.expect(lambda f: f.msg_type == MsgType.Stdout).payload == b"two\n"
    conn.close()  # "two" never acked: the daemon died
    conn2 = peer.accept(timeout=5)
    conn2.handshake(hello=True)
    first = conn2.expect(lambda f: f.msg_type in (MsgType.Stdout, MsgType.Stderr))
    assert (first.request_id, first.payload) == (eid, b"two\n")  # resent before new output
    (tmp_path / "gate2").touch()
    conn2.queue.appendleft(first)
    out = conn2.collect_execution(eid, ack_every=1)
    assert out["stdout"] == b"two\nthree\n"
    assert out["result"]["exit_code"] == 3 and out["result"]["stdout_bytes"] == 14


def test_no_resend_without_hello(peer, tmp_path, agents):
    serve(peer, tmp_path, agents, "--session", "demo")
    conn = peer.accept()
    conn.handshake(hello=False)
    res = run(conn, 2, {"argv": _gated_command(tmp_path)})
    assert conn.expect(lambda f: f.msg_type == MsgType.Stdout).payload == b"one\n"
    conn.close()
    conn2 = peer.accept(timeout=5)
    conn2.handshake(hello=False)
    (tmp_path / "gate1").touch()
    (tmp_path / "gate2").touch()
    out = conn2.collect_execution(res["execution_id"])
    assert out["stdout"] == b"two\nthree\n"


def test_output_buffered_while_disconnected_then_dropped_oldest(peer, tmp_path, agents):
    serve(peer, tmp_path, agents, "--buffer-bytes", "64K")
    conn = peer.accept()
    conn.handshake()
    done = tmp_path / "done"
    code = (
        "import os,sys,time\n"
        "t=time.time()+20\n"
        "while not os.path.exists(sys.argv[1]) and time.time()<t: time.sleep(0.01)\n"
        "for i in range(40): sys.stdout.buffer.write(bytes([65+i%26])*8192); sys.stdout.flush()\n"
        "open(sys.argv[2],'w').close()\n"
    )
    res = run(conn, 2, {"argv": py(code) + [str(tmp_path / "go"), str(done)]})
    conn.close()
    # The agent redials and sends its handshake; we leave it hanging while the output
    # is produced, so the agent is not connected past the handshake and must buffer.
    hanging = peer.accept(timeout=5)
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 10
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    hanging.handshake()
    seqs = hanging.expect(lambda f: f.msg_type == MsgType.RpcRequest and f.request_id == 0)
    assert json.loads(seqs.payload)["event"] == "output_seqs"  # numbers what follows (an execution is on)
    marker = hanging.expect(lambda f: f.msg_type == MsgType.RpcRequest and f.request_id == 0)
    body = json.loads(marker.payload)
    assert set(body) == {"event", "bytes"} and body["event"] == "output_dropped"
    out = hanging.collect_execution(res["execution_id"])
    produced = b"".join(bytes([65 + i % 26]) * 8192 for i in range(40))
    assert out["result"]["stdout_bytes"] == len(produced)
    assert body["bytes"] + len(out["stdout"]) == len(produced)
    assert produced.endswith(out["stdout"])  # the newest output survived
    assert len(out["stdout"]) <= 64 * 1024
    first_stream = next(i for i, f in enumerate(out["other"] + [marker]) if f is marker)
    assert first_stream == len(out["other"])  # the marker came before any kept frame


def test_sigterm_stops_serve_and_its_commands(peer, tmp_path, agents):
    agent = serve(peer, tmp_path, agents)
    conn = peer.accept()
    conn.handshake()
    res = run(conn, 2, {"argv": ["sleep", "30"]})
    started = time.monotonic()
    agent.proc.terminate()
    out = conn.collect_execution(res["execution_id"], timeout=10)
    assert out["result"]["signal"] == 15
    assert agent.wait(10) == 0
    assert time.monotonic() - started < 8
    with pytest.raises(ProcessLookupError):
        os.kill(res["pid"], 0)


# -- blink-agent run (pipe mode) ------------------------------------------------------


def test_run_mode_relays_and_exits_with_code(peer, tmp_path, agents):
    code = "import sys\nprint('hello'); sys.stderr.write('oops\\n'); sys.exit(5)"
    agent = start_agent(peer, tmp_path, "--", PY, "-c", code, command="run")
    agents.append(agent)
    conn = peer.accept()
    body = json.loads(conn.handshake())
    assert body["ack"] is True and "session" not in body
    out = conn.collect_execution(1)
    assert out["stdout"] == b"hello\n" and out["stderr"] == b"oops\n"
    r = out["result"]
    assert (r["execution_id"], r["exit_code"], r["signal"], r["stdout_bytes"], r["stderr_bytes"]) == (
        1,
        5,
        None,
        6,
        5,
    )
    assert agent.wait(10) == 5
    assert agent.proc.stdout.read() == b""  # the command's output went to the hub only


def test_run_mode_signal_exit_and_spawn_failure(peer, tmp_path, agents):
    agent = start_agent(peer, tmp_path, "--", "sh", "-c", "kill -9 $$", command="run", name="a1")
    agents.append(agent)
    conn = peer.accept()
    conn.handshake()
    assert conn.collect_execution(1)["result"]["signal"] == 9
    assert agent.wait(10) == 128 + 9
    agent = start_agent(peer, tmp_path, "--", "/nonexistent/cmd", command="run", name="a2")
    agents.append(agent)
    conn = peer.accept()
    conn.handshake()
    out = conn.collect_execution(1)
    assert out["result"]["exit_code"] == 127 and b"/nonexistent/cmd" in out["stderr"]
    assert agent.wait(10) == 127


def test_run_mode_connection_failures(tmp_path):
    env = agent_env()
    base = [PY, "-m", "blink_agent", "run"]
    p = subprocess.run(
        base + ["--addr", "unix:" + str(tmp_path / "none.sock"), "--", "true"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert p.returncode == 69
    assert p.stderr.decode().count("\n") == 1 and "cannot connect" in p.stderr.decode()
    p = subprocess.run(
        base + ["--addr", "tcp://nowhere", "--", "true"], env=env, capture_output=True, timeout=30
    )
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1 and "bad address" in p.stderr.decode()
    p = subprocess.run(
        [PY, "-m", "blink_agent", "serve", "--addr", "vsock://x:1"], env=env, capture_output=True, timeout=30
    )
    assert p.returncode == 2 and p.stderr.decode().startswith("blink-agent: bad address")


def test_run_mode_rejected_handshake_is_fatal(peer, tmp_path, agents):
    agent = start_agent(peer, tmp_path, "--session", "x", "--token", "bad", "--", "true", command="run")
    agents.append(agent)
    conn = peer.accept()
    conn.recv()
    conn.send_json(MsgType.Error, 0, {"code": "unknown_session", "message": "no session x"})
    assert agent.wait(10) == 69
    assert "unknown_session: no session x" in Path(agent.log_path).read_text()
