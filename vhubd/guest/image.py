"""Assembling the qemu backend's guest image, and finding a built one.

``build`` resolves the Debian packages below at the versions apt resolves
now, downloads and unpacks them (``apt``), and writes into
``<cache dir>/<key>/``:

- ``vmlinuz``: the cloud kernel (``linux-image-cloud-amd64``'s current image);
- ``initramfs.cpio``: busybox (static), the kernel modules the vsock device
  needs (virtio, virtio_ring, virtio_mmio, vsock, vmw_vsock_virtio_transport
  and their dependencies, from the modules' own ``depends=``), Python and
  the agent (``python``), and ``/init``;
- ``manifest.json``: packages and versions, the kernel release, sizes, digests.

Reproducible: the key (``cache``) is a digest of the builder (its version
and the sources of its modules, ``MODULES``), the exact package versions
and the agent's sources; the archive (``cpio``) and the bytecode are the same bytes for the
same inputs. ``current`` points at the newest build.

``/init`` mounts proc/sys/dev, loads the modules, takes ``vhub.session=`` and
``vhub.env=`` (``encode_env``: base64 of shell ``export`` lines) from the
kernel command line, and runs ``python3 -m blink_agent serve`` (default
address vsock://2:10000); when the agent exits the VM powers off.

Also owns ``GuestImage`` with ``load`` / ``find`` / ``default_cache_dir``,
and ``blink build-guest`` (``add_arguments``, ``run``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable

from ..errors import GuestImageError
from ..paths import default_state_dir
from . import apt, cache
from .cpio import Tree
from .elf import modinfo
from .python import add_python, agent_source_dir

BUILDER_VERSION = "1"
KERNEL_META = "linux-image-cloud-amd64"
PYTHON_META = "python3-minimal"
BASE_PACKAGES = ["busybox-static", "libc6", "zlib1g", "libexpat1"]
KERNEL_MODULES = ["vmw_vsock_virtio_transport", "virtio_mmio", "virtio_pci"]  # and their dependencies
MODULES = ("apt", "cache", "cpio", "elf", "image", "python")  # the builder: its sources are part of the key


@dataclasses.dataclass
class GuestImage:
    dir: str
    kernel: str
    initramfs: str
    manifest: dict

    @property
    def kernel_release(self) -> str:
        return self.manifest["kernel_release"]


def default_cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "guest")


def load(path: str) -> GuestImage:
    """The image in directory ``path`` (a build output, or ``current``)."""
    path = os.path.realpath(path)
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise GuestImageError(f"no guest image in {path} ({exc}); build one with `blink build-guest`") from None
    img = GuestImage(path, os.path.join(path, "vmlinuz"), os.path.join(path, "initramfs.cpio"), manifest)
    for p in (img.kernel, img.initramfs):
        if not os.path.isfile(p):
            raise GuestImageError(f"guest image {path} is incomplete ({os.path.basename(p)} missing); "
                                  "rebuild it with `blink build-guest --force`")
    cache.used(path)
    return img


def find(cache_dir: str) -> GuestImage:
    return load(os.path.join(cache_dir, "current"))


def resolve_packages(kernel: bool = True) -> dict[str, str]:
    """Package -> version, as apt resolves them now: Python, busybox and
    the libraries, and (``kernel``) the cloud kernel."""
    deps = apt.depends([KERNEL_META, PYTHON_META] if kernel else [PYTHON_META])
    py = apt.dependency(deps, PYTHON_META, r"python3\.[0-9]+-minimal")
    ver = py[len("python"):-len("-minimal")]
    names = [py, f"libpython{ver}-minimal", f"libpython{ver}-stdlib", *BASE_PACKAGES]
    if kernel:
        names.insert(0, apt.dependency(deps, KERNEL_META, r"linux-image-[0-9].*"))
    found = apt.candidates(names)
    return {n: found[n] for n in names}


# The first comment names the module this came from (vhubd.guest_image, now
# vhubd.guest): it is part of the image's bytes, so it stays as it is.
INIT = r"""#!/bin/sh
# blink guest init (vhubd.guest_image): mount, load the vsock modules, run the agent.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux
export PYTHONPATH=/opt/blink-agent PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
hostname blink-guest
ifconfig lo 127.0.0.1 up 2>/dev/null
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "vhub-init: insmod $mod failed"
done < /etc/vhub/modules
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vhub.session=*) export VHUB_SESSION="${arg#vhub.session=}" ;;
        vhub.env=*) eval "$(echo "${arg#vhub.env=}" | base64 -d)" ;;
        vhub.hostname=*) hostname "${arg#vhub.hostname=}" ;;
    esac
