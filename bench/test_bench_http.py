"""The HTTP API (``blink serve --http``), local backend, beside BLIN in the same run:

- keystroke echo on a terminal: a key sent on the WebSocket attach until its echo
  comes back from the remote pty (p50/p99), beside the same through ``blink run -t``
  (the CLI on a local pty, raw mode: what a user types into);
- pipe-mode output MB/s of one command writing 32 MiB (8 MiB quick) of text:
  through ``POST /runs`` with ``Accept: application/x-ndjson``, through a
  WebSocket attach of a spawned execution, and through a BLIN client
  (``vhubd.client``, ``agent.run`` + Stdout frames), the reference.

Correctness only: every key echoes, every byte arrives (counted), every run exits 0.
"""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time

import pytest
import uvloop
from _harness import QUICK, Daemon, percentile

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")

from vhubd.client import Client, Event, Output  # noqa: E402

KEYS = 50 if QUICK else 300
OUT_BYTES = (8 if QUICK else 32) << 20
LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz\n"
PRODUCE = f"yes {LINE[:-1].decode()} | head -c {OUT_BYTES}"


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vh"))
    daemon = Daemon(d, {}, "--backend", "local", "--state-dir", os.path.join(d, "state"), "--http", "127.0.0.1:0",
                    "--http-buffer", "4M").start()
    with open(os.path.join(d, "state", "http-token")) as f:
        daemon.token = f.read().strip()
    daemon.base = f"http://{daemon.listeners['http']}"
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def _stats(lat_ns: list) -> dict:
    s = sorted(lat_ns)
    return {"n": len(s), "p50_ms": round(percentile(s, 50) / 1e6, 3), "p99_ms": round(percentile(s, 99) / 1e6, 3)}


def _session(d, loop, name: str) -> None:
    async def open_():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {d.token}"}) as s:
            async with s.post(d.base + "/api/sessions", json={"name": name}) as r:
                assert r.status == 200, await r.text()

    loop.run_until_complete(open_())


def test_keystroke_echo_websocket(benchmark, record, http_daemon, loop):
    d = http_daemon
    _session(d, loop, "keys")
    lat: list = []

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {d.token}"}) as s:
            async with s.post(d.base + "/api/sessions/keys/spawn", json={
                    "command": "sh", "args": ["-c", "echo READY; exec cat"], "tty": True}) as r:
                spawned = await r.json()
            async with s.ws_connect(d.base + spawned["attach_url"] + "?seq=1") as ws:
                got = b""
                while b"READY" not in got:
                    got += (await ws.receive(timeout=20)).data[9:]
                for i in range(KEYS + 5):
                    key = b"abcdefghij"[i % 10:i % 10 + 1]
                    t0 = time.perf_counter_ns()
                    await ws.send_bytes(key)
                    seen = b""
                    while key not in seen:
                        seen += (await ws.receive(timeout=10)).data[9:]
                    if i >= 5:
                        lat.append(time.perf_counter_ns() - t0)
                await ws.send_bytes(b"\r\x04")
                while True:
                    msg = await ws.receive(timeout=20)
                    if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "exit":
                        break

    benchmark.group = "http keystroke echo"
    benchmark.pedantic(lambda: loop.run_until_complete(main()), rounds=1, iterations=1)
    record(benchmark, "http_echo", path="WebSocket attach (HTTP API)", **_stats(lat))


def test_keystroke_echo_blink_run_t(benchmark, record, http_daemon):
    d = http_daemon
    lat: list = []

    def main():
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(sys.executable, [sys.executable, "-m", "vhubd", "run", "-t", "--control", d.control, "keys2",
                                      "--", "sh", "-c", "echo READY; exec cat"])
        try:
            buf = b""
            deadline = time.monotonic() + 60
            while b"READY" not in buf and time.monotonic() < deadline:
                r, _, _ = select.select([fd], [], [], 1)
                if r:
                    buf += os.read(fd, 65536)
            assert b"READY" in buf, buf
            for i in range(KEYS + 5):
                key = b"abcdefghij"[i % 10:i % 10 + 1]
                t0 = time.perf_counter_ns()
                os.write(fd, key)
                seen = b""
                while key not in seen:
                    r, _, _ = select.select([fd], [], [], 10)
                    assert r, "no echo"
                    seen += os.read(fd, 65536)
                if i >= 5:
                    lat.append(time.perf_counter_ns() - t0)
            os.write(fd, b"\r\x04")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(fd)

    benchmark.group = "http keystroke echo"
    benchmark.pedantic(main, rounds=1, iterations=1)
    record(benchmark, "http_echo", path="reference: blink run -t (BLIN client on a local pty)", **_stats(lat))


