"""BoxLite's default image: an OCI image layout built from Debian packages.

``build`` resolves the qemu guest's packages without the kernel
(``image.resolve_packages``: ``pythonX.Y-minimal`` with its
``libpythonX.Y-minimal`` / ``-stdlib``, ``busybox-static``, ``libc6``,
``zlib1g``, ``libexpat1``), downloads and unpacks them (``apt``) and writes
an image layout (``layout``) of three gzip'd tar layers:

- ``base``: busybox and a symlink per applet (a shell and coreutils), the C
  library, the loader and the libraries Python links, ``/etc`` (passwd,
  group, nsswitch.conf, and hosts, hostname and resolv.conf for the
  runtime to mount over) and the usual mount points;
- ``python``: the interpreter and the part of the standard library the agent
  imports, as bytecode (``python.add_python``, as for the qemu guest);
- ``agent``: ``blink_agent`` at /opt/blink-agent.

Its config's Entrypoint is the agent, ``/usr/bin/python3 -m blink_agent
serve``. No registry is involved: the packages come from the host's apt.
Cached like the qemu guest image (``cache``): ``<cache>/<key>/layout/`` is
the OCI layout, ``<cache>/<key>/build.json`` what went in (packages,
digests, sizes), ``current`` the newest build. The same inputs give the
same layer digests.

Also owns ``blink build-image`` (``add_arguments``, ``run``): this layout,
copied to a directory (``export``), or the agent as one layer on top of
another layout (``on_base``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable

from ..errors import GuestImageError
from ..paths import default_state_dir
from . import apt, cache, layout
from .cpio import Tree
from .image import add_busybox, resolve_packages
from .image import default_cache_dir as guest_cache_dir
from .python import AGENT_DIR, add_python, agent_files, agent_source_dir

BUILDER_VERSION = "1"
MODULES = ("apt", "cache", "cpio", "elf", "image", "layout", "oci", "python")
REF = "blink-agent"
ENTRYPOINT = ["/usr/bin/python3", "-m", "blink_agent", "serve"]
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"PYTHONPATH=/{AGENT_DIR}",
       "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8", "HOME=/root"]
ETC = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
    "etc/hosts": b"127.0.0.1 localhost\n::1 localhost\n",
    "etc/hostname": b"blink-guest\n",
    "etc/resolv.conf": b"",
}
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "root", "run", "var/tmp", "mnt", "home")


@dataclasses.dataclass
class RootfsImage:
    dir: str
    manifest: dict  # build.json

    @property
    def layout(self) -> str:
        return os.path.join(self.dir, "layout")

    @property
    def compressed_bytes(self) -> int:
        return self.manifest["compressed_bytes"]


def default_cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "oci")


def default_debs_dir(state_dir: str) -> str:
    """The packages are the qemu guest's: one download serves both."""
    return os.path.join(guest_cache_dir(state_dir), "debs")


