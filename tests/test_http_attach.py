"""WebSocket attach (Blink's ``docs/PTY.md`` and ``docs/REATTACH.md``) against a
real daemon: a terminal, resizes, stdin and EOF, signals, reattach with ``after``
checked by seq, several attaches at once, the linger after exit, bad control
messages; and reattach across a daemon restart, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")

from harness import ROOT, Daemon, run, wait_for, wait_until  # noqa: E402
from harness.http import HttpApi, joined, read_attach  # noqa: E402

PY = sys.executable


@pytest.fixture
def api_daemon(make_daemon):
    return make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--heartbeat", "0", "--http-linger", "3")


def test_a_terminal_its_size_and_reattach_by_seq(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "t"})
            r = await api.ok("POST", "/api/sessions/t/spawn", {"command": "sh", "args": ["-i"], "tty": True,
                                                               "rows": 24, "cols": 80, "env": {"PS1": "$ "}})
            assert r["tty"] is True
            url = r["attach_url"]
            async with api.ws(url + "?seq=1") as ws:
                await ws.send_bytes(b"stty size; echo $((6*7))\r")
                first, _ = await read_attach(ws, until=b"42\r\n")
                assert b"24 80" in joined(first)
                await ws.send_str(json.dumps({"type": "resize", "rows": 33, "cols": 101}))
                await ws.send_bytes(b"stty size\r")
                more, _ = await read_attach(ws, until=b"33 101")
            seen = first + more
            seqs = [c[1] for c in seen]
            assert seqs == list(range(1, len(seqs) + 1))  # every frame, in order, numbered from 1
            assert {c[0] for c in seen} == {1}  # a terminal's output is channel 1
            # detached: the shell keeps running; two attaches at once, one from a cursor
            cursor = seqs[-1]
            async with api.ws(url + f"?after={cursor}") as a, api.ws(url + "?seq=1") as b:
                await a.send_bytes(b"echo again\r")
                got_a, _ = await read_attach(a, until=b"again\r\n$ ")
                got_b, _ = await read_attach(b, until=b"again\r\n$ ")
            assert got_a[0][1] == cursor + 1  # nothing before the cursor, nothing missed after it
            assert [c[1] for c in got_a] == list(range(cursor + 1, cursor + 1 + len(got_a)))
            assert joined(got_b).startswith(joined(seen))  # without a cursor: the whole buffer first
            tail = [c for c in got_b if c[1] > cursor]
            assert tail == got_a
            async with api.ws(url + f"?after={got_a[-1][1]}") as ws:
                await ws.send_bytes(b"exit 7\r")
                _, texts = await read_attach(ws)
            assert texts == [{"type": "exit", "exit_code": 7}]
            async with api.ws(url + "?after=0") as ws:  # within the linger: everything again, then the exit
                chunks, texts = await read_attach(ws)
            assert [c[1] for c in chunks] == list(range(1, len(chunks) + 1)) and texts[-1]["exit_code"] == 7
            await asyncio.sleep(3.5)  # --http-linger 3
            status, data = await api.req("GET", url)
            assert status == 404 and "ended" in data["error"]

    run(body(), timeout=60)


def test_pipe_stdin_eof_signal_and_bad_control_messages(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "p"})
            r = await api.ok("POST", "/api/sessions/p/spawn", {"command": "sh", "args": ["-c", "cat; echo done >&2"]})
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                for bad in ("not json", "[]", '{"type": "dance"}', '{"type": "resize", "rows": 0, "cols": 9}',
                            '{"type": "resize", "rows": 10, "cols": 10}', '{"type": "signal", "signal": "KILL"}',
                            '{"type": "signal", "signal": 99}'):
                    await ws.send_str(bad)
                    msg = await ws.receive(timeout=10)
                    assert msg.type == aiohttp.WSMsgType.TEXT, (bad, msg)
                    err = json.loads(msg.data)
                    assert err["type"] == "error" and 0 < len(err["message"]) < 300, (bad, err)
                await ws.send_bytes(bytes(range(256)))
                await ws.send_str('{"type": "stdin_eof"}')
                chunks, texts = await read_attach(ws)
            assert b"".join(c[2] for c in chunks if c[0] == 1) == bytes(range(256))
            assert [c[2] for c in chunks if c[0] == 2] == [b"done\n"]
            assert texts == [{"type": "exit", "exit_code": 0}]
            r = await api.ok("POST", "/api/sessions/p/spawn", {"command": "sleep", "args": ["60"]})
            async with api.ws(r["attach_url"]) as ws:
                await ws.send_str('{"type": "signal", "signal": 15}')
                _, texts = await read_attach(ws)
            assert texts == [{"type": "exit", "exit_code": 143}]
            for q, word in (("?after=x", "after"), ("?after=-1", "after"), ("?after=%C2%B2", "after")):
                status, data = await api.req("GET", r["attach_url"] + q)
                assert status == 400 and word in data["error"]
            for path in ("/api/sessions/p/executions/999/attach", "/api/sessions/p/executions/abc/attach",
                         "/api/sessions/p/executions/%C2%B2/attach",
                         "/api/sessions/p/executions/" + "9" * 40 + "/attach"):
                status, data = await api.req("GET", path)
                assert status == 404, (path, status, data)

    run(body(), timeout=60)


def test_detaching_never_kills_and_a_slow_reader_only_misses_what_the_ring_dropped(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--http-buffer", "64k")

    async def body():
        async with HttpApi(d) as api:
            await api.ok("POST", "/api/sessions", {"name": "big"})
            script = "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done"
            r = await api.ok("POST", "/api/sessions/big/spawn", {"command": "sh", "args": ["-c", script]})
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                await read_attach(ws, until=b"line-10\n")
            # detached while it runs: it finishes anyway, its output kept up to the ring's 64 KiB

            async def ended():
                listed = await api.ok("GET", "/api/sessions/big/executions")
                return listed["executions"][0]["exited"]

            await wait_until(ended, 60, what="the execution's end")
            async with api.ws(r["attach_url"] + "?after=1") as ws:
                chunks, texts = await read_attach(ws)
            assert texts[0]["type"] == "error" and "no longer buffered" in texts[0]["message"]
            assert texts[-1] == {"type": "exit", "exit_code": 0}
            seqs = [c[1] for c in chunks]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # what is left, whole and in order
            assert joined(chunks).endswith(b"line-19999\n")
            assert 0 < len(joined(chunks)) <= 64 * 1024 + 65536

    run(body(), timeout=90)


AGENT_ENV = ("VHUB_ADDR", "VHUB_SESSION", "VHUB_TOKEN")


def test_reattach_across_a_daemon_restart_has_no_gap_and_no_duplicate(tmp_path):
    """The agent keeps running the execution while no daemon runs, resends what was
    not acknowledged, and seq numbers stay what they were."""
    args = ("--backend", "external", "--http", "127.0.0.1:0", "--heartbeat", "0")
    d = Daemon(tmp_path / "d", *args).start()
    d2 = None
    token = d.call("vhub.register", {"session": "r"})["token"]
    env = dict(os.environ, VHUB_ADDR=f"unix:{d.socket}", VHUB_SESSION="r", VHUB_TOKEN=token,
               PYTHONPATH=os.path.join(ROOT, "guest-agent"))
    agent = subprocess.Popen([PY, "-m", "blink_agent", "serve"], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = 3000
    script = f"i=0; while [ $i -lt {n} ]; do echo line-$i; i=$((i+1)); [ $((i % 100)) = 0 ] && sleep 0.2; done"
    try:
        wait_for(lambda: d.call("vhub.info", {"session": "r"})["agent_connected"], 20, what="the agent")

        async def before():
            async with HttpApi(d) as api:
                r = await api.ok("POST", "/api/sessions/r/spawn", {"command": "sh", "args": ["-c", script]})
                async with api.ws(r["attach_url"] + "?seq=1") as ws:
                    chunks, _ = await read_attach(ws, until=b"line-500\n")
                return r, chunks

        r, seen = run(before(), timeout=60)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0
        d.stop()
        d2 = Daemon(tmp_path / "d", *args).start()  # same sockets, same state dir; output went on meanwhile

        async def after():
            async with HttpApi(d2) as api:
                async with api.ws(r["attach_url"] + f"?after={seen[-1][1]}") as ws:
                    got = await read_attach(ws, timeout=60)
                listed = await api.ok("GET", "/api/sessions/r/executions")
                assert [e["lost"] for e in listed["executions"]] == [[]]
                return got

        rest, texts = run(after(), timeout=90)
        assert texts == [{"type": "exit", "exit_code": 0}], texts
        assert rest and not joined(seen).endswith(b"line-%d\n" % (n - 1))  # it ran across the restart
        all_chunks = seen + rest
        seqs = [c[1] for c in all_chunks]
        assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate, across the restart
        assert joined(all_chunks) == b"".join(b"line-%d\n" % i for i in range(n))
        assert "kept" in d.log() and "http-executions" in d.log()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        if d2 is not None:
            d2.stop()
        d.stop()


def test_a_hostile_guest_cannot_grow_the_api_or_break_its_watcher(make_daemon):
    """A guest answers agent.run itself, then floods output, numbers it nonsensically,
    reports results for executions that are not its own or with garbage, and sends
    output for executions nobody spawned: the ring stays bounded, the watcher lives."""
    from harness import AsyncPeer, T

    d = make_daemon("--backend", "external", "--http", "127.0.0.1:0", "--http-buffer", "64k", "--heartbeat", "0")
    token = d.call("vhub.register", {"session": "h"})["token"]

    async def body():
        g = await AsyncPeer.guest(d.socket, {"session": "h", "token": token})
        async with HttpApi(d) as api:
            spawn = asyncio.ensure_future(api.ok("POST", "/api/sessions/h/spawn", {"command": "x"}))
            req = await g.next_frame(10, lambda f: f.msg_type == T.RPC_REQUEST)
            assert json.loads(bytes(req.payload))["method"] == "agent.run", req
            g.send(T.STDOUT, 5, b"early\n")  # before its answer: kept
            g.send(T.STDOUT, 99, b"nobody's\n" * 1000)
            g.send(T.RPC_RESPONSE, req.request_id, {"execution_id": 5, "pid": 1})
            r = await spawn
            assert r["execution_id"] == "5"
            chunk = b"z" * 65536
            for _ in range(64):  # 4 MiB into a 64 KiB ring
                g.send(T.STDOUT, 5, chunk)
            for bad in ({"event": "output_seqs", "executions": {"5": "x", "abc": 1, "\u00b2": 2, "9" * 30: 1}},
                        {"event": "output_seqs", "executions": [1, 2]},
                        {"event": "execution_result", "execution_id": [5], "exit_code": 0},
                        {"event": "execution_result", "execution_id": {"a": 1}}):
                g.send(T.RPC_REQUEST, 0, bad)
            g.send(T.STDOUT, 5, b"last\n")
            await g.drain()

            async def head():
                return (await api.ok("GET", "/api/sessions/h/executions"))["executions"][0]["head_seq"] == 66

            await wait_until(head, 20, what="every frame in the ring")
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                chunks, _ = await read_attach(ws, until=b"last\n")
            seqs = [c[1] for c in chunks]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[-1] == 66
            assert len(joined(chunks)) <= 2 * 65536 + 5
            listed = await api.ok("GET", "/api/sessions/h/executions")
            assert listed["executions"][0]["buffered_bytes"] <= 2 * 65536 and not listed["executions"][0]["exited"]
            g.send(T.RPC_REQUEST, 0, {"event": "execution_result", "execution_id": 5, "exit_code": "nope"})
            await g.drain()
            async with api.ws(r["attach_url"] + "?after=66") as ws:
                _, texts = await read_attach(ws)
            assert texts[-1]["type"] == "error"  # ended, but without an exit code it could trust
            await api.ok("GET", "/api/health")
        assert "Traceback" not in d.log()

    run(body(), timeout=60)


def test_quick_executions_back_to_back_each_get_their_exit(api_daemon):
    """A command may end before its spawn is answered, and a session's connection
    goes when nothing runs in it: neither loses an exit or ends a newer execution."""
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "q"})
            for i in range(12):
                cmd = ["-c", f"exit {i}"] if i % 3 else ["-c", f"sleep 0.2; echo x{i}; exit {i}"]
                r = await api.ok("POST", "/api/sessions/q/spawn", {"command": "sh", "args": cmd})
                async with api.ws(r["attach_url"] + "?seq=1") as ws:
                    chunks, texts = await read_attach(ws, timeout=20)
                assert texts == [{"type": "exit", "exit_code": i}], (i, texts)
                assert joined(chunks) == (b"" if i % 3 else b"x%d\n" % i)

    run(body(), timeout=90)


def test_stdin_at_the_commands_pace_loses_nothing(api_daemon):
    """5 MiB of stdin to a command that reads slowly: the attach holds at most the
    agent's window in flight (the client's socket waits), so every byte arrives."""
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "in"})
            r = await api.ok("POST", "/api/sessions/in/spawn", {
                "command": "sh", "args": ["-c", "sleep 1; cat | sha256sum"]})
            import hashlib

            data = bytes(range(256)) * (5 * 4096)
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                for i in range(0, len(data), 512 << 10):
                    await ws.send_bytes(data[i:i + (512 << 10)])
                await ws.send_str('{"type": "stdin_eof"}')
                chunks, texts = await read_attach(ws, timeout=60)
            assert joined(chunks).split()[0].decode() == hashlib.sha256(data).hexdigest()
            assert texts == [{"type": "exit", "exit_code": 0}]

    run(body(), timeout=90)


def test_reattach_after_a_daemon_crash_reports_the_gap_and_keeps_the_seqs(tmp_path):
    """SIGKILL: the rings are gone, but where each execution's seqs stand was saved;
    the same cursor still works: what the dead daemon held is announced as missing,
    everything after it comes once, numbered as before."""
    args = ("--backend", "external", "--http", "127.0.0.1:0", "--heartbeat", "0")
    d = Daemon(tmp_path / "d", *args).start()
    d2 = None
    token = d.call("vhub.register", {"session": "c"})["token"]
    env = dict(os.environ, VHUB_ADDR=f"unix:{d.socket}", VHUB_SESSION="c", VHUB_TOKEN=token,
               PYTHONPATH=os.path.join(ROOT, "guest-agent"))
    agent = subprocess.Popen([PY, "-m", "blink_agent", "serve"], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = 3000
    script = f"i=0; while [ $i -lt {n} ]; do echo line-$i; i=$((i+1)); [ $((i % 100)) = 0 ] && sleep 0.2; done"
    try:
        wait_for(lambda: d.call("vhub.info", {"session": "c"})["agent_connected"], 20, what="the agent")

        async def before():
            async with HttpApi(d) as api:
                r = await api.ok("POST", "/api/sessions/c/spawn", {"command": "sh", "args": ["-c", script]})
                async with api.ws(r["attach_url"] + "?seq=1") as ws:
                    chunks, _ = await read_attach(ws, until=b"line-500\n")
                await asyncio.sleep(2.5)  # the positions are saved every 2 s
                return r, chunks

        r, seen = run(before(), timeout=60)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(20)
        d.stop()
        d2 = Daemon(tmp_path / "d", *args).start()

        async def after():
            async with HttpApi(d2) as api:
                async with api.ws(r["attach_url"] + f"?after={seen[-1][1]}") as ws:
                    return await read_attach(ws, timeout=60)

        rest, texts = run(after(), timeout=90)
        assert texts[-1] == {"type": "exit", "exit_code": 0}, texts
        assert all(t["type"] == "error" and "no longer buffered" in t["message"] for t in texts[:-1]), texts
        assert rest, texts  # it ran across the crash
        seqs = [c[1] for c in rest]
        assert seqs == sorted(set(seqs)) and seqs[0] > seen[-1][1]  # nothing twice, nothing before the cursor
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # whole from where it resumes
        lines = [int(x.split(b"-")[1]) for x in (joined(seen) + joined(rest)).split(b"\n") if x]
        assert lines == sorted(set(lines)) and lines[-1] == n - 1  # in order, none twice, to the end
        if len(texts) == 1:
            assert lines == list(range(n))  # no gap announced: none there
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        if d2 is not None:
            d2.stop()
        d.stop()


def test_a_silent_websocket_does_not_hold_a_restart_up(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0")

    async def body():
        async with HttpApi(d) as api:
            await api.ok("POST", "/api/sessions", {"name": "s"})
            r = await api.ok("POST", "/api/sessions/s/spawn", {"command": "sleep", "args": ["60"]})
            sockets = [await api.ws(r["attach_url"], autoclose=False, autoping=False) for _ in range(5)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            d.proc.send_signal(signal.SIGTERM)  # the clients never answer the close
            code = await loop.run_in_executor(None, d.proc.wait, 30)
            assert code == 0 and loop.time() - t0 < 15
            for ws in sockets:
                await ws.close()

    run(body(), timeout=60)
