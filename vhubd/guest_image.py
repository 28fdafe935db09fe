"""The qemu backend's guest image: a kernel and an initramfs from Debian packages.

``blink build-guest`` (``build``) downloads, with ``apt-get download``, the
Debian packages below at the versions apt resolves, unpacks them with
``dpkg-deb``, and writes into ``<state dir>/guest/<key>/``:

- ``vmlinuz``: the cloud kernel (``linux-image-cloud-amd64``'s current image);
- ``initramfs.cpio``: busybox (static), the kernel modules the vsock device
  needs (virtio, virtio_ring, virtio_mmio, vsock, vmw_vsock_virtio_transport
  and their dependencies, from the modules' own ``depends=``), Python
  (``pythonX.Y-minimal``'s binary, the shared libraries it and its extension
  modules need, and the part of the standard library the agent imports,
  precompiled), ``blink_agent`` from this checkout, and ``/init``;
- ``manifest.json``: packages and versions, the kernel release, sizes, digests.

Reproducible: the key is a digest of the builder version, the exact package
versions and the agent's sources; the cpio has sorted entries, mtime 0, owner
root, and ``.pyc`` files use unchecked-hash invalidation (no timestamps), so
the same inputs give the same bytes. ``current`` points at the newest build.

``/init`` mounts proc/sys/dev, loads the modules, takes ``vhub.session=`` and
``vhub.env=`` (base64 of shell ``export`` lines) from the kernel command line,
and runs ``python3 -m blink_agent serve`` (default address vsock://2:10000);
when the agent exits the VM powers off.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

from .errors import GuestImageError

BUILDER_VERSION = "1"
KERNEL_META = "linux-image-cloud-amd64"
PYTHON_META = "python3-minimal"
BASE_PACKAGES = ["busybox-static", "libc6", "zlib1g", "libexpat1"]
KERNEL_MODULES = ["vmw_vsock_virtio_transport", "virtio_mmio"]  # and their dependencies
MULTIARCH = "x86_64-linux-gnu"
AGENT_DIR = "opt/blink-agent"
# what the agent never imports, though modulefinder's over-approximation would pull it in
STDLIB_EXCLUDE = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                  "distutils", "unittest", "venv", "sqlite3", "dbm", "curses", "pydoc", "doctest", "pdb",
                  "_pydecimal", "decimal", "tarfile", "zipfile", "lzma", "bz2", "ssl", "http", "email",
                  "urllib", "xml", "html", "xmlrpc", "ftplib", "smtplib", "imaplib", "poplib", "nntplib",
                  "mailbox", "webbrowser", "pickletools", "multiprocessing", "readline", "ctypes")


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


def agent_source_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(here, "guest-agent")
    if os.path.isdir(os.path.join(src, "blink_agent")):
        return src
    spec = importlib.util.find_spec("blink_agent")
    if spec is None or not spec.submodule_search_locations:
        raise GuestImageError("blink_agent is neither in this checkout (guest-agent/) nor installed")
    return os.path.dirname(list(spec.submodule_search_locations)[0])


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
    return img


def find(cache_dir: str) -> GuestImage:
    return load(os.path.join(cache_dir, "current"))


# --- apt ----------------------------------------------------------------------------

def _run(cmd: list[str], **kw) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise GuestImageError(f"{cmd[0]} not found: building the guest image needs a Debian host "
                              "(apt-get, apt-cache, dpkg-deb)") from None
    if r.returncode != 0:
        raise GuestImageError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def _candidates(pkgs: list[str]) -> dict[str, str]:
    out = _run(["apt-cache", "policy", *pkgs])
    found: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(\S+):$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s+Candidate:\s*(\S+)", line)
        if m and current and m.group(1) != "(none)":
            found[current] = m.group(1)
    missing = [p for p in pkgs if p not in found]
    if missing:
        raise GuestImageError(f"apt knows no candidate for {', '.join(missing)}; run `apt-get update` (the "
                              "package lists may be missing)")
    return found


def _depends(pkgs: list[str]) -> dict[str, list[str]]:
    out = _run(["apt-cache", "depends", *pkgs])
    deps: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = line.strip()
            deps.setdefault(current, [])
            continue
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(\S+)", line)
        if m and current:
            deps[current].append(m.group(1))
    return deps


def _dep(deps: dict[str, list[str]], pkg: str, pattern: str) -> str:
    for d in deps.get(pkg, []):
        if re.fullmatch(pattern, d):
            return d
    raise GuestImageError(f"{pkg} has no dependency matching {pattern!r}; run `apt-get update`?")


def resolve_packages() -> dict[str, str]:
    """Package -> version, as apt resolves them now."""
    deps = _depends([KERNEL_META, PYTHON_META])
    kernel = _dep(deps, KERNEL_META, r"linux-image-[0-9].*")
    py = _dep(deps, PYTHON_META, r"python3\.[0-9]+-minimal")
    ver = py[len("python"):-len("-minimal")]
    names = [kernel, py, f"libpython{ver}-minimal", f"libpython{ver}-stdlib", *BASE_PACKAGES]
    found = _candidates(names)
    return {n: found[n] for n in names}


def download(packages: dict[str, str], debs_dir: str) -> dict[str, str]:
    """The .deb of each package (downloaded once into ``debs_dir``)."""
    os.makedirs(debs_dir, exist_ok=True)
    found = {}
    missing = []
    for name, version in packages.items():
        path = _find_deb(debs_dir, name, version)
        if path:
            found[name] = path
        else:
            missing.append(f"{name}={version}")
    if missing:
        cmd = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            cmd += ["-o", "APT::Sandbox::User=root"]
        _run(cmd + missing, cwd=debs_dir)
        for name, version in packages.items():
            if name not in found:
                path = _find_deb(debs_dir, name, version)
                if not path:
                    raise GuestImageError(f"apt-get download did not produce {name} {version}")
                found[name] = path
    return found


def _find_deb(d: str, name: str, version: str) -> str | None:
    quoted = version.replace(":", "%3a")
    for f in sorted(os.listdir(d)):
        if f.startswith(name + "_") and f.endswith(".deb") and f[len(name) + 1:].split("_")[0] in (version, quoted):
            return os.path.join(d, f)
    return None


# --- ELF (just enough: DT_NEEDED, PT_INTERP, .modinfo) -------------------------------

def _elf(data: bytes):
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError("not a 64-bit little-endian ELF file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    return phdrs, shdrs, shstrndx


def elf_needed(data: bytes) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP) of an ELF executable or library."""
    phdrs, _, _ = _elf(data)
    interp = None
    dynamic = None
    for p_type, _, off, _, _, filesz, _, _ in phdrs:
        if p_type == 3:
            interp = data[off:off + filesz].rstrip(b"\0").decode()
        elif p_type == 2:
            dynamic = (off, filesz)
    if dynamic is None:
        return [], interp

    def file_off(addr: int) -> int:
        for p_type, _, off, vaddr, _, filesz, _, _ in phdrs:
            if p_type == 1 and vaddr <= addr < vaddr + filesz:
                return off + addr - vaddr
        raise GuestImageError(f"address 0x{addr:x} not in a loaded segment")

    entries = [struct.unpack_from("<qQ", data, dynamic[0] + i) for i in range(0, dynamic[1], 16)]
    strtab = next((v for t, v in entries if t == 5), None)
    if strtab is None:
        return [], interp
    base = file_off(strtab)
    needed = []
    for tag, val in entries:
        if tag == 1:
            end = data.index(b"\0", base + val)
            needed.append(data[base + val:end].decode())
    return needed, interp


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value pairs of a kernel module's .modinfo section."""
    _, shdrs, shstrndx = _elf(data)
    names_off = shdrs[shstrndx][4]
    for sh in shdrs:
        name_end = data.index(b"\0", names_off + sh[0])
        if data[names_off + sh[0]:name_end] == b".modinfo":
            raw = data[sh[4]:sh[4] + sh[5]]
            out: dict[str, str] = {}
            for item in raw.split(b"\0"):
                if b"=" in item:
                    k, v = item.decode("utf-8", "replace").split("=", 1)
                    out.setdefault(k, v)
            return out
    return {}


