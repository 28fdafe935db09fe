"""Standby: a booted session paused with its memory kept (local backend:
SIGSTOP to the agent's process group; qemu: QMP ``stop``), woken by
``vhub.wake`` or by anything sent to it. Real daemons, real processes, real
QEMU where the guest image is there."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from harness import Daemon, wait_for
from qemu_testing import require_guest_image

from vhubd.client import Client, Event, Output
from vhubd.errors import RemoteError

COUNTER = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo $i; sleep 0.05; done"


def daemon(tmp_path, backend: str, *extra: str) -> Daemon:
    args = ["--backend", backend, "--state-dir", str(tmp_path / "state"), "--heartbeat", "1", *extra]
    if backend == "qemu":
        args += ["--image", require_guest_image().dir, "--boot-timeout", "60"]
    return Daemon(tmp_path / "d", *args).start()


class Counter:
    """The numbers a counting command printed, as they arrive."""

    def __init__(self, c: Client, eid: int):
        self.c, self.eid, self.buf, self.seen = c, eid, b"", []

    async def pump(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                item = await self.c.next(timeout=left)
            except TimeoutError:
                return
            if isinstance(item, Output) and item.request_id == self.eid:
                *lines, self.buf = (self.buf + item.data).split(b"\n")
                self.seen += [int(x) for x in lines]

    async def until(self, n: int, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.seen) < n and loop.time() < end:
            await self.pump(0.2)
        assert len(self.seen) >= n, self.seen[-5:]


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("State:"))


async def _eventually(pred, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def state(admin: Client, name: str) -> str:
    return (await admin.info(name))["state"]


async def standby_cycle(d: Daemon, backend: str) -> dict:
    admin = await Client.connect(d.control)
    c = await Client.connect(d.control, session="sb", subscribe=["stdout"], boot=True, timeout=90)
    agent_pid = (await c.call("agent.info"))["pid"]
    eid = (await c.call("agent.run", {"argv": ["sh", "-c", COUNTER]}))["execution_id"]
    count = Counter(c, eid)
    await count.until(5)
    res = await admin.standby("sb")
    assert res["state"] == "standby", res
    if backend == "local":  # stopped, not dead (SIGSTOP lands as soon as the kernel schedules it)
        assert await _eventually(lambda: _proc_state(agent_pid) == "T"), _proc_state(agent_pid)
    await count.pump(1.0)  # what was on its way before the pause arrives (none is lost)...
    before = len(count.seen)
    await count.pump(4.0)  # ...then nothing: it is paused, past the heartbeats' dead time (3 s)
    assert len(count.seen) == before, count.seen[before:]
    assert await state(admin, "sb") == "standby"  # no agent_lost: heartbeats wait while it sleeps
    woke = await admin.wake("sb")
    assert woke["woken"] and woke["state"] == "ready", woke
    await count.until(before + 5)
    # the same process, continuing: every number once, in order, no restart
    assert count.seen == list(range(1, len(count.seen) + 1)), count.seen[before - 3:before + 3]
    # anything sent to a session in standby wakes it; the caller waits only for the resume
    await admin.standby("sb")
    assert (await c.call("agent.ping", timeout=30)) is not None
    for _ in range(500):  # ready once the backend confirmed the resume (QEMU's answer may follow the pong)
        if await state(admin, "sb") == "ready":
            break
    assert await state(admin, "sb") == "ready"
    n = len(count.seen)
    await count.until(n + 3)
    assert count.seen == list(range(1, len(count.seen) + 1))
    await c.close()
    await admin.close()
    return {"agent_pid": agent_pid}


@pytest.mark.parametrize("backend", ["local", pytest.param("qemu", marks=pytest.mark.slow)])
def test_standby_keeps_the_session_and_anything_sent_wakes_it(tmp_path, backend):
    d = daemon(tmp_path, backend)
    try:
        asyncio.run(asyncio.wait_for(standby_cycle(d, backend), 240))
        assert "agent_lost" not in d.log()
    finally:
        d.stop()


async def _cycles(d: Daemon, n: int) -> None:
    admin = await Client.connect(d.control)
    for _ in range(n):
        assert (await admin.standby("sb"))["state"] == "standby"
        assert (await admin.wake("sb"))["state"] == "ready"
    await admin.close()


@pytest.mark.parametrize("backend", ["local", pytest.param("qemu", marks=pytest.mark.slow)])
def test_fifty_standby_cycles_leak_nothing(tmp_path, backend):
    d = daemon(tmp_path, backend)
    try:
        assert d.cli("boot", "sb", timeout=120).returncode == 0
        asyncio.run(_cycles(d, 5))  # warm: whatever is allocated once
        fds, rss = d.fd_count(), d.rss_kib()
        asyncio.run(_cycles(d, 50))
        # the admin connection of the cycles closes as the daemon reads its EOF: a leak would stay
        wait_for(lambda: d.fd_count() <= fds, 10, what=f"the daemon's fds back to {fds}")
        assert d.rss_kib() - rss < 2048, (rss, d.rss_kib())
        r = d.cli("run", "sb", "--", "echo", "alive")
        assert r.returncode == 0 and r.stdout == b"alive\n", r.stderr
    finally:
        d.stop()


def test_standby_policy_then_stop(tmp_path):
    d = daemon(tmp_path, "local", "--standby-after", "0.5", "--stop-after", "1")
    try:
        assert d.cli("boot", "sb", timeout=60).returncode == 0
        wait_for(lambda: json.loads(d.cli("info", "sb", "--json").stdout)["state"] == "standby", 15,
                 what="idle standby")
        wait_for(lambda: json.loads(d.cli("info", "sb", "--json").stdout)["state"] == "stopped", 15,
                 what="stopped after its time in standby")
        assert "idle standby session=sb" in d.log() and "in standby" in d.log()
    finally:
        d.stop()


def test_what_cannot_go_to_standby_says_why(tmp_path):
    d = daemon(tmp_path, "local")
    try:
        for args, code in ((["standby", "nosuch"], "unknown_session"), (["standby", "default"], "bad_state"),
                           (["wake", "nosuch"], "unknown_session")):
            r = d.cli(*args)
            err = r.stderr.decode()
            assert r.returncode == 1 and err.count("\n") == 1 and code in err, (args, err)
        r = d.cli("wake", "default")  # not in standby: nothing to do
        assert r.returncode == 0 and b"not in standby" in r.stdout
    finally:
        d.stop()


@pytest.mark.slow
def test_a_failing_standby_leaves_the_session_as_it_was(tmp_path):
    d = daemon(tmp_path, "qemu")
    try:
        assert d.cli("boot", "sb", timeout=120).returncode == 0
        os.unlink(tmp_path / "state" / "sessions" / "sb" / "qmp.sock")  # QEMU's QMP socket is gone
        r = d.cli("standby", "sb")
        err = r.stderr.decode()
        assert r.returncode == 1 and "standby_failed" in err and "QMP stop" in err and err.count("\n") == 1, err
        info = json.loads(d.cli("info", "sb", "--json").stdout)
        assert info["state"] == "ready" and info["agent_connected"]
        r = d.cli("run", "sb", "--", "echo", "still here")
        assert r.returncode == 0 and r.stdout == b"still here\n"
    finally:
        d.stop()


def test_events_tell_subscribers_about_standby(tmp_path):
    d = daemon(tmp_path, "local")

    async def body():
        admin = await Client.connect(d.control)
        await admin.boot("sb")
        watcher = await Client.connect(d.control, session="sb", subscribe=["events"])
        await admin.standby("sb")
        await admin.wake("sb")
        states = []
        while len(states) < 2:
            item = await watcher.next(timeout=10)
            assert item is not None
            if isinstance(item, Event) and item.data.get("type") == "state":
                states.append((item.data["previous"], item.data["state"]))
        assert states == [("ready", "standby"), ("standby", "ready")]
        with pytest.raises(RemoteError, match="bad_state"):
            await admin.standby("default")
        await watcher.close()
        await admin.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        d.stop()


def test_heartbeats_alone_are_not_activity_for_the_idle_policies(tmp_path):
    # heartbeats every second, idle after 3 s: before, each pong counted as agent traffic and nothing was ever idle
    d = daemon(tmp_path, "local", "--standby-after", "3")
    try:
        assert d.cli("boot", "sb", timeout=60).returncode == 0
        wait_for(lambda: json.loads(d.cli("info", "sb", "--json").stdout)["state"] == "standby", 30,
                 interval=0.5, what="idle standby despite the heartbeats")
    finally:
        d.stop()
