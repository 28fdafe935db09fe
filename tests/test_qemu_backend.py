"""The qemu backend end to end: real QEMU microvms (TCG here, KVM where it
runs) booting the Debian cloud kernel, the guest agent dialing vsock CID 2
port 10000, and vhubd serving that vsock device over vhost-user.

One daemon serves most tests (each boot costs seconds under TCG); the
lifecycle tests (timeouts, shutdown, SIGKILL) start their own.
"""

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from harness import ROOT, Daemon, wait_for
from qemu_testing import alive, qemu_pids, require_guest_image

from vhubd.client import Client

pytestmark = pytest.mark.slow

BOOT = "60"  # seconds: TCG boots take ~5-10 s; a loaded CI host needs slack


@pytest.fixture(scope="module")
def image():
    return require_guest_image()


@pytest.fixture(scope="module")
def qd(image, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("qemu"), "--backend", "qemu", "--image", image.dir,
                   "--state-dir", str(tmp_path_factory.mktemp("qstate")), "--boot-timeout", BOOT).start()
    yield d
    d.stop()


def run(d, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vhubd", "run", "--control", d.control, *args],
                          capture_output=True, timeout=timeout, cwd=ROOT)


def session(d, name):
    return json.loads(d.cli("info", name, "--json").stdout)


def qemu_pid(d, name):
    state = d.args[d.args.index("--state-dir") + 1]
    with open(os.path.join(state, "sessions", name, "qemu.pid")) as f:
        return int(f.read())


def guest_ram_maps(d):
    with open(f"/proc/{d.pid}/maps") as f:
        return sum(1 for line in f if "memfd:memory-backend-memfd" in line)