# --- the cpio archive -------------------------------------------------------------------

class Tree:
    """The initramfs contents: path -> (mode, bytes) or (mode, symlink target)."""

    def __init__(self):
        self.entries: dict[str, tuple[int, bytes]] = {}

    def dir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = (stat.S_IFDIR | 0o755, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = (stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries.setdefault(path, (stat.S_IFLNK | 0o777, target.encode()))

    def cpio(self) -> bytes:
        """newc archive: sorted names, inode numbers in that order, mtime 0."""
        out = bytearray()
        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data = self.entries[name]
            _cpio_entry(out, name, ino, mode, data, 2 if stat.S_ISDIR(mode) else 1)
        _cpio_entry(out, "TRAILER!!!", 0, 0, b"", 1)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)


def _cpio_entry(out: bytearray, name: str, ino: int, mode: int, data: bytes, nlink: int) -> None:
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0]
    out += b"070701" + b"".join(b"%08X" % f for f in fields) + nb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)


# --- the build --------------------------------------------------------------------------

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


def _key(packages: dict[str, str], agent_src: str) -> str:
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n".encode())
    with open(os.path.abspath(__file__), "rb") as f:  # this builder, /init included
        h.update(hashlib.sha256(f.read()).digest())
    for name in sorted(packages):
        h.update(f"{name}={packages[name]}\n".encode())
    for rel, path in _agent_files(agent_src):
        with open(path, "rb") as f:
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:20]


