"""The boxlite backend with the real boxlite package: its default image (the
OCI layout built from Debian packages, on first use, once), box options,
get-or-create and remove; a registry image that cannot be pulled; and, on
a host whose /dev/kvm cannot run BoxLite VMs (ours), the whole path up to
the VM start, which fails in BoxLite's own words with nothing left behind.
Where BoxLite VMs run, a session boots and runs a command in the VM."""

import asyncio
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from harness import ROOT
from qemu_testing import require_rootfs_image, share_image_cache

from vhubd.backends import BootSpec
from vhubd.backends import boxlite as bl
from vhubd.guest import layout, oci

# the boxlite package is an extra (vhubd[boxlite]): without it, what needs it skips
needs_boxlite = pytest.mark.skipif(importlib.util.find_spec("boxlite") is None,
                                   reason="the boxlite package is not installed (pip install 'vhubd[boxlite]')")

BLINK_AGENT = ["python3", "-m", "blink_agent", "serve"]


def spec(tmp_path, session="unit", image=None) -> BootSpec:
    return BootSpec(session=session, token="tok", addr="tcp://host.boxlite.internal:1234",
                    workdir=str(tmp_path / "w"), image=image, cpus=1, memory_mib=256, env={"X": "1"})


def run(d, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vhubd", "run", "--control", d.control, *args],
                          capture_output=True, timeout=timeout, cwd=ROOT)