def load(path: str) -> RootfsImage:
    """The build in directory ``path`` (a build, or ``current``)."""
    path = os.path.realpath(path)
    try:
        with open(os.path.join(path, "build.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise GuestImageError(f"no image in {path} ({exc}); build one with `blink build-image`") from None
    if not os.path.isfile(os.path.join(path, "layout", "index.json")):
        raise GuestImageError(f"image {path} is incomplete; rebuild it with `blink build-image --force`")
    cache.used(path)
    return RootfsImage(path, manifest)


def find(cache_dir: str) -> RootfsImage:
    return load(os.path.join(cache_dir, "current"))


def layer_of(path: str, python: str) -> str:
    """Which layer an entry of the tree belongs to."""
    if path == AGENT_DIR or path.startswith(AGENT_DIR + "/"):
        return "agent"
    if path in (f"usr/bin/{python}", "usr/bin/python3", "usr/bin/python") or path.startswith(f"usr/lib/{python}/"):
        return "python"
    return "base"


def split(tree: Tree, python: str) -> dict[str, dict[str, tuple[int, bytes]]]:
    """The tree's entries by layer; each layer also holds its entries' parent directories."""
    layers: dict[str, dict[str, tuple[int, bytes]]] = {"base": {}, "python": {}, "agent": {}}
    for path, entry in tree.entries.items():
        part = layers[layer_of(path, python)]
        part[path] = entry
        parent = os.path.dirname(path)
        while parent and parent not in part:
            part[parent] = tree.entries[parent]
            parent = os.path.dirname(parent)
    return layers


def build(cache_dir: str, *, force: bool = False, log: Callable[[str], object] | None = None,
          debs_dir: str | None = None) -> RootfsImage:
    """Build (or reuse) the layout in ``cache_dir``; returns it. The packages
    are kept in ``debs_dir`` (default ``cache_dir/debs``)."""
    say = log or (lambda msg: None)
    cache_dir = os.path.abspath(cache_dir)
    agent_src = agent_source_dir()
    say("resolving Debian packages")
    packages = resolve_packages(kernel=False)
    key = cache.key(BUILDER_VERSION, MODULES, packages, agent_src)
    out = os.path.join(cache_dir, key)
    if not force and os.path.isfile(os.path.join(out, "build.json")):
        img = load(out)
        cache.point_current(cache_dir, key)
        say(f"image {key} is up to date")
        return img
    debs_dir = debs_dir or os.path.join(cache_dir, "debs")
    say(f"downloading {len(packages)} packages into {debs_dir}")
    debs = apt.download(packages, debs_dir)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as tmp:
        root = os.path.join(tmp, "root")
        say("unpacking")
        apt.extract(debs, root)
        tree = Tree()
        manifest: dict = {"builder": BUILDER_VERSION, "key": key,
                          "packages": {n: packages[n] for n in sorted(packages)}}
        add_busybox(tree, root)
        add_python(tree, root, agent_src, manifest, say)
        for path, data in ETC.items():
            tree.file(path, data)
        for d in MOUNT_POINTS:
            tree.dir(d)
        python = manifest["python"]
        parts = split(tree, python)
        py_pkgs = ", ".join(f"{n} {v}" for n, v in sorted(packages.items()) if "python" in n)
        base_pkgs = ", ".join(f"{n} {v}" for n, v in sorted(packages.items()) if "python" not in n)
        say("writing the layers")
        layers = [
            layout.gzip_layer(parts["base"], f"blink build-image: busybox, C library, /etc from {base_pkgs}"),
            layout.gzip_layer(parts["python"], f"blink build-image: {python} and the stdlib the agent imports "
                                               f"from {py_pkgs}"),
            layout.gzip_layer(parts["agent"], f"blink build-image: blink_agent at /{AGENT_DIR}"),
        ]
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Entrypoint": ENTRYPOINT, "Env": ENV, "WorkingDir": "/root",
                             "Labels": {"org.opencontainers.image.title": REF,
                                        "org.opencontainers.image.description":
                                            "the V-Hub guest agent on Debian's Python and busybox"}}}
        stage = os.path.join(tmp, "out")
        desc = layout.write(os.path.join(stage, "layout"), layers, config, f"{REF}:{key}")
        unpacked = {name: sum(len(d) for m, d in part.values() if stat.S_ISREG(m)) for name, part in parts.items()}
        manifest.update(
            manifest_digest=desc["digest"], entries=len(tree.entries),
            layers=[{"name": name, "digest": layer.digest, "diff_id": layer.diff_id, "bytes": len(layer.data),
                     "unpacked_bytes": unpacked[name], "entries": len(parts[name])}
                    for name, layer in zip(("base", "python", "agent"), layers, strict=True)],
            compressed_bytes=sum(len(layer.data) for layer in layers), unpacked_bytes=sum(unpacked.values()))
        with open(os.path.join(stage, "build.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
    cache.point_current(cache_dir, key)
    cache.prune(cache_dir, key)
    img = load(out)
    say(f"image {key}: {describe(img)}")
    return img


def describe(img: RootfsImage) -> str:
    m = img.manifest
    return (f"{len(m['layers'])} layers, {m['compressed_bytes'] / 2**20:.1f} MiB compressed, "
            f"{m['unpacked_bytes'] / 2**20:.1f} MiB unpacked, {m['entries']} files")


def export(img: RootfsImage, out: str) -> str:
    """Copy the layout to ``out``: a new or empty directory, or an earlier
    layout, whose contents it replaces."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, "oci-layout")):
            raise GuestImageError(f"{out} is neither empty nor an OCI layout; choose another directory")
        for name in ("blobs", "index.json", "oci-layout"):
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
    shutil.copytree(img.layout, out, dirs_exist_ok=True)
    return out


def on_base(out: str, base: str, agent_src: str | None = None) -> str:
    """The layout ``base`` plus one layer with the agent's sources, entrypoint the agent."""
    src = layout.read(base)
    tree = Tree()
    for rel, path in agent_files(agent_src or agent_source_dir()):
        with open(path, "rb") as f:
            tree.file(f"{AGENT_DIR}/{rel}", f.read())
    layers = []
    for desc in src.layers:
        layers.append(layout.Layer(str(desc.get("mediaType", layout.LAYER)), src.blob(desc["digest"]), ""))
    diff_ids = (src.config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise GuestImageError(f"{base}: the config's diff_ids do not match the manifest's layers")
    history = [h for h in src.config.get("history") or [] if not h.get("empty_layer")]
    for i, layer in enumerate(layers):
        layer.diff_id = str(diff_ids[i])
        layer.comment = str(history[i].get("created_by", "")) if i < len(history) else f"{base} layer {i}"
    layers.append(layout.gzip_layer(tree.entries, f"blink build-image: blink_agent at /{AGENT_DIR}"))
    cfg = dict(src.config.get("config") or {})
    env = [e for e in cfg.get("Env") or [] if not str(e).startswith("PYTHONPATH=")] + [f"PYTHONPATH=/{AGENT_DIR}"]
    cfg.update(Env=env, Entrypoint=["python3", "-m", "blink_agent", "serve"])
    cfg.pop("Cmd", None)
    config = {k: v for k, v in src.config.items() if k not in ("rootfs", "history", "config")}
    config.setdefault("architecture", "amd64")
    config.setdefault("os", "linux")
    layout.write(out, layers, {**config, "config": cfg}, REF)
    return out


def add_arguments(p) -> None:
    """The options of ``blink build-image``."""
    p.add_argument("out", metavar="DIR", nargs="?",
                   help="write the layout here (default: only into the cache, STATE_DIR/oci, which the boxlite "
                        "backend uses)")
    p.add_argument("--base", metavar="LAYOUT",
                   help="instead: add the agent as one layer on top of this OCI layout (one with python3)")
    p.add_argument("--state-dir", help="daemon state directory (the cache is STATE_DIR/oci)")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical image exists")
    p.add_argument("--json", action="store_true", help="print what went in (build.json) as JSON")


def run(args) -> int:
    """``blink build-image``: build (or find up to date) the layout; print its directory."""
    def say(msg: str) -> None:
        sys.stderr.write(f"blink build-image: {msg}\n")

    try:
        if args.base:
            if not args.out:
                say("error: --base needs DIR, where the new layout goes")
                return 2
            sys.stdout.write(on_base(args.out, args.base) + "\n")
            return 0
        state = args.state_dir or default_state_dir()
        img = build(default_cache_dir(state), force=args.force, log=say, debs_dir=default_debs_dir(state))
        path = export(img, args.out) if args.out else img.layout
    except (GuestImageError, OSError) as exc:
        say(f"error: {exc}")
        return 1
    say(f"{path}: {describe(img)}")
    if args.json:
        sys.stdout.write(json.dumps({"layout": path, **img.manifest}, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(path + "\n")
    return 0
