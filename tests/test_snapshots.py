"""Snapshots: a session's whole sandbox saved to disk and brought back
(``blink snapshot/snapshots/restore/rm-snapshot``, ``vhub.snapshot`` and the
others, Blink's ``/checkpoints`` endpoints, ``--snapshot-after``). Real
daemons and real QEMU (TCG) where the guest image is there: a counting process
in the guest keeps its state across a live snapshot, a snapshot that stops the
VM, and restores; a snapshot that fails (its disk full) leaves the session as
it was."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
from harness import Daemon, wait_for
from test_standby import Counter, daemon

from vhubd.client import Client
from vhubd.snapshots import SnapshotStore

# counts in the guest: each number to stdout and as the last line of /root/count
COUNTER = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo $i; echo $i >> /root/count; sleep 0.05; done"


def cli_json(d: Daemon, *args: str, timeout: float = 120):
    r = d.cli(*args, "--json", timeout=timeout)
    assert r.returncode == 0, (args, r.stderr)
    return json.loads(r.stdout)


def guest_count(d: Daemon, name: str) -> list[int]:
    """/root/count in the guest: every number the counter wrote, in order."""
    r = d.cli("run", name, "--", "cat", "/root/count", timeout=60)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


def consecutive(nums: list[int]) -> bool:
    return nums == list(range(1, len(nums) + 1))


@pytest.mark.slow
def test_snapshot_restore_and_the_counter_goes_on(tmp_path):
    d = daemon(tmp_path, "qemu")

    async def live() -> None:
        c = await Client.connect(d.control, session="sn", subscribe=["stdout"], boot=True, timeout=90)
        eid = (await c.call("agent.run", {"argv": ["sh", "-c", COUNTER]}))["execution_id"]
        count = Counter(c, eid)
        await count.until(10)
        admin = await Client.connect(d.control)
        res = await admin.snapshot("sn", "one")
        assert res["snapshot"] == "one" and res["state"] == "ready" and res["size_bytes"] > 1 << 20, res
        n = len(count.seen)
        await count.until(n + 20)  # the same process, counting on; what it printed meanwhile arrives
        assert consecutive(count.seen), count.seen[n - 5:n + 5]
        await admin.close()
        await c.close()

    try:
        asyncio.run(asyncio.wait_for(live(), 240))
        assert "agent_lost" not in d.log()  # the agent's link went down for the snapshot: "saving", not lost
        before_two = guest_count(d, "sn")
        two = cli_json(d, "snapshot", "sn", "two", "--stop")
        assert two["state"] == "stopped", two
        snaps = cli_json(d, "snapshots", "sn")
        assert [s["name"] for s in snaps] == ["two", "one"] and all(s["id"] for s in snaps), snaps
        # restored from "two": the counter continues from where it was (in memory: not restarted)
        back = cli_json(d, "restore", "sn", "two")
        assert back["state"] == "ready" and back["restored_from"] == "two", back
        after = guest_count(d, "sn")
        assert consecutive(after) and len(after) >= len(before_two), (len(before_two), after[-3:])
        wait_for(lambda: len(guest_count(d, "sn")) > len(after) + 5, 60, what="the restored counter counting")
        # restored from "one": back in time, and counting on from there
        cli_json(d, "restore", "sn", "one")
        rewound = guest_count(d, "sn")
        assert consecutive(rewound) and len(rewound) < len(after), (len(rewound), len(after))
        wait_for(lambda: len(guest_count(d, "sn")) > len(rewound) + 5, 60, what="counting after the rewind")
        assert consecutive(guest_count(d, "sn"))
        # removed one by one, then all with the session
        assert cli_json(d, "rm-snapshot", "sn", "one")["removed"]
        assert [s["name"] for s in cli_json(d, "snapshots", "sn")] == ["two"]
        r = d.cli("restore", "sn", "one")
        assert r.returncode == 1 and b"unknown_snapshot" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
        snapdir = tmp_path / "state" / "snapshots" / "sn"
        assert (snapdir / "two" / "vm.state").is_file()
        assert d.cli("rm", "sn", timeout=60).returncode == 0
        assert not snapdir.exists()
    finally:
        d.stop()


@pytest.mark.slow
def test_a_failing_snapshot_leaves_the_session_as_it_was(tmp_path):
    d = daemon(tmp_path, "qemu")
    full = tmp_path / "state" / "snapshots"
    full.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)], capture_output=True)
    if r.returncode != 0:
        d.stop()
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.decode().strip()}")
    try:
        assert d.cli("boot", "sn", timeout=120).returncode == 0
        assert d.cli("run", "sn", "--", "sh", "-c", f"({COUNTER}) > /dev/null 2>&1 &").returncode == 0
        wait_for(lambda: len(guest_count(d, "sn")) > 5, 30, what="the counter")
        r = d.cli("snapshot", "sn", "big", timeout=180)
        err = r.stderr.decode()
        assert r.returncode == 1 and "snapshot_failed" in err and err.count("\n") == 1, err
        info = cli_json(d, "info", "sn")
        assert info["state"] == "ready" and info["agent_connected"], info
        n = len(guest_count(d, "sn"))
        wait_for(lambda: len(guest_count(d, "sn")) > n + 5, 60, what="the counter going on")
        assert consecutive(guest_count(d, "sn"))
        assert cli_json(d, "snapshots", "sn") == []
        assert os.listdir(full / "sn") == []  # nothing half-written is left
        os.unlink(tmp_path / "state" / "sessions" / "sn" / "qmp.sock")  # QEMU's monitor gone: a QEMU error
        r = d.cli("snapshot", "sn", "again", timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 1 and "snapshot_failed" in err and "QMP" in err and err.count("\n") == 1, err
        assert cli_json(d, "info", "sn")["state"] == "ready"
        assert d.cli("run", "sn", "--", "true", timeout=60).returncode == 0
    finally:
        d.stop()
        subprocess.run(["umount", str(full)], capture_output=True)


@pytest.mark.slow
def test_snapshot_after_scales_to_zero_and_the_next_run_restores(tmp_path):
    d = daemon(tmp_path, "qemu", "--snapshot-after", "3")
    try:
        assert d.cli("boot", "sn", timeout=120).returncode == 0
        # a counter that prints nothing: the session is idle as far as the daemon sees
        assert d.cli("run", "sn", "--", "sh", "-c", f"({COUNTER}) > /dev/null 2>&1 &").returncode == 0
        wait_for(lambda: cli_json(d, "info", "sn")["state"] == "stopped", 90, interval=0.5,
                 what="the idle snapshot and stop")
        assert [s["name"] for s in cli_json(d, "snapshots", "sn")] == ["auto"]
        assert "idle snapshot session=sn" in d.log()
        nums = guest_count(d, "sn")  # boots on demand: from the snapshot, not cold
        assert "session restored session=sn" in d.log()
        assert consecutive(nums) and len(nums) > 5, nums[-3:]
        assert cli_json(d, "snapshots", "sn") == []  # spent: the session moved on from it
    finally:
        d.stop()


def test_what_cannot_be_snapshotted_says_why(tmp_path):
    d = daemon(tmp_path, "local")
    try:
        assert d.cli("boot", "sb", timeout=60).returncode == 0
        for args, code in ((["snapshot", "sb", "x"], "not_supported"), (["snapshot", "nosuch", "x"], "unknown_session"),
                           (["restore", "sb", "x"], "not_supported"), (["snapshots", "nosuch"], "unknown_session"),
                           (["rm-snapshot", "sb", "x"], "unknown_snapshot"), (["rm-snapshot", "sb", "../x"], "bad_params")):
            r = d.cli(*args)
            err = r.stderr.decode()
            assert r.returncode == 1 and err.count("\n") == 1 and code in err, (args, err)
        assert cli_json(d, "snapshots", "sb") == []
        assert cli_json(d, "info")["snapshots"] is False
    finally:
        d.stop()


def test_the_store_keeps_whole_snapshots_only(tmp_path):
    store = SnapshotStore(str(tmp_path))
    for i, name in enumerate(("a", "b")):
        partial = store.begin("s")
        (open(os.path.join(partial, "vm.state"), "wb")).close()
        store.commit(partial, "s", name, {"name": name, "created_at": 100 + i})
    assert [m["name"] for m in store.list("s")] == ["b", "a"]  # newest first
    leftover = store.begin("s")  # a snapshot that never finished (a crash)...
    assert [m["name"] for m in store.list("s")] == ["b", "a"]  # ...is not listed...
    store.begin("s")
    assert not os.path.exists(leftover)  # ...and goes with the next one
    partial = store.begin("s")
    store.commit(partial, "s", "a", {"name": "a", "created_at": 300})  # replaced
    assert [m["created_at"] for m in store.list("s")] == [300, 101]
    store.remove("s", "a")
    assert [m["name"] for m in store.list("s")] == ["b"]
    store.remove_all("s")
    assert store.list("s") == [] and store.count("s") == 0


def _http_api():
    pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")
    from harness.http import HttpApi

    return HttpApi


@pytest.mark.slow
def test_checkpoints_over_http_in_blinks_shapes(tmp_path):
    HttpApi = _http_api()
    d = daemon(tmp_path, "qemu", "--http", "127.0.0.1:0")

    async def body():
        async with HttpApi(d, token=(tmp_path / "state" / "http-token").read_text().strip()) as api:
            product = await api.ok("GET", "/api/product")
            assert product["snapshot_enabled"] is True and product["features"]["checkpoints"] is True
            await api.ok("POST", "/api/sessions", {"name": "hx"})
            await api.ok("POST", "/api/sessions/hx/runs", {"command": "sh", "args": ["-c", "echo 7 > /root/mark"]})
            made = await api.ok("POST", "/api/sessions/hx/checkpoints", {"snapshot": "c1"})
            assert made["event"] == "session_checkpoint" and made["snapshot"] == "c1", made
            assert made["snapshot_id"] and made["size_bytes"] > 0 and made["created_at"] > 0, made
            listed = await api.ok("GET", "/api/sessions/hx/checkpoints")
            assert listed["event"] == "checkpoint_list"
            assert [(s["name"], s["id"]) for s in listed["snapshots"]] == [("c1", made["snapshot_id"])]
            await api.ok("POST", "/api/sessions/hx/runs", {"command": "sh", "args": ["-c", "echo 8 > /root/mark"]})
            back = await api.ok("POST", "/api/sessions/hx/checkpoints/c1/restore")
            assert back["event"] == "session_restored" and back["name"] == "hx" and back["snapshot"] == "c1", back
            run = await api.ok("POST", "/api/sessions/hx/runs", {"command": "cat", "args": ["/root/mark"]})
            assert run["stdout"].strip() == "7", run  # the file as it was at the checkpoint
            status, err = await api.req("POST", "/api/sessions/hx/checkpoints/nosuch/restore")
            assert status == 404 and "nosuch" in err["error"], (status, err)
            status, err = await api.req("POST", "/api/sessions/hx/checkpoints", {"snapshot": "c1"})
            assert status == 409, (status, err)
            status, err = await api.req("POST", "/api/sessions/hx/checkpoints", {"name": "c2"})
            assert status == 400, (status, err)
            gone = await api.ok("DELETE", "/api/sessions/hx/checkpoints/c1")
            assert gone["event"] == "checkpoint_removed" and gone["snapshot"] == "c1"
            assert (await api.ok("GET", "/api/sessions/hx/checkpoints"))["snapshots"] == []

    try:
        asyncio.run(asyncio.wait_for(body(), 300))
    finally:
        d.stop()


def test_checkpoints_over_http_say_why_not(tmp_path):
    HttpApi = _http_api()
    d = daemon(tmp_path, "local", "--http", "127.0.0.1:0")

    async def body():
        async with HttpApi(d, token=(tmp_path / "state" / "http-token").read_text().strip()) as api:
            assert (await api.ok("GET", "/api/product"))["snapshot_enabled"] is False
            await api.ok("POST", "/api/sessions", {"name": "hx"})
            status, err = await api.req("POST", "/api/sessions/hx/checkpoints", {"snapshot": "c1"})
            assert status == 501 and "no snapshots" in err["error"], (status, err)
            status, err = await api.req("GET", "/api/sessions/nosuch/checkpoints")
            assert status == 404, (status, err)
            assert (await api.ok("GET", "/api/sessions/hx/checkpoints"))["snapshots"] == []

    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        d.stop()
