"""Test harness: real daemon processes and raw BLIN guests over real sockets.

``DaemonProc`` runs ``python -m vhubd serve`` in a subprocess on sockets under a
temp dir; ``RawGuest`` is a blocking socket speaking BLIN bytes exactly as a
VMM would deliver them. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from vhubd.frames import MsgType
from vhubd.protocol import Connection, Frame, Handshake, RemoteErrorEvent, Side, StreamRun, encode_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(pred, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class DaemonProc:
    def __init__(self, tmp_path, *args: str, env: dict | None = None, socket_name="vhub.sock"):
        self.dir = str(tmp_path)
        self.socket = os.path.join(self.dir, socket_name)
        self.control = os.path.join(self.dir, "control.sock")
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.logpath = os.path.join(self.dir, f"vhubd-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout=15.0) -> DaemonProc:
        self._log = open(self.logpath, "wb")
        cmd = [sys.executable, "-m", "vhubd", "serve", "--socket", self.socket, "--control", self.control,
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        wait_for(lambda: self.proc.poll() is not None or "vhubd ready" in self.log(), timeout, what="daemon ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
        return self

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

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def cli(self, *args: str, timeout=30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a ``blink`` client command against this daemon."""
        sub, rest = args[0], args[1:]
        return subprocess.run([sys.executable, "-m", "vhubd", sub, "--control", self.control, *rest],
                              capture_output=True, timeout=timeout, input=input, cwd=ROOT, env=self.env)


class RawGuest:
    """A guest (or raw client) as bytes on a blocking socket."""

    def __init__(self, path_or_addr, timeout=10.0):
        if isinstance(path_or_addr, tuple):
            self.sock = socket.create_connection(path_or_addr, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path_or_addr)
        self.conn = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
        self.pending: list = []
        self.closed = False

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg_type, rid, payload=b"") -> None:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        self.sock.sendall(encode_frame(msg_type, rid, payload))

    def handshake(self, payload=b"", rid=1):
        """Send our handshake; return ('ok', payload) or ('error', code, message)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.conn.send_handshake(payload, rid)
        self.sock.sendall(b"".join(self.conn.data_to_send()))
        ev = self.next_event()
        if isinstance(ev, Handshake):
            return ("ok", bytes(ev.payload), ev.request_id)
        if isinstance(ev, RemoteErrorEvent):
            return ("error", ev.code, ev.message)
        return ("other", ev)

    def next_event(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.closed:
                return None
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                raise TimeoutError("no frame from the daemon in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return None
            for ev in self.conn.receive_data(data):
                if isinstance(ev, StreamRun):
                    for f in ev.frames():
                        self.pending.append(Frame(f.msg_type, f.flags, f.request_id, memoryview(bytes(f.data))))
                elif isinstance(ev, Frame):
                    self.pending.append(Frame(ev.msg_type, ev.flags, ev.request_id, memoryview(bytes(ev.data))))
                else:
                    self.pending.append(ev)
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(b"".join(out))
        return self.pending.pop(0)

    def next_frame(self, timeout=10.0, skip=(MsgType.HEARTBEAT,)) -> Frame:
        while True:
            ev = self.next_event(timeout)
            if ev is None or isinstance(ev, RemoteErrorEvent):
                return ev
            if isinstance(ev, Frame) and ev.msg_type not in skip:
                return ev

    def read_until_closed(self, timeout=10.0) -> bytes:
        """Raw bytes until EOF (for checking an Error frame then close)."""
        self.sock.settimeout(timeout)
        chunks = []
        while True:
            try:
                d = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not d:
                break
            chunks.append(d)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def error_of(raw: bytes):
    """(code, message) of the first Error frame in raw bytes, or None."""
    c = Connection(Side.CLIENT, cut_through=1 << 62)
    c.send_handshake()
    for ev in c.receive_data(raw):
        if isinstance(ev, RemoteErrorEvent):
            return ev.code, ev.message
    # the Error may come as the very first frame (before any handshake answer)
    if raw[:4] == b"NILB" and raw[5] == MsgType.ERROR:
        p = json.loads(raw[20:20 + int.from_bytes(raw[8:12], "little")])
        return p["code"], p["message"]
    return None
