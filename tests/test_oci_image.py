"""BoxLite's default image (vhubd.guest.layout, vhubd.guest.oci): reproducible
tar+gzip layers, OCI layouts written and read back (hostile ones refused), a
real build from Debian packages that is complete and reproducible, its
rootfs running the agent for real, and `blink build-image`."""

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest
from harness import ROOT, wait_for
from qemu_testing import image_state_dir, require_rootfs_image, share_image_cache

from vhubd.errors import GuestImageError
from vhubd.guest import layout, oci
from vhubd.guest.cpio import Tree


def small_tree() -> Tree:
    t = Tree()
    t.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    t.symlink("bin/sh", "/bin/busybox")
    t.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    t.dir("tmp")
    return t


def members(layer: layout.Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.data))) as tf:
        return tf.getmembers()


def test_layers_are_sorted_timeless_and_reproducible():
    a = layout.gzip_layer(small_tree().entries, "a")
    b = layout.gzip_layer(small_tree().entries, "b")
    assert a.data == b.data and a.diff_id == b.diff_id
    assert a.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(a.data)).hexdigest()
    assert a.data[3] == 0 and a.data[4:8] == b"\0\0\0\0"  # gzip header: no file name, mtime 0
    ms = members(a)
    names = [m.name for m in ms]
    assert names == sorted(names) == ["bin", "bin/sh", "etc", "etc/passwd", "tmp", "usr", "usr/bin", "usr/bin/tool"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "root" for m in ms)
    by = {m.name: m for m in ms}
    assert by["bin/sh"].issym() and by["bin/sh"].linkname == "/bin/busybox"
    assert by["usr/bin/tool"].mode == 0o755 and by["usr"].isdir() and by["etc/passwd"].size == 26
    other = small_tree()
    other.file("etc/passwd", b"changed\n")
    assert layout.gzip_layer(other.entries).diff_id != a.diff_id


