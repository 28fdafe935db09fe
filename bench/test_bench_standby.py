"""Standby and wake (issue "standby in milliseconds"), local and qemu backends:

- resume: a session in standby gets ``agent.ping`` from a host client; the
  time from the call to the agent's answer includes the wake (SIGCONT, or
  QMP ``cont``) and the relay round trip. Beside the same ping to an awake
  session (the floor) and, for qemu, a cold boot of a session in the same run.
- the host memory a VM holds in standby (QEMU's RSS), and the daemon's.

Correctness only: every ping is answered, every session ends ready.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import uvloop
from _harness import QUICK, ROOT, Daemon, percentile, proc_rss_kib

sys.path.insert(0, os.path.join(ROOT, "tests"))
from qemu_testing import require_guest_image  # noqa: E402

from vhubd.client import Client  # noqa: E402

N = 20 if QUICK else 100
BOOTS = 2 if QUICK else 5


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def _daemon(tmp_path_factory, backend: str) -> Daemon:
    d = str(tmp_path_factory.mktemp(f"sb-{backend}"))
    extra = ["--image", require_guest_image().dir, "--boot-timeout", "120"] if backend == "qemu" else []
    return Daemon(d, {}, "--backend", backend, "--state-dir", os.path.join(d, "state"), *extra).start()


def _ms(lat_ns: list) -> dict:
    s = sorted(lat_ns)
    return {"n": len(s), "p50_ms": round(percentile(s, 50) / 1e6, 3), "p99_ms": round(percentile(s, 99) / 1e6, 3)}


@pytest.mark.parametrize("backend", ["local", "qemu"])
def test_resume_from_standby(benchmark, record, tmp_path_factory, loop, backend):
    d = _daemon(tmp_path_factory, backend)
    woke: list = []
    awake: list = []
    boots: list = []
    try:
        admin = loop.run_until_complete(Client.connect(d.control))
        c = loop.run_until_complete(Client.connect(d.control, session="sb", boot=True, timeout=180))

        async def ping(into: list) -> None:
            t0 = time.perf_counter_ns()
            assert await c.call("agent.ping", {}, timeout=60) == {"pong": True}
            into.append(time.perf_counter_ns() - t0)

        async def one() -> None:
            assert (await admin.standby("sb"))["state"] == "standby"  # untimed
            await ping(woke)  # timed: wakes it
            for _ in range(500):  # the state follows QEMU's answer to cont, which may come after the pong
                if (await admin.info("sb"))["state"] == "ready":
                    break
            else:
                raise AssertionError("the session did not become ready after its wake")
            await ping(awake)

        benchmark.group = f"standby {backend}"
        benchmark.pedantic(lambda: loop.run_until_complete(one()), rounds=N, iterations=1, warmup_rounds=2)
        loop.run_until_complete(admin.standby("sb"))
        vm_kib = None
        if backend == "qemu":
            pidfile = os.path.join(d.dir, "state", "sessions", "sb", "qemu.pid")
            if os.path.exists(pidfile):
                with open(pidfile) as f:
                    vm_kib = proc_rss_kib(int(f.read()))
        daemon_kib = proc_rss_kib(d.pid)
        loop.run_until_complete(admin.wake("sb"))
        if backend == "qemu":  # a cold boot in the same run: what standby saves
            for i in range(BOOTS):
                t0 = time.perf_counter_ns()
                loop.run_until_complete(admin.boot(f"cold{i}"))
                boots.append(time.perf_counter_ns() - t0)
                loop.run_until_complete(admin.stop(f"cold{i}"))
        loop.run_until_complete(c.close())
        loop.run_until_complete(admin.close())
    finally:
        assert d.stop() == 0, d.log()
    record(benchmark, "standby", backend=backend, op="agent.ping to a session in standby (wake included)",
           **_ms(woke[-N:]), vm_rss_mib=vm_kib and round(vm_kib / 1024, 1), daemon_rss_mib=round(daemon_kib / 1024, 1))
    record(benchmark, "standby", secondary=True, backend=backend, op="agent.ping to an awake session",
           **_ms(awake[-N:]))
    if boots:
        record(benchmark, "standby", secondary=True, backend=backend, op="cold boot of a session (same run)",
               **_ms(boots))


def test_restore_vs_cold_boot(benchmark, record, tmp_path_factory, loop):
    """qemu: a session brought back from a disk snapshot (QEMU -incoming from
    the file, the vsock device plugged in, the agent redialled and answering
    ``agent.ping``) beside a cold boot to the same point, in the same run."""
    d = _daemon(tmp_path_factory, "qemu")
    restores: list = []
    colds: list = []
    try:
        admin = loop.run_until_complete(Client.connect(d.control))
        loop.run_until_complete(admin.boot("rs", timeout=180))
        t0 = time.perf_counter_ns()
        snap = loop.run_until_complete(admin.snapshot("rs", "s", stop=True))
        save_ms = (time.perf_counter_ns() - t0) / 1e6

        async def ready_and_ping(name: str) -> None:
            c = await Client.connect(d.control, session=name)
            assert await c.call("agent.ping", {}, timeout=60) == {"pong": True}
            await c.close()

        async def restore() -> None:
            t0 = time.perf_counter_ns()
            await admin.restore("rs", "s")
            await ready_and_ping("rs")
            restores.append(time.perf_counter_ns() - t0)

        async def cold(i: int) -> None:
            t0 = time.perf_counter_ns()
            await admin.boot(f"cold{i}", timeout=180)
            await ready_and_ping(f"cold{i}")
            colds.append(time.perf_counter_ns() - t0)
            await admin.stop(f"cold{i}")

        benchmark.group = "snapshot qemu"
        benchmark.pedantic(lambda: loop.run_until_complete(restore()), rounds=BOOTS, iterations=1, warmup_rounds=0)
        for i in range(BOOTS):
            loop.run_until_complete(cold(i))
        loop.run_until_complete(admin.stop("rs"))
        loop.run_until_complete(admin.close())
    finally:
        assert d.stop() == 0, d.log()
    r, c = _ms(restores), _ms(colds)
    record(benchmark, "snapshot", backend="qemu", op="restore from a disk snapshot to agent.ping answered", **r,
           cold_p50_ms=c["p50_ms"], restore_vs_cold=round(r["p50_ms"] / c["p50_ms"], 3),
           snapshot_mib=round(snap["size_bytes"] / 1048576, 1), save_ms=round(save_ms))
    record(benchmark, "snapshot", secondary=True, backend="qemu", op="cold boot to agent.ping answered (same run)", **c)
