"""The qemu backend over the real virtio-vsock path (QEMU microvm + vhubd as
its vhost-user vsock device). Under TCG on hosts without usable KVM (the
development machines): every number says which accelerator it ran on.

- boot → agent ready: a client handshake with ``boot: true`` until the
  daemon answers it (QEMU started, kernel booted, modules loaded, the agent's
  Python started and handshook over vsock); p50 over 10 boots. Reference: the
  same QEMU + kernel + initramfs until a shell run as ``/init`` prints a line
  (no vsock, no Python): the floor of this machine and accelerator.
- guest → subscriber throughput: ``head -c N /dev/zero`` in the guest,
  relayed as Stdout frames over virtio-vsock to a lossless subscriber, every
  byte counted; the daemon's CPU time during the transfer (the device's
  cost). Reference: the same command into ``/dev/null`` inside the guest
  (what the emulated guest can produce at all).
- RPC round trips: host → guest ``agent.ping`` (timed on the host), and
  guest → host handler calls made by a program in the guest (timed there).
  Reference: ``agent.ping`` to an agent that is a host process (local backend,
  no VM): the relay's own cost.

No timing assertions; correctness only (byte counts, exit codes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import uvloop
from _harness import QUICK, ROOT, Daemon, percentile

sys.path.insert(0, os.path.join(ROOT, "tests"))
from qemu_testing import alive, require_guest_image  # noqa: E402

from vhubd.client import Client, Event, Output  # noqa: E402

BOOT_N = 3 if QUICK else 10
STREAM_BYTES = (8 if QUICK else 50) * 1_000_000
PING_N = 50 if QUICK else 300
GUEST_RPC_N = 50 if QUICK else 300


@pytest.fixture(scope="module")
def image():
    return require_guest_image()


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def qemu_daemon(image, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bq"))
    daemon = Daemon(d, {}, "--backend", "qemu", "--image", image.dir, "--state-dir", os.path.join(d, "state"),
                    "--boot-timeout", "120").start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def accel(daemon) -> str:
    log = daemon.log()
    return "kvm" if "accelerator kvm" in log else "tcg" if "accelerator tcg" in log else "?"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms_stats(lat_ns: list) -> dict:
    s = sorted(lat_ns)
    return {"n": len(s), "p50_ms": percentile(s, 50) / 1e6, "p99_ms": percentile(s, 99) / 1e6, "max_ms": s[-1] / 1e6}


def show(capsys, line: str) -> None:
    with capsys.disabled():
        sys.stdout.write(f"\n[qemu bench] {line}\n")


async def run_in(daemon, session: str, argv: list, *, count_only: bool = True) -> tuple[int, int, float]:
    """agent.run argv in session; (stdout bytes, exit code, seconds from call to result)."""
    c = await Client.connect(daemon.control, session=session, subscribe=["stdout", "stderr", "events"], boot=True,
                             timeout=120)
    try:
        t0 = time.perf_counter()
        res = await c.call("agent.run", {"argv": argv}, timeout=120)
        eid = res["execution_id"]
        n = 0
        while True:
            item = await c.next(timeout=300)
            assert item is not None, c.closed_reason
            if isinstance(item, Output) and item.request_id == eid and item.kind == "stdout":
                n += len(item.data)
            elif (isinstance(item, Event) and item.data.get("type") == "execution_result"
                  and item.data.get("execution_id") == eid):
                return n, item.data.get("exit_code"), time.perf_counter() - t0
    finally:
        await c.close()


def test_qemu_boot_to_agent_ready(benchmark, record, qemu_daemon, loop, capsys):
    lat: list = []
    state = {"i": 0, "client": None, "name": None}

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
        state["name"] = f"boot{state['i']}"
        return (), {}

    def boot():
        t0 = time.perf_counter_ns()
        c = loop.run_until_complete(Client.connect(qemu_daemon.control, session=state["name"], boot=True,
                                                   timeout=120))
        lat.append(time.perf_counter_ns() - t0)
        state["client"] = c
        info = c.hello.get("session") or {}
        assert info.get("state") == "ready", c.hello

    benchmark.group = "qemu boot"
    try:
        benchmark.pedantic(boot, setup=setup, rounds=BOOT_N, iterations=1, warmup_rounds=0)
    finally:
        loop.run_until_complete(stop_previous())
    s = ms_stats(lat)
    a = accel(qemu_daemon)
    record(benchmark, "qemu_boot", op=f"qemu ({a}): boot on demand → agent handshook over vsock", accel=a, **s)
    show(capsys, f"boot → agent ready ({a}): p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
                 f"max {s['max_ms']:.0f} ms over {s['n']} boots")


def test_qemu_boot_reference(benchmark, record, image, qemu_daemon, loop, capsys):
    """The floor: QEMU + the same kernel + initramfs until a shell run as
    /init prints a line on the console (no vsock device, no agent)."""
    from vhubd.backends.qemu import host_tsc_khz

    if accel(qemu_daemon) == "?":  # the daemon probes KVM at its first boot
        loop.run_until_complete(run_in(qemu_daemon, "probe", ["true"]))
    a = accel(qemu_daemon)
    append = "console=ttyS0 quiet panic=-1 rdinit=/bin/sh"
    if a == "tcg" and host_tsc_khz():
        append += f" tsc_early_khz={host_tsc_khz()} tsc=reliable"
    cmd = ["qemu-system-x86_64", "-M", f"microvm,accel={a}", "-cpu", "max" if a == "tcg" else "host", "-m", "256M",
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-kernel", image.kernel, "-initrd", image.initramfs, "-append", append + ' -- -c "echo VHUB-REF-UP"']
    lat: list = []

    def one():
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            for line in p.stdout:
                if b"VHUB-REF-UP" in line:
                    lat.append(time.perf_counter_ns() - t0)
                    break
            else:
                raise AssertionError("the reference guest never reached /init")
        finally:
            p.kill()
            p.wait()
            p.stdout.close()

    benchmark.group = "qemu boot"
    benchmark.pedantic(one, rounds=BOOT_N, iterations=1, warmup_rounds=0)
    s = ms_stats(lat)
    record(benchmark, "qemu_boot", op=f"reference ({a}): QEMU start → kernel → a shell as /init prints (no vsock, no agent)",
           accel=a, **s)
    show(capsys, f"reference, QEMU start to a shell running as /init ({a}): p50 {s['p50_ms']:.0f} ms")


def test_qemu_guest_to_subscriber_throughput(benchmark, record, qemu_daemon, loop, capsys):
    n = STREAM_BYTES
    res: dict = {}

    def one():
        before = cpu_seconds(qemu_daemon.pid)
        got, code, secs = loop.run_until_complete(run_in(qemu_daemon, "tput", ["head", "-c", str(n), "/dev/zero"]))
        assert (got, code) == (n, 0)
        res.update(secs=secs, cpu=cpu_seconds(qemu_daemon.pid) - before)

    loop.run_until_complete(run_in(qemu_daemon, "tput", ["true"]))  # boot outside the measurement
    a = accel(qemu_daemon)
    benchmark.group = "qemu stream"
    benchmark.pedantic(one, rounds=1, iterations=1)
    mbps = n / res["secs"] / 1e6
    ref: dict = {}
    _, code, secs = loop.run_until_complete(run_in(qemu_daemon, "tput", ["sh", "-c", f"head -c {n} /dev/zero >"
                                                                                         " /dev/null"]))
    assert code == 0
    ref_mbps = n / secs / 1e6
    ref.update(secs=secs)
    record(benchmark, "qemu_stream", op=f"guest stdout → virtio-vsock → vhubd → 1 subscriber ({a})", accel=a,
           bytes=n, mbps=mbps, daemon_cpu_s=res["cpu"], daemon_cpu_ns_per_byte=res["cpu"] * 1e9 / n,
           ref_mbps=ref_mbps, ratio_to_ref=mbps / ref_mbps)
    show(capsys, f"guest → subscriber ({a}): {mbps:.1f} MB/s for {n / 1e6:.0f} MB; daemon CPU "
                 f"{res['cpu']:.2f} s ({res['cpu'] * 1e9 / n:.1f} ns/byte, i.e. the device could carry "
                 f"~{n / max(res['cpu'], 1e-9) / 1e6:.0f} MB/s); reference, the same bytes into /dev/null in the "
                 f"guest: {ref_mbps:.1f} MB/s (ratio {mbps / ref_mbps:.2f})")


def test_qemu_vsock_path_capacity(benchmark, record, qemu_daemon, loop, capsys):
    """What the virtio-vsock path carries when the guest side is not a pipe
    reader: a program in the guest writes 1 MiB Stdout frames with the agent
    library; the subscriber times first byte to last byte."""
    n = STREAM_BYTES
    prog = ("import blink_agent; hub = blink_agent.connect(); b = bytes(1 << 20)\n"
            f"left = {n}\n"
            "while left:\n"
            "    k = min(left, len(b)); hub.stdout(b[:k]); left -= k\n"
            "hub.close()")

    async def go():
        sub = await Client.connect(qemu_daemon.control, session="tput", subscribe=["stdout"], boot=True, timeout=120)
        try:
            proc = await __import__("asyncio").create_subprocess_exec(
                sys.executable, "-m", "vhubd", "run", "--control", qemu_daemon.control, "tput", "--", "python3",
                "-c", prog, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
            got, t_first = 0, None
            while got < n:
                item = await sub.next(timeout=300)
                assert item is not None, sub.closed_reason
                if isinstance(item, Output) and item.request_id == 0 and item.kind == "stdout":
                    t_first = t_first or time.perf_counter()
                    got += len(item.data)
            t_last = time.perf_counter()
            _, err = await proc.communicate()
            assert proc.returncode == 0, err
            return got, t_last - t_first
        finally:
            await sub.close()

    res: dict = {}
    benchmark.group = "qemu stream"
    before = cpu_seconds(qemu_daemon.pid)
    benchmark.pedantic(lambda: res.update(zip(("bytes", "secs"), loop.run_until_complete(go()), strict=True)), rounds=1,
                       iterations=1)
    cpu = cpu_seconds(qemu_daemon.pid) - before
    a = accel(qemu_daemon)
    mbps = res["bytes"] / res["secs"] / 1e6
    record(benchmark, "qemu_stream", op=f"guest agent library, 1 MiB Stdout frames → 1 subscriber ({a})",
           accel=a, bytes=res["bytes"], mbps=mbps, daemon_cpu_s=cpu)
    show(capsys, f"vsock path capacity ({a}): {mbps:.1f} MB/s (guest library writes 1 MiB frames; first to last "
                 f"byte at the subscriber); daemon CPU {cpu:.2f} s")


def _ping(control: str, session: str, n: int, loop) -> list:
    async def go():
        c = await Client.connect(control, session=session, boot=True, timeout=120)
        lat = []
        try:
            for i in range(n + 10):
                t0 = time.perf_counter_ns()
                r = await c.call("agent.ping", {}, timeout=30)
                if i >= 10:
                    lat.append(time.perf_counter_ns() - t0)
                assert r == {"pong": True}, r
        finally:
            await c.close()
        return lat
    return loop.run_until_complete(go())


def test_qemu_rpc_round_trips(benchmark, record, qemu_daemon, loop, capsys, tmp_path):
    lat = _ping(qemu_daemon.control, "rpc", PING_N, loop)
    a = accel(qemu_daemon)
    s = ms_stats(lat)
    record(benchmark, "qemu_rpc", op=f"host → guest agent.ping over virtio-vsock ({a})", accel=a, **s)
    # the reference: the same call to an agent that is a host process
    d = str(tmp_path)
    local = Daemon(d, {}, "--backend", "local", "--state-dir", os.path.join(d, "state")).start()
    try:
        ref = ms_stats(_ping(local.control, "rpc", PING_N, loop))
    finally:
        local.stop()
    record(None, "qemu_rpc", op="reference: agent.ping, agent as a host process (local backend)", **ref)

    # guest → host: a program inside the guest calls a host handler, timing each call itself
    prog = ("import json, time, blink_agent; hub = blink_agent.connect(); lat = []\n"
            f"for i in range({GUEST_RPC_N} + 10):\n"
            "    t0 = time.perf_counter(); r = hub.call('bench.echo', i)\n"
            "    assert r == i, r\n"
            "    lat.append(time.perf_counter() - t0)\n"
            "lat = sorted(lat[10:]); print(json.dumps([lat[len(lat) // 2], lat[int(len(lat) * 0.99)], lat[-1]]))")

    async def guest_calls():
        async def echo(params):
            return params

        c = await Client.connect(qemu_daemon.control, session="rpc", serve={"bench.echo": echo})
        try:
            proc = await __import__("asyncio").create_subprocess_exec(
                sys.executable, "-m", "vhubd", "run", "--control", qemu_daemon.control, "rpc", "--", "python3",
                "-c", prog, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            out, err = await proc.communicate()
        finally:
            await c.close()
        assert proc.returncode == 0, err
        return json.loads(out)

    benchmark.group = "qemu rpc"
    g = {}
    benchmark.pedantic(lambda: g.update(v=loop.run_until_complete(guest_calls())), rounds=1, iterations=1)
    p50, p99, mx = g["v"]
    record(benchmark, "qemu_rpc", op=f"guest → host handler RPC, timed in the guest ({a})", accel=a,
           n=GUEST_RPC_N, p50_ms=p50 * 1e3, p99_ms=p99 * 1e3, max_ms=mx * 1e3)
    show(capsys, f"RPC ({a}): host→guest agent.ping p50 {s['p50_ms']:.2f} ms (p99 {s['p99_ms']:.2f}); "
                 f"guest→host handler p50 {p50 * 1e3:.2f} ms (p99 {p99 * 1e3:.2f}); reference agent.ping to a "
                 f"host-process agent p50 {ref['p50_ms']:.3f} ms")
    assert alive(qemu_daemon.pid)
