"""``blink cp`` against a real daemon and a real agent (local backend: the
guest's files are this host's, under a test directory), and the tar safety
rules of ``tarcopy`` on both ends: hostile archives going in, hostile trees
coming out, a guest that dies mid-transfer, the progress line on a terminal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from harness import ROOT, Daemon, wait_for

PY = sys.executable


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("cp"), "--backend", "local").start()
    assert d.cli("boot", "demo").returncode == 0
    yield d
    d.stop()


def cp(d, *args: str, input: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vhubd", "cp", "--control", d.control, *args], input=input,
                          capture_output=True, timeout=timeout, cwd=ROOT)


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root) -> dict:
    """Every entry under ``root``: type, mode, mtime (not for links), owner, content or target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path), st.st_uid)
            elif os.path.isdir(path):
                out[rel] = ("dir", oct(st.st_mode), int(st.st_mtime), st.st_uid, st.st_gid)
            else:
                out[rel] = ("file", oct(st.st_mode), int(st.st_mtime), st.st_uid, st.st_gid, sha(path))
    return out


def make_tree(root) -> None:
    os.makedirs(root / "sub" / "deeper")
    (root / "a.txt").write_text("alpha\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o750)
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    os.symlink("a.txt", root / "link-to-a")
    os.symlink("../a.txt", root / "sub" / "up-link")
    os.symlink("deeper", root / "sub" / "dir-link")
    os.symlink("missing", root / "dangling")
    os.link(root / "a.txt", root / "hard-a")
    if os.geteuid() == 0:
        os.chown(root / "sub" / "data.bin", 1234, 5678)
    os.chmod(root / "sub" / "deeper", 0o700)
    for i, p in enumerate(sorted(root.rglob("*"))):
        os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i), follow_symlinks=False)
    os.chmod(root / "sub", 0o555)  # read-only: extraction must still fill it
    os.utime(root / "sub", (1_500_000_000, 1_500_000_000))


