"""Test helpers for the guest agent (no tests here): a tiny BLIN host peer.

``HostPeer`` listens on a Unix socket and hands out ``PeerConn`` objects that speak
raw BLIN bytes with the agent's own codec (blink_agent.wire), blocking, with a
timeout on every wait. ``start_agent`` runs ``python -m blink_agent`` from the source
tree as a real process. Nothing here imports vhubd.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT_SRC = ROOT / "guest-agent"
if str(AGENT_SRC) not in sys.path:
    sys.path.insert(0, str(AGENT_SRC))

from blink_agent.wire import Frame, FrameDecoder, MsgType, encode_frame  # noqa: E402

READY = b"blink-vhub-ready"


def short_socket_path(tmp_path: Path, name: str = "hub.sock") -> str:
    """A Unix socket path under tmp_path, or a short temp dir when that is too long."""
    path = str(tmp_path / name)
    if len(path.encode()) < 100:
        return path
    return os.path.join(tempfile.mkdtemp(prefix="ba-", dir="/tmp"), name)


class PeerConn:
    """One accepted agent connection, seen from the host side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = FrameDecoder(max_payload=64 * 1024 * 1024)
        self.queue: deque = deque()
        self.auto_pong = True
        self.pings_seen: list = []
        self.stream_frames = 0  # Stdout/Stderr/StreamData frames received on this connection
        self.eof = False

    # -- sending ------------------------------------------------------------------
    def send(self, msg_type: int, request_id: int, payload: bytes = b"", flags: int = 0) -> None:
        self.sock.sendall(encode_frame(msg_type, request_id, payload, flags))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, msg_type: int, request_id: int, obj) -> None:
        self.send(msg_type, request_id, json.dumps(obj).encode())

    def request(self, request_id: int, method: str, params=None) -> None:
        self.send_json(MsgType.RpcRequest, request_id, {"method": method, "params": params})

    def hello(self) -> None:
        self.send_json(MsgType.RpcRequest, 0, {"method": "vhub.hello", "params": {"ack": True}})

    def ack(self, frames: int | None = None) -> None:
        n = self.stream_frames if frames is None else frames
        self.send_json(MsgType.RpcRequest, 0, {"method": "vhub.ack", "params": {"frames": n}})

    # -- receiving ----------------------------------------------------------------
    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            self.eof = True
            return False
        for frame in self.dec.feed(data):
            if frame.msg_type == MsgType.Heartbeat and frame.payload == b"" and self.auto_pong:
                self.pings_seen.append(frame.request_id)
                try:
                    self.send(MsgType.Heartbeat, frame.request_id, b"pong")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent pinged, then closed (an Error told it to): its EOF is read next
                continue
            if frame.msg_type in (MsgType.Stdout, MsgType.Stderr, MsgType.StreamData):
                self.stream_frames += 1
            self.queue.append(frame)
        return True

    def recv(self, timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.queue:
            if self.eof:
                raise EOFError("agent closed the connection")
            if not self._fill(deadline) and not self.queue:
                if self.eof:
                    raise EOFError("agent closed the connection")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no frame from the agent within {timeout:.1f} s")
        return self.queue.popleft()

    def recv_none(self, wait: float = 0.3) -> None:
        """Assert that no (non-ping) frame arrives within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.queue and not self.eof:
            self._fill(deadline)
        assert not self.queue, f"unexpected frame {self.queue[0]!r}"

    def wait_eof(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                raise TimeoutError("agent did not close the connection")
            self._fill(deadline)
            self.queue.clear()

    def handshake(self, reply: bytes = READY, hello: bool = False, timeout: float = 10.0) -> bytes:
        """Receive the agent's Handshake, answer it; returns the agent's payload."""
        frame = self.recv(timeout)
        assert frame.msg_type == MsgType.Handshake, frame
        assert frame.request_id == 1, frame
        self.send(MsgType.Handshake, frame.request_id, reply)
        if hello:
            self.hello()
        return frame.payload

    def call(self, request_id: int, method: str, params=None, timeout: float = 10.0):
        """Send a request and return the matching reply frame (other frames are kept)."""
        self.request(request_id, method, params)
        return self.expect(
            lambda f: f.msg_type in (MsgType.RpcResponse, MsgType.RpcError) and f.request_id == request_id,
            timeout,
        )

    def expect(self, predicate, timeout: float = 10.0) -> Frame:
        """The first frame matching ``predicate``; frames before it are kept in order."""
        deadline = time.monotonic() + timeout
        skipped: list = []
        try:
            while True:
                frame = self.recv(max(0.001, deadline - time.monotonic()))
                if predicate(frame):
                    return frame
                skipped.append(frame)
        finally:
            self.queue.extendleft(reversed(skipped))

    def collect_execution(
        self,
        execution_id: int,
        timeout: float = 30.0,
        keep: bool = True,
        ack_every: int = 0,
        answer: bool = True,
    ) -> dict:
        """Read Stdout/Stderr of ``execution_id`` until its execution_result request.

        Returns ``{"stdout" (bytes if keep), "stderr", "sha_out", "sha_err", "result",
        "order": [(type, len)], "other": [frames]}`` and answers the result ``{}``.
        """
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        sha_out, sha_err = hashlib.sha256(), hashlib.sha256()
        n_out = n_err = 0
        order, other = [], []
        while True:
            frame = self.recv(max(0.001, deadline - time.monotonic()))
            if frame.msg_type in (MsgType.Stdout, MsgType.Stderr) and frame.request_id == execution_id:
                if frame.msg_type == MsgType.Stdout:
                    sha_out.update(frame.payload)
                    n_out += len(frame.payload)
                    if keep:
                        out += frame.payload
                else:
                    sha_err.update(frame.payload)
                    n_err += len(frame.payload)
                    err += frame.payload  # always kept: small in every test
                order.append((frame.msg_type, len(frame.payload)))
                if ack_every and self.stream_frames % ack_every == 0:
                    self.ack()
                continue
            if frame.msg_type == MsgType.RpcRequest and frame.request_id != 0:
                body = json.loads(frame.payload)
                if body.get("event") == "execution_result" and body.get("execution_id") == execution_id:
                    if ack_every:
                        self.ack()
                    if answer:
                        self.send(MsgType.RpcResponse, frame.request_id, b"{}")
                    return {
                        "stdout": bytes(out),
                        "stderr": bytes(err),
                        "n_out": n_out,
                        "n_err": n_err,
                        "sha_out": sha_out.hexdigest(),
                        "sha_err": sha_err.hexdigest(),
                        "result": body,
                        "order": order,
                        "other": other,
                        "request_id": frame.request_id,
                    }
            other.append(frame)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class HostPeer:
    """A listening Unix socket standing in for the daemon's guest listener."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns: list = []

    @property
    def addr(self) -> str:
        return "unix:" + self.path

    def accept(self, timeout: float = 10.0) -> PeerConn:
        self.sock.settimeout(timeout)
        try:
            sock, _ = self.sock.accept()
        except TimeoutError:
            raise TimeoutError(f"no agent connected within {timeout:.1f} s") from None
        sock.settimeout(None)
        conn = PeerConn(sock)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def agent_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHUB_")}
    env["PYTHONPATH"] = str(AGENT_SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class AgentProcess:
    """A real ``python -m blink_agent`` process; its stderr goes to a log file."""

    def __init__(
        self,
        args: list,
        log_path: Path,
        env: dict | None = None,
        python: str | None = None,
        stdin=subprocess.DEVNULL,
    ) -> None:
        # BLINK_AGENT_TEST_PYTHON runs the agent under another interpreter (e.g. 3.8).
        python = python or os.environ.get("BLINK_AGENT_TEST_PYTHON") or sys.executable
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [python, "-W", "always::ResourceWarning", "-m", "blink_agent", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env if env is not None else agent_env(),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def start_agent(
    peer: HostPeer,
    tmp_path: Path,
    *extra: str,
    command: str = "serve",
    env: dict | None = None,
    name: str = "agent",
) -> AgentProcess:
    args = [command, "--addr", peer.addr, "--log-level", "debug", *extra]
    return AgentProcess(args, tmp_path / (name + ".log"), env=env)


def test_helpers_self_check(tmp_path):
    """The helpers themselves: a short socket path and a peer that listens there."""
    path = short_socket_path(tmp_path / ("x" * 120))
    assert len(path.encode()) < 108
    os.rmdir(os.path.dirname(path))  # the fallback made a fresh, empty temp dir
    peer = HostPeer(short_socket_path(tmp_path))
    try:
        assert peer.addr.startswith("unix:/")
    finally:
        peer.close()