def _agent_files(src: str) -> list[tuple[str, str]]:
    out = []
    for root, dirs, files in os.walk(os.path.join(src, "blink_agent")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py") or f == "py.typed":
                path = os.path.join(root, f)
                out.append((os.path.relpath(path, src), path))
    return sorted(out)


def build(cache_dir: str, *, force: bool = False, log=None, debs_dir: str | None = None) -> GuestImage:
    """Build (or reuse) the guest image in ``cache_dir``; returns it. The
    packages are kept in ``debs_dir`` (default ``cache_dir/debs``)."""
    say = log or (lambda msg: None)
    agent_src = agent_source_dir()
    say("resolving Debian packages")
    packages = resolve_packages()
    key = _key(packages, agent_src)
    out = os.path.join(cache_dir, key)
    if not force and os.path.isfile(os.path.join(out, "manifest.json")):
        img = load(out)
        _point_current(cache_dir, key)
        say(f"guest image {key} is up to date")
        return img
    debs_dir = debs_dir or os.path.join(cache_dir, "debs")
    say(f"downloading {len(packages)} packages into {debs_dir}")
    debs = download(packages, debs_dir)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as tmp:
        root = os.path.join(tmp, "root")
        for name in sorted(debs):
            _run(["dpkg-deb", "-x", debs[name], root])
        tree = Tree()
        manifest: dict = {"builder": BUILDER_VERSION, "key": key,
                          "packages": {n: packages[n] for n in sorted(packages)}}
        kernel_path, krel = _add_kernel(tree, root, manifest)
        _add_busybox(tree, root)
        _add_python(tree, root, agent_src, manifest, say)
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
    _point_current(cache_dir, key)
    _prune(cache_dir, key)
    say(f"guest image {key}: kernel {krel}, initramfs {len(cpio) >> 20} MiB")
    return load(out)


def _prune(cache_dir: str, key: str, keep: int = 2) -> None:
    """Drop all but the ``keep`` newest builds (``key`` always stays; a VM
    running from a removed build keeps its open files)."""
    builds = []
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name != key and re.fullmatch(r"[0-9a-f]{20}", name) and os.path.isdir(path):
            builds.append((os.path.getmtime(path), path))
    for _, path in sorted(builds, reverse=True)[keep - 1:]:
        shutil.rmtree(path, ignore_errors=True)


def _point_current(cache_dir: str, key: str) -> None:
    link = os.path.join(cache_dir, "current")
    tmp = link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(key, tmp)
    os.replace(tmp, link)


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


def _add_busybox(tree: Tree, root: str) -> None:
    path = os.path.join(root, "bin", "busybox")
    with open(path, "rb") as f:
        tree.file("bin/busybox", f.read(), 0o755)
    applets = _run([path, "--list-full"]).split()
    for a in sorted(applets):
        tree.symlink(a, "/bin/busybox")


def _add_python(tree: Tree, root: str, agent_src: str, manifest: dict, say) -> None:
    pys = sorted(f for f in os.listdir(os.path.join(root, "usr", "bin")) if re.fullmatch(r"python3\.\d+", f))
    if not pys:
        raise GuestImageError("no python3.X binary in the python package")
    exe = pys[0]
    ver = exe[len("python"):]
    stdlib = os.path.join(root, "usr", "lib", exe)
    dynload = os.path.join(stdlib, "lib-dynload")
    with open(os.path.join(root, "usr", "bin", exe), "rb") as f:
        pybin = f.read()
    tree.file(f"usr/bin/{exe}", pybin, 0o755)
    tree.symlink("usr/bin/python3", exe)
    tree.symlink("usr/bin/python", exe)
    import modulefinder

    # the modules the agent can import (over-approximated by modulefinder)
    finder = modulefinder.ModuleFinder(path=[agent_src, stdlib, dynload], excludes=list(STDLIB_EXCLUDE))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write("import blink_agent, blink_agent.__main__, blink_agent.cli, blink_agent.hub, "
                     "blink_agent.runner, blink_agent.pty, runpy, site, encodings, encodings.aliases, "
                     "encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.idna\n")
    try:
        finder.run_script(script.name)
    finally:
        os.unlink(script.name)
    compile_ = _can_compile(ver)
    jobs: list[tuple[str, str, bool]] = []
    files = set()
    for mod in finder.modules.values():
        path = getattr(mod, "__file__", None)
        if path and os.path.abspath(path).startswith(stdlib + os.sep):
            files.add(os.path.abspath(path))
    # a module built into this interpreter may be an extension module in the guest's
    sos = {f.split(".")[0]: os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so")}
    files.update(sos[name] for name in finder.modules if name in sos)
    # every module of a package we use comes along (cheap, and spares surprises)
    for pkg in ("encodings", "asyncio", "json", "concurrent", "logging", "collections", "importlib", "re"):
        d = os.path.join(stdlib, pkg)
        if os.path.isdir(d):
            for dirpath, dirs, fs in os.walk(d):
                dirs[:] = sorted(x for x in dirs if x != "__pycache__")
                files.update(os.path.join(dirpath, x) for x in fs if x.endswith(".py"))
    libs_needed: set[str] = set(elf_needed(pybin)[0])
    exts = []
    skipped = []
    for path in sorted(files):
        rel = os.path.relpath(path, stdlib)
        if path.endswith(".so"):
            with open(path, "rb") as f:
                data = f.read()
            needed = elf_needed(data)[0]
            if any(_find_lib(root, n) is None for n in needed):
                skipped.append(rel)
                continue
            libs_needed.update(needed)
            tree.file(f"usr/lib/{exe}/{rel}", data, 0o644)
            exts.append(rel)
        elif path.endswith(".py"):
            jobs.append((path, f"usr/lib/{exe}/{rel}", True))
    # shared libraries: the closure of DT_NEEDED, found in the unpacked packages
    todo = sorted(libs_needed)
    done: set[str] = set()
    interp = elf_needed(pybin)[1]
    while todo:
        so = todo.pop()
        if so in done:
            continue
        done.add(so)
        path = _find_lib(root, so)
        if path is None:
            raise GuestImageError(f"shared library {so} (needed by {exe}) is in none of the packages")
        with open(path, "rb") as f:
            data = f.read()
        tree.file(f"lib/{MULTIARCH}/{so}", data, 0o755)
        todo.extend(n for n in elf_needed(data)[0] if n not in done)
    if interp:
        name = os.path.basename(interp)
        path = _find_lib(root, name)
        if path is None:
            raise GuestImageError(f"the dynamic loader {interp} is in none of the packages")
        with open(path, "rb") as f:
            tree.file(f"lib/{MULTIARCH}/{name}", f.read(), 0o755)
        tree.symlink(interp, f"/lib/{MULTIARCH}/{name}")
    # the agent, sources and bytecode
    for rel, path in _agent_files(agent_src):
        with open(path, "rb") as f:
            tree.file(f"{AGENT_DIR}/{rel}", f.read())
        if path.endswith(".py"):
            jobs.append((path, f"{AGENT_DIR}/{rel}", False))
    _add_modules(tree, jobs, compile_)
    manifest.update(python=exe, python_extensions=exts, python_skipped_extensions=skipped,
                    python_libraries=sorted(done), pyc=compile_)
    say(f"python {ver}: {len(files)} stdlib files, {len(exts)} extension modules, {len(done)} libraries"
        + ("" if compile_ else " (no matching compiler: sources only, slower start)"))


def _find_lib(root: str, soname: str) -> str | None:
    for d in (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib64", "lib", "usr/lib"):
        p = _resolve_in(root, os.path.join(d, soname))
        if p is not None:
            return p
    return None


def _resolve_in(root: str, rel: str) -> str | None:
    """``rel`` inside the unpacked tree ``root``, following symlinks as the
    guest would (an absolute target is relative to ``root``, not the host)."""
    path = rel.strip("/")
    for _ in range(40):
        full = os.path.join(root, path)
        if os.path.islink(full):
            target = os.readlink(full)
            path = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                    else os.path.join(os.path.dirname(path), target))
            if path.startswith(".."):
                return None
            continue
        return full if os.path.isfile(full) else None
    return None


_COMPILE = """
import json, py_compile, sys
for src, dfile, out in json.load(sys.stdin):
    try:
        py_compile.compile(src, cfile=out, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        pass
"""


def _can_compile(ver: str) -> bool:
    """Whether this interpreter makes .pyc files the guest's Python loads:
    the same X.Y (same magic number)."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}" == ver


def _add_modules(tree: Tree, jobs: list[tuple[str, str, bool]], compile_: bool) -> None:
    """Add (source, destination, sourceless) modules, as .pyc when
    ``compile_``. Bytecode comes from one fresh interpreter with a fixed hash
    seed (set constants are marshalled in hash order) and unchecked-hash
    invalidation (no source mtimes): the same sources give the same bytes."""
    jobs = sorted(jobs)
    if not compile_:
        for src, dest, _ in jobs:
            with open(src, "rb") as f:
                tree.file(dest, f.read())
        return
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(src, "/" + dest, os.path.join(tmp, f"{i}.pyc")) for i, (src, dest, _) in enumerate(jobs)]
        subprocess.run([sys.executable, "-I", "-c", _COMPILE], input=json.dumps(todo).encode(), check=True,
                       env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        for (_src, dest, sourceless), (_, _, out) in zip(jobs, todo, strict=True):
            if not os.path.exists(out):
                continue  # a module this Python cannot compile: left out
            with open(out, "rb") as f:
                pyc = f.read()
            if sourceless:
                tree.file(dest[:-3] + ".pyc", pyc)
            else:
                d, base = os.path.split(dest)
                tree.file(f"{d}/__pycache__/{base[:-3]}.{sys.implementation.cache_tag}.pyc", pyc)


def add_arguments(p) -> None:
    """The options of ``blink build-guest`` (shared by the CLI and ``main``)."""
    p.add_argument("--state-dir", help="daemon state directory (the image goes to STATE_DIR/guest)")
    p.add_argument("--out", metavar="DIR", help="cache directory (default STATE_DIR/guest)")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical image exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args) -> int:
    """``blink build-guest``: build (or find up to date) and print the image directory."""
    from .paths import default_state_dir

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


if __name__ == "__main__":
    sys.exit(main())
