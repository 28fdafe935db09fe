"""``blink expose`` and ``blink cp`` with a real guest: a QEMU microvm (TCG
here) whose only link to the host is the daemon's vsock device. The guest has
no network device at all: every byte below crosses the agent's one vsock
connection. Skipped, with the reason, where QEMU or the guest image is missing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from harness import ROOT, Daemon
from qemu_testing import require_guest_image_of_this_checkout
from test_cp import make_tree, sha, snapshot

pytestmark = pytest.mark.slow
PY = sys.executable

# The guest image carries only the part of the standard library the agent uses
# (no http.server): a small HTTP/1.0 file server on sockets and threads.
SERVER = r'''
import os, socket, sys, threading
root, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(128)
def serve(c):
    with c:
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(4096)
            if not d:
                return
            req += d
        path = os.path.join(root, req.split(b" ")[1].decode().lstrip("/") or "index.html")
        try:
            with open(path, "rb") as f:
                body = f.read()
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            c.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    image = require_guest_image_of_this_checkout()
    d = Daemon(tmp_path_factory.mktemp("qports"), "--backend", "qemu", "--image", image.dir,
               "--state-dir", str(tmp_path_factory.mktemp("qpstate")), "--boot-timeout", "90").start()
    r = d.cli("boot", "px", "--memory-mib", "512", timeout=180)
    assert r.returncode == 0, r.stderr
    yield d
    d.stop()


def run(d, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vhubd", "run", "--control", d.control, "-n", "px", "--", *argv],
                          capture_output=True, timeout=timeout, cwd=ROOT)


def cp(d, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vhubd", "cp", "--control", d.control, *args], capture_output=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def web(vm, tmp_path_factory):
    """The file server running in the VM on port 8080, exposed on the host."""
    script = tmp_path_factory.mktemp("srv") / "srv.py"
    script.write_text(SERVER)
    assert cp(vm, str(script), "px:/tmp/srv.py").returncode == 0
    r = run(vm, "sh", "-c", "mkdir -p /tmp/www && echo '<h1>hello from the vm</h1>' > /tmp/www/index.html && "
                            "head -c 262144 /dev/urandom > /tmp/www/blob.bin && sha256sum /tmp/www/blob.bin && "
                            "(python3 /tmp/srv.py /tmp/www 8080 >/dev/null 2>&1 &)")
    assert r.returncode == 0, r.stderr
    blob_sha = r.stdout.split()[0].decode()
    r = vm.cli("expose", "px", "8080", "--wait", "--timeout", "60", timeout=120)
    assert r.returncode == 0, r.stderr
    host, port = r.stdout.decode().strip()[len("http://"):].rstrip("/").rsplit(":", 1)
    return host, int(port), blob_sha


def get(host: str, port: int, path: str) -> bytes:
    with socket.create_connection((host, port), timeout=120) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        out = bytearray()
        while d := s.recv(1 << 16):
            out += d
    return bytes(out).partition(b"\r\n\r\n")[2]


def test_a_page_from_the_vm_through_expose_with_curl(vm, web):
    host, port, _ = web
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian: apt-get install curl)")
    r = subprocess.run(["curl", "-sS", "--max-time", "60", f"http://{host}:{port}/index.html"],
                       capture_output=True, timeout=90)
    assert (r.returncode, r.stdout) == (0, b"<h1>hello from the vm</h1>\n"), r.stderr
    info = json.loads(vm.cli("info", "px", "--json").stdout)
    assert info["backend"] == "qemu" and info["exposed"][0]["guest_port"] == 8080


def test_64_concurrent_downloads_from_the_vm(vm, web):
    host, port, blob_sha = web
    sums: list = []
    threads = [threading.Thread(target=lambda: sums.append(hashlib.sha256(get(host, port, "/blob.bin")).hexdigest()))
               for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sums == [blob_sha] * 64


def test_100_mb_into_the_vm_and_back(vm, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    r = cp(vm, str(big), "px:/tmp/big.bin")
    assert r.returncode == 0, r.stderr
    r = run(vm, "sha256sum", "/tmp/big.bin")
    assert r.stdout.split()[0].decode() == sha(big)
    r = cp(vm, "px:/tmp/big.bin", str(tmp_path / "back.bin"))
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "back.bin") == sha(big)
    run(vm, "rm", "-f", "/tmp/big.bin")


def test_a_tree_with_links_and_modes_through_the_vm(vm, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    make_tree(src)
    r = cp(vm, str(src), "px:/tmp/tree")
    assert r.returncode == 0, r.stderr
    r = run(vm, "ls", "-l", "/tmp/tree/link-to-a")
    assert b"link-to-a -> a.txt" in r.stdout
    r = cp(vm, "px:/tmp/tree", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "back") == snapshot(src)
