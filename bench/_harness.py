"""Processes and sockets for the end-to-end benchmarks (bench/test_bench_relay.py).

- ``Daemon``: the shared harness's daemon (tests/harness), heartbeats off.
- ``Worker``: a ``bench/_worker.py`` subprocess (stream sender, RPC guest or RPC
  handler) driven one JSON line at a time.
- ``Socat``: one ``socat UNIX-LISTEN:a UNIX-CONNECT:b`` blind relay (one connection).
- ``StreamReceiver``: the sink, in the benchmark process: counts every byte and
  checksums it (crc32 of the whole byte stream, headers included, against the
  sender's), so a lost, duplicated, reordered or corrupted byte fails the test.

- ``FanoutReceiver``: N such sinks read together (one epoll loop), each
  checksummed on its own.
- ``control_call``, ``client_handshake``: from tests/harness (blocking).
- ``raise_nofile``: lift RLIMIT_NOFILE before spawning a daemon (it inherits it).

Sizes shrink with ``VHUB_BENCH_QUICK=1`` (CI).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import Daemon as _Daemon  # noqa: E402
from harness import client_handshake, control_call, wait_for  # noqa: E402,F401 (re-exported)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = os.environ.get("VHUB_BENCH_QUICK", "") not in ("", "0")


def Daemon(tmpdir: str, env: dict | None = None, *args: str, tree: str | None = None) -> _Daemon:
    """The shared test harness's daemon, as benchmarks run it: heartbeats off
    (sinks checksum raw bytes and never answer pings), imported from
    ``VHUB_BENCH_TREE`` when set (A/B runs of two source trees)."""
    return _Daemon(tmpdir, "--heartbeat", "0", *args, env=env, socket_name="guest.sock",
                   tree=tree or os.environ.get("VHUB_BENCH_TREE") or ROOT)


class Worker:
    """A bench/_worker.py process."""

    def __init__(self, name: str):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, text=True, bufsize=1)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.proc.poll()})")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.send(**cmd)
        out = self.read()
        if out.get("ok") is False:
            raise RuntimeError(f"worker {self.name}: {cmd['cmd']} failed: {out}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="exit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdin.close()
        self.proc.stdout.close()


class Socat:
    """``socat [-b N] UNIX-LISTEN:listen UNIX-CONNECT:target``, one connection."""

    def __init__(self, listen: str, target: str, buf: int | None):
        if shutil.which("socat") is None:
            raise RuntimeError("socat is not installed (apt-get install -y socat)")
        args = ["socat"] + (["-b", str(buf)] if buf else []) + [f"UNIX-LISTEN:{listen}", f"UNIX-CONNECT:{target}"]
        self._start(args, listen)

    def _start(self, args: list[str], listen: str) -> None:
        try:
            os.unlink(listen)
        except FileNotFoundError:
            pass
        self.listen = listen
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(listen) or self.proc.poll() is not None, 10, what=f"{args[0]} listening")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stderr.close()
        try:
            os.unlink(self.listen)
        except FileNotFoundError:
            pass


_floor: dict = {}


def floor_binary() -> str:
    """bench/floor_relay.c, compiled once per process (``cc -O2``)."""
    if "path" not in _floor:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (apt-get install -y gcc) for bench/floor_relay.c")
        out = os.path.join(tempfile.mkdtemp(prefix="vhub-floor"), "floor_relay")
        subprocess.run([cc, "-O2", "-o", out, os.path.join(HERE, "floor_relay.c")], check=True)
        _floor["path"] = out
    return _floor["path"]


class FloorRelay(Socat):
    """bench/floor_relay.c between ``listen`` and ``target``, one connection:
    the least a BLIN stream relay in C does per read (every header parsed,
    whole frames written, each batch copied into a 1 MiB scrollback ring)."""

    def __init__(self, listen: str, target: str):  # not super().__init__: that starts socat
        self._start([floor_binary(), listen, target], listen)


# --- BLIN bits for the benchmark process --------------------------------------------

class StreamReceiver:
    """Reads exactly ``nbytes`` from ``sock`` and checksums every byte."""

    BUF = 1 << 20

    def __init__(self):
        self.buf = bytearray(self.BUF)
        self.mv = memoryview(self.buf)

    def receive(self, sock: socket.socket, nbytes: int, timeout: float = 60.0) -> tuple[int, int]:
        sock.settimeout(timeout)
        recv_into = sock.recv_into
        mv = self.mv
        crc = 0
        got = 0
        size = self.BUF
        crc32 = zlib.crc32
        while got < nbytes:
            want = nbytes - got
            n = recv_into(mv, want if want < size else size)
            if not n:
                break
            crc = crc32(mv[:n], crc)
            got += n
        return got, crc

    def extra(self, sock: socket.socket, wait: float = 0.05) -> bytes:
        """Bytes that arrive after the expected end (there must be none)."""
        sock.settimeout(wait)
        try:
            return sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return b""


class FanoutReceiver:
    """N sinks read together with one selector; every sink must get exactly
    ``nbytes`` whose crc32 is the sender's (each sink is checked on its own)."""

    BUF = 1 << 20

    def __init__(self):
        self.buf = bytearray(self.BUF)
        self.mv = memoryview(self.buf)

    def receive(self, socks: list, nbytes: int, timeout: float = 120.0) -> list[tuple[int, int]]:
        sel = selectors.DefaultSelector()
        state = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
            state[i] = [0, 0]
        mv, size, crc32 = self.mv, self.BUF, zlib.crc32
        open_ = len(socks)
        deadline = time.monotonic() + timeout
        try:
            while open_:
                ready = sel.select(max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"fan-out sinks stalled: {[v[0] for v in state.values()]} of {nbytes}")
                for key, _ in ready:
                    st = state[key.data]
                    sock = key.fileobj
                    eof = False
                    while st[0] < nbytes:
                        want = nbytes - st[0]
                        try:
                            n = sock.recv_into(mv, want if want < size else size)
                        except BlockingIOError:
                            break
                        if not n:
                            eof = True
                            break
                        st[1] = crc32(mv[:n], st[1])
                        st[0] += n
                    if eof or st[0] >= nbytes:
                        sel.unregister(sock)
                        open_ -= 1
        finally:
            sel.close()
            for s in socks:
                s.setblocking(True)
        return [tuple(state[i]) for i in range(len(socks))]


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``want`` (capped by
    the hard limit); children (the daemon) inherit it. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of another process."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                v = line.split()[3]
                return 1 << 62 if v == "unlimited" else int(v)
    return 0


def percentile(sorted_vals: list, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def size_name(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}KiB"
    return f"{n}B"