done
echo "vhub-init: kernel $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s, starting blink-agent for session ${VHUB_SESSION:-?}"
cd /root
python3 -m blink_agent serve
echo "vhub-init: blink-agent exited with status $?; powering off"
sync
poweroff -f
"""


def encode_env(env: dict) -> str:
    """The ``vhub.env=`` kernel argument for ``env`` (base64, no spaces)."""
    lines = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(env.items())
                    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
    return base64.b64encode(lines.encode()).decode()


def build(cache_dir: str, *, force: bool = False, log: Callable[[str], object] | None = None,
          debs_dir: str | None = None) -> GuestImage:
    """Build (or reuse) the guest image in ``cache_dir``; returns it. The
    packages are kept in ``debs_dir`` (default ``cache_dir/debs``)."""
    say = log or (lambda msg: None)
    cache_dir = os.path.abspath(cache_dir)
    agent_src = agent_source_dir()
    say("resolving Debian packages")
    packages = resolve_packages()
    key = cache.key(BUILDER_VERSION, MODULES, packages, agent_src)
    out = os.path.join(cache_dir, key)
    if not force and os.path.isfile(os.path.join(out, "manifest.json")):
        img = load(out)
        cache.point_current(cache_dir, key)
        say(f"guest image {key} is up to date")
        return img
    debs_dir = debs_dir or os.path.join(cache_dir, "debs")
    say(f"downloading {len(packages)} packages into {debs_dir}")
    debs = apt.download(packages, debs_dir)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as tmp:
        root = os.path.join(tmp, "root")
        apt.extract(debs, root)
        tree = Tree()
        manifest: dict = {"builder": BUILDER_VERSION, "key": key,
                          "packages": {n: packages[n] for n in sorted(packages)}}
        kernel_path, krel = _add_kernel(tree, root, manifest)
        add_busybox(tree, root)
        add_python(tree, root, agent_src, manifest, say)
        tree.file("init", INIT.encode(), 0o755)
        tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        tree.file("etc/group", b"root:x:0:\n")
        tree.file("etc/hosts", b"127.0.0.1 localhost blink-guest\n")
        for d in ("proc", "sys", "dev", "tmp", "root", "run", "var/tmp", "mnt"):
            tree.dir(d)
        cpio = tree.cpio()
        stage = os.path.join(tmp, "out")
        os.makedirs(stage)
        shutil.copyfile(kernel_path, os.path.join(stage, "vmlinuz"))
        with open(os.path.join(stage, "initramfs.cpio"), "wb") as f:
            f.write(cpio)
        with open(kernel_path, "rb") as f:
            kdigest = hashlib.sha256(f.read()).hexdigest()
        manifest.update(kernel_release=krel, kernel_sha256=kdigest,
                        initramfs_sha256=hashlib.sha256(cpio).hexdigest(), initramfs_bytes=len(cpio),
                        initramfs_entries=len(tree.entries))
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
    cache.point_current(cache_dir, key)
    cache.prune(cache_dir, key)
    say(f"guest image {key}: kernel {krel}, initramfs {len(cpio) >> 20} MiB")
    return load(out)


def _add_kernel(tree: Tree, root: str, manifest: dict) -> tuple[str, str]:
    mods_root = os.path.join(root, "lib", "modules")
    releases = sorted(os.listdir(mods_root)) if os.path.isdir(mods_root) else []
    if len(releases) != 1:
        raise GuestImageError(f"expected one kernel in the kernel package, found {releases}")
    krel = releases[0]
    kernel = os.path.join(root, "boot", f"vmlinuz-{krel}")
    if not os.path.isfile(kernel):
        raise GuestImageError(f"the kernel package has no boot/vmlinuz-{krel}")
    kdir = os.path.join(mods_root, krel)
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(os.path.join(kdir, "kernel")):
        for fname in files:
            if fname.endswith(".ko"):
                index[fname[:-3].replace("-", "_")] = os.path.join(dirpath, fname)
    builtin = set()
    try:
        with open(os.path.join(kdir, "modules.builtin")) as fb:
            builtin = {os.path.basename(line.strip())[:-3].replace("-", "_") for line in fb if line.strip()}
    except OSError:
        pass
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestImageError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            raise GuestImageError(f"kernel module {name} not found in {krel}")
        with open(path, "rb") as f:
            deps = [d for d in modinfo(f.read()).get("depends", "").split(",") if d]
        for d in deps:
            visit(d, chain + (name,))
        seen.add(name)
        order.append(name)

    for m in KERNEL_MODULES:
        visit(m, ())
    lines = []
    for name in order:
        with open(index[name], "rb") as f:
            tree.file(f"lib/modules/{name}.ko", f.read())
        lines.append(f"{name}.ko")
    tree.file("etc/vhub/modules", ("\n".join(lines) + "\n").encode())
    manifest["kernel_modules"] = order
    return kernel, krel


def add_busybox(tree: Tree, root: str) -> None:
    """busybox (static) and a symlink for each of its applets."""
    path = os.path.join(root, "bin", "busybox")
    with open(path, "rb") as f:
        tree.file("bin/busybox", f.read(), 0o755)
    applets = apt.run([path, "--list-full"]).split()
    for a in sorted(applets):
        tree.symlink(a, "/bin/busybox")


def add_arguments(p) -> None:
    """The options of ``blink build-guest`` (shared by the CLI and ``main``)."""
    p.add_argument("--state-dir", help="daemon state directory (the image goes to STATE_DIR/guest)")
    p.add_argument("--out", metavar="DIR", help="cache directory (default STATE_DIR/guest)")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical image exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args) -> int:
    """``blink build-guest``: build (or find up to date) and print the image directory."""
    cache = args.out or default_cache_dir(args.state_dir or default_state_dir())
    try:
        img = build(cache, force=args.force, log=lambda m: sys.stderr.write(f"blink build-guest: {m}\n"))
    except (GuestImageError, OSError) as exc:
        sys.stderr.write(f"blink build-guest: error: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps({"dir": img.dir, **img.manifest}, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(img.dir + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="blink build-guest",
                                description="build the qemu backend's guest kernel + initramfs")
    add_arguments(p)
    return run(p.parse_args(argv))
