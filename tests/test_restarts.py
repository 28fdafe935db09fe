"""Restarts that drop nothing, without systemd (tests/test_systemd_nspawn.py
has the same under a real systemd, 3 restarts or VHUB_RESTARTS under load):
on SIGTERM the daemon stops accepting, tells every connection shutting_down
after what it was sent, half-closes and keeps reading, so a client still
writing gets no reset; an agent's output reaches the next daemon exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from harness import ROOT, Daemon, T, frame, wait_for

PY = sys.executable


def _error_code(raw: bytes) -> str | None:
    """The code of the Error frame among the frames of ``raw`` (pongs and all)."""
    off = 0
    while off + 20 <= len(raw):
        n = int.from_bytes(raw[off + 8:off + 12], "little")
        if raw[off + 5] == T.ERROR:
            return json.loads(raw[off + 20:off + 20 + n])["code"]
        off += 20 + n
    return None


def _client(d: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(d.control)
    s.sendall(frame(T.HANDSHAKE, 1, {"role": "client", "session": "*"}))
    s.recv(65536)  # the handshake answer
    return s


def test_sigterm_tells_every_connection_and_resets_none(tmp_path):
    d = Daemon(tmp_path / "d", "--heartbeat", "0").start()
    clients = [_client(d) for _ in range(5)]
    os.kill(d.pid, signal.SIGTERM)
    # they keep writing while the daemon drains: no EPIPE, no reset
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        for s in clients:
            s.sendall(frame(T.HEARTBEAT, 9))
        time.sleep(0.02)
    for s in clients:
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert _error_code(got) == "shutting_down", got[-200:]
        s.close()
    assert d.proc.wait(15) == 0
    d.stop()


AGENT = """
import os, sys, time, blink_agent
hub = blink_agent.connect()
for i in range(int(sys.argv[1])):
    hub.stdout(b"line %d\\n" % i)
    if i == int(sys.argv[1]) // 2:
        open(sys.argv[2], "w").close()  # half sent: the test restarts the daemon now
        while not os.path.exists(sys.argv[2] + ".go"):
            time.sleep(0.01)
hub.close(60)  # flushes, across the reconnection to the next daemon
print("done", flush=True)
"""


def test_an_agent_across_a_graceful_restart_loses_and_repeats_nothing(tmp_path):
    n = 4000
    d = Daemon(tmp_path / "d", "--heartbeat", "0", "--scrollback", "8m").start()
    token = d.call("vhub.register", {"session": "s"})["token"]
    env = dict(os.environ, VHUB_ADDR=f"unix:{d.socket}", VHUB_SESSION="s", VHUB_TOKEN=token,
               PYTHONPATH=os.path.join(ROOT, "guest-agent"))
    half = str(tmp_path / "half")
    sub = subprocess.Popen([PY, "-m", "vhubd", "tail", "-f", "--control", d.control, "s"], stdout=subprocess.PIPE,
                           cwd=ROOT)
    agent = subprocess.Popen([PY, "-c", AGENT, str(n), half], env=env, stdout=subprocess.PIPE, cwd=ROOT)
    d2 = None
    try:
        wait_for(lambda: os.path.exists(half), 30, what="half the output sent")
        os.kill(d.pid, signal.SIGTERM)  # graceful: subscribers get what was read, the agent its acks
        assert d.proc.wait(15) == 0
        old = sub.stdout.read().splitlines()
        sub.wait(10)
        d.stop()
        open(half + ".go", "w").close()  # the agent sends the rest while no daemon runs
        d2 = Daemon(tmp_path / "d", "--heartbeat", "0", "--scrollback", "8m").start()  # same sockets, same state
        out, _ = agent.communicate(timeout=90)
        assert out.strip() == b"done"
        new = subprocess.run([PY, "-m", "vhubd", "tail", "--control", d2.control, "s"], capture_output=True,
                             timeout=30, cwd=ROOT).stdout.splitlines()
    finally:
        for p in (agent, sub):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        sub.stdout.close()
        agent.stdout.close()
        d.stop()
        if d2 is not None:
            d2.stop()
    want = [b"line %d" % i for i in range(n)]
    assert old + new == want, (len(old), len(new), old[-2:], new[:2])  # exactly once, in order
