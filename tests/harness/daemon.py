"""A real daemon process for tests, benchmarks and the reliability script.

``Daemon`` runs ``python -m vhubd serve`` on sockets under a directory of
its own and knows it is ready the way systemd does: it listens on a test
``NOTIFY_SOCKET`` for ``READY=1`` (no log scraping). Its listeners' addresses
then come from the daemon itself (``vhub.info``). Every wait is bounded.

The notify socket is read for the daemon's whole life, as PID 1 would read
it: a datagram socket nobody reads fills after a few ``STATUS=`` lines, and
then a daemon sending with libsystemd's blocking ``sd_notify`` would hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from vhubd.frames import HEADER, HEADER_SIZE, MsgType
from vhubd.protocol import encode_frame

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """One ``blink serve`` process.

    ``args`` are extra ``serve`` flags; ``tree`` is the source tree it imports
    ``vhubd`` from (benchmarks compare trees with ``VHUB_BENCH_TREE``), its
    working directory; ``python`` the interpreter (another venv's, to run an
    installed vhubd: then ``tree`` is any directory without a ``vhubd/``).
    """

    def __init__(self, directory, *args: str, env: dict | None = None, socket_name: str = "vhub.sock",
                 tree: str | None = None, python: str | None = None):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.socket = os.path.join(self.dir, socket_name)
        self.control = os.path.join(self.dir, "control.sock")
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.tree = tree or ROOT
        self.python = python or sys.executable
        self.logpath = os.path.join(self.dir, f"vhubd-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None
        self.notices: list[str] = []  # every sd_notify message it sent
        self.listeners: dict = {}
        self._notify: socket.socket | None = None
        self._notified = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log = None

    # -- lifecycle --
    def start(self, timeout: float = 20.0) -> Daemon:
        path = os.path.join(self.dir, f"notify-{time.monotonic_ns()}.sock")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(path)
        self._reader = threading.Thread(target=self._read_notices, args=(self._notify,), daemon=True)
        self._reader.start()
        env = dict(self.env, NOTIFY_SOCKET=path)
        self._log = open(self.logpath, "wb")
        state = [] if "--state-dir" in self.args else ["--state-dir", os.path.join(self.dir, "state")]
        cmd = [self.python, "-m", "vhubd", "serve", "--socket", self.socket, "--control", self.control,
               *state, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.tree)
        try:
            self.ready_notice = self.wait_notice("READY=1", timeout)
            self.listeners = self.call("vhub.info").get("listeners", {})
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def _read_notices(self, sock: socket.socket) -> None:
        while True:
            try:
                msg = sock.recv(4096).decode()
            except OSError:
                return  # closed by stop()
            with self._notified:
                self.notices.append(msg)
                self._notified.notify_all()

    def wait_notice(self, word: str, timeout: float = 20.0) -> str:
        """The first sd_notify message that contains ``word`` (taken out of
        ``notices``); fails if the process exits first."""
        deadline = time.monotonic() + timeout
        with self._notified:
            while True:
                for msg in self.notices:
                    if word in msg.split("\n"):
                        self.notices.remove(msg)
                        return msg
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {word} from the daemon within {timeout}s: {self.log()[-3000:]}")
                self._notified.wait(min(0.2, left))

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
        if self._notify is not None:
            time.sleep(0.05)  # what it said on the way out (STOPPING=1...) is read by now
            self._notify.shutdown(socket.SHUT_RDWR)
            self._notify.close()
            self._notify = None
            if self._reader is not None:
                self._reader.join(5)
        return self.proc.returncode

    # -- what it is doing --
    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    @property
    def tcp(self) -> tuple[str, int]:
        """The loopback TCP guest listener (``--tcp 127.0.0.1:0``)."""
        host, port = self.listeners["tcp"][:2]
        return host, port

    @property
    def codec(self) -> str:
        return self.call("vhub.info").get("codec", "?")

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0):
        """One daemon call on the control socket (blocking); the result, or RuntimeError."""
        return control_call(self.control, method, params, timeout)

    def cli(self, *args: str, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a ``blink`` client command against this daemon."""
        sub, rest = args[0], args[1:]
        return subprocess.run([self.python, "-m", "vhubd", sub, "--control", self.control, *rest],
                              capture_output=True, timeout=timeout, input=input, cwd=self.tree, env=self.env)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = sock.recv(n - len(buf))
        if not d:
            raise ConnectionError("closed")
        buf += d
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """(msg_type, request_id, payload) of the next frame on a blocking socket."""
    _, _, mt, _, n, rid = HEADER.unpack(recv_exact(sock, HEADER_SIZE))
    return mt, rid, recv_exact(sock, n)


def client_handshake(path: str, hello: dict, timeout: float = 10.0) -> socket.socket:
    """A blocking control-socket client whose handshake was answered."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(encode_frame(MsgType.HANDSHAKE, 1, json.dumps(hello).encode()))
    mt, _, payload = read_frame(s)
    if mt != MsgType.HANDSHAKE:
        s.close()
        raise RuntimeError(f"handshake refused: {payload[:300]!r}")
    return s


def control_call(path: str, method: str, params: dict | None = None, timeout: float = 30.0):
    """One call on a fresh control connection; the result, or RuntimeError with the RpcError."""
    s = client_handshake(path, {"role": "client", "session": "*"}, timeout)
    try:
        body = {"method": method, "params": params or {}}
        s.sendall(encode_frame(MsgType.RPC_REQUEST, 1, json.dumps(body).encode()))
        while True:
            mt, rid, payload = read_frame(s)
            if mt == MsgType.HEARTBEAT:
                continue
            if mt == MsgType.RPC_RESPONSE and rid == 1:
                return json.loads(payload)
            if mt in (MsgType.RPC_ERROR, MsgType.ERROR):
                raise RuntimeError(f"{method}: {payload.decode(errors='replace')}")
    finally:
        s.close()
