"""Blink compatibility, end to end: the bytes a Blink agent sends, against the
real daemon and against ``blink serve --socket P --once`` (DESIGN §1, §3)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest
from harness import READY, ROOT, RawGuest, error_of, frame, header, wait_for

from vhubd.frames import MsgType as T

BLINK_HANDSHAKE = struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, 0, 1)


def test_blink_empty_handshake_gets_exact_ready_frame(daemon):
    g = RawGuest(daemon.socket)
    try:
        g.send_raw(BLINK_HANDSHAKE)
        want = struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, len(READY), 1) + READY
        got = b""
        g.sock.settimeout(10)
        while len(got) < len(want):
            d = g.sock.recv(len(want) - len(got))
            assert d, got
            got += d
        assert got == want
    finally:
        g.close()


@pytest.mark.parametrize("rid", [7, 0xFFFF_FFFF_FFFF_FFFF])
def test_handshake_answer_keeps_request_id(daemon, rid):
    g = RawGuest(daemon.socket)
    try:
        assert g.handshake(b"", rid) == ("ok", READY, rid)
    finally:
        g.close()


# --- blink serve --once ---------------------------------------------------------

class Once:
    """``python -m vhubd serve --socket P --once`` as a subprocess; its stdout
    and stderr go to files (a pipe nobody reads would block it)."""

    def __init__(self, tmp_path, *args):
        self.path = str(tmp_path / "once.sock")
        self.out = open(tmp_path / "once.out", "w+b")
        self.err = open(tmp_path / "once.err", "w+b")
        self.proc = subprocess.Popen([sys.executable, "-m", "vhubd", "serve", "--socket", self.path, "--once",
                                      *args], stdout=self.out, stderr=self.err, cwd=ROOT)
        wait_for(lambda: self.proc.poll() is not None or os.path.exists(self.path), 15, what="once socket")
        assert self.proc.poll() is None, self.finish()

    def finish(self, timeout=15):
        """(exit code, stdout bytes, stderr bytes) once it exits."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        return self.proc.returncode, self._read(self.out), self._read(self.err)

    def stdout_now(self) -> bytes:
        with open(self.out.name, "rb") as f:
            return f.read()

    @staticmethod
    def _read(f) -> bytes:
        f.seek(0)
        return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.out.close()
        self.err.close()


@pytest.fixture
def once(tmp_path):
    made = []

    def start(*args):
        made.append(Once(tmp_path, *args))
        return made[-1]

    yield start
    for o in made:
        o.close()


def read_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n:
        d = sock.recv(n - len(buf))
        if not d:
            break
        buf += d
    return buf


OUT = [b"hello ", b"\x00\xff binary\n", b"x" * 70000]
ERR = [b"warn: 1\n", b"\xfe\xfd"]
REQUEST = json.dumps({"event": "execution_result", "execution_id": 0, "exit_code": 0}).encode()
OUTPUT_FRAMES = (frame(T.STDOUT, 0, OUT[0]) + frame(T.STDERR, 0, ERR[0]) + frame(T.STDOUT, 0, OUT[1])
                 + frame(T.STDERR, 0, ERR[1]) + frame(T.STDOUT, 0, OUT[2]))
ANSWER = header(T.RPC_RESPONSE, 2, 42) + b"{}"


def _send(s: socket.socket, data: bytes, bytewise: bool) -> None:
    if bytewise:
        for i in range(len(data)):
            s.sendall(data[i:i + 1])
    else:
        s.sendall(data)


@pytest.mark.parametrize("bytewise", [False, True], ids=["frames", "bytewise"])
def test_once_transcript(once, bytewise):
    """Blink's agent: handshake, output, one RpcRequest. The output lands on
    stdout/stderr byte for byte, the request is answered ``{}`` with its id and
    printed as one line, the process exits 0 and removes its socket."""
    srv = once()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        _send(s, BLINK_HANDSHAKE, bytewise)
        assert read_exact(s, 20 + len(READY)) == header(T.HANDSHAKE, len(READY), 1) + READY
        _send(s, OUTPUT_FRAMES[:300] if bytewise else OUTPUT_FRAMES, bytewise)
        if bytewise:
            s.sendall(OUTPUT_FRAMES[300:])
        # the output is written before the request comes
        wait_for(lambda: len(srv.stdout_now()) == len(b"".join(OUT)), 10, what="stdout written")
        _send(s, frame(T.RPC_REQUEST, 42, REQUEST), bytewise)
        assert read_exact(s, len(ANSWER)) == ANSWER
        code, out, err = srv.finish()
        assert (code, out, err) == (0, b"".join(OUT) + REQUEST + b"\n", b"".join(ERR))
        assert not os.path.exists(srv.path)
    finally:
        s.close()


def test_once_everything_in_one_write(once):
    """A Blink agent may write handshake, output and request back to back."""
    srv = once()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        s.sendall(BLINK_HANDSHAKE + frame(T.STDOUT, 0, OUT[0]) + frame(T.STDERR, 0, ERR[0])
                  + frame(T.RPC_REQUEST, 42, REQUEST))
        assert read_exact(s, 20 + len(READY) + len(ANSWER)) == (
            header(T.HANDSHAKE, len(READY), 1) + READY + ANSWER)
        code, out, err = srv.finish()
        assert (code, out, err) == (0, OUT[0] + REQUEST + b"\n", ERR[0])
    finally:
        s.close()


def _one_line(err: bytes) -> str:
    text = err.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


def test_once_bad_magic_first_frame(once):
    srv = once()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        s.sendall(header(T.HANDSHAKE, 0, 1, magic=0x4E494C42))
        s.settimeout(10)
        raw = b""
        while d := s.recv(4096):
            raw += d
        assert error_of(raw)[0] == "bad_magic"
        code, out, err = srv.finish()
        assert code != 0 and out == b""
        assert "bad_magic" in _one_line(err)
    finally:
        s.close()


def test_once_agent_closes_before_rpc(once):
    srv = once()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        s.sendall(BLINK_HANDSHAKE + frame(T.STDOUT, 0, b"partial output"))
        assert read_exact(s, 20 + len(READY))[20:] == READY
    finally:
        s.close()
    code, out, err = srv.finish()
    assert code != 0
    assert out == b"partial output"
    assert "closed" in _one_line(err)


def test_once_non_handshake_first_frame(once):
    srv = once()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        s.sendall(frame(T.RPC_REQUEST, 3, REQUEST))
        s.settimeout(10)
        raw = b""
        while d := s.recv(4096):
            raw += d
        assert error_of(raw)[0] == "handshake_required"
    finally:
        s.close()
    code, out, err = srv.finish()
    assert code != 0 and out == b""
    assert "handshake_required" in _one_line(err)


def test_once_handshake_timeout(once):
    srv = once("--handshake-timeout", "1")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.path)
        code, out, err = srv.finish()
    finally:
        s.close()
    assert code != 0 and out == b""
    assert "handshake" in _one_line(err)