def processes_under(path: str, exclude: set[int]) -> list[str]:
    """Processes whose executable or command line names ``path`` (a BoxLite
    shim runs from a copy in its box directory, bwrap names that directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in exclude:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if path in cmd or exe.startswith(path):
            found.append(f"{pid} {cmd[:200]}")
    return found


def boxlite_log(home: str) -> str:
    text = ""
    logs = os.path.join(home, "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        with open(os.path.join(logs, name), errors="replace") as f:
            text += f.read()
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def boxes_left(home: str) -> list:
    import boxlite

    async def main():
        rt = boxlite.Boxlite(boxlite.Options(home_dir=home))
        return [b.name for b in await rt.list_info()]

    return asyncio.run(main())


@needs_boxlite
def test_host_check_is_overridable(monkeypatch):
    ok, why = bl.host_can_boot_vms()
    assert why
    if importlib.util.find_spec("boxlite") is None:
        assert not ok and "pip install 'vhubd[boxlite]'" in why
    elif os.path.isdir("/sys/module/kvm_pvm"):
        assert not ok and "kvm-pvm" in why
    monkeypatch.setenv("BLINK_BOXLITE_VMS", "yes")
    assert bl.host_can_boot_vms()[0]
    monkeypatch.setenv("BLINK_BOXLITE_VMS", "no")
    assert not bl.host_can_boot_vms()[0]


@pytest.mark.slow
@needs_boxlite
def test_default_image_options_and_boxes(tmp_path):
    img = require_rootfs_image()
    share_image_cache(tmp_path / "s")
    be = bl.BoxliteBackend(str(tmp_path / "s" / "boxlite"), state_dir=str(tmp_path / "s"))

    async def main():
        image, default = await be.image_for(spec(tmp_path))
        assert default and image == img.layout
        kw = be.box_options(spec(tmp_path), image, default)
        assert kw["rootfs_path"] == os.path.realpath(img.layout) and "image" not in kw
        assert "entrypoint" not in kw and kw["volumes"] == []  # the image's own entrypoint: the agent, baked in
        env = dict(kw["env"])
        assert env["VHUB_SESSION"] == "unit" and env["VHUB_TOKEN"] == "tok" and env["X"] == "1"
        opts = be.options(spec(tmp_path), image, default)  # boxlite takes them
        assert opts.rootfs_path == kw["rootfs_path"] and opts.entrypoint is None
        # a layout `blink build-image` made, named explicitly, is used as it is
        assert await be.image_for(spec(tmp_path, image=img.layout)) == (img.layout, True)
        # a registry image gets the agent mounted and run by python3
        image, default = await be.image_for(spec(tmp_path, image="registry.example/python:3"))
        assert (image, default) == ("registry.example/python:3", False)
        kw = be.box_options(spec(tmp_path), image, default)
        assert kw["image"] == image and kw["entrypoint"] == BLINK_AGENT
        assert [v[1:] for v in kw["volumes"]] == [(bl.GUEST_AGENT_DIR, True)]
        assert be.options(spec(tmp_path), image, default).entrypoint == BLINK_AGENT
        box, created = await be.create_box(spec(tmp_path))
        assert created and box.name == "vhub-unit"
        again, created2 = await be.create_box(spec(tmp_path))  # get-or-create
        assert not created2 and again.id == box.id
        info = await be.info("unit")
        assert info is not None and info.name == "vhub-unit"
        await be.remove("unit")
        assert await be.info("unit") is None
        await be.close()

    asyncio.run(main())


@pytest.mark.slow
@needs_boxlite
def test_default_image_is_built_on_first_use_once_with_progress(tmp_path, caplog):
    require_rootfs_image()  # its packages are downloaded: this build shares them
    state = tmp_path / "s"
    (state / "guest").mkdir(parents=True)
    from qemu_testing import image_state_dir

    os.symlink(oci.default_debs_dir(image_state_dir()), oci.default_debs_dir(str(state)))
    caplog.set_level(logging.INFO, logger="vhubd")

    async def main():
        be = bl.BoxliteBackend(str(state / "boxlite"), state_dir=str(state))
        first = await asyncio.gather(*(be.image_for(spec(tmp_path, f"s{i}")) for i in range(3)))
        assert len({image for image, _ in first}) == 1 and all(default for _, default in first)
        again = bl.BoxliteBackend(str(state / "boxlite2"), state_dir=str(state))
        return first[0][0], (await again.image_for(spec(tmp_path)))[0]

    built, reused = asyncio.run(main())
    assert built == reused and layout.read(built).config["config"]["Entrypoint"][1:] == BLINK_AGENT[1:]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("boxlite default image:")]
    assert sum("ready in" in x for x in lines) == 2, lines  # one build for three boots, then the cache
    assert any("downloading" in x for x in lines) and any("writing the layers" in x for x in lines)
    assert sum("is up to date" in x for x in lines) == 1, lines


@pytest.mark.slow
@needs_boxlite
def test_a_registry_image_that_cannot_be_pulled_is_boxlites_words(make_daemon, tmp_path):
    d = make_daemon("--backend", "boxlite", "--state-dir", str(tmp_path / "s"))
    r = d.cli("boot", "x", "--image", "127.0.0.1:1/none:latest", timeout=120)
    assert r.returncode == 1
    first, line = r.stderr.decode().strip().split("\n")  # the boot's start on a pipe, then its failure
    assert first == "blink: booting session x (boxlite)", first
    assert line.startswith("blink: boot_failed: BoxLite could not get the image '127.0.0.1:1/none:latest'"), line
    assert "Failed to pull image" in line and "\n" not in line
    d.stop()
    assert "vhub-x" not in boxes_left(str(tmp_path / "s" / "boxlite"))


@pytest.mark.slow
@needs_boxlite
def test_default_image_goes_through_boxlite_up_to_the_vm_start(make_daemon, tmp_path):
    """No --image: BoxLite's runtime, the import of the local layout, the box,
    its start; the start fails (this host's /dev/kvm cannot run BoxLite VMs)
    in BoxLite's own words, and nothing is left: no process, no box."""
    ok, why = bl.host_can_boot_vms()
    if ok:
        pytest.skip("this host can boot BoxLite VMs: the failure path is tested where they cannot")
    img = require_rootfs_image()
    config_digest = layout.read(img.layout).config_digest
    state = tmp_path / "s"
    share_image_cache(state)
    home = str(state / "boxlite")
    d = make_daemon("--backend", "boxlite", "--state-dir", str(state), "--boot-timeout", "120")
    for attempt in range(2):  # a retry behaves the same (and imports nothing again)
        t = time.monotonic()
        r = d.cli("boot", "x", timeout=180)
        took = time.monotonic() - t
        assert r.returncode == 1, r.stdout
        first, line = r.stderr.decode().strip().split("\n")  # the boot's start on a pipe, then its failure
        assert first == "blink: booting session x (boxlite)", first
        assert line.startswith("blink: boot_failed: BoxLite could not start the VM after "), line
        assert "engine reported an error: The VM failed to start." in line and why in line, line
        info = json.loads(d.cli("info", "x", "--json").stdout)
        assert info["state"] == "failed" and "The VM failed to start" in info["reason"]
        print(f"attempt {attempt + 1}: boot_failed after {took:.1f} s ({line.split('after ')[1].split(':')[0]} "
              "in BoxLite's start)")
        assert processes_under(str(state), {d.pid}) == []
    log = boxlite_log(home)
    steps = [f"Loading OCI image from local path: {img.layout}", f"Loaded local OCI image: config={config_digest}",
             "Created container rootfs", "Starting Box subprocess", "The VM failed to start"]
    at = [log.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at, strict=True))
    assert "Failed to pull" not in log and "registry" not in log.lower()
    ours = d.log()
    assert "tcp=" in ours and f"image={img.layout}" in ours and "boxlite box vhub-x removed" in ours
    d.stop()
    assert boxes_left(home) == []
    assert os.listdir(os.path.join(home, "boxes")) == []
    assert processes_under(str(state), set()) == []


