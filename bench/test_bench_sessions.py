"""Sessions end to end, with the ``local`` backend (the agent is a host process):

- host -> guest: a host client calls ``agent.run`` of ``true`` through the
  daemon; latency from the call to the command's ``execution_result`` event
  (p50/p99), beside ``agent.ping`` (the relay round trip alone) and a
  fork/exec of ``true`` in the benchmark process (the floor).
- boot on demand: a client handshake with ``boot: true`` for a session that
  has no agent, until the daemon answers it (the agent started and
  connected); each session is stopped before the next boot. Beside the time
  to start the agent's Python interpreter and import it (the floor).

Correctness only: every run must exit 0 and report its result, every boot
must end with the session ready.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import uvloop
from _harness import QUICK, ROOT, Daemon, percentile

from vhubd.client import Client, Event

H2G_N = 30 if QUICK else 200
BOOT_N = 8 if QUICK else 50
BOOT_REF = "reference: start the agent's Python and import it (no daemon)"
H2G_REF = "reference: fork/exec `true` in the bench process"


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def local_daemon(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vl"))
    daemon = Daemon(d, {}, "--backend", "local", "--state-dir", os.path.join(d, "state")).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def _stats(lat_ns: list) -> dict:
    s = sorted(lat_ns)
    return {"n": len(s), "p50_us": percentile(s, 50) / 1e3, "p99_us": percentile(s, 99) / 1e3,
            "max_us": s[-1] / 1e3}


def test_host_to_guest_run(benchmark, record, local_daemon, loop):
    c = loop.run_until_complete(Client.connect(local_daemon.control, session="h2g", subscribe=["events"],
                                               boot=True, timeout=60))
    to_result: list = []
    to_reply: list = []

    async def one():
        t0 = time.perf_counter_ns()
        res = await c.call("agent.run", {"argv": ["true"]}, timeout=30)
        t1 = time.perf_counter_ns()
        eid = res["execution_id"]
        while True:
            item = await c.next(timeout=30)
            assert item is not None, f"connection closed: {c.closed_reason}"
            if (isinstance(item, Event) and item.data.get("type") == "execution_result"
                    and item.data.get("execution_id") == eid):
                break
        t2 = time.perf_counter_ns()
        assert item.data.get("exit_code") == 0, item.data
        to_reply.append(t1 - t0)
        to_result.append(t2 - t0)

    benchmark.group = "host->guest"
    try:
        benchmark.pedantic(lambda: loop.run_until_complete(one()), rounds=H2G_N, iterations=1, warmup_rounds=3)
    finally:
        loop.run_until_complete(c.close())
    assert len(to_result) >= H2G_N
    to_result, to_reply = to_result[-H2G_N:], to_reply[-H2G_N:]
    record(benchmark, "h2g", op="agent.run `true` → its execution_result event", **_stats(to_result))
    record(benchmark, "h2g", secondary=True, op="agent.run `true` → the call's reply (spawned)",
           **_stats(to_reply))


def test_host_to_guest_ping(benchmark, record, local_daemon, loop):
    c = loop.run_until_complete(Client.connect(local_daemon.control, session="h2g", boot=True, timeout=60))
    lat: list = []

    async def one():
        t0 = time.perf_counter_ns()
        res = await c.call("agent.ping", {}, timeout=30)
        lat.append(time.perf_counter_ns() - t0)
        assert res == {"pong": True}, res

    benchmark.group = "host->guest"
    try:
        benchmark.pedantic(lambda: loop.run_until_complete(one()), rounds=H2G_N * 5, iterations=1,
                           warmup_rounds=10)
    finally:
        loop.run_until_complete(c.close())
    record(benchmark, "h2g", op="agent.ping round trip (relay + agent, no process)", **_stats(lat[-H2G_N * 5:]))


def test_host_to_guest_reference(benchmark, record):
    lat: list = []

    def one():
        t0 = time.perf_counter_ns()
        p = subprocess.run(["true"], stdin=subprocess.DEVNULL, capture_output=True)
        lat.append(time.perf_counter_ns() - t0)
        assert p.returncode == 0

    benchmark.group = "host->guest"
    benchmark.pedantic(one, rounds=H2G_N, iterations=1, warmup_rounds=3)
    record(benchmark, "h2g", op=H2G_REF, **_stats(lat[-H2G_N:]))


def test_boot_on_demand(benchmark, record, local_daemon, loop):
    lat: list = []
    state = {"i": 0, "client": None, "name": None}
    tag = os.getpid()

    async def stop_previous():
        c, name = state["client"], state["name"]
        if c is not None:
            res = await c.stop(name)
            assert res.get("state") == "stopped", res
            await c.close()
            state["client"] = None

    def setup():
        loop.run_until_complete(stop_previous())
        state["i"] += 1
        state["name"] = f"boot-{tag}-{state['i']}"
        return (), {}

    def run():
        t0 = time.perf_counter_ns()
        c = loop.run_until_complete(Client.connect(local_daemon.control, session=state["name"], boot=True,
                                                   timeout=60))
        lat.append(time.perf_counter_ns() - t0)
        state["client"] = c
        info = c.hello.get("session") or {}
        assert info.get("agent_connected") is True or info.get("state") == "ready", c.hello

    benchmark.group = "boot"
    try:
        benchmark.pedantic(run, setup=setup, rounds=BOOT_N, iterations=1, warmup_rounds=1)
    finally:
        loop.run_until_complete(stop_previous())
    s = _stats(lat[-BOOT_N:])
    record(benchmark, "boot", op="boot on demand: client handshake with boot → answered (agent connected)",
           n=s["n"], p50_ms=s["p50_us"] / 1e3, p99_ms=s["p99_us"] / 1e3, max_ms=s["max_us"] / 1e3)


def test_boot_reference(benchmark, record):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "guest-agent"))
    lat: list = []

    def one():
        t0 = time.perf_counter_ns()
        subprocess.run([sys.executable, "-c", "import blink_agent.cli, blink_agent.hub, blink_agent.runner"],
                       env=env, check=True)
        lat.append(time.perf_counter_ns() - t0)

    benchmark.group = "boot"
    benchmark.pedantic(one, rounds=max(5, BOOT_N // 2), iterations=1, warmup_rounds=1)
    s = _stats(lat)
    record(benchmark, "boot", op=BOOT_REF,
           n=s["n"], p50_ms=s["p50_us"] / 1e3, p99_ms=s["p99_us"] / 1e3, max_ms=s["max_us"] / 1e3)


# --- the event loop while a client lists 10,000 sessions ---------------------------------

LIST_SESSIONS = 2_000 if QUICK else 10_000
LIST_PINGS = 100 if QUICK else 500


def test_sessions_listing_keeps_the_loop_responsive(benchmark, record, tmp_path_factory, loop):
    """``vhub.sessions`` at the session cap: one client pages through every
    session over and over while another pings the daemon; the pings' latency
    beside the same pings on an idle daemon (the listing is paged, 1,000 a call,
    so no call holds the loop long)."""
    d = str(tmp_path_factory.mktemp("vs"))
    daemon = Daemon(d, {}, "--max-sessions", str(LIST_SESSIONS), "--backend", "external").start()
    try:
        async def setup():
            admin = await Client.connect(daemon.control)
            calls = [admin.call("vhub.register", {"session": f"s{i:05d}"}) for i in range(LIST_SESSIONS - 1)]
            for i in range(0, len(calls), 500):
                await asyncio.gather(*calls[i:i + 500])
            return admin, await Client.connect(daemon.control)

        async def pings(c, n):
            lat = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                await c.call("vhub.ping")
                lat.append(time.perf_counter_ns() - t0)
            return lat

        async def during(pinger):
            # the lister is a process of its own: its decoding must not slow the pings we time
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", LISTER, daemon.control, str(LIST_SESSIONS), stdout=asyncio.subprocess.PIPE,
                cwd=ROOT)
            await asyncio.sleep(0.3)
            lat = await pings(pinger, LIST_PINGS)
            proc.terminate()
            out, _ = await proc.communicate()
            return lat, [float(x) for x in out.split()]

        lister, pinger = loop.run_until_complete(setup())
        idle = loop.run_until_complete(pings(pinger, LIST_PINGS))
        busy, listed = benchmark.pedantic(lambda: loop.run_until_complete(during(pinger)), rounds=1, iterations=1)
        assert listed, "the lister listed nothing"
        loop.run_until_complete(lister.close())
        loop.run_until_complete(pinger.close())
    finally:
        assert daemon.stop() == 0, daemon.log()
    full = sorted(listed)
    record(benchmark, "sessions_listing", case="vhub.ping while another process lists every session",
           sessions=LIST_SESSIONS, **_stats(busy), listings=len(listed),
           listing_ms_p50=round(percentile(full, 50) * 1000, 1))
    record(None, "sessions_listing", case="reference: vhub.ping on the idle daemon", sessions=LIST_SESSIONS,
           **_stats(idle))


LISTER = """
import asyncio, signal, sys, time
from vhubd.client import Client
async def main():
    c = await Client.connect(sys.argv[1])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        t0 = time.perf_counter()
        got = await c.sessions()
        assert len(got) == int(sys.argv[2]), len(got)
        print(time.perf_counter() - t0, flush=True)
asyncio.run(main())
"""