def _pipe_row(record, benchmark, path: str, nbytes: int, seconds: float) -> None:
    assert nbytes == OUT_BYTES, (path, nbytes)
    record(benchmark, "http_pipe", path=path, mib=OUT_BYTES >> 20, mbps=round(nbytes / seconds / 1e6, 1))


def test_pipe_output_blin_client(benchmark, record, http_daemon, loop):
    d = http_daemon
    box: dict = {}

    async def main():
        c = await Client.connect(d.control, session="pipe", boot=True, subscribe=["stdout", "events"], timeout=60)
        try:
            t0 = time.perf_counter()
            res = await c.call("agent.run", {"argv": ["sh", "-c", PRODUCE]})
            n = 0
            async for item in c:
                if type(item) is Output and item.request_id == res["execution_id"]:
                    n += len(item.data)
                elif type(item) is Event and item.data.get("type") == "execution_result" \
                        and item.data.get("execution_id") == res["execution_id"]:
                    assert item.data["exit_code"] == 0
                    break
            box.update(n=n, s=time.perf_counter() - t0)
        finally:
            await c.close()

    benchmark.group = "http pipe output"
    benchmark.pedantic(lambda: loop.run_until_complete(main()), rounds=1, iterations=1)
    _pipe_row(record, benchmark, "reference: BLIN client (vhubd.client agent.run)", box["n"], box["s"])


def test_pipe_output_ndjson(benchmark, record, http_daemon, loop):
    d = http_daemon
    _session(d, loop, "pipe")
    box: dict = {}

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {d.token}"}) as s:
            t0 = time.perf_counter()
            n = 0
            async with s.post(d.base + "/api/sessions/pipe/runs", json={"command": "sh", "args": ["-c", PRODUCE]},
                              headers={"Accept": "application/x-ndjson"}) as r:
                async for line in r.content:
                    ev = json.loads(line)
                    if ev["event"] == "stdout":
                        n += len(ev["data"])
                    elif ev["event"] == "execution_result":
                        assert ev["exit_code"] == 0
            box.update(n=n, s=time.perf_counter() - t0)

    benchmark.group = "http pipe output"
    benchmark.pedantic(lambda: loop.run_until_complete(main()), rounds=1, iterations=1)
    _pipe_row(record, benchmark, "POST /runs, Accept: application/x-ndjson", box["n"], box["s"])


def test_pipe_output_websocket(benchmark, record, http_daemon, loop):
    d = http_daemon
    _session(d, loop, "pipe")
    box: dict = {}

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {d.token}"}) as s:
            t0 = time.perf_counter()
            async with s.post(d.base + "/api/sessions/pipe/spawn", json={"command": "sh", "args": ["-c", PRODUCE]}) as r:
                spawned = await r.json()
            n = 0
            async with s.ws_connect(d.base + spawned["attach_url"] + "?seq=1", max_msg_size=0) as ws:
                while True:
                    msg = await ws.receive(timeout=60)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        n += len(msg.data) - 9
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        ev = json.loads(msg.data)
                        assert ev == {"type": "exit", "exit_code": 0}, ev
                    else:
                        break
            box.update(n=n, s=time.perf_counter() - t0)

    benchmark.group = "http pipe output"
    benchmark.pedantic(lambda: loop.run_until_complete(main()), rounds=1, iterations=1)
    _pipe_row(record, benchmark, "spawn + WebSocket attach (seq framing)", box["n"], box["s"])


def test_zz_ratios(record):
    """The same-run ratios (HTTP ÷ BLIN)."""
    from conftest import ROWS

    echo = {r["path"]: r for r in ROWS if r["kind"] == "http_echo"}
    pipe = {r["path"]: r for r in ROWS if r["kind"] == "http_pipe"}
    ref_e = next((r for p, r in echo.items() if p.startswith("reference")), None)
    ref_p = next((r for p, r in pipe.items() if p.startswith("reference")), None)
    for p, r in echo.items():
        if ref_e and r is not ref_e:
            record(None, "http_ratio", what=f"keystroke echo p50: {p} ÷ blink run -t",
                   ratio=round(r["p50_ms"] / ref_e["p50_ms"], 2))
    for p, r in pipe.items():
        if ref_p and r is not ref_p:
            record(None, "http_ratio", what=f"output MB/s: {p} ÷ BLIN client", ratio=round(r["mbps"] / ref_p["mbps"], 2))
    sys.stderr.write("\n" + "\n".join(f"{r}" for r in ROWS if r["kind"].startswith("http")) + "\n")
