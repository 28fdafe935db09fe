"""Processes and sockets for the end-to-end benchmarks (bench/test_bench_relay.py).

- ``Daemon``: a real ``python -m vhubd serve`` subprocess on sockets in a temp dir.
- ``Worker``: a ``bench/_worker.py`` subprocess (stream sender, RPC guest or RPC
  handler) driven one JSON line at a time.
- ``Socat``: one ``socat UNIX-LISTEN:a UNIX-CONNECT:b`` blind relay (one connection).
- ``StreamReceiver``: the sink, in the benchmark process: counts every byte and
  checksums it (crc32 of the whole byte stream, headers included, against the
  sender's), so a lost, duplicated, reordered or corrupted byte fails the test.

- ``FanoutReceiver``: N such sinks read together (one epoll loop), each
  checksummed on its own.
- ``control_call``: one daemon call on the control socket (blocking).
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
import time
import zlib

from vhubd.frames import HEADER, MsgType

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = os.environ.get("VHUB_BENCH_QUICK", "") not in ("", "0")


def wait_for(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    def __init__(self, tmpdir: str, env: dict | None = None, *args: str, tree: str | None = None):
        self.tree = tree or os.environ.get("VHUB_BENCH_TREE") or ROOT  # where `python -m vhubd` imports from
        self.dir = tmpdir
        self.socket = os.path.join(tmpdir, "guest.sock")
        self.control = os.path.join(tmpdir, "control.sock")
        self.logpath = os.path.join(tmpdir, "vhubd.log")
        self.env = dict(os.environ, **(env or {}))
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self._log = open(self.logpath, "wb")
        # heartbeats off: the stream sink checksums raw bytes and never answers pings
        cmd = [sys.executable, "-m", "vhubd", "serve", "--socket", self.socket, "--control", self.control,
               "--heartbeat", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tree)
        try:
            wait_for(lambda: self.proc.poll() is not None or "vhubd ready" in self.log(), 15, "daemon ready")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            self._log.close()
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
        return self

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def codec(self) -> str:
        for line in self.log().splitlines():
            if "vhubd ready" in line and "codec=" in line:
                return line.rsplit("codec=", 1)[1].split()[0]
        return "?"

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


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
        for p in (listen,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.listen = listen
        args = ["socat"] + (["-b", str(buf)] if buf else []) + [f"UNIX-LISTEN:{listen}", f"UNIX-CONNECT:{target}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(listen) or self.proc.poll() is not None, 10, "socat listening")

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


# --- BLIN bits for the benchmark process --------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        d = sock.recv(n - len(out))
        if not d:
            raise ConnectionError(f"peer closed after {len(out)} of {n} bytes")
        out += d
    return bytes(out)


def client_handshake(path: str, hello: dict, timeout: float = 10.0) -> socket.socket:
    """Connect to the control socket and handshake; returns the socket, positioned
    just after the daemon's handshake answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    body = json.dumps(hello).encode()
    sock.sendall(HEADER.pack(0x424C494E, 1, MsgType.HANDSHAKE, 0, len(body), 1) + body)
    magic, ver, mtype, _, length, _ = HEADER.unpack(_recv_exact(sock, HEADER.size))
    answer = _recv_exact(sock, length)
    if mtype != MsgType.HANDSHAKE or not json.loads(answer).get("ok"):
        sock.close()
        raise ConnectionError(f"client handshake refused: type {mtype:#x} {answer[:200]!r}")
    return sock


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


def control_call(path: str, method: str, params: dict | None = None, timeout: float = 30.0):
    """One RpcRequest on a fresh control connection; returns the result or raises."""
    sock = client_handshake(path, {"role": "client", "session": "*"}, timeout)
    try:
        body = json.dumps({"method": method, "params": params or {}}).encode()
        sock.sendall(HEADER.pack(0x424C494E, 1, MsgType.RPC_REQUEST, 0, len(body), 7) + body)
        while True:
            _, _, mtype, _, length, rid = HEADER.unpack(_recv_exact(sock, HEADER.size))
            payload = _recv_exact(sock, length)
            if rid != 7:
                continue
            if mtype == MsgType.RPC_RESPONSE:
                return json.loads(payload)
            if mtype == MsgType.RPC_ERROR:
                raise RuntimeError(f"{method}: {payload.decode('utf-8', 'replace')}")
    finally:
        sock.close()


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
