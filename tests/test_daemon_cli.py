"""The ``blink`` client commands against a real daemon (DESIGN §9): tables
for people, ``--json`` for programs, one-line errors with the documented exit
codes (1 failed operation, 2 usage, 69 unreachable)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from harness import ROOT, AsyncPeer, T, client, frame, json_of, run


def one_line(err: bytes) -> str:
    text = err.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


async def cli(d, *args):
    return await asyncio.to_thread(d.cli, *args)


def test_sessions_table_and_json(daemon):
    async def body():
        await AsyncPeer.guest(daemon.socket, {"agent": "x"})
        await client(daemon, session="default")
        admin = await client(daemon)
        await admin.register("box")
        r = await cli(daemon, "sessions")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[0].split() == ["NAME", "STATE", "BACKEND", "AGENT", "CLIENTS", "EXPOSED", "REASON"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert rows["default"][1:5] == ["ready", "external", "yes", "1"]
        assert rows["box"][1:5] == ["waiting_agent", "external", "no", "0"]
        r = await cli(daemon, "sessions", "--json")
        assert r.returncode == 0 and r.stderr == b""
        by_name = {s["name"]: s for s in json.loads(r.stdout)}
        assert set(by_name) == {"default", "box"}
        for s in by_name.values():
            assert {"name", "state", "backend", "agent_connected", "clients"} <= set(s)
        assert by_name["default"]["agent_connected"] is True and by_name["default"]["clients"] == 1

    run(body())


def test_info(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket, {"agent": "blinky", "pid": 12})
        g.send(T.RPC_REQUEST, 3, {"event": "execution_result", "execution_id": 1, "exit_code": 0})
        await g.next_frame(10)
        r = await cli(daemon, "info", "default")
        assert r.returncode == 0, r.stderr
        fields = dict(line.split(None, 1) for line in r.stdout.decode().splitlines())
        assert fields["name:"] == "default" and fields["state:"] == "ready" and fields["agent_connected:"] == "True"
        assert json.loads(fields["last_result:"])["exit_code"] == 0
        r = await cli(daemon, "info", "default", "--json")
        info = json.loads(r.stdout)
        assert info["agent"]["agent"] == "blinky" and info["last_result"]["execution_id"] == 1
        r = await cli(daemon, "info", "--json")  # the daemon itself
        assert json.loads(r.stdout)["pid"] == daemon.pid
        r = await cli(daemon, "info", "ghost")
        assert r.returncode == 1 and "unknown_session" in one_line(r.stderr) and r.stdout == b""

    run(body())


def test_call(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)

        async def agent():
            f = await g.next_frame(20, lambda f: f.msg_type == T.RPC_REQUEST)
            req = json_of(f)
            assert req == {"method": "agent.echo", "params": {"x": [1, "two"]}}
            g.send(T.RPC_RESPONSE, f.request_id, {"echo": req["params"]})
            f = await g.next_frame(20, lambda f: f.msg_type == T.RPC_REQUEST)
            g.send(T.RPC_ERROR, f.request_id, {"code": "boom", "message": "it broke"})

        serving = asyncio.ensure_future(agent())
        r = await cli(daemon, "call", "default", "agent.echo", '{"x": [1, "two"]}')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"echo": {"x": [1, "two"]}}
        r = await cli(daemon, "call", "default", "agent.fail")
        assert r.returncode == 1 and r.stdout == b""
        line = one_line(r.stderr)
        assert "boom" in line and "it broke" in line
        await asyncio.wait_for(serving, 10)
        r = await cli(daemon, "call", "default", "vhub.ping")
        assert r.returncode == 0 and json.loads(r.stdout)["pong"] is True
        r = await cli(daemon, "call", "default", "agent.x", "{not json")
        assert r.returncode == 2 and "JSON" in one_line(r.stderr)
        r = await cli(daemon, "call", "nobody", "agent.x")  # an unknown session: an error, nothing created
        assert r.returncode == 1 and "unknown_session" in one_line(r.stderr)
        assert "nobody" not in (await cli(daemon, "sessions")).stdout.decode()
        await (await client(daemon)).register("idle")
        r = await cli(daemon, "call", "idle", "agent.x")
        assert r.returncode == 1 and "no_agent" in one_line(r.stderr)

    run(body())


def test_tail_replays_output(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        g.send_raw(frame(T.STDOUT, 1, b"line one\n") + frame(T.STDERR, 1, b"oops\n")
                   + frame(T.STDOUT, 2, b"\x00\xffline two\n"))
        assert (await g.call("vhub.ping", rid=2)).msg_type == T.RPC_RESPONSE
        r = await cli(daemon, "tail", "default")
        assert r.returncode == 0
        assert r.stdout == b"line one\n\x00\xffline two\n" and r.stderr == b"oops\n"
        r = await cli(daemon, "tail", "default", "--no-replay")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")

    run(body())


def test_stats_json(daemon):
    async def body():
        g = await AsyncPeer.guest(daemon.socket)
        g.send(T.STDOUT, 1, b"12345")
        assert (await g.call("vhub.ping", rid=2)).msg_type == T.RPC_RESPONSE
        r = await cli(daemon, "stats", "--json")
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        assert stats["pid"] == daemon.pid and stats["guests"] == 1
        assert stats["counters"]["guests_accepted"] == 1 and stats["counters"]["stream_bytes"] == 25
        r = await cli(daemon, "stats")
        assert r.returncode == 0 and b"counters.guests_accepted: 1" in r.stdout

    run(body())


@pytest.mark.parametrize("argv", [
    ["sessions", "--bogus"],
    ["info", "--nope", "x"],
    ["call"],
    ["tail", "default", "--follow-harder"],
    ["stats", "--json", "--what"],
    ["no-such-command"],
    ["serve", "--bogus-flag"],
    ["serve", "--tcp", "10.0.0.1:7000"],
])
def test_usage_errors_exit_2_with_one_line(argv, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhubd", *argv], capture_output=True, timeout=30, cwd=ROOT,
                       env={"BLINK_CONTROL": str(tmp_path / "none.sock"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r
    assert r.stdout == b""
    one_line(r.stderr)


@pytest.mark.parametrize("argv", [["sessions"], ["info", "x"], ["call", "x", "vhub.ping"], ["tail", "x"],
                                  ["stats", "--json"]])
def test_unreachable_daemon_exits_69_with_one_line(argv, tmp_path):
    sock = str(tmp_path / "nobody-home.sock")
    r = subprocess.run([sys.executable, "-m", "vhubd", argv[0], "--control", sock, *argv[1:]], capture_output=True,
                       timeout=30, cwd=ROOT)
    assert r.returncode == 69, r
    assert r.stdout == b""
    assert sock in one_line(r.stderr)
