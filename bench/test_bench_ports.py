"""Exposed ports and copies, with the ``local`` backend (the agent is a host
process; the "guest" port is a server on this host's loopback):

- expose throughput: one connection downloads SIZE bytes from a guest server,
  through ``blink expose`` (host socket -> daemon -> agent -> guest socket and
  back), beside a direct loopback connection to the same server and
  ``socat TCP-LISTEN:...,fork TCP:...`` in between; MB/s and ratios.
- connection set-up: connect, send one byte, get it echoed (p50/p99), the
  same three ways.
- ``blink cp`` of one file up and down, MB/s, beside ``tar c`` piped into
  ``tar x``.

Correctness only: every byte is counted (and copies compared by sha256).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from _harness import QUICK, ROOT, Daemon, percentile

SIZE = (16 if QUICK else 128) << 20
ROUNDS = 3 if QUICK else 5
CONNECTS = 50 if QUICK else 300
CP_SIZE = (16 if QUICK else 100) << 20

# The "guest": a source port (SIZE bytes to each connection) and an echo port.
SERVER = r"""
import socket, sys, threading
size = int(sys.argv[1])
blob = b"\xa5" * (1 << 20)
def source(c):
    with c:
        left = size
        while left:
            n = c.send(memoryview(blob)[:min(left, len(blob))])
            left -= n
def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
def serve(s, fn):
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=fn, args=(c,), daemon=True).start()
ports = []
for fn in (source, echo):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    ports.append(s.getsockname()[1])
    threading.Thread(target=serve, args=(s, fn), daemon=True).start()
print(*ports, flush=True)
threading.Event().wait()
"""


@pytest.fixture(scope="module")
def guest():
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(SIZE)], stdout=subprocess.PIPE, text=True)
    src, echo = map(int, p.stdout.readline().split())
    yield src, echo
    p.kill()
    p.wait()
    p.stdout.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vports"))
    daemon = Daemon(d, {}, "--backend", "local", "--state-dir", os.path.join(d, "state")).start()
    assert daemon.cli("boot", "ports").returncode == 0
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def expose(d, port: int) -> int:
    r = d.cli("expose", "ports", str(port))
    assert r.returncode == 0, r.stderr
    return int(r.stdout.decode().strip().rstrip("/").rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def socat(guest):
    if shutil.which("socat") is None:
        yield None
        return
    procs, ports = [], []
    for target in guest:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs.append(subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                       f"TCP:127.0.0.1:{target}"], stderr=subprocess.DEVNULL))
        ports.append(port)
    for port in ports:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
    yield ports
    for p in procs:
        p.terminate()
        p.wait()


def download(port: int) -> float:
    """Seconds to receive SIZE bytes from ``port`` (all of them, counted)."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        got = 0
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
    dt = time.perf_counter() - t0
    assert got == SIZE, got
    return dt


def setup_latency(port: int) -> float:
    t0 = time.perf_counter_ns()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        dt = time.perf_counter_ns() - t0
    return dt


def test_expose_throughput(benchmark, record, local, guest, socat):
    src, _ = guest
    ways = {"direct loopback (reference)": src, "blink expose": expose(local, src)}
    if socat:
        ways["socat TCP-LISTEN,fork (reference)"] = socat[0]
    best: dict = {}
    for name, port in ways.items():
        times = [download(port) for _ in range(ROUNDS)]
        best[name] = SIZE / min(times) / 1e6
    benchmark.group = "ports"
    port = ways["blink expose"]
    benchmark.pedantic(lambda: download(port), rounds=1, iterations=1)
    direct = best["direct loopback (reference)"]
    for name, mbs in best.items():
        record(benchmark, "ports", secondary=name != "blink expose", case=f"one connection, {SIZE >> 20} MiB",
               way=name, mb_s=round(mbs, 1), vs_direct=round(mbs / direct, 3),
               vs_socat=round(mbs / best["socat TCP-LISTEN,fork (reference)"], 3) if socat else None)


def test_expose_connection_setup(benchmark, record, local, guest, socat):
    _, echo = guest
    ways = {"direct loopback (reference)": echo, "blink expose": expose(local, echo)}
    if socat:
        ways["socat TCP-LISTEN,fork (reference)"] = socat[1]
    stats: dict = {}
    for name, port in ways.items():
        lat = sorted(setup_latency(port) for _ in range(CONNECTS))
        stats[name] = (percentile(lat, 50) / 1e3, percentile(lat, 99) / 1e3)
    benchmark.group = "ports"
    port = ways["blink expose"]
    benchmark.pedantic(lambda: setup_latency(port), rounds=5, iterations=1)
    for name, (p50, p99) in stats.items():
        record(benchmark, "ports", secondary=name != "blink expose",
               case="connect + 1-byte echo", way=name, p50_us=round(p50, 1), p99_us=round(p99, 1),
               p50_vs_direct=round(p50 / stats["direct loopback (reference)"][0], 2),
               p50_vs_socat=round(p50 / stats["socat TCP-LISTEN,fork (reference)"][0], 2) if socat else None)


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_cp_throughput(benchmark, record, local, tmp_path):
    src = tmp_path / "payload.bin"
    with open(src, "wb") as f:
        for _ in range(CP_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    want = _sha(str(src))

    def blink_cp(*args: str) -> float:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "vhubd", "cp", "--control", local.control, *args],
                           capture_output=True, cwd=ROOT, timeout=600)
        dt = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        return dt

    def tar_pipe(dest: str) -> float:
        os.makedirs(dest, exist_ok=True)
        t0 = time.perf_counter()
        r = subprocess.run(f"tar cf - -C {tmp_path} payload.bin | tar xf - -C {dest}", shell=True)
        dt = time.perf_counter() - t0
        assert r.returncode == 0
        return dt

    up, down, ref = [], [], []
    for i in range(ROUNDS):
        up.append(blink_cp(str(src), f"ports:{tmp_path}/up{i}.bin"))
        down.append(blink_cp(f"ports:{tmp_path}/up{i}.bin", str(tmp_path / f"down{i}.bin")))
        ref.append(tar_pipe(str(tmp_path / f"ref{i}")))
        assert _sha(str(tmp_path / f"down{i}.bin")) == want
        for p in (f"up{i}.bin", f"down{i}.bin", f"ref{i}/payload.bin"):
            os.unlink(tmp_path / p)
    benchmark.group = "ports"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    mb = CP_SIZE / 1e6
    ref_mbs = mb / min(ref)
    for name, times in (("blink cp into the session", up), ("blink cp out of the session", down),
                        ("tar c piped into tar x (reference)", ref)):
        mbs = mb / min(times)
        record(benchmark, "ports", secondary=not name.startswith("blink cp into"),
               case=f"one {CP_SIZE >> 20} MiB file", way=name, mb_s=round(mbs, 1),
               vs_tar_pipe=round(mbs / ref_mbs, 3))
