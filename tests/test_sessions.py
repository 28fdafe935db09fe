"""Sessions: boot on demand with the local backend, single flight, idle stop,
stop/boot cycles, boot failures, the auto backend's choice. The boxlite
backend has its own file (test_boxlite_backend.py)."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
from harness import ROOT, wait_for

from vhubd.backends import boxlite as bl
from vhubd.client import Client
from vhubd.errors import ConnectionClosed
from vhubd.sessions import InvalidName, validate_name


def run(d, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vhubd", "run", "--control", d.control, *args],
                          capture_output=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def local(make_daemon, tmp_path):
    return make_daemon("--backend", "local", "--state-dir", str(tmp_path / "state"), "--boot-timeout", "20")


def test_names_are_validated():
    assert validate_name("demo-1.x_y") == "demo-1.x_y"
    for bad in ["", "Demo", "-x", "a" * 64, "a/b", "../x", None, 3]:
        with pytest.raises(InvalidName):
            validate_name(bad)


def test_blink_run_boots_on_demand_and_exits_with_code(local):
    r = run(local, "demo", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout) == (3, b"out\n")
    boot, booted, err = r.stderr.split(b"\n", 2)  # on a pipe: one line as the boot starts, one as it ends
    assert (boot, booted[:30], err) == (b"blink: booting session demo (local)", b"blink: session demo booted in ",
                                        b"err\n")
    s = json.loads(local.cli("sessions", "--json").stdout)
    demo = next(x for x in s if x["name"] == "demo")
    assert demo["state"] == "ready" and demo["backend"] == "local" and demo["agent_connected"]
    info = json.loads(local.cli("info", "demo", "--json").stdout)
    assert info["sandbox"] is False and "NOT a sandbox" in info["warning"]
    assert "NOT a sandbox" in local.log()


def test_concurrent_runs_share_one_boot(local):
    procs = [subprocess.Popen([sys.executable, "-m", "vhubd", "run", "--control", local.control, "shared", "--",
                               "sh", "-c", f"echo run{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT) for i in range(20)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 20, [o[1] for o in outs]
    assert sorted(o[0] for o in outs) == sorted(f"run{i}\n".encode() for i in range(20))
    assert local.log().count("session=shared stopped -> booting") == 1
    assert local.log().count("local agent started session=shared") == 1


def test_idle_stop_and_stop_boot_cycles(make_daemon, tmp_path):
    d = make_daemon("--backend", "local", "--state-dir", str(tmp_path / "s"), "--idle-stop", "1")
    assert run(d, "idle", "--", "true").returncode == 0
    wait_for(lambda: "idle stop session=idle" in d.log(), 15, what="idle stop")
    wait_for(lambda: '"state": "stopped"' in d.cli("info", "idle", "--json").stdout.decode(), 10)
    for _ in range(3):
        b = d.cli("boot", "idle", "--json")
        assert b.returncode == 0, b.stderr
        assert json.loads(b.stdout)["state"] == "ready"
        pid = json.loads(d.cli("info", "idle", "--json").stdout)["agent"]["pid"]
        assert os.path.exists(f"/proc/{pid}")
        s = d.cli("stop", "idle", "--json")
        assert json.loads(s.stdout)["state"] == "stopped"
        # the stopped session's agent process is gone (reaped by the daemon)
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10, what="agent process gone")


def test_boot_failure_of_local_backend_reaches_every_waiter(make_daemon, tmp_path):
    d = make_daemon("--backend", "local", "--state-dir", str(tmp_path / "s"),
                    "--agent-command", "sh -c 'echo agent cannot start >&2; exit 7'")

    async def main():
        async def one():
            try:
                await Client.connect(d.control, session="broken", boot=True, subscribe=["stdout"])
            except ConnectionClosed as exc:
                return exc.code, exc.message
            return None

        return await asyncio.gather(*(one() for _ in range(5)))

    res = asyncio.run(main())
    assert all(r is not None and r[0] == "boot_failed" for r in res), res
    assert "exited with code 7" in res[0][1] and "agent cannot start" in res[0][1]
    info = json.loads(d.cli("info", "broken", "--json").stdout)
    assert info["state"] == "failed" and "exited with code 7" in info["reason"]
    r = d.cli("boot", "broken")  # a later boot retries, and fails the same way
    assert r.returncode == 1 and b"boot_failed" in r.stderr
    assert d.log().count("session=broken stopped -> booting") == 1
    assert d.log().count("-> booting") >= 2


def test_bad_session_names_never_reach_a_backend(local):
    r = local.cli("boot", "Bad/Name")
    assert r.returncode == 1 and b"bad_session_name" in r.stderr
    assert "Bad/Name" not in local.log().replace("'Bad/Name'", "")


def test_external_backend_explains_boot_failure(make_daemon, tmp_path):
    d = make_daemon("--backend", "external", "--state-dir", str(tmp_path / "s"))
    r = d.cli("boot", "ext")
    assert r.returncode == 1 and b"boot_failed" in r.stderr and b"--backend" in r.stderr


def test_auto_backend_on_this_host(make_daemon, tmp_path):
    ok, why = bl.host_can_boot_vms()
    d = make_daemon("--state-dir", str(tmp_path / "s"))
    info = json.loads(d.cli("info", "--json").stdout)
    assert info["backend"] == ("boxlite" if ok else "external")
    if not ok:  # one line that offers the choice, qemu first
        line = next(x for x in d.log().splitlines() if "backend auto:" in x)
        assert why in line and "--backend qemu" in line and "--backend local" in line and "--backend boxlite" in line


@pytest.mark.parametrize("params", [
    {"image": 5}, {"image": ""}, {"image": "x" * 5000}, {"image": "a\0b"}, {"image": {"ref": "x"}},
    {"cpus": "2"}, {"cpus": 0}, {"cpus": True}, {"memory_mib": 10**9}, {"env": ["A=1"]},
    {"env": {"A": {"nested": 1}}}, {"env": {f"K{i}": "v" for i in range(300)}},
])
def test_bad_boot_params_are_refused_before_anything_happens(local, params):
    with pytest.raises(RuntimeError, match="bad_params") as info:
        local.call("vhub.boot", {"session": "bp", **params})
    assert len(str(info.value)) < 400
    assert "bp" not in [s["name"] for s in local.call("vhub.sessions")]  # nothing created, nothing booted
    # the same through a client handshake's boot_params
    from harness.daemon import client_handshake

    with pytest.raises(Exception, match="bad_params"):
        client_handshake(local.control, {"role": "client", "session": "bp", "boot": True, "boot_params": params})
    assert local.call("vhub.ping")["pong"]