@pytest.mark.skipif(not bl.host_can_boot_vms()[0], reason=f"BoxLite VMs cannot boot here: {bl.host_can_boot_vms()[1]}")
def test_boxlite_session_boots_and_runs(make_daemon, tmp_path):  # pragma: no cover - needs a KVM host
    """The whole thing: the default image, the VM boots, the agent in the box
    dials the daemon over loopback TCP, `blink run` prints the box's kernel."""
    require_rootfs_image()
    state = tmp_path / "s"
    share_image_cache(state)
    d = make_daemon("--backend", "boxlite", "--state-dir", str(state), "--boot-timeout", "180")
    r = run(d, "vm", "--", "uname", "-r", timeout=240)
    assert r.returncode == 0, r.stderr
    release = r.stdout.decode().strip()
    assert release and release != os.uname().release  # the VM's kernel, not the host's
    info = json.loads(d.cli("info", "vm", "--json").stdout)
    assert info["state"] == "ready" and info["backend"] == "boxlite"
    assert info["agent"]["peer"].startswith("tcp:127.0.0.1:")  # host.boxlite.internal is the host's loopback
    r = run(d, "vm", "--", "sh", "-c", "echo out; echo err >&2; exit 3", timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


@pytest.mark.slow
@needs_boxlite
def test_snapshots_map_to_boxlites_up_to_the_vm_start(tmp_path):
    """A session's snapshot through BoxLite's own calls (the box's disk: BoxLite
    0.10.8 has no memory snapshots): ``snapshot.create`` on the stopped box and
    ``export`` into the snapshot's directory; a restore through
    ``snapshot.restore``, and through ``import_box`` from the export once the
    box is gone; each then starts the VM, which fails here (or runs on a KVM
    host). The box and its snapshots survive a failed restore."""
    ok, _ = bl.host_can_boot_vms()
    require_rootfs_image()
    share_image_cache(tmp_path / "s")
    be = bl.BoxliteBackend(str(tmp_path / "s" / "boxlite"), state_dir=str(tmp_path / "s"))
    sp = spec(tmp_path, session="snap")

    async def start_or_fail(what) -> None:
        try:
            await what
        except bl.BackendError as exc:
            assert not ok and "BoxLite could not start the VM" in str(exc), exc
        else:
            assert ok

    async def main():
        box, _ = await be.create_box(sp)
        await start_or_fail(be._start_box("snap", box))  # the disk exists from here, booted or not
        one = tmp_path / "snaps" / "one"
        one.mkdir(parents=True)
        res = await be.snapshot("snap", str(one), keep_running=False)
        assert res["memory"] is False and res["boxlite_snapshot"].startswith("vhub-"), res
        rec = json.loads((one / bl.SNAPSHOT_FILE).read_text())
        assert rec["box"] == "vhub-snap" and (one / rec["archive"]).stat().st_size > 0
        assert [s.name for s in await box.snapshot.list()] == [res["boxlite_snapshot"]]
        # restore through BoxLite's snapshot: the same box, its snapshot kept even when the start fails
        await start_or_fail(be.restore(sp, str(one)))
        assert (await be.info("snap")) is not None
        assert [s.name for s in await box.snapshot.list()] == [res["boxlite_snapshot"]]
        # the box gone (with BoxLite's snapshot): restored from the export, a box of the same name again
        await be.remove("snap")
        assert await be.info("snap") is None
        await start_or_fail(be.restore(sp, str(one)))
        info = await be.info("snap")
        assert info is not None and info.name == "vhub-snap"
        await be.remove("snap")
        await be.close()

    asyncio.run(main())
