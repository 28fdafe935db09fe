"""The guest image builder (vhubd.guest): the cpio writer, the ELF and
module readers, the kernel-command-line environment, and a real build from
Debian packages that is reproducible byte for byte."""

import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest
from qemu_testing import guest_cache_dir, require_guest_image

from vhubd import guest as gi
from vhubd.guest.cpio import Tree
from vhubd.guest.elf import elf_needed


def parse_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    out = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode, mtime = f[11], f[6], f[1], f[5]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, mtime, body))


def test_cpio_is_sorted_timeless_and_complete():
    t = Tree()
    t.file("usr/bin/tool", b"#!/bin/sh\n", 0o755)
    t.symlink("bin/sh", "/bin/busybox")
    t.file("a", b"x" * 5)
    t.dir("proc")
    data = t.cpio()
    assert len(data) % 512 == 0
    entries = parse_newc(data)
    names = [e[0] for e in entries]
    assert names == sorted(names) == ["a", "bin", "bin/sh", "proc", "usr", "usr/bin", "usr/bin/tool"]
    by = {e[0]: e for e in entries}
    assert all(e[2] == 0 for e in entries)  # mtime 0
    assert stat.S_ISLNK(by["bin/sh"][1]) and by["bin/sh"][3] == b"/bin/busybox"
    assert by["usr/bin/tool"][1] == stat.S_IFREG | 0o755 and by["usr/bin/tool"][3] == b"#!/bin/sh\n"
    assert stat.S_ISDIR(by["usr"][1])
    assert t.cpio() == data
    if shutil.which("cpio"):
        listed = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout
        assert listed.decode().split() == names


def test_elf_needed_of_this_python():
    exe = os.path.realpath(sys.executable)
    with open(exe, "rb") as f:
        needed, interp = elf_needed(f.read())
    assert interp and interp.endswith(".so.2")
    assert any(n.startswith("libc.so") for n in needed) or any("python" in n for n in needed)
    with pytest.raises(gi.GuestImageError):
        elf_needed(b"#!/bin/sh\n" + bytes(100))


def test_env_survives_the_kernel_command_line_and_init(tmp_path):
    env = {"PLAIN": "x", "SPACES": "a b  c", "QUOTES": "it's \"q\" $HOME `x`", "NL": "l1\nl2", "bad-key": "no"}
    arg = gi.encode_env(env)
    assert " " not in arg and "\n" not in arg
    script = f'eval "$(echo "{arg}" | base64 -d)"; printf "%s|%s|%s|%s" "$PLAIN" "$SPACES" "$QUOTES" "$NL"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout.decode()
    assert out == "x|a b  c|it's \"q\" $HOME `x`|l1\nl2"


def test_missing_image_says_how_to_build_one(tmp_path):
    with pytest.raises(gi.GuestImageError, match="blink build-guest"):
        gi.find(str(tmp_path))


@pytest.mark.slow
def test_real_build_is_reproducible_and_complete(tmp_path):
    img = require_guest_image()
    m = img.manifest
    assert m["kernel_release"].endswith("-cloud-amd64")
    mods = m["kernel_modules"]
    # dependencies load first
    assert mods.index("vsock") < mods.index("vmw_vsock_virtio_transport_common") < mods.index(
        "vmw_vsock_virtio_transport")
    assert mods.index("virtio") < mods.index("virtio_mmio") and "virtio_ring" in mods
    with open(img.initramfs, "rb") as f:
        cpio = f.read()
    assert hashlib.sha256(cpio).hexdigest() == m["initramfs_sha256"]
    names = {e[0] for e in parse_newc(cpio)}
    for must in ("init", "bin/busybox", "bin/sh", "usr/bin/python3", f"usr/bin/{m['python']}",
                 "lib64/ld-linux-x86-64.so.2", "opt/blink-agent/blink_agent/__main__.py",
                 "lib/modules/vsock.ko", "etc/vhub/modules", f"usr/lib/{m['python']}/asyncio/__init__.pyc"):
        assert must in names, must
    # the same inputs give the same bytes (a fresh build next to the cached one, same packages)
    again = gi.build(str(tmp_path / "cache"), force=True, debs_dir=os.path.join(guest_cache_dir(), "debs"))
    if again.manifest["key"] != m["key"]:
        # the cached image came from other inputs (older sources, newer packages): compare two fresh builds
        img = again
        again = gi.build(str(tmp_path / "cache2"), force=True, debs_dir=os.path.join(guest_cache_dir(), "debs"))
    assert again.manifest["key"] == img.manifest["key"]
    assert again.manifest["initramfs_sha256"] == img.manifest["initramfs_sha256"]
    assert again.manifest["kernel_sha256"] == img.manifest["kernel_sha256"]