def test_blink_run_boots_a_vm_and_prints_the_guest_kernel_release(qd, image):
    r = run(qd, "vm1", "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == image.kernel_release
    assert image.kernel_release != os.uname().release  # the guest's kernel, not the host's
    info = session(qd, "vm1")
    assert info["state"] == "ready" and info["backend"] == "qemu" and info["agent_connected"]
    # the agent's traffic crossed the virtio-vsock device: its peer is the device
    assert info["agent"]["peer"].startswith("qemu-vm1:")
    log = qd.log()
    assert "vsock device qemu-vm1 ready: guest cid" in log
    assert "accelerator tcg" in log or "accelerator kvm" in log
    assert alive(qemu_pid(qd, "vm1"))


def test_stdout_stderr_and_exit_code(qd):
    r = run(qd, "vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_20_mb_of_guest_stdout_arrive_byte_exact(qd):
    n = 20_000_000
    prog = f"import random, sys; sys.stdout.buffer.write(random.Random(42).randbytes({n}))"
    r = run(qd, "vm1", "--", "python3", "-c", prog, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    assert len(r.stdout) == n
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(random.Random(42).randbytes(n)).hexdigest()


def test_a_stalled_lossless_subscriber_holds_the_guest_back_through_vsock_credit(qd):
    """The subscriber stops reading: the relay pauses the vsock peer, the device
    stops returning credit, the guest's writes block. Nothing piles up in the
    daemon, and once the subscriber reads again every byte arrives."""
    from vhubd.client import Event, Output

    n = 30_000_000

    async def main():
        sub = await Client.connect(qd.control, session="vm1", subscribe=["stdout", "events"], queue_size=8)
        runner = await Client.connect(qd.control, session="vm1")
        try:
            rss0 = qd.rss_kib()
            res = await runner.call("agent.run", {"argv": ["head", "-c", str(n), "/dev/zero"]}, timeout=60)
            eid = res["execution_id"]
            await asyncio.sleep(6)  # unblocked, the guest would send ~20 MB meanwhile
            grown = qd.rss_kib() - rss0
            assert grown < 16 * 1024, f"the daemon grew by {grown} KiB: nothing held the guest back"
            got = 0
            while True:
                item = await sub.next(timeout=120)
                assert item is not None, sub.closed_reason
                if isinstance(item, Output) and item.request_id == eid:
                    got += len(item.data)
                elif (isinstance(item, Event) and item.data.get("type") == "execution_result"
                      and item.data.get("execution_id") == eid):
                    break
            assert got == n and item.data.get("exit_code") == 0
        finally:
            await sub.close()
            await runner.close()
    asyncio.run(main())


def test_rpc_from_inside_the_guest_to_a_host_handler(qd):
    async def main():
        seen = []

        async def echo(params):
            seen.append(params)
            return {"echo": params, "host_pid": os.getpid()}

        c = await Client.connect(qd.control, session="vm1", serve={"host.echo": echo})
        try:
            prog = ("import json, blink_agent; hub = blink_agent.connect(); "
                    "print(json.dumps(hub.call('host.echo', {'from': 'guest', 'n': 7})))")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vhubd", "run", "--control", qd.control, "vm1", "--", "python3", "-c", prog,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            await c.close()
        assert proc.returncode == 0, err
        assert json.loads(out) == {"echo": {"from": "guest", "n": 7}, "host_pid": os.getpid()}
        assert seen == [{"from": "guest", "n": 7}]
    asyncio.run(main())


def test_two_vms_at_once_stay_isolated(qd):
    r2 = run(qd, "vm2", "--", "sh", "-c", "echo $VHUB_SESSION; cat /proc/sys/kernel/random/boot_id")
    r1 = run(qd, "vm1", "--", "sh", "-c", "echo $VHUB_SESSION; cat /proc/sys/kernel/random/boot_id")
    assert r1.returncode == r2.returncode == 0
    s1, boot1 = r1.stdout.decode().split()
    s2, boot2 = r2.stdout.decode().split()
    assert (s1, s2) == ("vm1", "vm2") and boot1 != boot2  # two kernels
    assert qemu_pid(qd, "vm1") != qemu_pid(qd, "vm2")
    assert session(qd, "vm1")["agent"]["peer"] != session(qd, "vm2")["agent"]["peer"]
    # a program in vm1 that claims to be vm2 still lands in vm1: the device names the session
    claim = ("import blink_agent; hub = blink_agent.connect(session='vm2', token='guess', attach=True); "
             "hub.stdout(b'claimed-vm2-marker\\n'); hub.close()")
    r = run(qd, "vm1", "--", "python3", "-c", claim)
    assert r.returncode == 0, r.stderr
    tail1 = qd.cli("tail", "vm1").stdout
    tail2 = qd.cli("tail", "vm2").stdout
    assert b"claimed-vm2-marker" in tail1 and b"claimed-vm2-marker" not in tail2


def test_killing_qemu_marks_agent_lost_and_frees_everything(qd):
    assert run(qd, "vm3", "--", "true").returncode == 0
    pid = qemu_pid(qd, "vm3")
    fds_before = qd.fd_count()
    maps_before = guest_ram_maps(qd)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: session(qd, "vm3")["state"] == "agent_lost", 20, what="agent_lost")
    wait_for(lambda: not alive(pid), 10, what="qemu reaped")
    assert "qemu exited session=vm3" in qd.log() and "killed by SIGKILL" in qd.log()
    # the device's socket, eventfds and guest memory mapping are gone
    wait_for(lambda: qd.fd_count() < fds_before, 10, what="fds released")
    assert 0 < guest_ram_maps(qd) < maps_before  # vm3's guest RAM is unmapped; the other VMs' stays
    # and the session boots again on demand
    r = run(qd, "vm3", "--", "echo", "again")
    assert (r.returncode, r.stdout) == (0, b"again\n")


def test_stop_terminates_qemu(qd):
    assert run(qd, "vm4", "--", "true").returncode == 0
    pid = qemu_pid(qd, "vm4")
    r = qd.cli("stop", "vm4", "--json")
    assert json.loads(r.stdout)["state"] == "stopped"
    assert not alive(pid)


def test_boot_failure_reports_qemus_own_words(qd, tmp_path):
    bad = tmp_path / "bad-image"
    bad.mkdir()
    (bad / "vmlinuz").write_bytes(b"this is not a kernel")
    (bad / "initramfs.cpio").write_bytes(b"")
    (bad / "manifest.json").write_text(json.dumps({"kernel_release": "none", "kernel_modules": ["virtio_pci"]}))
    r = qd.cli("boot", "broken", "--image", str(bad))
    assert r.returncode != 0
    msg = r.stderr.decode()
    assert "boot_failed" in msg and "QEMU exited with code 1: qemu: linux kernel too old" in msg, msg
    assert session(qd, "broken")["state"] == "failed"


def test_an_image_older_than_the_pcie_device_says_rebuild_it(qd, tmp_path):
    old = tmp_path / "old-image"
    shutil.copytree(require_guest_image().dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["kernel_modules"] = [m for m in manifest["kernel_modules"] if not m.startswith("virtio_pci")]
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = qd.cli("boot", "oldimg", "--image", str(old))
    msg = r.stderr.decode()
    assert r.returncode != 0 and "boot_failed" in msg and "blink build-guest" in msg and "virtio_pci" in msg, msg


def test_boot_timeout_and_idle_stop_leave_no_qemu(image, make_daemon, tmp_path):
    d = make_daemon("--backend", "qemu", "--image", image.dir, "--state-dir", str(tmp_path / "s"),
                    "--boot-timeout", "0.5")
    before = qemu_pids()
    r = d.cli("boot", "slow")
    assert r.returncode != 0 and b"timed out" in r.stderr
    wait_for(lambda: qemu_pids() <= before, 10, what="qemu of the timed-out boot gone")
    d2 = make_daemon("--backend", "qemu", "--image", image.dir, "--state-dir", str(tmp_path / "s2"),
                     "--boot-timeout", BOOT, "--idle-stop", "1")
    assert run(d2, "idle", "--", "true").returncode == 0
    pid = qemu_pid(d2, "idle")
    wait_for(lambda: "idle stop session=idle" in d2.log(), 20, what="idle stop")
    wait_for(lambda: not alive(pid), 10, what="qemu stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_daemon_exit_takes_its_vms_along(image, tmp_path, sig):
    d = Daemon(tmp_path, "--backend", "qemu", "--image", image.dir, "--state-dir", str(tmp_path / "s"),
                   "--boot-timeout", BOOT).start()
    try:
        assert run(d, "vmx", "--", "true").returncode == 0
        pid = qemu_pid(d, "vmx")
        assert alive(pid)
        d.stop(sig)
        # SIGTERM: the daemon stops its VMs; SIGKILL: PR_SET_PDEATHSIG does it
        wait_for(lambda: not alive(pid), 15, what="qemu gone after the daemon")
        if sig == signal.SIGTERM:
            assert "qemu stopped session=vmx" in d.log()
    finally:
        d.stop()
        time.sleep(0)