def test_a_tree_with_links_and_modes_round_trips(local, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    make_tree(src)
    guest = tmp_path / "guest"
    guest.mkdir()
    up = cp(local, "--json", str(src), f"demo:{guest}")  # an existing directory: lands as guest/tree
    assert up.returncode == 0, up.stderr
    res = json.loads(up.stdout)
    assert res["ok"] and res["sent"] == res["bytes"] and len(res["sha256"]) == 64
    assert snapshot(guest / "tree") == snapshot(src)
    assert os.readlink(guest / "tree" / "link-to-a") == "a.txt"  # a link, not a copy
    assert os.stat(guest / "tree" / "hard-a").st_ino == os.stat(guest / "tree" / "a.txt").st_ino
    if os.geteuid() == 0:
        assert os.stat(guest / "tree" / "sub" / "data.bin").st_uid == 1234
    back = tmp_path / "back"  # does not exist: the tree lands as back, like cp -r
    down = cp(local, f"demo:{guest}/tree", str(back))
    assert down.returncode == 0, down.stderr
    assert snapshot(back) == snapshot(src)


def test_a_100_mb_file_up_and_back(local, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    guest = tmp_path / "guest"
    guest.mkdir()
    r = cp(local, str(big), f"demo:{guest}/copy.bin")  # a file to a new name
    assert r.returncode == 0, r.stderr
    assert sha(guest / "copy.bin") == sha(big)
    r = cp(local, f"demo:{guest}/copy.bin", str(tmp_path / "again.bin"))
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "again.bin") == sha(big)
    assert r.stdout == b"" and r.stderr == b""  # no progress line on a pipe


def test_tar_on_stdin_and_stdout(local, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = 6, 0o640, 1_234_567_890
        tar.addfile(info, io.BytesIO(b"hello\n"))
    dest = tmp_path / "in"  # created
    r = cp(local, "-", f"demo:{dest}", input=buf.getvalue())
    assert r.returncode == 0, r.stderr
    assert (dest / "hello.txt").read_bytes() == b"hello\n"
    assert oct(os.stat(dest / "hello.txt").st_mode & 0o777) == "0o640"
    assert os.stat(dest / "hello.txt").st_mtime == 1_234_567_890
    r = cp(local, f"demo:{dest}", "-")
    assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        assert sorted(tar.getnames()) == ["in", "in/hello.txt"]
        assert tar.extractfile("in/hello.txt").read() == b"hello\n"


def evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            t = tarfile.TarInfo("../x")
            t.size = 4
            tar.addfile(t, io.BytesIO(b"evil"))
        elif kind == "absolute":
            t = tarfile.TarInfo("/etc/x")
            t.size = 4
            tar.addfile(t, io.BytesIO(b"evil"))
        elif kind in ("symlink-out", "symlink-abs"):
            t = tarfile.TarInfo("escape")
            t.type = tarfile.SYMTYPE
            t.linkname = "../../outside" if kind == "symlink-out" else "/etc"
            tar.addfile(t)
            w = tarfile.TarInfo("escape/passwd")
            w.size = 4
            tar.addfile(w, io.BytesIO(b"evil"))
        elif kind == "through-link":  # a link inside, then a file written through a link that leads out
            t = tarfile.TarInfo("inside")
            t.type = tarfile.SYMTYPE
            t.linkname = "."
            tar.addfile(t)
            w = tarfile.TarInfo("inside/../../x")
            w.size = 4
            tar.addfile(w, io.BytesIO(b"evil"))
        elif kind == "device":
            t = tarfile.TarInfo("null")
            t.type = tarfile.CHRTYPE
            t.devmajor, t.devminor = 1, 3
            tar.addfile(t)
    return buf.getvalue()


@pytest.mark.parametrize("kind, name, why", [
    ("dotdot", "../x", "a '..' component"),
    ("absolute", "/etc/x", "an absolute path"),
    ("symlink-out", "escape", "outside the destination"),
    ("symlink-abs", "escape", "a symlink to an absolute path"),
    ("through-link", "inside/../../x", "a '..' component"),
    ("device", "null", "a device file"),
])
def test_hostile_archives_are_refused_by_name(local, tmp_path, kind, name, why):
    dest = tmp_path / "a" / "b" / "dest"
    before = set(os.listdir(tmp_path))
    r = cp(local, "-", f"demo:{dest}", input=evil_tar(kind))
    assert r.returncode == 1
    line = r.stderr.decode()
    assert len(line.splitlines()) == 1 and f"refused {name!r}" in line and why in line, line
    assert (dest / "fine.txt").read_bytes() == b"ok"  # what came before it is there
    assert set(os.listdir(tmp_path)) - {"a"} == before  # nothing landed outside
    assert os.listdir(tmp_path / "a") == ["b"] and os.listdir(tmp_path / "a" / "b") == ["dest"]
    assert not (tmp_path / "a" / "b" / "x").exists() and not (tmp_path / "a" / "outside").exists()
    assert not os.path.lexists(dest / "escape") or os.path.islink(dest / "escape") is False
    # the session is fine afterwards
    ok = tmp_path / "ok.txt"
    ok.write_text("fine")
    assert cp(local, str(ok), f"demo:{dest}").returncode == 0


def test_a_guest_tree_whose_links_lead_out_is_refused_on_the_host(local, tmp_path):
    guest = tmp_path / "guest" / "tree"
    guest.mkdir(parents=True)
    (guest / "a").write_text("a")
    os.symlink("/etc/passwd", guest / "evil")
    dest = tmp_path / "host"
    r = cp(local, f"demo:{guest}", str(dest))
    assert r.returncode == 1
    assert "refused 'tree/evil': a symlink to an absolute path ('/etc/passwd')" in r.stderr.decode()
    assert not os.path.lexists(dest / "evil")


def test_an_existing_link_in_the_destination_is_not_followed(local, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "sub")  # planted before the copy
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        t = tarfile.TarInfo("sub/x")
        t.size = 4
        tar.addfile(t, io.BytesIO(b"evil"))
    r = cp(local, "-", f"demo:{dest}", input=buf.getvalue())
    assert r.returncode == 1 and b"refused 'sub/x'" in r.stderr and b"outside the destination" in r.stderr
    assert os.listdir(outside) == []


def agent_pid(d) -> int:
    return json.loads(d.cli("info", "demo", "--json").stdout)["agent"]["pid"]


def test_a_guest_that_dies_mid_transfer(local, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB to read, nothing to write
    proc = subprocess.Popen([PY, "-m", "vhubd", "cp", "--control", local.control, f"demo:{big}",
                             str(tmp_path / "out.bin")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    wait_for(lambda: os.path.exists(tmp_path / "out.bin") and os.path.getsize(tmp_path / "out.bin") > 1 << 20,
             60, what="the download to start")
    os.kill(agent_pid(local), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.decode().startswith("blink: ") and "agent disconnected" in err.decode() and len(err.splitlines()) == 1
    # the backend brings no agent back by itself: boot again, and copies work
    wait_for(lambda: json.loads(local.cli("info", "demo", "--json").stdout)["agent_connected"] is False, 20)
    assert local.cli("boot", "demo").returncode == 0
    small = tmp_path / "small"
    small.write_text("x")
    assert cp(local, str(small), f"demo:{tmp_path}/small2").returncode == 0
    # and an upload cut by the agent's death
    proc = subprocess.Popen([PY, "-m", "vhubd", "cp", "--control", local.control, "-", f"demo:{tmp_path}/up"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdin.write(evil_tar("none")[:-1024])  # a tar without its end, then the agent dies
    proc.stdin.flush()
    wait_for(lambda: os.path.exists(tmp_path / "up" / "fine.txt"), 30)
    os.kill(agent_pid(local), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"agent disconnected" in err
    wait_for(lambda: json.loads(local.cli("info", "demo", "--json").stdout)["agent_connected"] is False, 20)
    assert local.cli("boot", "demo").returncode == 0


def test_progress_line_on_a_terminal(local, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(20 << 20))
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, "-m", "vhubd", "cp", "--control", local.control, str(src),
                             f"demo:{tmp_path}/g.bin"], stderr=slave, stdout=subprocess.DEVNULL, cwd=ROOT)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 1)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0
    assert b"%" in seen and b"MiB/s" in seen and seen.endswith(b"\r\x1b[K")
    assert sha(tmp_path / "g.bin") == sha(src)


def test_usage_and_missing_paths(local, tmp_path):
    r = cp(local, str(tmp_path), str(tmp_path / "x"))
    assert r.returncode == 2 and b"exactly one of SRC and DEST" in r.stderr
    r = cp(local, "demo:/a", "demo:/b")
    assert r.returncode == 2
    r = cp(local, str(tmp_path), "demo:relative/path")
    assert r.returncode == 2 and b"must be absolute" in r.stderr
    r = cp(local, str(tmp_path / "nope"), "demo:/tmp/x")
    assert r.returncode == 1 and b"No such file or directory" in r.stderr
    r = cp(local, f"demo:{tmp_path}/nope", str(tmp_path / "y"))
    assert r.returncode == 1 and b"not_found" in r.stderr and b"No such file or directory" in r.stderr
    r = cp(local, str(tmp_path), "nosuch:/tmp/x")
    assert r.returncode == 1 and b"unknown_session" in r.stderr


def test_the_host_and_the_agent_share_one_tarcopy():
    with open(os.path.join(ROOT, "vhubd", "tarcopy.py"), "rb") as a, \
            open(os.path.join(ROOT, "guest-agent", "blink_agent", "tarcopy.py"), "rb") as b:
        assert a.read() == b.read(), "vhubd/tarcopy.py must be guest-agent/blink_agent/tarcopy.py, byte for byte"


def test_an_agent_without_copies_is_named(make_daemon, tmp_path):
    """Blink's agent (or ours from before copies) answers no_handler: one clear line."""
    from harness.peers import RawGuest

    from vhubd.frames import MsgType

    d = make_daemon("--backend", "external")
    tok = d.call("vhub.register", {"session": "old"})["token"]
    g = RawGuest(d.socket)
    assert g.handshake({"session": "old", "token": tok})[0] == "ok"
    f = tmp_path / "f"
    f.write_text("x")
    proc = subprocess.Popen([PY, "-m", "vhubd", "cp", "--control", d.control, str(f), "old:/tmp/f"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    while True:
        req = g.next_frame(timeout=30)
        if req.msg_type == MsgType.RPC_REQUEST and req.request_id:
            assert json.loads(bytes(req.payload))["method"] == "agent.untar"
            g.send(MsgType.RPC_ERROR, req.request_id, {"code": "no_handler", "message": "no handler"})
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == b"blink: copy_failed: the agent of session 'old' does not do copies (agent.tar/agent.untar): " \
                  b"update the guest image\n"
    g.close()
