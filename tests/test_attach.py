"""``blink attach SESSION EXECUTION`` against a real daemon and real agents
(local backend): back to a detached terminal (scrollback, raw mode, resize,
detach again, the exit code), to a running pipe execution (its scrollback and
live output only, Ctrl-C detaches), to one that has ended; unknown sessions and
executions are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from harness import ROOT, Daemon, wait_for
from test_tty_cli import PROMPT, SETSID, LocalTerminal

PY = sys.executable
pytestmark = pytest.mark.skipif(not os.path.exists(SETSID), reason="needs util-linux setsid -c")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("attachd")
    d = Daemon(base, "--backend", "local", "--state-dir", str(base / "state")).start()
    yield d
    d.stop()


@pytest.fixture
def terminals():
    made: list[LocalTerminal] = []

    def make(daemon, *args, **kw) -> LocalTerminal:
        t = LocalTerminal(daemon, *args, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def blink(d, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vhubd", args[0], "--control", d.control, *args[1:]], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def executions(d, session: str) -> list[int]:
    return json.loads(blink(d, "call", session, "agent.info").stdout)["executions"]


def test_back_to_a_detached_terminal(daemon, terminals):
    t = terminals(daemon, "-t", "-e", "PS1=" + PROMPT.decode(), "att-tty", "--", "sh")
    t.read_until(PROMPT, 30)
    t.type(b"echo before-$((6*7))\r")
    t.read_until(b"before-42")
    t.type(b"\x1d")
    assert t.wait() == 0
    [eid] = executions(daemon, "att-tty")
    a = terminals(daemon, "att-tty", str(eid), command="attach", rows=30, cols=100)
    assert b"before-42" in a.read_until(b"before-42", 20)  # the scrollback
    a.type(b"stty size; echo after-$((2*3))\r")
    assert b"30 100" in a.read_until(b"after-6", 20)  # its window is this terminal's
    a.resize(40, 120)
    a.type(b"stty size\r")
    a.read_until(b"40 120", 20)
    a.type(b"\x1d")  # detach again
    assert a.wait() == 0 and a.settings() == a.before
    said = a.read_until(b"agent.kill")
    assert b"keeps running" in said and f"back: blink attach att-tty {eid}".encode() in said
    b = terminals(daemon, "att-tty", str(eid), command="attach")
    b.read_until(b"after-6", 20)
    b.type(b"exit 5\r")
    assert b.wait(20) == 5 and b.settings() == b.before
    wait_for(lambda: executions(daemon, "att-tty") == [], 10, what="the shell to end")


def start_pipe(d, session: str, script: str) -> int:
    r = blink(d, "call", "--boot", session, "agent.run", json.dumps({"argv": ["sh", "-c", script]}))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["execution_id"]


def test_back_to_a_pipe_execution_and_after_it_ended(daemon, tmp_path):
    flag = tmp_path / "go"
    other = start_pipe(daemon, "att-pipe", "echo other-output; echo other-err >&2")
    eid = start_pipe(daemon, "att-pipe", f"echo first; echo err1 >&2; while [ ! -e {flag} ]; do sleep 0.05; done; "
                                         "echo second; exit 4")
    assert other != eid
    with subprocess.Popen([PY, "-m", "vhubd", "attach", "--control", daemon.control, "att-pipe", str(eid)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as p:
        try:
            assert p.stdout.readline() == b"first\n"  # from the scrollback
            flag.touch()
            assert p.wait(timeout=30) == 4
            assert p.stdout.read() == b"second\n"  # live; nothing of the other execution
            assert p.stderr.read() == b"err1\n"
        finally:
            p.kill()
    r = blink(daemon, "attach", "att-pipe", str(eid))  # it has ended: what is left, and its exit code
    assert r.returncode == 4
    assert r.stdout == "first\nsecond\n"
    assert r.stderr == f"err1\nblink attach: execution {eid} has ended (exit code 4)\n"


def test_ctrl_c_detaches_from_a_pipe_execution(daemon, tmp_path):
    flag = tmp_path / "stop"
    eid = start_pipe(daemon, "att-int", f"echo started; while [ ! -e {flag} ]; do sleep 0.05; done")
    with subprocess.Popen([PY, "-m", "vhubd", "attach", "--control", daemon.control, "att-int", str(eid)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as p:
        try:
            assert p.stdout.readline() == b"started\n"
            time.sleep(0.2)  # let it install its handler after the replay (no timing is asserted)
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=30) == 0
            assert f"detached; execution {eid} keeps running".encode() in p.stderr.read()
        finally:
            p.kill()
    assert eid in executions(daemon, "att-int")
    flag.touch()
    wait_for(lambda: eid not in executions(daemon, "att-int"), 10, what="the execution to end")


def test_unknown_session_and_execution(daemon):
    r = blink(daemon, "attach", "att-nosuch", "1")
    assert r.returncode == 1 and r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith("blink: unknown_session: ")
    assert "att-nosuch" not in [s["name"] for s in daemon.call("vhub.sessions")]
    start_pipe(daemon, "att-known", "true")
    r = blink(daemon, "attach", "att-known", "99999")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("blink attach: no running execution 99999 in session att-known")
    r = blink(daemon, "attach", "att-known", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