def test_a_written_layout_reads_back_and_every_digest_is_checked(tmp_path):
    layers = [layout.gzip_layer(small_tree().entries, "tools"), layout.gzip_layer({"opt": (stat.S_IFDIR | 0o755, b"")})]
    desc = layout.write(str(tmp_path / "l"), layers, {"architecture": "amd64", "os": "linux",
                                                      "config": {"Entrypoint": ["/bin/sh"]}}, "t:1")
    again = layout.write(str(tmp_path / "m"), layers, {"architecture": "amd64", "os": "linux",
                                                       "config": {"Entrypoint": ["/bin/sh"]}}, "t:1")
    assert desc == again  # the same inputs, the same digests
    img = layout.read(str(tmp_path / "l"))
    assert img.manifest_digest == desc["digest"]
    assert [x["digest"] for x in img.layers] == [x.digest for x in layers]
    assert img.config["rootfs"]["diff_ids"] == [x.diff_id for x in layers]
    assert img.config["history"][0]["created_by"] == "tools"
    assert json.loads((tmp_path / "l" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    # a blob whose bytes do not match its name
    blob = tmp_path / "l" / "blobs" / "sha256" / img.config_digest[len("sha256:"):]
    blob.write_bytes(blob.read_bytes() + b" ")
    with pytest.raises(GuestImageError, match="does not match its digest"):
        layout.read(str(tmp_path / "l"))


@pytest.mark.parametrize("index, words", [
    (None, "not an OCI image layout"),
    (b"not json", "index.json is not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"manifests": []}).encode(), "lists no manifest"),
    (json.dumps({"manifests": [{"digest": "sha256:../../../../etc/passwd"}]}).encode(), "not a sha256 digest"),
    (json.dumps({"manifests": [{"digest": "sha256:" + "0" * 64}]}).encode(), "missing"),
    (b" " * (layout.MAX_JSON + 1), "larger than"),
])
def test_a_bad_layout_is_refused_with_the_reason(tmp_path, index, words):
    d = tmp_path / "bad"
    d.mkdir()
    if index is not None:
        (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (d / "index.json").write_bytes(index)
    with pytest.raises(GuestImageError, match=words) as info:
        layout.read(str(d))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


# --- the real image, from Debian packages ----------------------------------------------------

def unpack(img, root) -> dict:
    """Apply the layout's layers in order into ``root`` (as a container
    runtime would); returns the image config."""
    doc = layout.read(img.layout)
    os.makedirs(root)
    for desc in doc.layers:
        blob = os.path.join(img.layout, "blobs", "sha256", desc["digest"][len("sha256:"):])
        subprocess.run(["tar", "-xzf", blob, "-C", str(root)], check=True, timeout=120)
    return doc.config


@pytest.mark.slow
def test_the_real_image_is_complete_and_reproducible(tmp_path):
    img = require_rootfs_image()
    m = img.manifest
    doc = layout.read(img.layout)
    cfg = doc.config["config"]
    assert cfg["Entrypoint"] == ["/usr/bin/python3", "-m", "blink_agent", "serve"]
    assert "PYTHONPATH=/opt/blink-agent" in cfg["Env"] and any(e.startswith("PATH=") for e in cfg["Env"])
    assert [x["mediaType"] for x in doc.layers] == [layout.LAYER_GZIP] * 3
    assert [x["name"] for x in m["layers"]] == ["base", "python", "agent"]
    assert m["compressed_bytes"] == sum(x["size"] for x in doc.layers) < 32 << 20
    assert set(m["packages"]) >= {"busybox-static", "libc6", m["python"] + "-minimal"}
    contents = []
    for desc, diff_id in zip(doc.layers, doc.config["rootfs"]["diff_ids"], strict=True):
        tar = gzip.decompress(doc.blob(desc["digest"]))
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            contents.append({x.name for x in tf.getmembers()})
    base, python, agent = contents
    for must in ("bin/busybox", "bin/sh", "bin/ls", "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
                 "etc/passwd", "etc/resolv.conf", "etc/hosts", "proc", "tmp"):
        assert must in base, must
    for must in ("usr/bin/python3", f"usr/bin/{m['python']}", f"usr/lib/{m['python']}/asyncio/__init__.pyc",
                 f"usr/lib/{m['python']}/os.pyc"):
        assert must in python, must
    assert "opt/blink-agent/blink_agent/__main__.py" in agent
    assert not any(n.startswith("opt/blink-agent/") for n in base | python)
    assert not any("tkinter" in n or "/test/" in n for n in python)  # only what the agent needs
    # the same inputs give the same bytes: a fresh build beside the cached one
    again = oci.build(str(tmp_path / "cache"), force=True, debs_dir=oci.default_debs_dir(image_state_dir()))
    assert again.manifest["key"] == m["key"]
    assert again.manifest["manifest_digest"] == m["manifest_digest"]
    assert [x["digest"] for x in again.manifest["layers"]] == [x["digest"] for x in m["layers"]]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mounts into the unpacked image need root")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_the_images_entrypoint_becomes_a_sessions_agent(make_daemon, tmp_path):
    """The image's own rootfs, unpacked layer by layer, chrooted, its
    Entrypoint run with its Env: the agent in it dials the daemon over
    loopback TCP and runs commands with the image's busybox and Python."""
    img = require_rootfs_image()
    root = tmp_path / "rootfs"
    config = unpack(img, root)["config"]
    d = make_daemon("--backend", "external", "--tcp", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"))
    token = json.loads(d.cli("register", "img", "--json").stdout)["token"]
    host, port = d.tcp
    env = dict(e.split("=", 1) for e in config["Env"])
    env.update(VHUB_SESSION="img", VHUB_TOKEN=token, VHUB_ADDR=f"tcp://{host}:{port}")
    # as a container runtime would: its own mount and pid namespaces, /dev and /proc mounted, then the rootfs
    run_in = 'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    agent = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", run_in, str(root),
                              *config["Entrypoint"]], env=env, cwd=str(root), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: json.loads(d.cli("info", "img", "--json").stdout)["agent_connected"], 30,
                 what="the image's agent connected")
        script = "echo $((6*7)); cat /etc/hostname; python3 -c 'import sys; print(sys.executable)'; ls /opt/blink-agent"
        r = subprocess.run([sys.executable, "-m", "vhubd", "run", "--control", d.control, "img", "--", "sh", "-c",
                            script], capture_output=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == ["42", "blink-guest", "/usr/bin/python3", "blink_agent"]
        info = json.loads(d.cli("info", "img", "--json").stdout)
        assert info["agent"]["peer"].startswith("tcp:127.0.0.1:")  # it came over loopback TCP
    finally:
        agent.kill()
        out = agent.communicate(timeout=10)[0]
    assert b"Traceback" not in out, out.decode(errors="replace")[-2000:]


def build_image(*args, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "vhubd", "build-image", *args], capture_output=True, timeout=timeout,
                          cwd=cwd)


@pytest.mark.slow
def test_blink_build_image(tmp_path):
    img = require_rootfs_image()
    state = tmp_path / "state"
    share_image_cache(state)
    out = tmp_path / "out"
    for _ in range(2):  # a second run replaces the first
        r = build_image(str(out), "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == str(out)
        assert b"up to date" in r.stderr and b"MiB compressed" in r.stderr
        assert layout.read(str(out)).manifest_digest == img.manifest["manifest_digest"]
    assert sorted(os.listdir(out / "blobs" / "sha256")) == sorted(os.listdir(os.path.join(img.layout, "blobs",
                                                                                            "sha256")))
    r = build_image("--state-dir", str(state), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["layout"] == img.layout
    # a relative state dir builds the same image (modulefinder's paths are absolute)
    (tmp_path / "rel" / "guest").mkdir(parents=True)
    os.symlink(oci.default_debs_dir(image_state_dir()), oci.default_debs_dir(str(tmp_path / "rel")))
    r = build_image("--state-dir", "rel", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest_digest"] == img.manifest["manifest_digest"]
    # the agent on top of another layout (here: this one)
    on = tmp_path / "on"
    r = build_image(str(on), "--base", str(out))
    assert r.returncode == 0, r.stderr
    doc = layout.read(str(on))
    assert len(doc.layers) == 4 and doc.layers[:3] == layout.read(str(out)).layers
    assert doc.config["config"]["Entrypoint"] == ["python3", "-m", "blink_agent", "serve"]
    assert len(doc.config["rootfs"]["diff_ids"]) == 4
    # bad input: one line, a non-zero exit, nothing else
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for args, code, words in [
        ((str(junk), "--state-dir", str(state)), 1, b"neither empty nor an OCI layout"),
        ((str(tmp_path / "file"), "--state-dir", str(state)), 1, b"error:"),
        ((str(tmp_path / "x"), "--base", str(junk)), 1, b"is not an OCI image layout"),
        (("--base", str(out)), 2, b"--base needs DIR"),
    ]:
        r = build_image(*args)
        assert r.returncode == code, (args, r.stderr)
        errors = [line for line in r.stderr.decode().splitlines() if "error" in line]
        assert len(errors) == 1 and words.decode() in errors[0] and b"Traceback" not in r.stderr, r.stderr
    assert (junk / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
