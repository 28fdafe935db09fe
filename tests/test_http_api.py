"""The HTTP API (``blink serve --http``) against a real daemon on the local
backend, through aiohttp's client: every REST endpoint with good bodies, bad
bodies and unknown sessions; the token; origins; bounds; a boot that fails."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")

from harness import ROOT, run, wait_until  # noqa: E402
from harness.http import HttpApi, joined, read_attach  # noqa: E402

PY = sys.executable


def test_health_product_and_the_token(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            health = await api.ok("GET", "/api/health")
            assert health["event"] == "health" and health["status"] == "ok"
            product = await api.ok("GET", "/api/product")
            assert product["event"] == "product" and product["features"]["attach_seq"] is True
            assert product["features"]["reattach_after_restart"] is True and product["backend"] == "local"
        for token in ("", "wrong", api.token + "x"):
            async with HttpApi(api_daemon, token=token) as bad:
                for method, path in (("GET", "/api/health"), ("GET", "/api/sessions"),
                                     ("POST", "/api/sessions"), ("DELETE", "/api/sessions/x")):
                    status, data = await bad.req(method, path, {"name": "x"})
                    assert status == 401, (method, path, status, data)
                    assert "token" in data["error"]
        async with aiohttp.ClientSession() as s:  # no Authorization header at all
            async with s.get(api.base + "/api/sessions") as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            async with s.get(api.base + "/api/health?token=" + api.token) as r:
                assert r.status == 401  # ?token= is for WebSocket upgrades only
            async with s.get(api.base + "/") as r:  # the page itself holds no secret
                assert r.status == 200 and "xterm" in await r.text()
        assert api_daemon.call("vhub.sessions") and True  # the daemon is fine

    run(body())
    st = os.stat(os.path.join(api_daemon.dir, "state", "http-token"))
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_sessions_open_info_list_stop_remove(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            opened = await api.ok("POST", "/api/sessions", {"name": "web1", "warm": True})
            assert opened["event"] == "session_opened" and opened["session"] == "web1"
            assert opened["booted"] is True and opened["info"]["state"] == "ready"
            again = await api.ok("POST", "/api/sessions", {"name": "web1"})
            assert again["booted"] is False  # already running: nothing booted
            listed = await api.ok("GET", "/api/sessions")
            assert listed["event"] == "session_list"
            assert [s["state"] for s in listed["sessions"] if s["name"] == "web1"] == ["ready"]
            info = await api.ok("GET", "/api/sessions/web1")
            assert info["event"] == "session_info" and info["session"] == "web1" and info["agent_connected"]
            stopped = await api.ok("POST", "/api/sessions/web1/stop")
            assert stopped == {"event": "session_stopped", "session": "web1", "state": "stopped"}
            removed = await api.ok("DELETE", "/api/sessions/web1")
            assert removed == {"event": "session_removed", "session": "web1"}
            for method, path in (("GET", "/api/sessions/web1"), ("POST", "/api/sessions/web1/stop"),
                                 ("DELETE", "/api/sessions/web1"), ("POST", "/api/sessions/nope/runs"),
                                 ("POST", "/api/sessions/nope/spawn"),
                                 ("GET", "/api/sessions/nope/executions/1/attach")):
                status, data = await api.req(method, path, {"command": "true"})
                assert status == 404, (method, path, status, data)
                assert "nope" in data["error"] or "web1" in data["error"]
            status, data = await api.req("GET", "/api/nothing-here")
            assert status == 404 and "GET /api/nothing-here" in data["error"]
            status, data = await api.req("PUT", "/api/sessions")
            assert status == 405 and "PUT" in data["error"]
            names = [s["name"] for s in (await api.ok("GET", "/api/sessions"))["sessions"]]
            assert "nope" not in names and "web1" not in names  # nothing was created by a 404

    run(body(), timeout=60)


BAD_OPEN = [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 400, "name"),
    (b'{"name": "Bad Name!"}', 400, "name"),
    (b'{"name": "' + b"a" * 5000 + b'"}', 400, "name"),
    (b'{"name": "x1", "warm": "yes"}', 400, "warm"),
    (b'{"name": "x1", "resources": {"cpus": "many"}}', 400, "cpus"),
    (b'{"name": "x1", "resources": {"disk": 5}}', 400, "resources"),
    (b'{"name": "x1", "image": 7}', 400, "image"),
]


@pytest.mark.parametrize("raw,status,word", BAD_OPEN, ids=[b[2] + str(i) for i, b in enumerate(BAD_OPEN)])
def test_bad_bodies_get_clear_errors(api_daemon, raw, status, word):
    async def body():
        async with HttpApi(api_daemon) as api:
            got, data = await api.req("POST", "/api/sessions", raw=raw, headers={"Content-Type": "application/json"})
            assert got == status, data
            assert word.lower() in data["error"].lower() and len(data["error"]) < 500
            assert data["error"][0] not in "'\"", data  # plain text, not a repr
            await api.ok("GET", "/api/health")

    run(body())


def test_runs_pipe_mode(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "r"})
            res = await api.ok("POST", "/api/sessions/r/runs",
                               {"command": "sh", "args": ["-c", "echo out; echo err >&2; exit 3"]})
            assert res["event"] == "execution_result"
            assert (res["stdout"], res["stderr"], res["exit_code"]) == ("out\n", "err\n", 3)
            res = await api.ok("POST", "/api/sessions/r/runs",
                               {"command": "sh", "args": ["-c", 'cat; echo "$V"; pwd'], "stdin": "in\n",
                                "env": {"V": "vee"}, "working_dir": "/tmp"})
            assert res["stdout"] == "in\nvee\n/tmp\n" and res["exit_code"] == 0
            res = await api.ok("POST", "/api/sessions/r/runs", {"command": "sh", "args": ["-c", "kill -9 $$"]})
            assert res["exit_code"] == 137
            res = await api.ok("POST", "/api/sessions/r/runs",
                               {"command": "sleep", "args": ["30"], "timeout": 0.5})
            assert res["exit_code"] == 137  # killed at its timeout
            status, data = await api.req("POST", "/api/sessions/r/runs", {"command": "no-such-program-x"})
            assert status == 422 and "no-such-program-x" in data["error"]
            for bad, word in (({}, "command"), ({"command": ""}, "command"), ({"command": 5}, "command"),
                              ({"command": "true", "args": "x"}, "args"), ({"command": "true", "args": [1]}, "args"),
                              ({"command": "true", "env": {"A": 1}}, "env"),
                              ({"command": "true", "working_dir": 3}, "working_dir"),
                              ({"command": "true", "stdin": 3}, "stdin"),
                              ({"command": "true", "timeout": -1}, "timeout"),
                              ({"command": "true", "timeout": "1"}, "timeout")):
                status, data = await api.req("POST", "/api/sessions/r/runs", bad)
                assert status == 400 and word in data["error"], (bad, status, data)
            # Blink's {script}: a host file copied into the guest (over a channel) and run
            d = api_daemon.dir
            with open(os.path.join(d, "s.sh"), "w") as f:
                f.write("#!/bin/sh\necho \"script $0 says $1\"\nexit 4\n")
            os.chmod(os.path.join(d, "s.sh"), 0o755)
            ran = await api.ok("POST", "/api/sessions/r/runs", {"script": os.path.join(d, "s.sh"), "args": ["hi"]})
            assert ran["exit_code"] == 4 and ran["stdout"].startswith("script /tmp/blink-script-"), ran
            assert ran["stdout"].endswith(" says hi\n"), ran
            with open(os.path.join(d, "plain.sh"), "w") as f:  # not executable: run with /bin/sh
                f.write("echo plain $1\n")
            ran = await api.ok("POST", "/api/sessions/r/runs", {"script": os.path.join(d, "plain.sh"), "args": ["x"]})
            assert (ran["exit_code"], ran["stdout"]) == (0, "plain x\n"), ran
            for bad, want in (({"script": "rel.sh"}, 400), ({"script": 5}, 400), ({"script": d}, 400),
                              ({"script": os.path.join(d, "missing.sh")}, 400)):
                status, data = await api.req("POST", "/api/sessions/r/runs", bad)
                assert status == want and "script" in data["error"], (bad, status, data)

    run(body(), timeout=60)


def test_runs_ndjson_streams_as_produced(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "nd"})
            script = "echo first; echo oops >&2; i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done"
            lines = []
            assert api.session is not None
            async with api.session.post(api.base + "/api/sessions/nd/runs", json={"command": "sh",
                                        "args": ["-c", script]}, headers={"Accept": "application/x-ndjson"}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
                async for raw in r.content:
                    lines.append(json.loads(raw))
            assert lines[-1]["event"] == "execution_result" and lines[-1]["exit_code"] == 0
            out = "".join(x["data"] for x in lines if x["event"] == "stdout")
            err = "".join(x["data"] for x in lines if x["event"] == "stderr")
            assert out == "first\n" + "".join(f"line {i}\n" for i in range(2000))
            assert err == "oops\n"
            assert "stdout" not in lines[-1]  # the output came as it was produced, not again at the end

    run(body(), timeout=60)


def test_a_boot_that_fails_is_503_with_the_backends_words(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--boot-timeout", "20",
                    "--agent-command", "sh -c 'echo the agent cannot start here >&2; exit 1'")

    async def body():
        async with HttpApi(d) as api:
            status, data = await api.req("POST", "/api/sessions", {"name": "broken"})
            assert status == 503, data
            assert data["error"].startswith("boot_failed: ") and "exited with code 1" in data["error"], data
            assert "the agent cannot start here" in data["error"]  # the backend's words
            await api.ok("GET", "/api/health")

    run(body(), timeout=60)


def test_cross_origin_is_refused_unless_configured(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--http-origin", "https://console.example")

    async def body():
        async with HttpApi(d) as api:
            status, data = await api.req("GET", "/api/sessions", headers={"Origin": "https://evil.example"})
            assert status == 403 and "cross-origin" in data["error"]
            status, data = await api.req("GET", "/api/sessions", headers={"Origin": api.base})
            assert status == 200  # the page's own origin
            assert api.session is not None
            async with api.session.get(api.base + "/api/sessions", headers={"Origin": "https://console.example"}) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://console.example"
            async with api.session.options(api.base + "/api/sessions", headers={
                    "Origin": "https://console.example", "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204 and "Authorization" in r.headers["Access-Control-Allow-Headers"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                async with api.ws("/api/sessions/x/executions/1/attach", headers={"Origin": "https://evil.example"}):
                    pass
            assert exc.value.status == 403

    run(body())


def test_bounds_body_size_and_connections(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--http-max-body", "4k",
                    "--http-max-connections", "2", "--http-max-executions", "2")

    async def body():
        async with HttpApi(d) as api:
            status, data = await api.req("POST", "/api/sessions", raw=b'{"name": "' + b"a" * 10000 + b'"}',
                                         headers={"Content-Type": "application/json"})
            assert status == 413 and "large" in data["error"]
            await api.ok("POST", "/api/sessions", {"name": "b"})
            ids = []
            for _ in range(2):
                r = await api.ok("POST", "/api/sessions/b/spawn", {"command": "sleep", "args": ["30"]})
                ids.append(r["execution_id"])
            status, data = await api.req("POST", "/api/sessions/b/spawn", {"command": "true"})
            assert status == 429 and "at most 2" in data["error"]
            async with api.ws(f"/api/sessions/b/executions/{ids[0]}/attach") as w1:
                async with api.ws(f"/api/sessions/b/executions/{ids[1]}/attach"):
                    status, data = await api.req("GET", "/api/health")
                    assert status == 503 and "too many" in data["error"]
                await w1.send_str('{"type": "signal", "signal": 9}')
                chunks, texts = await read_attach(w1)
                assert texts[-1] == {"type": "exit", "exit_code": 137}
            await api.ok("GET", "/api/health")
            # a WebSocket message over the bound closes that socket, and nothing else
            async with api.ws(f"/api/sessions/b/executions/{ids[1]}/attach") as w2:
                await w2.send_bytes(b"x" * 8192)
                msg = await w2.receive(timeout=10)
                while msg.type == aiohttp.WSMsgType.BINARY:
                    msg = await w2.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            await api.ok("GET", "/api/health")

    run(body(), timeout=60)


def test_http_token_command_and_a_unix_socket(make_daemon, tmp_path):
    sock = str(tmp_path / "api.sock")
    d = make_daemon("--backend", "local", "--http", f"unix:{sock}")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # its file mode is the guard

    async def body():
        conn = aiohttp.UnixConnector(path=sock)
        async with aiohttp.ClientSession(connector=conn) as s:  # no token on a Unix socket
            async with s.get("http://api/api/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"

    run(body())
    state = os.path.join(d.dir, "state")
    r = subprocess.run([PY, "-m", "vhubd", "http-token", "--state-dir", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "no token" in r.stderr and r.stderr.count("\n") == 1
    d2 = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--state-dir", state)
    with open(os.path.join(state, "http-token")) as f:
        token = f.read().strip()
    r = subprocess.run([PY, "-m", "vhubd", "http-token", "--state-dir", state], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout == token + "\n"
    r = subprocess.run([PY, "-m", "vhubd", "http-token", "--state-dir", state, "--url", d2.listeners["http"]],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout == f"http://{d2.listeners['http']}/#token={token}\n"


@pytest.mark.parametrize("args,word", [
    (["--http", "0.0.0.0:8787"], "not a loopback address"),
    (["--http", "8.8.8.8:80"], "--http-public"),
    (["--http", "nonsense"], "HOST:PORT"),
    (["--http", "unix:/nonexistent-dir/x.sock"], "no such directory"),
    (["--http", "127.0.0.1:0", "--http-buffer", "0"], "--http-buffer"),
    (["--http", "127.0.0.1:0", "--once"], "--once"),
    (["--http", "127.0.0.1:\u00b2"], "HOST:PORT"),
])
def test_serve_refuses_bad_http_settings(tmp_path, args, word):
    r = subprocess.run([PY, "-m", "vhubd", "serve", "--socket", str(tmp_path / "g.sock"), "--control",
                        str(tmp_path / "c.sock"), "--state-dir", str(tmp_path / "st"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and word in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_http_in_the_config_file(make_daemon, tmp_path):
    conf = tmp_path / "vhubd.toml"
    conf.write_text('http = "127.0.0.1:0"\nhttp-linger = 5\nbackend = "local"\n')
    d = make_daemon("--config", str(conf))

    async def body():
        async with HttpApi(d) as api:
            product = await api.ok("GET", "/api/product")
            assert product["limits"]["attach_linger_secs"] == 5

    run(body())


def test_spawn_output_is_kept_without_an_attach(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "k"})
            r = await api.ok("POST", "/api/sessions/k/spawn",
                             {"command": "sh", "args": ["-c", "echo one; echo two >&2; exit 4"]})
            assert r["event"] == "exec_spawned" and r["tty"] is False
            assert r["attach_url"] == f"/api/sessions/k/executions/{r['execution_id']}/attach"
            async with api.ws(r["attach_url"] + "?seq=1") as ws:
                chunks, texts = await read_attach(ws)
            assert sorted((c[0], c[2]) for c in chunks) == [(1, b"one\n"), (2, b"two\n")]
            assert [c[1] for c in chunks] == [1, 2]
            assert texts == [{"type": "exit", "exit_code": 4}]
            async with api.ws(r["attach_url"]) as ws:  # legacy framing, again after the exit
                chunks, texts = await read_attach(ws, seq=False)
            assert joined(chunks) in (b"one\ntwo\n", b"two\none\n") and texts[-1]["exit_code"] == 4
            listed = await api.ok("GET", "/api/sessions/k/executions")
            assert [e["exited"] for e in listed["executions"]] == [True]

    run(body(), timeout=60)


def test_warm_sessions_are_exempt_from_idle_stop(make_daemon):
    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--idle-stop", "1")

    async def body():
        async with HttpApi(d) as api:
            await api.ok("POST", "/api/sessions", {"name": "warm1", "warm": True})
            await api.ok("POST", "/api/sessions", {"name": "cold1"})

            async def state(name):
                return (await api.ok("GET", f"/api/sessions/{name}"))["state"]

            await wait_until(lambda: _is(state("cold1"), "stopped"), 30, what="cold1's idle stop")
            assert await state("warm1") == "ready"  # idle as long, and kept booted

    run(body(), timeout=60)


async def _is(coro, value):
    return await coro == value


def test_a_run_whose_client_goes_away_is_stopped(api_daemon):
    async def body():
        from harness import client

        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "gone"})
            assert api.session is not None
            async with api.session.post(api.base + "/api/sessions/gone/runs", json={
                    "command": "sh", "args": ["-c", "echo started; exec sleep 60"]},
                    headers={"Accept": "application/x-ndjson"}) as r:
                first = json.loads(await r.content.readline())
                assert first == {"event": "stdout", "data": "started\n"}
                c = await client(api_daemon, session="gone")
                assert len((await c.call("agent.info"))["executions"]) == 1
            # the response was closed before the end: the command is stopped

            async def none_left():
                return not (await c.call("agent.info"))["executions"]

            await wait_until(none_left, 20, what="the abandoned command to be stopped")
            await api.ok("GET", "/api/health")

    run(body(), timeout=60)


def test_silent_connections_hold_at_most_the_connection_bound(make_daemon):
    import socket

    d = make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--http-max-connections", "3")
    host, port = d.listeners["http"].rsplit(":", 1)

    async def body():
        silent = [socket.create_connection((host, int(port))) for _ in range(3)]  # connect, send nothing
        try:
            async with HttpApi(d) as api:
                status, data = await api.req("GET", "/api/health")
                assert status == 503 and "at most 3" in data["error"]
                extra = [socket.create_connection((host, int(port))) for _ in range(20)]
                for s in extra:  # refused at once: answered and closed, never held
                    s.settimeout(10)
                    assert s.recv(100).startswith(b"HTTP/1.1 503")
                    s.close()
        finally:
            for s in silent:
                s.close()
        async with HttpApi(d) as api:

            async def healthy():
                return (await api.req("GET", "/api/health"))[0] == 200

            await wait_until(healthy, 10, what="the API once the silent connections went")
        assert d.fd_count() < 60

    run(body())
